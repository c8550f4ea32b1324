"""Quantized plans run: weights folded as qdq fixed points, activations quantized at linear inputs after their rotation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt

pytest.importorskip("transformers")

FORMATS = [rotfn.mxfp4(), rotfn.mxfp4("rceil"), rotfn.nvfp4(), rotfn.intq(4, group=16), rotfn.intq(8), rotfn.fp8("token")]


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2_moe"])
def test_quantized_plans_run_and_stay_close(family, fmt):
    cfg = rt.make_config(family, hidden=64, heads=4, kv_heads=2, layers=2, intermediate=64, bias=True)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=1)
    p = rotfn.params(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = rotfn.call(model, p, None, ids).logits
    plans = [
        rotfn.plans.per_linear(model, rotation=rt.RotationFactory("hadamard", 0, block=32), weights=fmt, acts=fmt),
        rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16), r3=rotfn.hadamard(16),
                           r4=rt.RotationFactory("signed", 2), weights=fmt, acts=fmt),
        rotfn.plans.per_linear(model, rotation=None, weights=fmt, acts=fmt),
    ]
    for plan in plans:
        out = rotfn.call(model, rotfn.fold(p, plan), plan, ids).logits
        err = rt.relative_error(ref, out)
        assert math.isfinite(err) and 0 < err < 0.6, (plan, err)


def test_folded_weights_are_qdq_fixed_points_of_the_rotated_weights():
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=1, intermediate=64)
    model = rt.tiny_model(cfg, dtype=torch.float32)
    p = rotfn.params(model)
    fmt = rotfn.mxfp4()
    R = rotfn.hadamard(64, seed=3)
    plan = rotfn.plans.per_linear(model, rotation=R, weights=fmt)
    folded = rotfn.fold(p, plan)
    assert len(plan.quantized) == 7
    for key in plan.quantized:
        rt.assert_bits_equal(rotfn.qdq(folded[key], fmt), folded[key], name=f"qdq({key})")
        expected = rotfn.qdq(p[key].double() @ R.matrix(), fmt).float()
        rt.assert_bits_equal(folded[key], expected, name=key)


@settings(max_examples=6)
@given(fmt=rt.formats(("mxfp4", "nvfp4", "intq")), rot=rt.rotation_factories(blocks=(None, 16, 32)), data=st.data())
def test_activations_reach_each_linear_rotated_and_quantized(fmt, rot, data):
    cfg = rt.make_config("qwen2", hidden=64, heads=4, kv_heads=2, layers=1, intermediate=64)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=data.draw(rt.seeds()))
    p = rotfn.params(model)
    plan = rotfn.plans.per_linear(model, rotation=rot, acts=fmt)
    ids = data.draw(rt.token_inputs(cfg.vocab_size, padding=False))
    seen_plain, seen_planned = {}, {}

    def record(store, name):
        return lambda m, args, out: store.setdefault(name, args[0].detach().clone())

    def run(params, plan_, store):
        hooks = [m.register_forward_hook(record(store, n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        try:
            rotfn.call(model, params, plan_, **ids)
        finally:
            for h in hooks:
                h.remove()

    run(p, None, seen_plain)
    run(rotfn.fold(p, plan), plan, seen_planned)
    online = {o.site: o for o in plan.online}
    assert set(online) == set(seen_plain) - {"lm_head"}
    for site, o in online.items():
        x = seen_planned[site]
        if fmt.name == "mxfp4":  # MX qdq is idempotent: a quantized input is a fixed point
            rt.assert_bits_equal(rotfn.qdq(x, fmt), x, name=f"{site} input is quantized")
        # in the first layer's attention the plain input is known exactly: compare with qdq(x @ R)
        if site.endswith("self_attn.q_proj"):
            rt.assert_bits_equal(x, rotfn.qdq(rotfn.rotate(seen_plain[site], o.rotation), fmt), name=site)
