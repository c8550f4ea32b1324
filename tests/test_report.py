"""rotfn.report: per-layer SQNR with and without a plan's rotations; rotation helps MXFP4 on outlier channels;
with gptq=True, the output SQNR of round to nearest and GPTQ."""

import dataclasses
import functools
import math

import pytest
import torch

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, DTypeError, FoldError, PlanError, RotfnError, SelectionError

pytest.importorskip("transformers")

HIDDEN, INTERMEDIATE, OUTLIER_GAIN = 64, 128, 50.0


@functools.cache
def outlier_llama():
    """A tiny float32 Llama whose residual norms scale 4 of 64 channels by 50x: LLM-like outlier channels."""
    cfg = rt.make_config("llama", hidden=HIDDEN, heads=4, kv_heads=2, layers=2, intermediate=INTERMEDIATE)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=0)
    hot = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(1))[:4]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[hot] *= OUTLIER_GAIN
            layer.post_attention_layernorm.weight[hot] *= OUTLIER_GAIN
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    return model, ids


def _snapshot(model, p, inputs):
    return ({k: rt.bits(v).clone() for k, v in p.items()},
            {k: rt.bits(v).clone() for k, v in model.state_dict(keep_vars=True).items()},
            {k: v.clone() for k, v in inputs.items()})


def _assert_unchanged(model, p, inputs, snap):
    params_bits, model_bits, inputs_copy = snap
    for k, b in params_bits.items():
        rt.assert_bits_equal(rt.bits(p[k]), b, name=f"params[{k!r}]")
    for k, b in model_bits.items():
        rt.assert_bits_equal(rt.bits(model.state_dict(keep_vars=True)[k]), b, name=f"model {k}")
    assert inputs.keys() == inputs_copy.keys() and all(torch.equal(inputs[k], v) for k, v in inputs_copy.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("block", [None, 32], ids=["full", "block32"])
def test_rotation_lowers_mxfp4_activation_error_on_outlier_channels(block):
    model, ids = outlier_llama()
    p, inputs = rotfn.params(model), {"input_ids": ids}
    fmt = rotfn.mxfp4()
    plan = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.hadamard(n, block=block, seed=0), weights=fmt, acts=fmt)
    snap = _snapshot(model, p, inputs)
    r = rotfn.report(model, p, plan, inputs)
    _assert_unchanged(model, p, inputs, snap)

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert [row.layer for row in r.rows] == linears
    assert all(None not in (row.weight_plain, row.weight_rotated, row.act_plain, row.act_rotated) for row in r.rows)
    # the norm readers see the outlier channels: rotation spreads them over the MX group and lowers the error
    readers = [row for row in r.rows if row.layer.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))]
    assert len(readers) == 10 and all(row.act_rotated > row.act_plain for row in readers), str(r)
    assert sorted(row.act_gain for row in readers)[5] > 1.0 and r.summary()["median_act_gain"] > 0.5, str(r)
    assert r.weights == fmt and r.acts == fmt


def test_report_matches_direct_sqnr_of_the_first_linear_input():
    model, ids = outlier_llama()
    p = rotfn.params(model)
    fmt, R = rotfn.nvfp4(), rotfn.hadamard(HIDDEN, seed=3)
    plan = rotfn.plans.per_linear(model, rotation=R, acts=fmt, where="model.layers.0.self_attn.q_proj")
    seen = {}
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    hook = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        hook.remove()
    (row,) = rotfn.report(model, p, plan, ids).rows
    x = seen["x"]
    xr = rotfn.rotate(x, R)
    for got, y, yq in ((row.act_plain, x, rotfn.qdq(x, fmt)), (row.act_rotated, xr, rotfn.qdq(xr, fmt))):
        signal, noise = y.double().square().sum().item(), (y.double() - yq.double()).square().sum().item()
        assert math.isclose(got, 10 * math.log10(signal / noise), rel_tol=1e-9)
    assert row.weight_plain is None and row.weight_gain is None


def test_quarot_report_covers_every_quantized_linear_and_prints():
    model, ids = outlier_llama()
    p = rotfn.params(model)
    fmt = rotfn.intq(4, group=32)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(HIDDEN, seed=0), r2=rotfn.hadamard(16, seed=1),
                              r4=rotfn.hadamard(INTERMEDIATE, seed=2), weights=fmt, acts=fmt)
    r = rotfn.report(model, p, plan, (ids,))
    quantized = {k.removesuffix(".weight") for k in plan.quantized}
    assert {row.layer for row in r.rows} == quantized and len(r.rows) == 14
    text = str(r)
    assert "x gain" in text and "median gain from rotation" in text and all(row.layer in text for row in r.rows)
    d = r.to_dict()
    assert d["acts"] == fmt.to_dict() and len(d["rows"]) == 14 and set(d["rows"][0]) >= {"layer", "act_gain", "weight_gain"}
    assert d["summary"]["layers"] == 14


def test_summary_lists_layers_where_rotation_hurts():
    rows = (rotfn.LayerReport("a", 8, 10.0, 9.0, 20.0, 23.0), rotfn.LayerReport("b", 8, 10.0, 10.05, None, None))
    r = rotfn.Report(rows, rotfn.nvfp4(), rotfn.nvfp4(), "Plan(...)")
    s = r.summary()
    assert s["weight_hurt"] == ["a"] and s["act_hurt"] == [] and s["median_act_gain"] == 3.0
    assert "rotation hurts weights (< -0.1 dB) on 1: a" in r.summary_line() and "GPTQ" not in r.summary_line()
    rows = tuple(dataclasses.replace(row, out_rtn=15.0, out_gptq=15.0 + g) for row, g in zip(rows, (1.0, 2.5)))
    r = rotfn.Report(rows, rotfn.nvfp4(), rotfn.nvfp4(), "Plan(...)")
    assert r.summary()["median_gptq_gain"] == 1.75
    assert r.summary_line().endswith("GPTQ over round to nearest: median output gain +1.75 dB (in-sample)")


@pytest.mark.parametrize("side", ["weights", "acts"])
def test_a_side_the_plan_does_not_quantize_is_left_out_of_the_views(side):
    """A weights-only plan has no activation columns and no "acts - dB" in its summary (and the other way round)."""
    m = torch.nn.Sequential(torch.nn.Linear(64, 8)).eval()
    plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(64, seed=0), **{side: rotfn.mxfp4()})
    r = rotfn.report(m, rotfn.params(m), plan, torch.randn(4, 64))
    letter, key, other = {"weights": ("W", "weight", "acts"), "acts": ("x", "act", "weights")}[side]
    title, *lines = str(r).splitlines()
    header = next(line.split() for line in lines if line.startswith("layer"))
    assert header == ["layer", "in", letter, "none", letter, "rot", letter, "gain"]
    assert f"median gain from rotation: {side} {r.summary()[f'median_{key}_gain']:+.2f} dB;" in r.summary_line()
    assert other not in r.summary_line() and " - dB" not in str(r) + repr(r)
    assert f"{side} mxfp4" in title and other not in title


@pytest.mark.parametrize("rotation", [lambda n: rotfn.hadamard(n, seed=0), None], ids=["hadamard", "none"])
@pytest.mark.parametrize("fmt", [rotfn.mxfp4(), rotfn.intq(4, group=32), rotfn.nvfp4()], ids=repr)
def test_gptq_output_sqnr_is_at_least_round_to_nearest_on_every_linear(fmt, rotation):
    model, _ = outlier_llama()
    # 256 rows: more than any linear's in-features, so H is full rank and GPTQ cannot hide its error in a null space
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(3))
    p, inputs = rotfn.params(model), {"input_ids": ids}
    plan = rotfn.plans.per_linear(model, rotation=rotation, weights=fmt, acts=fmt)
    snap = _snapshot(model, p, inputs)
    with_gptq = rotfn.report(model, p, plan, inputs, gptq=True)
    _assert_unchanged(model, p, inputs, snap)
    without = rotfn.report(model, p, plan, inputs)

    assert len(with_gptq.rows) == 14 and all(None not in (r.out_rtn, r.out_gptq) for r in with_gptq.rows)
    # GPTQ minimises tr((W'-Q) H (W'-Q)^T) column by column from the round-to-nearest start: never worse in-sample
    assert all(r.out_gptq >= r.out_rtn for r in with_gptq.rows), str(with_gptq)
    assert with_gptq.summary()["median_gptq_gain"] > 1.0, str(with_gptq)
    # the GPTQ columns add to the report and change nothing else
    assert [dataclasses.replace(r, out_rtn=None, out_gptq=None) for r in with_gptq.rows] == list(without.rows)
    assert all(r.out_rtn is r.out_gptq is r.gptq_gain is None for r in without.rows)
    assert without.summary()["median_gptq_gain"] is None
    text, plain_text = str(with_gptq), str(without)
    assert "y GPTQ" in text and "GPTQ over round to nearest" in text and "in-sample" in text
    assert "GPTQ" not in plain_text and plain_text.splitlines()[1].split() == [
        "layer", "in", "W", "none", "W", "rot", "W", "gain", "x", "none", "x", "rot", "x", "gain"]
    row = with_gptq.to_dict()["rows"][0]
    assert row["gptq_gain"] == row["out_gptq"] - row["out_rtn"] and with_gptq.rows[0].out_rtn == row["out_rtn"]


def test_output_sqnr_is_the_error_of_the_linear_outputs_on_recorded_inputs():
    model, ids = outlier_llama()
    p = rotfn.params(model)
    fmt, R = rotfn.intq(4, group=32), rotfn.hadamard(HIDDEN, seed=5)
    rotations = rotfn.plans.quarot(model, r1=R)
    plan = rotfn.plans.quarot(model, r1=R, weights=fmt)
    folded = rotfn.fold(p, rotations)
    seen = {}
    names = [k.removesuffix(".weight") for k in plan.quantized]
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: seen.setdefault(name, args[0].detach().clone())) for name in names]
    try:
        with torch.no_grad():
            torch.func.functional_call(model, folded, (ids,), strict=True)
    finally:
        for hook in hooks:
            hook.remove()
    r = rotfn.report(model, p, plan, ids, gptq=True)
    assert [row.layer for row in r.rows] == names and r.acts is None

    def output_sqnr(x, w, q):  # SQNR of x @ W'.T against x @ Q.T, from the outputs themselves
        y, err = x @ w.double().T, x @ (w.double() - q.double()).T
        return 10 * math.log10(y.square().sum().item() / err.square().sum().item())

    for row in r.rows:
        x = seen[row.layer].reshape(-1, row.in_features).double()
        w = folded[f"{row.layer}.weight"]
        h = x.T @ x / x.shape[0]
        assert math.isclose(row.out_rtn, output_sqnr(x, w, rotfn.qdq(w, fmt)), rel_tol=1e-9), row
        gptq_q = rotfn.dequantize(rotfn.gptq(w, h, fmt), w.dtype)
        assert math.isclose(row.out_gptq, output_sqnr(x, w, gptq_q), rel_tol=1e-9), row


@functools.cache
def ctx():
    model, ids = outlier_llama()
    p = rotfn.params(model)
    fmt = rotfn.mxfp4()
    plan = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.hadamard(n, seed=0), weights=fmt, acts=fmt)
    other = rt.tiny_model(rt.make_config("qwen2", hidden=32, heads=4, kv_heads=2, layers=1, intermediate=48))
    train = rt.tiny_model(rt.make_config("llama", hidden=HIDDEN, heads=4, kv_heads=2, layers=2, intermediate=INTERMEDIATE))
    return {"model": model, "ids": ids, "p": p, "plan": plan, "bare": rotfn.plans.per_linear(model, rotation=None),
            "other": other, "train": train.train(), "folded": rotfn.fold(p, plan)}


def _missing(c):
    p = dict(c["p"])
    del p["model.norm.weight"]
    return p


CASES = [
    (lambda c: rotfn.report("m", c["p"], c["plan"], c["ids"]), ArgumentError, ValueError, r"report: argument 'model': expected a torch.nn.Module"),
    (lambda c: rotfn.report(c["train"], rotfn.params(c["train"]), c["plan"], c["ids"]), ArgumentError, ValueError, r"report: argument 'model': expected a model in eval mode.*fix: call model.eval\(\)"),
    (lambda c: rotfn.report(c["model"], [1], c["plan"], c["ids"]), DTypeError, TypeError, r"report: argument 'params': expected a dict"),
    (lambda c: rotfn.report(c["model"], _missing(c), c["plan"], c["ids"]), SelectionError, KeyError, r"report: argument 'params'.*missing \['model.norm.weight'\]"),
    (lambda c: rotfn.report(c["model"], c["folded"], c["plan"], c["ids"]), FoldError, ValueError, r"report: argument 'params': expected unfolded params.*fix: pass rotfn.params\(model\)"),
    (lambda c: rotfn.report(c["model"], c["p"], "plan", c["ids"]), PlanError, ValueError, r"report: argument 'plan': expected a rotfn.plans.Plan, got str"),
    (lambda c: rotfn.report(c["model"], c["p"], c["bare"], c["ids"]), PlanError, ValueError, r"report: argument 'plan': expected a plan that quantizes linears.*fix: build it with"),
    (lambda c: rotfn.report(c["other"], rotfn.params(c["other"]), c["plan"], c["ids"]), PlanError, ValueError, r"report: argument 'plan': expected a plan built for this model"),
    (lambda c: rotfn.report(c["model"], c["p"], c["plan"], [c["ids"]]), ArgumentError, ValueError, r"report: argument 'inputs': expected a tensor.*got list"),
    (lambda c: rotfn.report(c["model"], c["p"], c["plan"], {1: c["ids"]}), ArgumentError, ValueError, r"report: argument 'inputs'.*got dict"),
    (lambda c: rotfn.report(c["model"], c["p"], c["plan"], {"input_idz": c["ids"]}), ArgumentError, ValueError, r"report: argument 'inputs': expected inputs LlamaForCausalLM accepts, got \w+Error"),
    (lambda c: rotfn.report(c["model"], c["p"], c["plan"], c["ids"].float()), ArgumentError, ValueError, r"report: argument 'inputs': expected inputs LlamaForCausalLM accepts"),
    (lambda c: rotfn.report(c["model"], c["p"], c["plan"], c["ids"], gptq="yes"), ArgumentError, ValueError, r"report: argument 'gptq': expected True or False, got 'yes'.*fix: pass gptq=True"),
    (lambda c: rotfn.report(c["model"], c["p"], c["plan"], c["ids"], gptq=1), ArgumentError, ValueError, r"report: argument 'gptq': expected True or False, got 1"),
]


@pytest.mark.parametrize("case,error,builtin,pattern", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_table(case, error, builtin, pattern):
    c = ctx()
    inputs = {"input_ids": c["ids"]}
    snap = _snapshot(c["model"], c["p"], inputs)
    with pytest.raises(error, match=pattern) as info:
        case(c)
    assert isinstance(info.value, RotfnError) and isinstance(info.value, builtin)
    _assert_unchanged(c["model"], c["p"], inputs, snap)
