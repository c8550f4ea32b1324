"""Every family: per_linear and quarot exact in float64 (<= 1e-10) and float32 (<= 1e-4); family specifics."""

import dataclasses

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn.errors import FamilyError, PlanError

pytest.importorskip("transformers")

optional_rotations = st.one_of(st.none(), rt.rotation_factories())


def _quarot(model, cfg, r1, r2, r3, r4, **kw):
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    return rotfn.plans.quarot(model, r1=r1 and r1(d), r2=r2 and r2(hd), r3=r3 and r3(hd), r4=r4, **kw)


@pytest.mark.parametrize("family", rt.FAMILY_NAMES)
@settings(max_examples=20)
@given(r1=optional_rotations, r2=optional_rotations, r3=optional_rotations, r4=optional_rotations, data=st.data())
def test_quarot_is_exact_in_float64_for_every_family(family, r1, r2, r3, r4, data):
    cfg = data.draw(rt.model_configs((family,)))
    event(f"tied={cfg.tie_word_embeddings}, gqa={cfg.num_key_value_heads < cfg.num_attention_heads}")
    model = rt.tiny_model(cfg, seed=data.draw(rt.seeds()))
    p = rotfn.params(model)
    before = {k: rt.bits(v).clone() for k, v in p.items()}
    plan = _quarot(model, cfg, r1, r2, r3, r4)
    assert plan.family == cfg.model_type
    rt.assert_equivalent(model, p, None, rotfn.fold(p, plan), plan, data.draw(rt.token_inputs(cfg.vocab_size)), rtol=1e-10)
    for k, b in before.items():
        rt.assert_bits_equal(rt.bits(p[k]), b, name=f"input {k}")
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", rt.FAMILY_NAMES)
@settings(max_examples=10)
@given(rotation=rt.rotation_factories(), data=st.data())
def test_per_linear_is_exact_in_float64_for_every_family(family, rotation, data):
    cfg = data.draw(rt.model_configs((family,)))
    model = rt.tiny_model(cfg, seed=data.draw(rt.seeds()))
    p = rotfn.params(model)
    plan = rotfn.plans.per_linear(model, rotation=rotation)
    rt.assert_equivalent(model, p, None, rotfn.fold(p, plan), plan, data.draw(rt.token_inputs(cfg.vocab_size)), rtol=1e-10)


@pytest.mark.parametrize("family", rt.FAMILY_NAMES)
@settings(max_examples=6)
@given(r=rt.rotation_factories(), data=st.data())
def test_float32_stock_models_within_1e4_for_every_family(family, r, data):
    cfg = data.draw(rt.model_configs((family,)))
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=data.draw(rt.seeds()))
    p = rotfn.params(model)
    inputs = data.draw(rt.token_inputs(cfg.vocab_size))
    for plan in (_quarot(model, cfg, r, r, r, r), rotfn.plans.per_linear(model, rotation=r)):
        rt.assert_equivalent(model, p, None, rotfn.fold(p, plan), plan, inputs, rtol=1e-4)


@pytest.mark.parametrize("family", rt.FAMILY_NAMES)
def test_every_family_with_gqa_biases_ties_and_all_four_rotations(family):
    cfg = rt.make_config(family, hidden=64, heads=4, kv_heads=2, layers=2, intermediate=96, tied=True, bias=True,
                         dense_layers=(1,) if family.endswith("_moe") else ())
    model = rt.tiny_model(cfg, seed=7)
    p = rotfn.params(model)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.orthogonal(16, seed=2),
                              r3=rotfn.hadamard(16, seed=3), r4=rt.RotationFactory("orthogonal", 4, block=16))
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    rt.assert_equivalent(model, p, None, rotfn.fold(p, plan), plan, ids, rtol=1e-10)
    assert set(plan.untied) == {"model.embed_tokens.weight", "lm_head.weight"}


def test_qwen3_head_norms_are_left_alone_and_noted():
    cfg = rt.make_config("qwen3", hidden=64, heads=4, kv_heads=2, layers=1)
    model = rt.tiny_model(cfg)
    p = rotfn.params(model)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2), r3=rotfn.orthogonal(16, seed=3))
    folded = rotfn.fold(p, plan)
    for name in ("q_norm", "k_norm"):
        key = f"model.layers.0.self_attn.{name}.weight"
        assert folded[key] is p[key]
        assert all(key not in n.into and key != n.norm for n in plan.norms)
    assert any("q_norm/k_norm" in note and "R3" in note for note in plan.notes)
    touched_qk_rows = [w for w in plan.rotations if w.key.endswith(("q_proj.weight", "k_proj.weight")) and w.side == "output"]
    assert touched_qk_rows == []


def test_r2_is_refused_where_v_has_a_per_head_norm(monkeypatch):
    fam = rotfn.plans.FAMILIES["llama"]
    monkeypatch.setitem(rotfn.plans.FAMILIES, "llama", dataclasses.replace(fam, v_norm="self_attn.v_norm"))
    model = rt.tiny_model(rt.make_config("llama"))
    with pytest.raises(PlanError, match=r"quarot: argument 'r2'.*per-head norm.*fix: leave r2=None"):
        rotfn.plans.quarot(model, r1=None, r2=rotfn.hadamard(8))
    rotfn.plans.quarot(model, r1=rotfn.hadamard(32), r3=rotfn.hadamard(8))  # the rest stays available


def test_phi3_fused_qkv_rotates_only_v_rows_and_gate_up_as_one():
    cfg = rt.make_config("phi3", hidden=64, heads=4, kv_heads=2, layers=1)
    model = rt.tiny_model(cfg)
    p = rotfn.params(model)
    plan = rotfn.plans.quarot(model, r1=None, r2=rotfn.orthogonal(16, seed=1))
    folded = rotfn.fold(p, plan)
    key = "model.layers.0.self_attn.qkv_proj.weight"
    qk_rows = 4 * 16 + 2 * 16
    rt.assert_bits_equal(folded[key][:qk_rows], p[key][:qk_rows], name="q and k rows")
    assert not torch.equal(folded[key][qk_rows:], p[key][qk_rows:])
    full = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=0), r4=rotfn.hadamard(96 if cfg.intermediate_size == 96 else 64))
    assert "model.layers.0.mlp.gate_up_proj.weight" in {w.key for w in full.rotations}


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_moe_every_expert_and_the_shared_expert_are_rotated_and_run(family):
    cfg = rt.make_config(family, hidden=32, heads=4, kv_heads=2, layers=1, experts=4, expert_intermediate=32,
                         shared_intermediate=32)
    model = rt.tiny_model(cfg, seed=2)
    p = rotfn.params(model)
    r1, r4 = rotfn.orthogonal(32, seed=1), rotfn.orthogonal(32, seed=4)
    plan = rotfn.plans.quarot(model, r1=r1, r4=r4, acts=None)
    folded = rotfn.fold(p, plan)
    pre = "model.layers.0.mlp."
    g = p["model.layers.0.post_attention_layernorm.weight"].double()
    R1, R4 = r1.matrix(), r4.matrix()
    for e in range(cfg.num_experts):
        torch.testing.assert_close(folded[pre + "experts.gate_up_proj"][e], (p[pre + "experts.gate_up_proj"][e] * g) @ R1,
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(folded[pre + "experts.down_proj"][e], R1.T @ p[pre + "experts.down_proj"][e] @ R4,
                                   rtol=0, atol=1e-12)
    torch.testing.assert_close(folded[pre + "gate.weight"], (p[pre + "gate.weight"] * g) @ R1, rtol=0, atol=1e-12)
    if family == "qwen2_moe":
        for name in ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert_gate"):
            torch.testing.assert_close(folded[pre + name + ".weight"], (p[pre + name + ".weight"] * g) @ R1, rtol=0, atol=1e-12)
        assert any(o.site == pre + "shared_expert.down_proj" and o.rotation == r4 for o in plan.online)
    hit = set()
    probe = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, a: hit.update(a[1].flatten().tolist()))
    try:
        ids = torch.arange(cfg.vocab_size).reshape(4, -1)
        rt.assert_equivalent(model, p, None, folded, plan, ids, rtol=1e-10)
    finally:
        probe.remove()
    assert hit == set(range(cfg.num_experts)), "every expert must have run for this check to cover it"
    assert any(o.kind == "experts_down" for o in plan.online)


def test_unknown_family_lists_the_supported_ones():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(FamilyError, match=r"quarot: argument 'model': expected a model of a supported family "
                                          r"\['llama', 'mistral', 'phi3', 'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_moe'\]"):
        rotfn.plans.quarot(gpt2, r1=rotfn.hadamard(32))
    assert rotfn.plans.per_linear(gpt2, rotation=None, acts=rotfn.intq(8)).family is None  # needs no adapter


def test_a_parameter_the_adapter_does_not_know_is_refused():
    model = rt.tiny_model(rt.make_config("llama"))
    model.model.layers[0].extra_proj = torch.nn.Linear(32, 32)
    with pytest.raises(PlanError, match=r"quarot: argument 'model'.*unknown \['model.layers.0.extra_proj.weight'"):
        rotfn.plans.quarot(model, r1=rotfn.hadamard(32))


# ----- GPT-2: Conv1D linears store their weight [in, out] (y = x @ W + b) ---------------------------
def _gpt2(dtype=torch.float64, seed=0):
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=16, vocab_size=96, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return rt.tiny_model(cfg, seed=seed, dtype=dtype)


GPT2_LINEARS = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@settings(max_examples=6)
@given(rotation=rt.rotation_factories(), data=st.data())
def test_per_linear_folds_gpt2_conv1d_exactly_in_float64(rotation, data):
    model = _gpt2(seed=data.draw(rt.seeds()))
    p = rotfn.params(model)
    plan = rotfn.plans.per_linear(model, rotation=rotation)
    assert [o.site for o in plan.online] == GPT2_LINEARS  # every Conv1D is a linear site (lm_head left out)
    assert set(plan.transposed) == {f"{s}.weight" for s in GPT2_LINEARS}
    folded = rotfn.fold(p, plan)
    key = "transformer.h.0.mlp.c_proj.weight"  # [256 in, 64 out]: the input side is dim 0
    r = plan.online[3].rotation
    torch.testing.assert_close(folded[key], r.matrix().T @ p[key], rtol=0, atol=1e-12)
    rt.assert_equivalent(model, p, None, folded, plan, data.draw(rt.token_inputs(96)), rtol=1e-10)


def test_gpt2_conv1d_weights_are_quantized_along_their_input_dim():
    model = _gpt2()
    p = rotfn.params(model)
    fmt, r = rotfn.intq(4, group=32), rotfn.hadamard(64, seed=3)
    plan = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.hadamard(n, seed=3), weights=fmt, acts=rotfn.mxfp4())
    folded = rotfn.fold(p, plan)
    key = "transformer.h.1.attn.c_attn.weight"  # [64 in, 192 out]
    expected = rotfn.qdq(rotfn.rotate(p[key], r, dim=0).mT, fmt).mT
    rt.assert_bits_equal(folded[key], expected, name=key)
    # quantized along in: each output column holds 64 / 32 = 2 scale groups, so rows are not groups
    assert not torch.equal(folded[key], rotfn.qdq(rotfn.rotate(p[key], r, dim=0), fmt))
    again = rotfn.Plan.from_dict(plan.to_dict())
    assert again == plan and again.transposed == plan.transposed
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = rotfn.call(model, folded, plan, ids).logits
    assert torch.isfinite(logits).all()
    r_report = rotfn.report(model, p, plan, ids, gptq=True)
    assert [row.layer for row in r_report.rows] == GPT2_LINEARS
    assert all(row.out_gptq >= row.out_rtn for row in r_report.rows)
    calibration = rotfn.calibrate(model, p, plan, [ids], progress=False)
    by_gptq = rotfn.fold(p, plan, weights_by=calibration)
    assert by_gptq[key].shape == p[key].shape and not torch.equal(by_gptq[key], folded[key])


def test_gpt2_folded_directory_round_trips_and_compressed_export_is_refused(tmp_path):
    model = _gpt2()
    p = rotfn.params(model)
    plan = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.orthogonal(n, seed=1), weights=rotfn.mxfp4())
    folded = rotfn.fold(p, plan)
    with pytest.warns(rotfn.errors.CheckpointWarning, match="rotfn-load_hf-only"):
        rotfn.export_hf(model, folded, plan, tmp_path / "hf")
    loaded, params, plan_again = rotfn.load_hf(tmp_path / "hf")
    assert plan_again == plan
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rt.assert_bits_equal(rotfn.call(loaded, params, plan_again, ids).logits, rotfn.call(model, folded, plan, ids).logits)
    with pytest.raises(PlanError, match=r"export_compressed: argument 'plan'.*GPT-2 Conv1D weights stored \[in, out\]"
                                        r".*rotfn fold SRC DST --plan per_linear --weights FORMAT"):
        rotfn.export_compressed(model, folded, plan, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    # the streaming fold of the checkpoint, cut in small pieces, gives the in-memory fold's bits
    model.save_pretrained(tmp_path / "src")
    rotfn.fold_checkpoint(tmp_path / "src", plan, tmp_path / "streamed", progress=False, piece_elements=64 * 16)
    _, streamed, _ = rotfn.load_hf(tmp_path / "streamed")
    for key in plan.transposed:
        rt.assert_bits_equal(streamed[key], folded[key], name=key)
