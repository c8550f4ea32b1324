"""Bad input to params / call / fold / plans / transforms: typed errors naming function, argument and a fix; inputs unchanged."""

import functools

import pytest
import torch

import rotfn
import rotfn.testing as rt
from rotfn import transforms as T
from rotfn.errors import (
    ArgumentError,
    DTypeError,
    FamilyError,
    FoldError,
    FormatError,
    PlanError,
    RotationError,
    RotfnError,
    SelectionError,
    ShapeError,
    SpecError,
)

pytest.importorskip("transformers")


@functools.cache
def ctx():
    """One tiny Llama (hidden 32, head_dim 8, intermediate 48), its params and plans; built once."""
    model = rt.tiny_model(rt.make_config("llama", hidden=32, heads=4, kv_heads=2, layers=1, intermediate=48))
    other = rt.tiny_model(rt.make_config("qwen2", hidden=32, heads=4, kv_heads=2, layers=1, intermediate=48))
    p = rotfn.params(model)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=0))
    return {"model": model, "other": other, "p": p, "plan": plan, "folded": rotfn.fold(p, plan),
            "ids": torch.zeros(1, 3, dtype=torch.long)}


def _missing(c):
    p = dict(c["p"])
    del p["model.norm.weight"]
    return p


R8 = rotfn.hadamard(8)
W = {"w": torch.ones(4, 8)}

CASES = [
    # (call(ctx), error type, builtin it also is, regex the message must match)
    (lambda c: rotfn.params("model"), ArgumentError, ValueError, r"params: argument 'model': expected a torch.nn.Module, got str; fix:"),
    (lambda c: rotfn.call(None, c["p"], None), ArgumentError, ValueError, r"call: argument 'model': expected a torch.nn.Module"),
    (lambda c: rotfn.call(c["model"], [1], None), DTypeError, TypeError, r"call: argument 'params': expected a dict \{name: Tensor\}, got list; fix:"),
    (lambda c: rotfn.call(c["model"], {"w": 1.0}, None), DTypeError, TypeError, r"call: argument 'params'.*str key 'w' -> float"),
    (lambda c: rotfn.call(c["model"], c["p"], "quarot"), PlanError, ValueError, r"call: argument 'plan': expected a rotfn.plans.Plan or None, got str; fix:"),
    (lambda c: rotfn.call(c["model"], _missing(c), None, c["ids"]), SelectionError, KeyError, r"call: argument 'params'.*missing \['model.norm.weight'\].*fix: build params with rotfn.params\(model\)"),
    (lambda c: rotfn.call(c["model"], c["p"], c["plan"], c["ids"]), FoldError, ValueError, r"call: argument 'params': expected params folded with this plan, got unfolded params; fix: params = rotfn.fold"),
    (lambda c: rotfn.call(c["other"], rotfn.params(c["other"]), c["plan"]), PlanError, ValueError, r"call: argument 'plan'"),
    (lambda c: rotfn.call(c["other"], c["folded"], c["plan"]), PlanError, ValueError, r"call: argument 'plan': expected a plan built for this model.*fix: build the plan from this model"),
    (lambda c: rotfn.fold(c["p"], None), PlanError, ValueError, r"fold: argument 'plan': expected a rotfn.plans.Plan, got NoneType; fix:"),
    (lambda c: rotfn.fold(c["folded"], c["plan"]), FoldError, ValueError, r"fold: argument 'params': expected params not folded yet.*fix: fold the original"),
    (lambda c: rotfn.fold(rotfn.params(c["other"]), c["plan"]), PlanError, ValueError, r"fold: argument 'plan': expected a plan for params with signature"),
    (lambda c: rotfn.fold(_missing(c), c["plan"]), PlanError, ValueError, r"fold: argument 'plan'"),
    (lambda c: rotfn.plans.quarot(torch.nn.Linear(2, 2), r1=None), FamilyError, ValueError, r"quarot: argument 'model': expected a model of a supported family \[.*'llama'.*\], got Linear.*fix: add an adapter"),
    (lambda c: rotfn.plans.quarot(c["model"], r1=rotfn.hadamard(64)), ShapeError, ValueError, r"quarot: argument 'r1': expected a rotation of size 32 \(the hidden size of model.embed_tokens\), got Rotation\(hadamard, n=64\); fix: build it for n=32"),
    (lambda c: rotfn.plans.quarot(c["model"], r1=None, r2=rotfn.hadamard(16)), ShapeError, ValueError, r"quarot: argument 'r2': expected a rotation of size 8 \(the head_dim"),
    (lambda c: rotfn.plans.quarot(c["model"], r1=None, r3=rotfn.hadamard(4)), ShapeError, ValueError, r"quarot: argument 'r3': expected a rotation of size 8"),
    (lambda c: rotfn.plans.quarot(c["model"], r1=None, r4=rotfn.hadamard(32)), ShapeError, ValueError, r"quarot: argument 'r4': expected a rotation of size 48 \(the input size of model.layers.0.mlp.down_proj\).*pass a function n -> Rotation"),
    (lambda c: rotfn.plans.quarot(c["model"], r1="hadamard"), RotationError, ValueError, r"quarot: argument 'r1': expected None, a rotfn.Rotation or a function n -> Rotation, got str; fix:"),
    (lambda c: rotfn.plans.quarot(c["model"], r1=None, r4=lambda n: rotfn.hadamard(n, block=32)), RotationError, ValueError, r"quarot: argument 'r4': building the rotation for model.layers.0.mlp.down_proj \(n=48\) failed: hadamard: argument 'block': expected a divisor of n=48, got 32"),
    (lambda c: rotfn.plans.quarot(c["model"], r1=None, r4=lambda n: "H"), RotationError, ValueError, r"quarot: argument 'r4': expected a function returning a rotfn.Rotation, got it returned str"),
    (lambda c: rotfn.plans.quarot(c["model"], r1=None, acts="mxfp4"), FormatError, ValueError, r"quarot: argument 'acts': expected None or a rotfn format spec, got str; fix:"),
    (lambda c: rotfn.plans.quarot(c["model"], r1=None, acts=rotfn.mxfp4()), ShapeError, ValueError, r"quarot: argument 'acts': expected a format whose scale group divides 48.*fix:"),
    (lambda c: rotfn.plans.quarot(c["model"], r1=None, weights=rotfn.mxfp4()), ShapeError, ValueError, r"quarot: argument 'weights'"),
    (lambda c: rotfn.plans.per_linear(c["model"], rotation=R8), ShapeError, ValueError, r"per_linear: argument 'rotation': expected a rotation of size 32 \(the input size of model.layers.0.self_attn.q_proj\)"),
    (lambda c: rotfn.plans.per_linear(c["model"], rotation=lambda n: rotfn.orthogonal(n, seed=0, block=5)), RotationError, ValueError, r"per_linear: argument 'rotation': building the rotation for .* failed: orthogonal: argument 'block': expected a divisor"),
    (lambda c: rotfn.plans.per_linear(c["model"], rotation=None, where="*.q_prj"), SelectionError, KeyError, r"per_linear: argument 'where': expected a filter matching at least one.*fix: use one of the closest keys: \['model.layers.0.self_attn.q_proj'"),
    (lambda c: rotfn.plans.per_linear(c["model"], rotation=None, where=3), ArgumentError, ValueError, r"where: argument 'selectors'"),
    (lambda c: rotfn.plans.per_linear(c["model"], rotation=None, weights=1), FormatError, ValueError, r"per_linear: argument 'weights'"),
    (lambda c: rotfn.plans.per_linear("m", rotation=None), ArgumentError, ValueError, r"per_linear: argument 'model': expected a torch.nn.Module"),
    (lambda c: rotfn.where(), ArgumentError, ValueError, r"where: argument 'selectors': expected at least one selector"),
    (lambda c: rotfn.where(None), ArgumentError, ValueError, r"where: argument 'selectors'.*got NoneType None; fix:"),
    (lambda c: T.rotate_input("R", "w"), RotationError, ValueError, r"rotate_input: argument 'R': expected a rotfn.Rotation, got str; fix:"),
    (lambda c: T.rotate_input(R8, "w", per_head=1), ArgumentError, ValueError, r"rotate_input: argument 'per_head': expected a bool"),
    (lambda c: T.rotate_output(R8, "w", span=(4, 2)), ArgumentError, ValueError, r"rotate_output: argument 'span'"),
    (lambda c: T.rotate_input(R8, "x")(W), SelectionError, KeyError, r"rotate_input: argument 'where'.*fix: use one of the closest keys: \['w'\]"),
    (lambda c: T.rotate_input(rotfn.hadamard(4), "w")(W), ShapeError, ValueError, r"rotate_input: argument 'params\['w'\]': expected dim -1 of size 4.*got shape \(4, 8\); fix: build the rotation for n=8"),
    (lambda c: T.rotate_output(rotfn.hadamard(8), "w")(W), ShapeError, ValueError, r"rotate_output: argument 'params\['w'\]': expected dim -2 of size 8"),
    (lambda c: T.rotate_output(rotfn.hadamard(8), "w", per_head=True)(W), ShapeError, ValueError, r"a multiple of 8 \(heads of size R.n\).*fix: use a rotation whose n is the head size"),
    (lambda c: T.rotate_input(R8, "w")({"w": torch.ones(2, 8, dtype=torch.long)}), DTypeError, TypeError, r"rotate_input: argument 'params\['w'\]': expected a floating tensor"),
    (lambda c: T.rotate_input(R8, "w")([1]), DTypeError, TypeError, r"rotate_input: argument 'params'"),
    (lambda c: T.fuse_norm("n", "w")(W), SelectionError, KeyError, r"fuse_norm: argument 'params': expected a key 'n'.*fix:"),
    (lambda c: T.fuse_norm("n", "w")({**W, "n": torch.ones(4)}), ShapeError, ValueError, r"fuse_norm: argument 'params\['w'\]': expected last dim 4"),
    (lambda c: T.fuse_norm("n", "w", bias="b")({**W, "n": torch.ones(8), "b": torch.ones(8)}), PlanError, ValueError, r"fuse_norm: argument 'bias'.*fix:"),
    (lambda c: T.fuse_norm(3, "w"), ArgumentError, ValueError, r"fuse_norm: argument 'norm'"),
    (lambda c: T.qdq_weights("mxfp4", "w"), FormatError, ValueError, r"qdq_weights: argument 'fmt'"),
    (lambda c: T.qdq_weights(rotfn.mxfp4(), "w")(W), ShapeError, ValueError, r"qdq_weights: argument 'params\['w'\]': expected last dim divisible by .*group of 32.*fix:"),
    (lambda c: rotfn.chain(T.rotate_input(R8, "w"), "x"), ArgumentError, ValueError, r"chain: argument 'transforms'"),
    (lambda c: T.fuse_norm("n", "w").inverse(), ArgumentError, ValueError, r"fuse_norm.inverse: argument 'self'"),
    (lambda c: rotfn.Plan.from_dict({"version": 1}), SpecError, ValueError, r"Plan.from_dict: argument 'd': expected all keys"),
    (lambda c: rotfn.Plan.from_dict({**c["plan"].to_dict(), "version": 9}), SpecError, ValueError, r"Plan.from_dict: argument 'd\['version'\]'"),
    (lambda c: rotfn.Plan.from_dict({**c["plan"].to_dict(), "rotations": [{"key": "w"}]}), SpecError, ValueError, r"Plan.from_dict: argument 'd': expected well-formed entries"),
]


@pytest.mark.parametrize("case,error,builtin,pattern", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_table(case, error, builtin, pattern):
    c = ctx()
    snapshot = {k: rt.bits(v).clone() for k, v in c["p"].items()}
    with pytest.raises(error, match=pattern) as info:
        case(c)
    assert isinstance(info.value, (RotfnError, builtin)) and isinstance(info.value, builtin)
    for k, b in snapshot.items():  # the params used in the failing calls are untouched
        rt.assert_bits_equal(rt.bits(c["p"][k]), b, name=k)
    assert all(len(m._forward_pre_hooks) == 0 for m in c["model"].modules())
