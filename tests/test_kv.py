"""KV-cache quantization (quarot(kv=)): the attention inputs are the reference qdq of the rotated keys / values, bit for bit."""

import functools
import inspect

import pytest
import torch

import rotfn
import rotfn.testing as rt
from rotfn.errors import FormatError, ShapeError
from rotfn.model import Site, call_with

transformers = pytest.importorskip("transformers")

FORMATS = [rotfn.intq(4, symmetric=False), rotfn.intq(8), rotfn.intq(4, group=16, symmetric=False), rotfn.fp8("token"),
           rotfn.mxfp4(), rotfn.nvfp4()]


def _setup(family="llama", **kw):
    cfg = rt.make_config(family, hidden=128, heads=4, kv_heads=2, layers=2, intermediate=128)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=3, outliers=4.0)
    plans = {kv: rotfn.plans.quarot(model, r1=rotfn.hadamard(128, seed=1), r2=rotfn.hadamard(32, seed=2),
                                    r3=rotfn.hadamard(32), kv=kv, **kw) for kv in (None, *FORMATS)}
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return model, rotfn.params(model), plans, ids


def _attention(plan):
    return sorted({o.site for o in plan.online if o.kind == "qk"})


def test_kv_none_is_the_plan_without_it():
    model, _, plans, _ = _setup()
    assert plans[None] == rotfn.plans.quarot(model, r1=rotfn.hadamard(128, seed=1), r2=rotfn.hadamard(32, seed=2),
                                              r3=rotfn.hadamard(32))
    assert plans[None].kv is None and not [o for o in plans[None].online if o.kind in ("key", "value")]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
def test_attention_sees_the_reference_qdq_of_rotated_keys_and_values(family, fmt):
    model, p, plans, ids = _setup(family)
    base, plan = plans[None], plans[fmt]
    assert plan.kv == fmt and rotfn.fold(p, plan).keys() == rotfn.fold(p, base).keys()
    raw, want = {}, {}

    def reference(site, x):   # what the kv-free plan gives the attention, quantized here by hand
        raw[site] = x
        want[site] = rotfn.qdq(x, fmt)
        return want[site]

    sites = [Site(a, point) for a in _attention(plan) for point in ("key", "value")]
    with torch.no_grad():
        ref = call_with(model, rotfn.fold(p, base), base, {s: functools.partial(reference, s) for s in sites}, ids)
        seen = {}
        out = call_with(model, rotfn.fold(p, plan), plan, {s: functools.partial(seen.__setitem__, s) for s in sites}, ids)
    assert torch.equal(out.logits, ref.logits)
    for s in sites:
        assert torch.equal(seen[s], want[s]), s
        assert not torch.equal(seen[s], raw[s]), s
    # layer 0 sees the same float keys with and without kv: they are k R3 (R1 and R2 folded)
    with torch.no_grad():
        plain = {}
        call_with(model, rotfn.fold(p, base), base, {s: functools.partial(plain.__setitem__, s) for s in sites}, ids)
    first = [s for s in sites if ".0." in s.module]
    assert all(torch.equal(plain[s], raw[s]) for s in first)


def test_the_cache_gives_each_token_the_codes_of_one_forward():
    model, p, plans, ids = _setup()
    plan = plans[rotfn.intq(4, symmetric=False)]
    folded = rotfn.fold(p, plan)
    # transformers 5.x renames past_key_values to cache
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        full = rotfn.call(model, folded, plan, ids).logits
        rotfn.call(model, folded, plan, ids[:, :-1], use_cache=True, **{name: cache})
        assert cache.get_seq_length() == ids.shape[1] - 1
        step = rotfn.call(model, folded, plan, ids[:, -1:], use_cache=True, **{name: cache}).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_kv_plans_print_and_round_trip():
    _, _, plans, _ = _setup()
    plan = plans[rotfn.nvfp4()]
    assert rotfn.plans.Plan.from_dict(plan.to_dict()) == plan
    assert "kv=" in repr(plan) and "key" in str(plan) and "value" in str(plan)


def test_kv_alone_and_with_the_whole_recipe():
    model, p, _, ids = _setup()
    alone = rotfn.plans.quarot(model, r1=None, kv=rotfn.intq(4, symmetric=False))
    assert not alone.needs_fold and {o.kind for o in alone.online} == {"key", "value"}
    with torch.no_grad():
        out = rotfn.call(model, p, alone, ids).logits
        ref = rotfn.call(model, p, None, ids).logits
    assert 0 < rt.relative_error(ref, out) < 0.5
    w4a4kv4 = rotfn.plans.quarot(model, r1=rotfn.hadamard(128, seed=1), r2=rotfn.hadamard(32, seed=2),
                                 r3=rotfn.hadamard(32), r4=rotfn.hadamard(128, seed=4), weights=rotfn.intq(4, group=32),
                                 acts=rotfn.intq(4, group=32, clip=0.9), kv=rotfn.intq(4, symmetric=False))
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    folded = rotfn.fold(p, w4a4kv4, weights_by=rotfn.calibrate(model, p, w4a4kv4, batches, progress=False))
    with torch.no_grad():
        assert torch.isfinite(rotfn.call(model, folded, w4a4kv4, ids).logits).all()


def test_bad_kv():
    model, _, _, _ = _setup()
    with pytest.raises(ShapeError, match=r"quarot: argument 'kv': expected a format whose scale group divides 32 "
                                         r"\(the head_dim of model.layers.0.self_attn\)"):
        rotfn.plans.quarot(model, r1=None, kv=rotfn.intq(4, group=64))
    with pytest.raises(FormatError, match=r"quarot: argument 'kv'"):
        rotfn.plans.quarot(model, r1=None, kv="int4")
