"""docs/howto/recipes.md and docs/quickstart.md run as written: their python blocks, in order, in one namespace."""

import pathlib
import re

import pytest

pytest.importorskip("transformers")

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGE = DOCS / "howto" / "recipes.md"


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


def test_the_quickstart_runs_and_quantization_costs_what_it_says(capsys):
    page = DOCS / "quickstart.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 1 and len(blocks[0].splitlines()) <= 40
    ns: dict = {}
    exec(compile(blocks[0], str(page), "exec"), ns)
    quantized, rotated = (float(v) for v in re.findall(r"([\d.]+) dB", capsys.readouterr().out.splitlines()[-1]))
    assert 5 < quantized < 40 and rotated > 100  # MXFP4 costs something; the rotations alone only rounding
