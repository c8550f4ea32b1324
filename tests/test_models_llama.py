"""Llama end to end: params, fold, call; per_linear and quarot R1..R4 exact; ties; purity; no residue on the model."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, FoldError, PlanError
from rotfn.plans import Online

pytest.importorskip("transformers")

LLAMA = ("llama",)
SIGNED_OR_ORTHO = ("signed", "orthogonal", "matrix")  # non-symmetric kinds


def _dims(cfg):
    return cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads


def _quarot(model, cfg, r1, r2, r3, r4, **kw):
    d, hd = _dims(cfg)
    return rotfn.plans.quarot(model, r1=r1 and r1(d), r2=r2 and r2(hd), r3=r3 and r3(hd), r4=r4, **kw)


def _model_state(model):
    """Everything call must leave as it was: hooks, config, module attributes, parameter bits and identities."""
    hooks = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}
    attrs = {name: sorted(vars(m)) for name, m in model.named_modules()}
    config = dict(vars(model.config))
    tensors = {k: (t, rt.bits(t).clone()) for k, t in model.state_dict(keep_vars=True).items()}
    return hooks, attrs, config, tensors


def _assert_same_state(model, state):
    hooks, attrs, config, tensors = state
    now_hooks, now_attrs, now_config, _ = _model_state(model)
    assert now_hooks == hooks, "call left hooks on the model"
    assert now_attrs == attrs, "call changed module attributes"
    assert now_config == config, "call left the config changed"
    for k, t in model.state_dict(keep_vars=True).items():
        assert t is tensors[k][0], f"{k} is another tensor object after call"
        rt.assert_bits_equal(rt.bits(t), tensors[k][1], name=k)


def _snapshot(params):
    return dict(params), {k: rt.bits(v).clone() for k, v in params.items()}


def _assert_unchanged(params, snap):
    objs, bits = snap
    assert params.keys() == objs.keys() and all(params[k] is objs[k] for k in objs)
    for k, b in bits.items():
        rt.assert_bits_equal(rt.bits(params[k]), b, name=k)


optional_rotations = st.one_of(st.none(), rt.rotation_factories())


@settings(max_examples=40)
@given(cfg=rt.model_configs(LLAMA), r1=optional_rotations, r2=optional_rotations, r3=optional_rotations,
       r4=optional_rotations, data=st.data())
def test_quarot_is_exact_in_float64(cfg, r1, r2, r3, r4, data):
    model = rt.tiny_model(cfg, seed=data.draw(rt.seeds()))
    inputs = data.draw(rt.token_inputs(cfg.vocab_size))
    p = rotfn.params(model)
    snap = _snapshot(p)
    plan = _quarot(model, cfg, r1, r2, r3, r4)
    folded = rotfn.fold(p, plan)
    rt.assert_equivalent(model, p, None, folded, plan, inputs, rtol=1e-10)
    _assert_unchanged(p, snap)


@settings(max_examples=15)
@given(cfg=rt.model_configs(LLAMA), rotation=rt.rotation_factories(), data=st.data())
def test_per_linear_is_exact_in_float64(cfg, rotation, data):
    model = rt.tiny_model(cfg, seed=data.draw(rt.seeds()))
    p = rotfn.params(model)
    plan = rotfn.plans.per_linear(model, rotation=rotation)
    rt.assert_equivalent(model, p, None, rotfn.fold(p, plan), plan, data.draw(rt.token_inputs(cfg.vocab_size)), rtol=1e-10)


@pytest.mark.parametrize("kind", SIGNED_OR_ORTHO + ("block",))
@pytest.mark.parametrize("position", ["r1", "r2", "r3", "r4"])
def test_each_position_alone_with_non_symmetric_and_block_rotations(position, kind):
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=96, bias=True, tied=True)
    model = rt.tiny_model(cfg, seed=3)
    factory = rt.RotationFactory("signed", 11, block=8) if kind == "block" else rt.RotationFactory(kind, 11, transposed=True)
    args = {"r1": None, "r2": None, "r3": None, "r4": None, position: factory}
    plan = _quarot(model, cfg, **args)
    rotations = [w.rotation for w in plan.rotations] + [o.rotation for o in plan.online]
    assert rotations and all(not r.symmetric for r in rotations)
    if kind == "block":
        assert all(r.block == 8 for r in rotations)
    p = rotfn.params(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    rt.assert_equivalent(model, p, None, rotfn.fold(p, plan), plan, ids, rtol=1e-10)


@settings(max_examples=10)
@given(cfg=rt.model_configs(LLAMA), r=rt.rotation_factories(), data=st.data())
def test_float32_stock_model_within_1e4(cfg, r, data):
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=data.draw(rt.seeds()))
    p = rotfn.params(model)
    inputs = data.draw(rt.token_inputs(cfg.vocab_size))
    for plan in (_quarot(model, cfg, r, r, r, r), rotfn.plans.per_linear(model, rotation=r)):
        rt.assert_equivalent(model, p, None, rotfn.fold(p, plan), plan, inputs, rtol=1e-4)


def test_stock_float64_rmsnorm_is_the_only_floor():
    """transformers' RMSNorm rounds to float32: that, not rotfn, limits stock float64 models to ~1e-7."""
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    errors = {}
    for exact in (False, True):
        model = rt.tiny_model(cfg, exact_norms=exact, seed=5)
        p = rotfn.params(model)
        plan = rotfn.plans.quarot(model, r1=rotfn.orthogonal(64, seed=1), r2=rotfn.hadamard(16, seed=2))
        errors[exact] = rt.assert_equivalent(model, p, None, rotfn.fold(p, plan), plan, ids, rtol=1e-6)
    assert errors[True] <= 1e-10 < errors[False]


def test_call_without_plan_is_the_model():
    cfg = rt.make_config("llama", layers=2, tied=True)
    model = rt.tiny_model(cfg, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    with torch.no_grad():
        rt.assert_bits_equal(rotfn.call(model, rotfn.params(model), None, ids).logits, model(ids).logits)


def test_params_has_every_name_detached_and_ties_as_one_tensor():
    model = rt.tiny_model(rt.make_config("llama", tied=True), dtype=torch.float32)
    p = rotfn.params(model)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    assert set(p) == names and set(model.state_dict()) <= set(p)
    assert "model.rotary_emb.inv_freq" in p  # non-persistent buffers too: functional_call(strict=True) needs them
    assert p["lm_head.weight"] is p["model.embed_tokens.weight"]
    assert not any(t.requires_grad for t in p.values())
    assert p["model.norm.weight"].data_ptr() == model.model.norm.weight.data_ptr()


def test_call_leaves_the_model_as_it_was():
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=1, layers=2, tied=True)
    model = rt.tiny_model(cfg)
    state = _model_state(model)
    p = rotfn.params(model)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=0), r2=rotfn.hadamard(16, seed=1),
                              r3=rotfn.orthogonal(16, seed=2), r4=rotfn.hadamard(64, seed=3), acts=rotfn.mxfp4())
    seen = []
    probe = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a: seen.append(m.config._attn_implementation))
    try:
        rotfn.call(model, rotfn.fold(p, plan), plan, torch.randint(0, cfg.vocab_size, (1, 4)))
    finally:
        probe.remove()
    assert seen == ["rotfn_sdpa"]
    _assert_same_state(model, state)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(FoldError):  # an error inside call also leaves no residue
        rotfn.call(model, p, plan, torch.zeros(1, 3, dtype=torch.long))
    _assert_same_state(model, state)


def test_online_qk_transform_runs_and_is_exact_with_eager_attention():
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, attn_implementation="eager")
    model = rt.tiny_model(cfg)
    p = rotfn.params(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    plan = rotfn.plans.quarot(model, r1=None, r3=rotfn.orthogonal(16, seed=4))
    rt.assert_equivalent(model, p, None, p, plan, ids, rtol=1e-6)  # eager softmax runs in float32
    # the same sites with a 2-bit quantizer after R3 must change the output: the function really ran
    lossy = rotfn.plans.Plan(**{**vars(plan), "online": tuple(Online(o.site, o.kind, o.rotation, rotfn.intq(2)) for o in plan.online)})
    with pytest.raises(AssertionError, match="max relative error"):
        rt.assert_equivalent(model, p, None, p, lossy, ids, rtol=1e-3)
    assert model.config._attn_implementation == "eager"


def test_tied_embeddings_untied_by_quarot_kept_by_per_linear():
    cfg = rt.make_config("llama", hidden=32, layers=1, tied=True)
    model = rt.tiny_model(cfg)
    p = rotfn.params(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    quarot = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=0))
    assert set(quarot.untied) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert any("untied" in n for n in quarot.notes)
    folded = rotfn.fold(p, quarot)
    assert folded["lm_head.weight"] is not folded["model.embed_tokens.weight"]
    rt.assert_equivalent(model, p, None, folded, quarot, ids, rtol=1e-10)

    kept = rotfn.plans.per_linear(model, rotation=rt.RotationFactory("signed", 1))
    assert kept.untied == () and "lm_head" not in [o.site for o in kept.online]
    folded = rotfn.fold(p, kept)
    assert folded["lm_head.weight"] is folded["model.embed_tokens.weight"] is p["lm_head.weight"]

    head = rotfn.plans.per_linear(model, rotation=rotfn.hadamard(32, seed=1), where=("lm_head", "*.q_proj"))
    assert [o.site for o in head.online] == ["model.layers.0.self_attn.q_proj", "lm_head"] and head.untied
    rt.assert_equivalent(model, p, None, rotfn.fold(p, head), head, ids, rtol=1e-10)


def test_folding_twice_and_calling_unfolded_are_typed_errors():
    cfg = rt.make_config("llama", hidden=32, layers=1)
    model = rt.tiny_model(cfg)
    p = rotfn.params(model)
    snap = _snapshot(p)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=0))
    other = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=1))
    folded = rotfn.fold(p, plan)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(FoldError, match=r"fold: argument 'params': expected params not folded yet.*fix:"):
        rotfn.fold(folded, plan)
    with pytest.raises(FoldError, match="already folded"):
        rotfn.fold(dict(folded), other)  # a plain copy is still recognised
    with pytest.raises(FoldError, match=r"call: argument 'params': expected params folded with this plan.*fix: params = rotfn.fold"):
        rotfn.call(model, p, plan, ids)
    with pytest.raises(FoldError, match=r"call: argument 'params'.*folded with"):
        rotfn.call(model, folded, other, ids)
    with pytest.raises(FoldError, match=r"call: argument 'plan'"):
        rotfn.call(model, folded, None, ids)
    assert isinstance(folded, rotfn.FoldedParams) and folded.plan is plan
    rotfn.call(model, dict(folded), plan, ids)  # the copy still calls with its plan
    _assert_unchanged(p, snap)


def test_plan_is_frozen_printable_and_round_trips():
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=1, tied=True)
    model = rt.tiny_model(cfg)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=0), r2=rotfn.orthogonal(16, seed=1),
                              r3=rotfn.hadamard(16), r4=rotfn.hadamard(64, block=32, seed=2),
                              weights=rotfn.intq(4, group=32), acts=rotfn.mxfp4())
    again = rotfn.Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and hash(again.rotations) == hash(plan.rotations)
    text = str(plan)
    for word in ("R1", "R2", "R3", "R4", "qk", "untied", "intq(4, group=32)", "mxfp4"):
        assert word in text
    with pytest.raises(AttributeError):
        plan.method = "x"
    assert repr(plan).startswith("Plan(quarot, family=llama, model=LlamaForCausalLM")


def test_plan_for_another_model_is_rejected():
    small = rt.tiny_model(rt.make_config("llama", hidden=32, layers=1))
    big = rt.tiny_model(rt.make_config("llama", hidden=64, layers=1))
    plan = rotfn.plans.quarot(small, r1=rotfn.hadamard(32))
    p_big = rotfn.params(big)
    snap = _snapshot(p_big)
    with pytest.raises(PlanError, match=r"fold: argument 'plan': expected a plan for params.*fix: build the plan"):
        rotfn.fold(p_big, plan)
    with pytest.raises(PlanError, match=r"call: argument 'plan': expected a plan built for this model"):
        rotfn.call(big, rotfn.fold(rotfn.params(small), plan), plan, torch.zeros(1, 2, dtype=torch.long))
    _assert_unchanged(p_big, snap)


def test_float32_precision_fold_is_within_one_ulp_of_the_float64_fold():
    cfg = rt.make_config("llama", hidden=256, heads=4, kv_heads=2, layers=2, intermediate=512, vocab=512)
    model = rt.tiny_model(cfg, dtype=torch.bfloat16, seed=0, exact_norms=False)
    p = rotfn.params(model)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(256, seed=0), r2=rotfn.hadamard(64, seed=1))
    exact, fast = rotfn.fold(p, plan), rotfn.fold(p, plan, precision="float32")
    again = rotfn.fold(p, plan)  # the precision held for that call only: float64 again by default
    assert all(torch.equal(again[k], exact[k]) for k in plan.touched())
    same = total = 0
    for k in plan.touched():
        a, b = exact[k].double(), fast[k].double()
        ulp = (torch.nextafter(exact[k], torch.tensor(torch.inf, dtype=torch.bfloat16)).double() - a).abs()
        # one unit in the last place, or float32's rounding error at the tensor's scale for tiny elements
        assert fast[k].dtype == torch.bfloat16 and bool(((a - b).abs() <= torch.maximum(ulp, 2**-20 * a.abs().max())).all()), k
        same, total = same + int((exact[k].view(torch.int16) == fast[k].view(torch.int16)).sum()), total + a.numel()
    assert same >= 0.999 * total, (same, total)  # 4 in 100,000 differ here
    with pytest.raises(ArgumentError, match="fold: argument 'precision'"):
        rotfn.fold(p, plan, precision="half")


def test_without_formats_keeps_the_rotations_and_drops_every_quantizer():
    """quarot W4A4 KV4 with R1..R4, without its formats: the same rotations, no qdq anywhere, a float-exact fold."""
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, tied=True)
    model = rt.tiny_model(cfg, seed=2)
    rotations = {"r1": rotfn.hadamard(64, seed=0), "r2": rotfn.orthogonal(16, seed=1), "r3": rotfn.hadamard(16),
                 "r4": rotfn.hadamard(64, block=32, seed=2)}
    plan = rotfn.plans.quarot(model, **rotations, weights=rotfn.intq(4, group=32), acts=rotfn.mxfp4(), kv=rotfn.intq(4))
    exact = plan.without_formats()
    assert exact == rotfn.plans.quarot(model, **rotations)  # the plan built without formats, entry for entry
    assert exact.rotations == plan.rotations and exact.norms == plan.norms and exact.untied == plan.untied
    assert exact.weights is exact.acts is exact.kv is None and exact.quantized == ()
    assert [o.site for o in exact.online] == [o.site for o in plan.online if o.rotation is not None]
    assert all(o.fmt is None for o in exact.online) and any(o.fmt is not None for o in plan.online)
    assert plan.weights is not None and plan.quantized  # plan itself unchanged
    p = rotfn.params(model)
    folded = rotfn.fold(p, exact)
    reference = rotfn.fold(p, rotfn.plans.quarot(model, **rotations))
    assert all(torch.equal(folded[k], reference[k]) for k in reference)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    rt.assert_equivalent(model, p, None, folded, exact, ids, rtol=1e-10)
