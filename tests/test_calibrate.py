"""rotfn.calibrate + fold(weights_by=): equal to hand-rolled GPTQ loops on tiny models, and better than RTN."""

import dataclasses

import pytest
import torch

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, PlanError

pytest.importorskip("transformers")

FMT = rotfn.intq(4, group=16)


def _setup(family="llama", layers=2, acts=None):
    cfg = rt.make_config(family, hidden=64, heads=4, kv_heads=2, layers=layers, intermediate=128)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=1, outliers=8.0)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16), r4=rotfn.hadamard(128, seed=2),
                              weights=FMT, acts=acts)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (4, 16), generator=gen) for _ in range(3)]
    return model, rotfn.params(model), plan, batches


def _float_plan(plan):
    """What calibrate collects under by default: no weight rounding, no activation formats."""
    return dataclasses.replace(plan, weights=None, quantized=(), acts=None,
                               online=tuple(dataclasses.replace(o, fmt=None) for o in plan.online))


def _hessians(model, params, plan, batches, keys):
    """The inputs of each linear recorded with plain forward hooks on a copy of the model."""
    sums = {k: 0 for k in keys}
    counts = dict.fromkeys(keys, 0)
    sites = {}
    for k in keys:
        def record(x, k=k):
            rows = x.reshape(-1, x.shape[-1]).double()
            sums[k] = sums[k] + rows.T @ rows
            counts[k] += rows.shape[0]
        sites[rotfn.model.Site(k.removesuffix(".weight"))] = record
    with torch.no_grad():
        for b in batches:
            rotfn.model.call_with(model, params, plan, sites, b)
    return {k: sums[k] / counts[k] for k in keys}


def test_one_pass_equals_hand_rolled_gptq():
    model, p, plan, batches = _setup()
    calib = rotfn.calibrate(model, p, plan, batches, progress=False)
    base = _float_plan(plan)
    folded = rotfn.fold(p, base)
    hs = _hessians(model, folded, base, batches, plan.quantized)
    got = rotfn.fold(p, plan, weights_by=calib)
    rtn = rotfn.fold(p, plan)
    for k in got:
        if k in plan.quantized:
            want = rotfn.dequantize(rotfn.gptq(folded[k], hs[k], FMT), folded[k].dtype)
            assert torch.equal(got[k], want), k
            assert not torch.equal(got[k], rtn[k]), k
        else:
            assert torch.equal(got[k], rtn[k]), k
    assert calib.rtn == () and calib.tokens == 3 * 4 * 16


def test_a_fused_groups_input_gram_matrix_is_computed_once(monkeypatch):
    """q/k/v (and gate/up) read one input: its X^T X is computed once per batch and shared, Hessians unchanged."""
    model, p, plan, batches = _setup()
    grams, matmul = [], torch.Tensor.__matmul__

    def counted(a, b):
        if a.dtype == torch.float64 and a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[1]:
            grams.append(a.shape[0])
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", counted)
    calib = rotfn.calibrate(model, p, plan, batches[:1], progress=False, keep_hessians=True)
    monkeypatch.undo()
    # per layer: q/k/v once, o once, gate/up once, down once (7 linears, 4 products)
    assert len(grams) == 2 * 4 and len(plan.shared_scales) == 2 * 2
    base = _float_plan(plan)
    want = _hessians(model, rotfn.fold(p, base), base, batches[:1], plan.quantized)
    for k, h in calib.hessians.items():
        assert torch.equal(h, want[k]), k


def test_sequential_equals_a_layer_by_layer_loop():
    model, p, plan, batches = _setup(layers=3)
    calib = rotfn.calibrate(model, p, plan, batches, sequential=True, progress=False)
    base = _float_plan(plan)
    current = dict(rotfn.fold(p, base))
    for layer in range(3):
        keys = [k for k in plan.quantized if k.startswith(f"model.layers.{layer}.")]
        hs = _hessians(model, rotfn.plans.FoldedParams(current, base), base, batches, keys)
        for k in keys:
            current[k] = rotfn.dequantize(rotfn.gptq(current[k], hs[k], FMT), current[k].dtype)
    got = rotfn.fold(p, plan, weights_by=calib)
    for k in plan.quantized:
        assert torch.equal(got[k], current[k]), k


def test_gptq_model_is_closer_to_the_float_model_than_rtn():
    model, p, plan, batches = _setup(acts=None)
    ref = [rotfn.call(model, p, None, b).logits for b in batches]
    err = {}
    for name, calib in (("rtn", None), ("gptq", rotfn.calibrate(model, p, plan, batches, progress=False)),
                        ("seq", rotfn.calibrate(model, p, plan, batches, sequential=True, progress=False))):
        folded = rotfn.fold(p, plan, weights_by=calib)
        err[name] = sum(rt.relative_error(r, rotfn.call(model, folded, plan, b).logits) for r, b in zip(ref, batches))
    assert err["gptq"] < err["rtn"] and err["seq"] < err["rtn"], err


def test_activation_formats_during_collection():
    model, p, plan, batches = _setup(acts=rotfn.intq(4, group=16))
    plain = rotfn.calibrate(model, p, plan, batches, progress=False, keep_hessians=True)
    quant = rotfn.calibrate(model, p, plan, batches, activations="quantized", progress=False, keep_hessians=True)
    key = plan.quantized[0]
    assert plain.settings["activations"] == "float" and quant.settings["activations"] == "quantized"
    assert not torch.equal(plain.hessians[key], quant.hessians[key])
    folded = rotfn.fold(p, plan, weights_by=quant)
    out = rotfn.call(model, folded, plan, batches[0]).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family, fmt", [("qwen2_moe", FMT), ("qwen3_moe", rotfn.nvfp4())])
def test_fused_experts_are_rounded_by_gptq_expert_by_expert(family, fmt):
    """Each expert of fused experts' [E, out, in] weights gets GPTQ against the Hessian of the tokens routed to it
    (recorded here by hand at the bridge's expert points); an expert no token reaches is rounded to nearest and
    listed; NVFP4's global scale is the whole tensor's, as fold's; per-expert QTensors stack as fold's."""
    from rotfn.ops.quant import nvfp4_shared_global_scale

    cfg = rt.make_config(family, hidden=64, heads=4, kv_heads=2, layers=1, intermediate=64)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=1)
    plan = rotfn.plans.per_linear(model, rotation=None, weights=fmt)
    p = rotfn.params(model)
    # two tokens, 2 of 4 experts each: some experts left out (this seed), the rest GPTQ'd on one or two tokens
    batches = [torch.randint(0, cfg.vocab_size, (1, 2), generator=torch.Generator().manual_seed(5))]
    calib = rotfn.calibrate(model, p, plan, batches, progress=False)
    experts = [k for k in plan.quantized if p[k].ndim == 3]
    assert experts and calib.rtn == ()
    seen: dict = {k: {} for k in experts}
    sites = {}
    for module, p_in, p_down in rotfn.plans.describe(model).experts:
        for param, point in ((p_in, "expert_in"), (p_down, "expert_down")):
            def record(x, e, key=f"{module}.{param}"):
                seen[key].setdefault(e, []).append(x.double().reshape(-1, x.shape[-1]))
            sites[rotfn.model.Site(module, point)] = record
    with torch.no_grad():
        for b in batches:
            rotfn.model.call_with(model, p, _float_plan(plan), sites, b)
    rtn = rotfn.fold(p, plan)
    for k in experts:
        w = p[k]
        fmt_e = rotfn.nvfp4(nvfp4_shared_global_scale([w], fmt).item()) if isinstance(fmt, rotfn.NVFP4) else fmt
        nearest = [rotfn.quantize(w[e], fmt_e) for e in range(w.shape[0])]
        assert torch.equal(rotfn.plans.codes_of(rtn[k]).codes, torch.stack([q.codes for q in nearest])), k
        assert set(calib.unrouted.get(k, ())) == set(range(w.shape[0])) - set(seen[k]) and seen[k], k
        for e in range(w.shape[0]):
            if e not in seen[k]:
                want = nearest[e]
            else:
                x = torch.cat(seen[k][e])
                want = rotfn.gptq(w[e], x.T @ x / x.shape[0], fmt_e)
            assert torch.equal(calib.weights[k].codes[e], want.codes), (k, e)
            assert torch.equal(calib.weights[k].scales[e].float(), want.scales.float()), (k, e)
    folded = rotfn.fold(p, plan, weights_by=calib)
    assert any(not torch.equal(folded[k], rtn[k]) for k in experts)
    assert calib.unrouted and "unrouted experts to nearest" in repr(calib)


def test_fp8_tensor_scaled_experts_are_rounded_to_nearest_and_listed():
    cfg = rt.make_config("qwen2_moe", hidden=64, heads=4, kv_heads=2, layers=1, intermediate=64)
    model = rt.tiny_model(cfg, dtype=torch.float32)
    plan = rotfn.plans.per_linear(model, rotation=None, weights=rotfn.fp8("tensor"))
    p = rotfn.params(model)
    calib = rotfn.calibrate(model, p, plan, [torch.randint(0, cfg.vocab_size, (2, 8))], progress=False)
    folded, rtn = rotfn.fold(p, plan, weights_by=calib), rotfn.fold(p, plan)
    assert calib.rtn and all(p[k].ndim == 3 for k in calib.rtn)
    for k in calib.rtn:
        assert torch.equal(folded[k], rtn[k])
    assert "to nearest" in repr(calib)


def test_the_result_saves_and_loads(tmp_path):
    model, p, plan, batches = _setup(layers=1)
    folded = rotfn.fold(p, plan, weights_by=rotfn.calibrate(model, p, plan, batches, progress=False))
    rotfn.save(tmp_path / "m.safetensors", folded, plan)
    loaded, plan2 = rotfn.load(tmp_path / "m.safetensors")
    assert plan2 == plan and all(torch.equal(loaded[k], folded[k]) for k in folded)


def _same_calibration(a, b):
    """Every field of two calibrations equal, every tensor bit for bit (QTensors: each part)."""
    assert (a.plan, a.rtn, a.tokens, dict(a.settings), dict(a.digests), dict(a.unrouted)) == (
        b.plan, b.rtn, b.tokens, dict(b.settings), dict(b.digests), dict(b.unrouted))
    assert set(a.weights) == set(b.weights) and set(a.input_amax) == set(b.input_amax)
    for k, q in a.weights.items():
        r = b.weights[k]
        assert (q.format, q.shape, q.dtype) == (r.format, r.shape, r.dtype), k
        for part in ("codes", "scales", "global_scale", "zero_points"):
            x, y = getattr(q, part), getattr(r, part)
            assert (x is None and y is None) or torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), (k, part)
    assert all(torch.equal(a.input_amax[k], b.input_amax[k]) for k in a.input_amax)
    assert (a.hessians is None) == (b.hessians is None)
    if a.hessians is not None:
        assert set(a.hessians) == set(b.hessians) and all(torch.equal(a.hessians[k], b.hessians[k]) for k in a.hessians)


@pytest.mark.parametrize("case", ["quarot intq4 + hessians", "moe nvfp4 (unrouted experts)", "nvfp4 fused groups"])
def test_a_calibration_file_holds_every_field_and_folds_the_same_bits(tmp_path, case):
    """rotfn.calibration.save / load: the calibration comes back equal in every field and tensor, and fold with it
    gives the weights fold gives with the original, bit for bit."""
    if case.startswith("moe"):
        cfg = rt.make_config("qwen2_moe", hidden=64, heads=4, kv_heads=2, layers=1, intermediate=64)
        model = rt.tiny_model(cfg, dtype=torch.bfloat16, seed=2)
        plan = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.hadamard(n, block=32), weights=rotfn.nvfp4())
        # one token: 2 of the 4 experts see it, the other two none
        p, batches = rotfn.params(model), [torch.randint(0, cfg.vocab_size, (1, 1), generator=torch.Generator().manual_seed(0))]
    else:
        model, p, plan, batches = _setup(layers=1, acts=rotfn.nvfp4() if case.startswith("nvfp4") else None)
        if case.startswith("nvfp4"):
            plan = dataclasses.replace(plan, weights=rotfn.nvfp4())
            assert plan.shared_scales
    calib = rotfn.calibrate(model, p, plan, batches, keep_hessians="hessians" in case, progress=False)
    path = tmp_path / "c.safetensors"
    rotfn.calibration.save(path, calib)
    again = rotfn.calibration.load(path)
    _same_calibration(calib, again)
    assert bool(calib.unrouted) == case.startswith("moe") and repr(again) == repr(calib)
    want, got = rotfn.fold(p, plan, weights_by=calib), rotfn.fold(p, plan, weights_by=again)
    for k in plan.quantized:
        assert torch.equal(got[k], want[k]), k
        assert torch.equal(rotfn.plans.codes_of(got[k]).codes, rotfn.plans.codes_of(want[k]).codes), k


def test_a_calibration_file_is_not_a_params_file(tmp_path):
    """Each reader refuses the other's file, naming the reader to use; a damaged section and a non-calibration are
    typed errors."""
    import json

    import safetensors
    import safetensors.torch

    from rotfn.errors import CheckpointError

    model, p, plan, batches = _setup(layers=1)
    calib = rotfn.calibrate(model, p, plan, batches, progress=False)
    cal, params = tmp_path / "c.safetensors", tmp_path / "p.safetensors"
    rotfn.calibration.save(cal, calib)
    rotfn.save(params, rotfn.params(model), plan)
    with pytest.raises(CheckpointError, match=r"^load: argument 'path': .*a params file .*got a file with a "
                                              r"'calibration' section; fix: read it with rotfn.calibration.load"):
        rotfn.load(cal)
    with pytest.raises(CheckpointError, match=r"^calibration.load: argument 'path': .*a calibration file .*; fix: "
                                              r"read it with rotfn.load"):
        rotfn.calibration.load(params)
    with safetensors.safe_open(cal, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    doc = json.loads(meta["rotfn"])
    for i, (field, value, pattern) in enumerate([("version", 9, "calibration section version 1, got 9"),
                                                 ("rtn", ["nope"], "a calibration section with rtn"),
                                                 ("digests", {}, "a calibration section with rtn")]):
        broken = {**doc, "calibration": {**doc["calibration"], field: value}}
        path = tmp_path / f"b{i}.safetensors"
        safetensors.torch.save_file(tensors, path, metadata={**meta, "rotfn": json.dumps(broken)})
        with pytest.raises(CheckpointError, match=r"^calibration.load: argument 'path': .*" + pattern):
            rotfn.calibration.load(path)
    with pytest.raises(ArgumentError, match=r"^calibration.save: argument 'calibration': expected a rotfn.calibrate"):
        rotfn.calibration.save(tmp_path / "x.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(ArgumentError, match=r"^calibration.save: argument 'path': expected a path in an existing"):
        rotfn.calibration.save(tmp_path / "no" / "x.safetensors", calib)


def test_bad_input():
    model, p, plan, batches = _setup(layers=1)
    calib = rotfn.calibrate(model, p, plan, batches, progress=False)
    other = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=5), weights=FMT)
    with pytest.raises(PlanError, match=r"fold: argument 'weights_by': expected a calibration of this plan"):
        rotfn.fold(p, other, weights_by=calib)
    changed = {k: (v * 1.5 if k in plan.quantized else v) for k, v in p.items()}
    with pytest.raises(PlanError, match=r"expected a calibration of these params"):
        rotfn.fold(changed, plan, weights_by=calib)
    with pytest.raises(ArgumentError, match=r"fold: argument 'weights_by': expected None or a rotfn.calibrate\(\.\.\.\) result"):
        rotfn.fold(p, plan, weights_by={"a": 1})
    unquantized = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1))
    with pytest.raises(PlanError, match=r"calibrate: argument 'plan': expected a plan that quantizes weights"):
        rotfn.calibrate(model, p, unquantized, batches)
    with pytest.raises(ArgumentError, match=r"calibrate: argument 'activations'"):
        rotfn.calibrate(model, p, plan, batches, activations="int4")
    with pytest.raises(ArgumentError, match=r"gptq: argument 'damp'"):
        rotfn.calibrate(model, p, plan, batches, damp=-1.0)
    with pytest.raises(ArgumentError, match=r"argument 'data'"):
        rotfn.calibrate(model, p, plan, [])


def test_input_amax_and_static_input_scales():
    """amax of each linear's inputs, as the plan's online rotation leaves them; NVFP4 / FP8 scales from it."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    r = {64: rotfn.hadamard(64, seed=3), 32: rotfn.hadamard(32, seed=4)}
    plan = rotfn.plans.per_linear(m, rotation=lambda n: r[n], weights=FMT)
    batches = [torch.randn(40, 64) * 3, torch.randn(24, 64)]
    calib = rotfn.calibrate(m, rotfn.params(m), plan, batches, progress=False)
    with torch.no_grad():
        first = [rotfn.rotate(b, r[64]) for b in batches]
        second = [rotfn.rotate(torch.relu(m[0](b)), r[32]) for b in batches]
    want = {"0.weight": max(x.abs().max() for x in first), "2.weight": max(x.abs().max() for x in second)}
    assert sorted(calib.input_amax) == ["0.weight", "2.weight"]
    for key, a in want.items():
        torch.testing.assert_close(calib.input_amax[key], a.float(), rtol=1e-6, atol=0)
        assert calib.input_scale(key, rotfn.nvfp4()).item() == pytest.approx(a.item() / 2688, rel=1e-6)
        assert calib.input_scale(key, rotfn.fp8()).item() == pytest.approx(a.item() / 448, rel=1e-6)
    with pytest.raises(PlanError, match="input_scale"):
        calib.input_scale("1.weight", rotfn.nvfp4())
    with pytest.raises(rotfn.errors.FormatError, match="nvfp4"):
        calib.input_scale("0.weight", rotfn.mxfp4())


def test_a_model_that_is_one_linear_is_rounded_by_gptq():
    """The root module's weight ("weight", no module prefix) gets its Hessian too, as any linear's."""
    m = torch.nn.Linear(32, 4)
    plan = rotfn.plans.per_linear(m, rotation=None, weights=FMT)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    calib = rotfn.calibrate(m, rotfn.params(m), plan, [x], progress=False)
    assert calib.rtn == () and calib.tokens == 64
    h = x.double().T @ x.double() / 64
    want = rotfn.gptq(m.weight.detach(), h, FMT)
    assert torch.equal(calib.weights["weight"].codes, want.codes)
