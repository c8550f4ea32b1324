"""rotfn.fold and rotfn.fold_checkpoint keep their bits: every output tensor's sha256 against a stored table.

The table (``tests/data/fold_digests.json``) was written by the fold engines of the first round, before the
engine was rebuilt (regenerated once since, when NVFP4 fused partitions began to share one measured global
scale, which changed those keys only); a refactor that changes a single bit of any folded tensor, on any family, precision or
plan kind, fails here. Regenerate only for an intended change of results: ``python tests/test_fold_digests.py``.
"""

import hashlib
import json
import os
import pathlib
import sys
import tempfile

import pytest
import torch

import rotfn
from rotfn.testing.models import FAMILY_NAMES, make_config, tiny_model

TABLE = pathlib.Path(__file__).parent / "data" / "fold_digests.json"
DENSE = tuple(f for f in FAMILY_NAMES if not f.endswith("_moe"))  # fold_checkpoint: dense families only

PLANS = {
    "quarot r1..r4 mxfp4": lambda m, d, hd: rotfn.plans.quarot(
        m, r1=rotfn.hadamard(d, seed=0), r2=rotfn.hadamard(hd, seed=1), r3=rotfn.hadamard(hd),
        r4=lambda n: rotfn.hadamard(n, seed=2), weights=rotfn.mxfp4()),
    "quarot r1 orthogonal": lambda m, d, hd: rotfn.plans.quarot(m, r1=rotfn.orthogonal(d, seed=3)),
    "per_linear block nvfp4": lambda m, d, hd: rotfn.plans.per_linear(
        m, rotation=lambda n: rotfn.hadamard(n, block=16, seed=4), weights=rotfn.nvfp4()),
    "per_linear signed int4": lambda m, d, hd: rotfn.plans.per_linear(
        m, rotation=lambda n: rotfn.hadamard(n, seed=5), weights=rotfn.intq(4, group=16)),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _config(family, tied):
    return make_config(family, hidden=64, heads=4, kv_heads=2, layers=2, vocab=96, intermediate=96, tied=tied,
                       bias=family in ("llama", "qwen3"))


def _digests(params) -> dict[str, str]:
    out = {}
    for key in sorted(params):
        t = params[key].detach().contiguous().cpu()
        head = f"{key}|{t.dtype}|{tuple(t.shape)}|".encode()
        out[key] = hashlib.sha256(head + t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return out


def _model(family, dtype, tied):
    return tiny_model(_config(family, tied), seed=7, dtype=DTYPES[dtype])


def fold_cases():
    for family in FAMILY_NAMES:
        for dtype in DTYPES:
            for plan in PLANS:
                for precision in ("float64", "float32"):
                    yield f"fold {family} {dtype} {plan} {precision} tied={family == 'qwen2'}"


def checkpoint_cases():
    for family in DENSE:
        for plan in ("quarot r1..r4 mxfp4", "per_linear block nvfp4"):
            for precision in ("float64", "float32"):
                yield f"fold_checkpoint {family} bfloat16 {plan} {precision} tied={family == 'llama'}"


def compute(case: str) -> dict[str, str]:
    engine, family, dtype, rest = case.split(" ", 3)
    rest, tied = rest.rsplit(" tied=", 1)
    plan_name, precision = rest.rsplit(" ", 1)
    model = _model(family, dtype, tied == "True")
    d = model.config.hidden_size
    hd = d // model.config.num_attention_heads
    build = lambda m: PLANS[plan_name](m, d, hd)  # noqa: E731
    if engine == "fold":
        return _digests(rotfn.fold(rotfn.params(model), build(model), precision=precision))
    import safetensors.torch

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "src"), os.path.join(tmp, "dst")
        model.save_pretrained(src, max_shard_size="60KB")
        rotfn.fold_checkpoint(src, build, dst, max_shard_size="50KB", progress=False, precision=precision)
        stored = {}
        for name in os.listdir(dst):
            if name.endswith(".safetensors"):
                stored.update(safetensors.torch.load_file(os.path.join(dst, name)))
        return _digests(stored)


CASES = [*fold_cases(), *checkpoint_cases()]


@pytest.fixture(scope="module")
def table():
    return json.loads(TABLE.read_text())


def test_the_table_covers_every_case(table):
    assert sorted(table) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_every_folded_tensor_keeps_its_bits(table, case):
    got = compute(case)
    assert sorted(got) == sorted(table[case])
    changed = [k for k in got if got[k] != table[case][k]]
    assert not changed, f"{case}: {len(changed)} of {len(got)} tensors changed bits, e.g. {changed[:4]}"


if __name__ == "__main__":
    os.environ["HF_HUB_OFFLINE"] = "1"
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text(json.dumps({c: compute(c) for c in CASES}, indent=0, sort_keys=True) + "\n")
    print(f"wrote {len(CASES)} cases to {TABLE}", file=sys.stderr)
