"""docs/howto/recipes.md runs as written: its python blocks, in order, in one namespace."""

import pathlib
import re

import pytest

pytest.importorskip("transformers")

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "howto" / "recipes.md"


def test_recipes_run_and_every_recipe_rounds_by_gptq(capsys):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 4
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), ns)
    losses = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines()]
    assert len(losses) == 4 and all(0 < v < 20 for v in losses)
    rotfn, params = ns["rotfn"], ns["params"]
    for plan, folded in ((ns["quarot"], ns["w4a4kv4"]), (ns["learned"].plan, ns["spinquant"]), (ns["plan"], ns["folded"])):
        rtn = rotfn.fold(params, plan)
        assert plan.quantized and all(not (folded[k] == rtn[k]).all() for k in plan.quantized)
