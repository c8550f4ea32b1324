"""rotfn.export_compressed, proven with compressed-tensors itself: transformers loads the directory and
computes rotfn.call's logits; compressed-tensors' decompression gives rotfn's weights bit for bit."""

import dataclasses
import json
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, FormatError, PlanError

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402

from rotfn.io._compressed import pack_int32  # noqa: E402

BF16 = "bfloat16"
WEIGHTS = {  # bf16 models: scales held in bf16 where compressed-tensors keeps them in the model's dtype
    "mxfp4": rotfn.mxfp4(), "mxfp4-even": rotfn.mxfp4("even"), "nvfp4": rotfn.nvfp4("pow2"),
    "int4-g32": rotfn.intq(4, group=32, scale_dtype=BF16), "int3-g32": rotfn.intq(3, group=32, scale_dtype=BF16),
    "int8-row": rotfn.intq(8, scale_dtype=BF16), "fp8-channel": rotfn.fp8("channel", scale_dtype=BF16),
    "fp8-tensor": rotfn.fp8("tensor", scale_dtype=BF16),
}


def _model(family: str):
    cfg = rt.make_config(family, hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128)
    return rt.tiny_model(cfg, dtype=torch.bfloat16, seed=1, outliers=8.0).eval()


def _plan(model, kind: str, fmt, acts=None):
    if kind == "quarot":
        return rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2), weights=fmt,
                                  acts=acts, r3=None, r4=None)
    return rotfn.plans.per_linear(model, rotation=None, weights=fmt, acts=acts)


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def _export_and_load(tmp_path, model, plan, folded, **kw):
    """The exported directory through transformers, its weights decompressed (a first forward does it)."""
    rotfn.export_compressed(model, folded, plan, tmp_path, **kw)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        loaded(_ids(model)[:, :2])
    return loaded


def _serve(path, model):
    """What an engine runs: the loaded model with the online entries of the transform config applied
    (transformers 5 loads only the quantization; compressed-tensors' own transforms, weights from the directory)."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors.torch import load_file
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        loaded(_ids(model)[:, :2])
    config = TransformConfig.model_validate(_qconfig(path)["transform_config"])
    for scheme in config.config_groups.values():
        scheme.apply = [a for a in scheme.apply if a.location == "input"]  # the weight_input inverse is folded in
    apply_transform_config(loaded, config)
    stored, state = load_file(path / "model.safetensors"), loaded.state_dict()
    keys = [k for k in stored if k.endswith("_input.weight")]
    assert keys and all(k in state for k in keys)
    with torch.no_grad():
        for k in keys:
            state[k].copy_(stored[k])
    return loaded


def _qconfig(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("kind", ["per_linear", "quarot"])
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_transformers_loads_rotfns_weights_and_logits(tmp_path, family, kind, name):
    """Weight-only plans: every decompressed weight is rotfn's bit for bit, so the logits are rotfn.call's exactly."""
    model = _model(family)
    plan = _plan(model, kind, WEIGHTS[name])
    folded = rotfn.fold(rotfn.params(model), plan)
    loaded = _export_and_load(tmp_path, model, plan, folded)
    state = loaded.state_dict()
    for key in plan.quantized:
        rt.assert_bits_equal(state[key], folded[key], name=key)
    with torch.no_grad():
        rt.assert_bits_equal(loaded(_ids(model)).logits, rotfn.call(model, folded, plan, _ids(model)).logits)
    qc = _qconfig(tmp_path)
    QuantizationConfig.model_validate(qc)
    assert "lm_head" in qc["ignore"] and not any(k.removesuffix(".weight") in qc["ignore"] for k in plan.quantized)
    assert not list(tmp_path.glob("rotfn*"))


ROTATIONS = {  # online input rotations and the compressed-tensors transform type each becomes
    "sylvester": (rotfn.hadamard(128), "hadamard", None),
    "signed": (rotfn.hadamard(128, seed=3), "random-hadamard", None),
    "block-sylvester": (rotfn.hadamard(128, block=32), "hadamard", 32),
    "block-orthogonal": (rotfn.orthogonal(128, seed=4, block=32), "random-hadamard", 32),
    "order-12-blocks": (rotfn.hadamard(96, block=12), "random-hadamard", 12),
}


@pytest.mark.parametrize("name", list(ROTATIONS))
def test_r4_exports_as_an_online_transform_with_rotfns_logits(tmp_path, name):
    """QuaRot R1+R2+R4: R4 becomes an ``input`` transform on down_proj (a Sylvester Hadamard as type "hadamard",
    anything else as a stored matrix); with compressed-tensors' own transforms the served logits are rotfn.call's,
    bit for bit (MXFP4 weights and compressed-tensors' activation rule, mxfp4("even"))."""
    r4, kind, head_dim = ROTATIONS[name]
    intermediate = r4.n
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=intermediate)
    model = rt.tiny_model(cfg, dtype=torch.bfloat16, seed=1, outliers=8.0).eval()
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2), r4=r4, r3=None,
                              weights=rotfn.mxfp4(), acts=rotfn.mxfp4("even"))
    folded = rotfn.fold(rotfn.params(model), plan)
    rotfn.export_compressed(model, folded, plan, tmp_path)
    (scheme,) = _qconfig(tmp_path)["transform_config"]["config_groups"].values()
    assert (scheme["type"], scheme["head_dim"]) == (kind, head_dim)
    assert [a["location"] for a in scheme["apply"]] == ["input", "weight_input"]
    assert scheme["apply"][0]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    want = rotfn.call(model, folded, plan, _ids(model)).logits
    with torch.no_grad():
        unrotated = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(_ids(model)).logits
        served = _serve(tmp_path, model)(_ids(model)).logits
    assert not torch.equal(unrotated, want)  # the transform is what makes them agree
    rt.assert_bits_equal(served, want)


def test_per_linear_input_rotations_share_one_transform_per_fused_linear(tmp_path):
    """per_linear with a block rotation on every linear's input: one scheme per distinct rotation, q/k/v and
    gate/up in the same one (vLLM fuses them), logits bit for bit through compressed-tensors' transforms."""
    model = _model("qwen3")
    plan = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.hadamard(n, block=32, seed=5),
                                  weights=rotfn.mxfp4(), acts=rotfn.mxfp4("even"))
    folded = rotfn.fold(rotfn.params(model), plan)
    rotfn.export_compressed(model, folded, plan, tmp_path)
    groups = _qconfig(tmp_path)["transform_config"]["config_groups"]
    assert len(groups) == 2  # inputs of size 64 and of size 128 (down_proj)
    for scheme in groups.values():
        targets = scheme["apply"][0]["targets"]
        assert scheme["type"] == "random-hadamard" and scheme["head_dim"] is None  # random signs span all n
        for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            parents = {t.rpartition(".")[0] for t in targets if t.rpartition(".")[2] in fused}
            assert all(f"{p}.{leaf}" in targets for p in parents for leaf in fused)
    with torch.no_grad():
        rt.assert_bits_equal(_serve(tmp_path, model)(_ids(model)).logits,
                             rotfn.call(model, folded, plan, _ids(model)).logits)


def test_gptq_rounded_params_export_their_own_codes(tmp_path):
    model = _model("llama")
    plan = _plan(model, "quarot", rotfn.intq(4, group=32, scale_dtype=BF16))
    p = rotfn.params(model)
    batches = [_ids(model) for _ in range(2)]
    folded = rotfn.fold(p, plan, weights_by=rotfn.calibrate(model, p, plan, batches, progress=False))
    assert not torch.equal(folded["model.layers.0.mlp.down_proj.weight"],
                           rotfn.fold(p, plan)["model.layers.0.mlp.down_proj.weight"])  # GPTQ, not RTN
    loaded = _export_and_load(tmp_path, model, plan, folded)
    for key in plan.quantized:
        rt.assert_bits_equal(loaded.state_dict()[key], folded[key], name=key)


def test_mxfp4_activations_even_rule_is_compressed_tensors_quantizer(tmp_path):
    """compressed-tensors' dynamic MXFP4 activation quantizer is rotfn's mxfp4("even"): the same logits, bit for bit."""
    model = _model("llama")
    plan = _plan(model, "quarot", rotfn.mxfp4(), acts=rotfn.mxfp4("even"))
    folded = rotfn.fold(rotfn.params(model), plan)
    loaded = _export_and_load(tmp_path, model, plan, folded)
    acts = _qconfig(tmp_path)["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] is True and acts["group_size"] == 32
    with torch.no_grad():
        rt.assert_bits_equal(loaded(_ids(model)).logits, rotfn.call(model, folded, plan, _ids(model)).logits)


CT_RULE = "compressed-tensors"


@pytest.mark.parametrize("weights, acts, fmt_name", [
    (rotfn.fp8("channel", scale_dtype=BF16), rotfn.fp8("token", rule=CT_RULE), "float-quantized"),
    (rotfn.intq(8, scale_dtype=BF16), rotfn.intq(8, rule=CT_RULE), "int-quantized"),
    (rotfn.fp8("channel", scale_dtype=BF16), rotfn.fp8("token"), "float-quantized"),
    (rotfn.intq(8, scale_dtype=BF16), rotfn.intq(8), "int-quantized"),
], ids=["fp8-ct", "int8-ct", "fp8-rotfn", "int8-rotfn"])
def test_dynamic_token_activations(tmp_path, weights, acts, fmt_name):
    """Per-token fp8 / int8 activations: written as dynamic token quantization. With rule="compressed-tensors"
    rotfn.call quantizes as the library does (bf16 arithmetic) and the served logits are rotfn's bit for bit;
    rotfn's own rules (fp32 arithmetic, int8 scale amax / 127) agree to that rounding only."""
    model = _model("llama")
    plan = _plan(model, "quarot", weights, acts=acts)
    folded = rotfn.fold(rotfn.params(model), plan)
    loaded = _export_and_load(tmp_path, model, plan, folded)
    group = _qconfig(tmp_path)["config_groups"]["group_0"]
    assert group["format"] == fmt_name and group["input_activations"]["strategy"] == "token"
    with torch.no_grad():
        a, b = loaded(_ids(model)).logits, rotfn.call(model, folded, plan, _ids(model)).logits
    if acts.rule == CT_RULE:
        rt.assert_bits_equal(a, b)
    else:
        assert not torch.equal(a, b) and rt.relative_error(a.float(), b.float()) < 0.05


def _ct_qdq(x, num_bits, kind):
    """compressed-tensors' own dynamic per-token quantize-dequantize (what its forward hook runs on a linear's input)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
    args = QuantizationArgs(num_bits=num_bits, type=kind, symmetric=True, strategy="token", dynamic=True)
    scale, zero = compute_dynamic_scales_and_zp(x, args, module=None)
    return fake_quantize(x, scale, zero, args)


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), seed=st.integers(0, 2**16),
       spread=st.floats(0.0, 6.0), zero_rows=st.integers(0, 2))
def test_compressed_tensors_rule_is_the_librarys_quantizer(dtype, seed, spread, zero_rows):
    """rule="compressed-tensors": fp8 per token bit for bit as compressed-tensors' quantizer, int8 with equal values
    (rotfn's integer codes carry no sign of zero: where the library returns -0.0, rotfn returns +0.0); rows of
    zeros (scale eps) and signed zeros included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 64, generator=g) * torch.logspace(-spread, spread, 8)[None, :, None]
    x[0, :zero_rows] = 0.0
    x[1, 0, ::3] = -0.0
    x = x.clamp(-6e4, 6e4).to(dtype)  # finite in float16 (non-finite rows follow rotfn's NaN rule, not the library's)
    fp8 = rotfn.qdq(x, rotfn.fp8("token", rule=CT_RULE))
    rt.assert_bits_equal(fp8, _ct_qdq(x, 8, "float"))
    int8 = rotfn.qdq(x, rotfn.intq(8, rule=CT_RULE))
    ref = _ct_qdq(x, 8, "int")
    assert torch.equal(int8, ref) and int8.dtype == ref.dtype


def test_nvfp4_activations_take_static_global_scales_from_calibration(tmp_path):
    model = _model("llama")
    plan = _plan(model, "quarot", rotfn.nvfp4("pow2"), acts=rotfn.nvfp4("pow2"))
    p = rotfn.params(model)
    folded = rotfn.fold(p, plan)
    with pytest.raises(ArgumentError, match="argument 'calibration'"):
        rotfn.export_compressed(model, folded, plan, tmp_path / "no")
    assert not (tmp_path / "no").exists()
    calib = rotfn.calibrate(model, p, plan, [_ids(model)], progress=False)
    loaded = _export_and_load(tmp_path, model, plan, folded, calibration=calib)
    from safetensors.torch import load_file
    stored = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj"
    assert stored[f"{key}.input_global_scale"].item() == 1 / calib.input_scale(f"{key}.weight", plan.acts).item()
    assert _qconfig(tmp_path)["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
    with torch.no_grad():
        a, b = loaded(_ids(model)).logits.float(), rotfn.call(model, folded, plan, _ids(model)).logits.float()
    assert rt.relative_error(a, b) < 0.2  # served: static global scales; rotfn.call: each batch's own


def test_nvfp4s_default_rule_serves_within_one_rounding(tmp_path):
    """quarot with rotfn.nvfp4() weights and activations (s_g = amax / 2688, no power of two) exports;
    compressed-tensors divides by the stored 1 / s_g, so a served bf16 weight is rotfn's but where the float32
    roundings of s_b / G and of s_b * s_g land on two sides of a bf16 rounding boundary (one bf16 step apart), and
    the served logits are rotfn.call's up to that and the activations' static global scales."""
    model = _model("llama")
    plan = _plan(model, "quarot", rotfn.nvfp4(), acts=rotfn.nvfp4())
    p = rotfn.params(model)
    folded = rotfn.fold(p, plan)
    calib = rotfn.calibrate(model, p, plan, [_ids(model)], progress=False)
    loaded = _export_and_load(tmp_path, model, plan, folded, calibration=calib)
    state, moved, total = loaded.state_dict(), 0, 0
    for key in plan.quantized:
        served, ours = state[key].float(), folded[key].float()
        assert ((served - ours).abs() <= ours.abs() * 2.0**-7).all(), key  # one bf16 step at most
        moved, total = moved + int((served != ours).sum()), total + ours.numel()
    assert moved <= total // 1000
    from safetensors.torch import load_file
    stored = load_file(tmp_path / "model.safetensors")
    scales = [v.item() for k, v in stored.items() if k.endswith("weight_global_scale")]
    assert len(scales) == len(plan.quantized) and all(math.frexp(g)[0] != 0.5 for g in scales)  # not powers of two
    with torch.no_grad():
        a, b = loaded(_ids(model)).logits.float(), rotfn.call(model, folded, plan, _ids(model)).logits.float()
    assert rt.relative_error(a, b) < 0.2  # served: static activation global scales; rotfn.call: each batch's own


@pytest.mark.parametrize("fmt", [rotfn.intq(4, group=32, symmetric=False, scale_dtype=BF16),
                                 rotfn.intq(8, group=32, symmetric=False, scale_dtype=BF16),
                                 rotfn.intq(2, symmetric=False, scale_dtype=BF16)])
def test_asymmetric_weights_decompress_bit_for_bit(tmp_path, fmt):
    """compressed-tensors' own pack-quantized decompressor on the written tensors (transformers' loader does not
    read asymmetric pack-quantized checkpoints in compressed-tensors 0.20: its meta shapes ignore the packing)."""
    from safetensors.torch import load_file
    model = _model("llama")
    plan = _plan(model, "per_linear", fmt)
    folded = rotfn.fold(rotfn.params(model), plan)
    rotfn.export_compressed(model, folded, plan, tmp_path)
    qc = _qconfig(tmp_path)
    QuantizationConfig.model_validate(qc)
    group = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**group["weights"]))
    compressor = BaseCompressor.load_from_registry(group["format"])
    stored = load_file(tmp_path / "model.safetensors")
    for key in plan.quantized:
        name = key.removesuffix(".weight")
        local = {k.removeprefix(name + "."): v for k, v in stored.items() if k.startswith(name + ".")}
        weight = compressor.decompress(local, scheme)["weight"]
        rt.assert_bits_equal(weight.to(folded[key].dtype), folded[key], name=key)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), n=st.integers(1, 100), seed=rt.seeds())
def test_pack_int32_is_compressed_tensors_packing(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2**bits, (rows, n), generator=g)
    want = pack_to_int32((u - 2 ** (bits - 1)).to(torch.int8), bits)
    rt.assert_bits_equal(pack_int32(u, bits), want)


def _folded(fmt=WEIGHTS["int4-g32"], **kw):
    model = _model("llama")
    plan = _plan(model, "quarot", fmt, **kw)
    return model, plan, rotfn.fold(rotfn.params(model), plan)


def test_bad_exports_are_typed_errors_and_write_nothing(tmp_path):
    model, plan, folded = _folded()
    r3 = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r3=rotfn.hadamard(16), weights=WEIGHTS["int4-g32"])
    kv = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), kv=rotfn.intq(4, group=16),
                            weights=WEIGHTS["int4-g32"])
    per = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.hadamard(n, block=32), weights=WEIGHTS["int4-g32"])
    k_site = "model.layers.0.self_attn.k_proj"
    split = dataclasses.replace(per, online=tuple(
        dataclasses.replace(o, rotation=rotfn.hadamard(64, seed=9)) if o.site == k_site else o for o in per.online))
    copied = {k: v.clone() for k, v in folded.items()}
    edited = _folded()[2]
    edited["model.layers.0.mlp.up_proj.weight"].mul_(2)  # in place: the tensor keeps its codes, its values change
    mx8 = _folded(rotfn.mxfp8())
    fp32_scales = _folded(rotfn.intq(4, group=32))
    cases = [
        (lambda d: rotfn.export_compressed(model, rotfn.fold(rotfn.params(model), r3), r3, d), PlanError,
         r"expected a plan whose online side is at linear inputs.*online .*rotation at .*self_attn.*kind 'qk'"),
        (lambda d: rotfn.export_compressed(model, rotfn.fold(rotfn.params(model), kv), kv, d), PlanError,
         r"kind '(key|value)'.*fix: drop it"),
        (lambda d: rotfn.export_compressed(model, rotfn.fold(rotfn.params(model), split), split, d), PlanError,
         r"one online input rotation for all of model.layers.0.self_attn.\{q_proj,k_proj,v_proj\}"),
        (lambda d: rotfn.export_compressed(model, rotfn.params(model), None, d), PlanError, r"a plan that quantizes"),
        (lambda d: rotfn.export_compressed(model, rotfn.plans.FoldedParams(copied, plan), plan, d), PlanError,
         r"carrying its .* codes"),
        (lambda d: rotfn.export_compressed(model, edited, plan, d), PlanError,
         r"a weight changed since"),
        (lambda d: rotfn.export_compressed(mx8[0], mx8[2], mx8[1], d), FormatError, r"export MXFP8 with rotfn.export_hf"),
        (lambda d: rotfn.export_compressed(fp32_scales[0], fp32_scales[2], fp32_scales[1], d), FormatError,
         r"fix: build the plan with weights=rotfn.intq\(4, group=32, scale_dtype='bfloat16'\)"),
        (lambda d: rotfn.export_compressed(model, folded, plan, d, max_shard_size="big"), ArgumentError,
         r"max_shard_size"),
    ]
    for i, (call, error, pattern) in enumerate(cases):
        out = tmp_path / str(i)
        with pytest.raises(error, match=pattern):
            call(out)
        assert not out.exists() or not os.listdir(out), f"case {i} wrote files"


def test_the_serving_howto_runs_as_written(capsys):
    import pathlib
    import re
    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "howto" / "serving.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    assert len(blocks) == 2
    exec(compile("\n".join(blocks), str(page), "exec"), {})
    assert capsys.readouterr().out.split() == ["pack-quantized", "True", "hadamard"]


def _layer_groups(layer: int = 1) -> tuple[tuple[str, ...], ...]:
    base = f"model.layers.{layer}"
    return (tuple(f"{base}.self_attn.{p}_proj.weight" for p in "qkv"),
            (f"{base}.mlp.gate_proj.weight", f"{base}.mlp.up_proj.weight"))


@pytest.mark.parametrize("kind", ["per_linear", "quarot"])
def test_fused_partitions_share_one_measured_nvfp4_global_scale(tmp_path, kind):
    """vLLM loads q/k/v (and gate/up) into one linear with one global scale: plans group them (shared_scales),
    the fold measures one scale over each group (the largest partition's: q, scaled by 16 here), the served
    weights are rotfn's bit for bit; a plan without the groups is a typed error, not a wrong served model."""
    model = _model("llama")
    p = dict(rotfn.params(model))
    qkv, gate_up = _layer_groups()
    p[qkv[0]] = p[qkv[0]] * 16
    plan = _plan(model, kind, rotfn.nvfp4("pow2"))
    assert qkv in plan.shared_scales and gate_up in plan.shared_scales and len(plan.shared_scales) == 4
    folded = rotfn.fold(p, plan)
    alone = rotfn.fold(p, dataclasses.replace(plan, shared_scales=()))
    for group in (qkv, gate_up):
        own = {k: rotfn.plans.codes_of(alone[k]).global_scale for k in group}
        shared = {k: rotfn.plans.codes_of(folded[k]).global_scale for k in group}
        assert len(set(own.values())) > 1 or group == gate_up
        assert all(s == max(own.values()) for s in shared.values())
        assert all(rotfn.plans.codes_of(folded[k]).format == plan.weights for k in group)
    k_shared, k_alone = (rotfn.plans.codes_of(f[qkv[1]]).scales.float() for f in (folded, alone))
    assert torch.equal(k_shared * 16, k_alone)  # k got q's 16x global scale: its block scales are 16x smaller
    rt.assert_bits_equal(folded[qkv[0]], alone[qkv[0]])
    with pytest.raises(PlanError, match=r"one NVFP4 global scale for model.layers.1.self_attn.\{q_proj,k_proj,v_proj\}"):
        rotfn.export_compressed(model, alone, dataclasses.replace(plan, shared_scales=()), tmp_path / "no")
    assert not (tmp_path / "no").exists()
    loaded = _export_and_load(tmp_path / "yes", model, plan, folded)
    for key in plan.quantized:
        rt.assert_bits_equal(loaded.state_dict()[key], folded[key], name=key)
    with torch.no_grad():
        ids = _ids(model)
        rt.assert_bits_equal(loaded(ids).logits, rotfn.call(model, folded, plan, ids).logits)


def test_gptq_rounds_fused_partitions_with_the_groups_global_scale(tmp_path):
    """calibrate (GPTQ) measures a fused group's NVFP4 global scale over the group's folded weights, as the
    fold does, so its codes export; the written global scales of q/k/v are one."""
    model = _model("llama")
    plan = _plan(model, "quarot", rotfn.nvfp4("pow2"))
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(3))
    calib = rotfn.calibrate(model, rotfn.params(model), plan, [ids], progress=False)
    folded = rotfn.fold(rotfn.params(model), plan, weights_by=calib)
    for group in plan.shared_scales:
        assert len({calib.weights[k].global_scale.item() for k in group}) == 1, group
    loaded = _export_and_load(tmp_path, model, plan, folded)
    for key in plan.quantized:
        rt.assert_bits_equal(loaded.state_dict()[key], folded[key], name=key)


def _moe(fmt):
    cfg = rt.make_config("qwen3_moe", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128)
    model = rt.tiny_model(cfg, dtype=torch.bfloat16, seed=1, outliers=8.0).eval()
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2), weights=fmt,
                              r3=None, r4=None)
    return model, plan, rotfn.fold(rotfn.params(model), plan)


@pytest.mark.parametrize("fmt", [rotfn.mxfp4(), rotfn.nvfp4(None), rotfn.fp8("channel", scale_dtype=BF16),
                                 rotfn.fp8("tensor", scale_dtype=BF16)], ids=repr)
def test_moe_experts_export_per_expert_and_transformers_computes_rotfns_logits(tmp_path, fmt):
    """Qwen3-MoE: the fused 3-D experts are written per expert and projection (the names transformers saves and
    vLLM loads), the routers listed under ignore; transformers fuses them back to rotfn's experts, bit for bit."""
    model, plan, folded = _moe(fmt)
    assert any(k.endswith("experts.gate_up_proj") for k in plan.quantized)
    loaded = _export_and_load(tmp_path, model, plan, folded)
    from safetensors.torch import load_file
    stored = load_file(tmp_path / "model.safetensors")
    part = "weight" if isinstance(fmt, rotfn.specs.formats.FP8) else "weight_packed"
    for e in range(model.config.num_experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{proj}.{part}" in stored
    assert {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"} <= set(_qconfig(tmp_path)["ignore"])
    state = loaded.state_dict()
    for key in plan.quantized:
        rt.assert_bits_equal(state[key], folded[key], name=key)
    with torch.no_grad():
        rt.assert_bits_equal(loaded(_ids(model)).logits, rotfn.call(model, folded, plan, _ids(model)).logits)


@pytest.mark.parametrize("fmt", [rotfn.nvfp4("pow2"), rotfn.intq(4, group=32, scale_dtype=BF16),
                                 rotfn.intq(8, scale_dtype=BF16)], ids=repr)
def test_moe_experts_decompress_bit_for_bit(tmp_path, fmt):
    """Every expert's tensors through compressed-tensors' own decompressor equal rotfn's expert rows, bit for bit
    (transformers 5.25's fused-experts loader drops weight_global_scale and runs int experts in float64: reader
    limits, so the files are checked with the library's compressor)."""
    from safetensors.torch import load_file
    from transformers.core_model_loading import revert_weight_conversion
    model, plan, folded = _moe(fmt)
    rotfn.export_compressed(model, folded, plan, tmp_path)
    group = _qconfig(tmp_path)["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**group["weights"]))
    compressor = BaseCompressor.load_from_registry(group["format"])
    stored = load_file(tmp_path / "model.safetensors")
    experts = revert_weight_conversion(model, {k: folded[k] for k in plan.quantized if "experts" in k})
    assert len(experts) == 2 * 3 * model.config.num_experts
    for name, want in experts.items():
        base = name.removesuffix(".weight")
        local = {k.removeprefix(base + "."): v for k, v in stored.items() if k.startswith(base + ".")}
        rt.assert_bits_equal(compressor.decompress(local, scheme)["weight"].to(want.dtype), want, name=name)


def _tensors_in(directory) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, f)))
    return out


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].contiguous().view(-1).view(torch.uint8).tolist() == b[k].contiguous().view(-1).view(torch.uint8).tolist(), k


STREAMED = {  # plan builders for the skeleton the streaming export gets
    "quarot-r4-mxfp4": lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2),
                                                    r4=rotfn.hadamard(128, seed=3), r3=None, weights=rotfn.mxfp4(),
                                                    acts=rotfn.mxfp4("even")),
    "per-linear-int4": lambda m: rotfn.plans.per_linear(m, rotation=lambda n: rotfn.hadamard(n, block=32),
                                                        weights=rotfn.intq(4, group=32, scale_dtype=BF16)),
    "quarot-nvfp4-fixed": lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=1), weights=rotfn.nvfp4(2.0**-6)),
    "per-linear-nvfp4-shared": lambda m: rotfn.plans.per_linear(m, rotation=lambda n: rotfn.hadamard(n, block=16),
                                                                weights=rotfn.nvfp4("pow2")),
    "quarot-fp8-tensor": lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=1),
                                                      weights=rotfn.fp8("tensor", scale_dtype=BF16),
                                                      acts=rotfn.fp8("token")),
}


@pytest.mark.parametrize("name", list(STREAMED))
def test_streaming_export_equals_the_in_memory_export_byte_for_byte(tmp_path, name):
    """fold_checkpoint(..., export="compressed-tensors") on a saved checkpoint: the tensors of export_compressed
    of the in-memory fold, byte for byte, and the same quantization config; shards cut at max_shard_size."""
    model = _model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="60KB")
    plan = STREAMED[name](model)
    rotfn.export_compressed(model, rotfn.fold(rotfn.params(model), plan), plan, tmp_path / "memory")
    stats = rotfn.fold_checkpoint(src, STREAMED[name], tmp_path / "stream", export="compressed-tensors",
                                  max_shard_size="40KB", progress=False)
    assert stats.shards > 1 and (tmp_path / "stream" / "model.safetensors.index.json").exists()
    assert not [f for f in os.listdir(tmp_path / "stream") if f.startswith(".")]
    _assert_same_tensors(_tensors_in(tmp_path / "memory"), _tensors_in(tmp_path / "stream"))
    assert _qconfig(tmp_path / "memory") == _qconfig(tmp_path / "stream")
    largest = max(t.numel() for t in model.state_dict().values())
    assert stats.peak_held_bytes <= 40_000 + largest * (2 + 8 + 2)  # a shard, the largest tensor, its float64 fold
    if name != "per-linear-int4":  # asymmetric-free int4 loads too; this one checks logits once more end to end
        return
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    folded = rotfn.fold(rotfn.params(model), plan)
    with torch.no_grad():
        loaded(_ids(model)[:, :2])
    for key in plan.quantized:
        rt.assert_bits_equal(loaded.state_dict()[key], folded[key], name=key)


def test_streaming_export_errors_write_nothing(tmp_path):
    model = _model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    cases = [
        (dict(plan=lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64), r3=rotfn.hadamard(16),
                                                weights=rotfn.mxfp4()), export="compressed-tensors"),
         PlanError, r"fold_checkpoint: .*kind 'qk'"),
        (dict(plan=lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64), weights=rotfn.mxfp8()),
              export="compressed-tensors"), FormatError, r"fold_checkpoint: .*export MXFP8 with rotfn.export_hf"),
        (dict(plan=lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64), weights=rotfn.mxfp4()), export="vllm"),
         ArgumentError, r"argument 'export'"),
        (dict(plan=lambda m: dataclasses.replace(rotfn.plans.per_linear(m, rotation=None, weights=rotfn.nvfp4("pow2")),
                                                 shared_scales=()),  # a plan that does not group q/k/v
              export="compressed-tensors"), PlanError, r"one NVFP4 global scale"),
    ]
    with torch.no_grad():  # q's global scale differs from k's and v's: found only once they are folded
        model.get_parameter("model.layers.1.self_attn.q_proj.weight").mul_(16)
    model.save_pretrained(src)
    for i, (kw, error, pattern) in enumerate(cases):
        out = tmp_path / str(i)
        with pytest.raises(error, match=pattern):
            rotfn.fold_checkpoint(src, kw["plan"], out, export=kw["export"], progress=False)
        left = os.listdir(out) if out.exists() else []
        assert not [f for f in left if f != rotfn.io.MARKER], (i, left)


def test_rotfn_fold_export_through_the_command_line(tmp_path):
    import subprocess
    import sys
    model = _model("llama")
    model.save_pretrained(tmp_path / "src")
    done = subprocess.run([sys.executable, "-m", "rotfn", "fold", str(tmp_path / "src"), str(tmp_path / "out"),
                           "--r1", "hadamard", "--r2", "hadamard", "--r4", "hadamard", "--weights", "int4",
                           "--export", "compressed-tensors", "--quiet"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "format pack-quantized, online transforms: R4" in done.stdout
    qc = _qconfig(tmp_path / "out")
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert qc["transform_config"]["config_groups"]["R4"]["type"] == "random-hadamard"  # --seed: random signs
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.isfinite(loaded(_ids(model)).logits).all()


@pytest.mark.parametrize("fmt", [rotfn.intq(4, group=32, scale_dtype=BF16), rotfn.nvfp4(None), rotfn.nvfp4("pow2"),
                                 rotfn.mxfp4()], ids=repr)
def test_streaming_export_of_a_moe_checkpoint_equals_the_in_memory_export(tmp_path, fmt):
    """A Qwen3-MoE checkpoint holds its experts per expert: the streaming export folds and packs each on its own
    (an NVFP4 global scale over all experts measured first), byte for byte the in-memory export of the fused
    experts; an FP8 tensor scale over all experts is refused."""
    model, plan, folded = _moe(fmt)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="60KB")
    rotfn.export_compressed(model, folded, plan, tmp_path / "memory")
    build = lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2),  # noqa: E731
                                         weights=fmt, r3=None, r4=None)
    rotfn.fold_checkpoint(src, build, tmp_path / "stream", export="compressed-tensors", max_shard_size="40KB",
                          progress=False)
    memory, stream = _tensors_in(tmp_path / "memory"), _tensors_in(tmp_path / "stream")
    assert any(".experts.3.down_proj.weight" in k for k in stream)
    _assert_same_tensors(memory, stream)
    assert _qconfig(tmp_path / "memory") == _qconfig(tmp_path / "stream")
    with pytest.raises(PlanError, match=r"act on each expert's rows alone"):
        rotfn.fold_checkpoint(src, lambda m: dataclasses.replace(build(m), weights=rotfn.fp8("tensor", scale_dtype=BF16)),
                              tmp_path / "no", export="compressed-tensors", progress=False)


@pytest.mark.parametrize("fmt", [rotfn.nvfp4(None), rotfn.intq(4, group=32, scale_dtype=BF16)], ids=repr)
def test_gptq_experts_export_streaming_and_in_memory_alike_and_transformers_computes_rotfns_logits(tmp_path, fmt):
    """Qwen3-MoE with GPTQ on every linear and, one problem per expert, on the fused experts: the in-memory export
    of fold(weights_by=) loads into transformers with rotfn.call's logits bit for bit, and the streaming export of
    the checkpoint (experts held per expert) writes its tensors byte for byte."""
    model, plan, _ = _moe(fmt)
    p = rotfn.params(model)
    calib = rotfn.calibrate(model, p, plan, [_ids(model)], progress=False)
    assert calib.rtn == () and any(k.endswith("experts.gate_up_proj") for k in calib.weights)
    folded = rotfn.fold(p, plan, weights_by=calib)
    loaded = _export_and_load(tmp_path / "memory", model, plan, folded)
    with torch.no_grad():
        assert torch.equal(loaded(_ids(model)).logits, rotfn.call(model, folded, plan, _ids(model)).logits)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="60KB")
    build = lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2),  # noqa: E731
                                         weights=fmt, r3=None, r4=None)
    rotfn.fold_checkpoint(src, build, tmp_path / "stream", export="compressed-tensors", calibration=calib,
                          max_shard_size="40KB", progress=False)
    _assert_same_tensors(_tensors_in(tmp_path / "memory"), _tensors_in(tmp_path / "stream"))


STATIC_ACTS = {  # plans whose activations need each linear's static input scale, from a calibration
    "quarot-nvfp4-nvfp4": lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2),
                                                       r4=rotfn.hadamard(128), r3=None, weights=rotfn.nvfp4(),
                                                       acts=rotfn.nvfp4()),
    "per-linear-fp8-tensor": lambda m: rotfn.plans.per_linear(m, rotation=lambda n: rotfn.hadamard(n, block=32),
                                                              weights=rotfn.fp8("channel", scale_dtype=BF16),
                                                              acts=rotfn.fp8("tensor", scale_dtype=BF16)),
}


@pytest.mark.parametrize("name", list(STATIC_ACTS))
def test_streaming_export_takes_the_in_memory_calibration(tmp_path, name):
    """Static activation scales and GPTQ weights in the streaming export: fold_checkpoint(..., calibration=) with a
    calibration made on the in-memory model writes the in-memory export's tensors (input scales included, weights
    folded with weights_by=), byte for byte; without it a typed error before any work."""
    model = _model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="60KB")
    plan = STATIC_ACTS[name](model)
    p = rotfn.params(model)
    calib = rotfn.calibrate(model, p, plan, [_ids(model)], progress=False)
    rotfn.export_compressed(model, rotfn.fold(p, plan, weights_by=calib), plan, tmp_path / "memory", calibration=calib)
    with pytest.raises(ArgumentError, match=r"fold_checkpoint: argument 'calibration'.*static input scale"):
        rotfn.fold_checkpoint(src, STATIC_ACTS[name], tmp_path / "none", export="compressed-tensors", progress=False)
    assert not (tmp_path / "none").exists()
    rotfn.fold_checkpoint(src, STATIC_ACTS[name], tmp_path / "stream", export="compressed-tensors",
                          calibration=calib, max_shard_size="40KB", progress=False)
    memory, stream = _tensors_in(tmp_path / "memory"), _tensors_in(tmp_path / "stream")
    part = "input_global_scale" if "nvfp4" in name else "input_scale"
    assert len([k for k in stream if k.endswith(part)]) == len(plan.quantized)
    _assert_same_tensors(memory, stream)
    assert _qconfig(tmp_path / "memory") == _qconfig(tmp_path / "stream")


def test_a_calibration_of_another_plan_or_model_is_refused(tmp_path):
    """The in-memory and the streaming export read a calibration's input scales only if it was made for the plan
    they export (of this model): another plan, another model, or not a calibration are typed errors, nothing
    written."""
    model = _model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    build = STATIC_ACTS["quarot-nvfp4-nvfp4"]
    plan, p = build(model), rotfn.params(model)
    other_plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=7), r2=rotfn.hadamard(16, seed=2),
                                    r4=rotfn.hadamard(128), r3=None, weights=rotfn.nvfp4(), acts=rotfn.nvfp4())
    qwen = _model("qwen3")
    calibs = {
        "plan": rotfn.calibrate(model, p, other_plan, [_ids(model)], progress=False),
        "model": rotfn.calibrate(qwen, rotfn.params(qwen), build(qwen), [_ids(qwen)], progress=False),
    }
    folded = rotfn.fold(p, plan)
    cases = [(calibs["plan"], PlanError, r"argument 'calibration'.*a calibration of this plan"),
             (calibs["model"], PlanError, r"argument 'calibration'.*a calibration of this plan.*Qwen3"),
             ({"model.layers.0.self_attn.q_proj.weight": 1.0}, ArgumentError,
              r"argument 'calibration'.*None or a rotfn.calibrate\(...\) result, got dict")]
    for i, (calib, error, pattern) in enumerate(cases):
        with pytest.raises(error, match="export_compressed: " + pattern):
            rotfn.export_compressed(model, folded, plan, tmp_path / f"m{i}", calibration=calib)
        with pytest.raises(error, match="fold_checkpoint: " + pattern):
            rotfn.fold_checkpoint(src, build, tmp_path / f"s{i}", export="compressed-tensors", calibration=calib,
                                  progress=False)
        assert not (tmp_path / f"m{i}").exists() and not (tmp_path / f"s{i}").exists(), i


def _qwen2_moe(kind: str, fmt, acts=None, where=None):
    cfg = rt.make_config("qwen2_moe", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128)
    model = rt.tiny_model(cfg, dtype=torch.bfloat16, seed=1, outliers=8.0).eval()
    if kind == "quarot":
        plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2), weights=fmt,
                                  acts=acts, r3=None, r4=None)
    else:
        plan = rotfn.plans.per_linear(model, rotation=None, weights=fmt, acts=acts, where=where)
    return model, plan


@pytest.mark.parametrize("kind", ["quarot", "per_linear"])
@pytest.mark.parametrize("fmt", [rotfn.mxfp4(), rotfn.nvfp4(None), rotfn.fp8("channel", scale_dtype=BF16)], ids=repr)
def test_qwen2_moe_shared_expert_exports_and_its_gate_stays_float(tmp_path, kind, fmt):
    """Qwen2-MoE: the shared expert's gate/up/down are ordinary quantized linears; its d -> 1 shared_expert_gate,
    which vLLM builds as a plain float nn.Linear, is under ignore with a float weight (per_linear quantizes it: the
    plan's fake-quantized values, so the served model is still rotfn's). transformers loads it with rotfn.call's
    logits bit for bit, and the streaming export of its checkpoint writes the same bytes."""
    model, plan = _qwen2_moe(kind, fmt)
    gates = [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)]
    assert (f"{gates[0]}.weight" in plan.quantized) == (kind == "per_linear")
    folded = rotfn.fold(rotfn.params(model), plan)
    loaded = _export_and_load(tmp_path / "memory", model, plan, folded)
    qc = _qconfig(tmp_path / "memory")
    QuantizationConfig.model_validate(qc)
    assert set(gates) <= set(qc["ignore"]) and {"model.layers.0.mlp.gate", "lm_head"} <= set(qc["ignore"])
    stored = _tensors_in(tmp_path / "memory")
    part = "weight" if isinstance(fmt, rotfn.specs.formats.FP8) else "weight_packed"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.1.mlp.shared_expert.{proj}.{part}" in stored
    for gate in gates:
        assert [k for k in stored if k.startswith(gate + ".")] == [f"{gate}.weight"]
        rt.assert_bits_equal(stored[f"{gate}.weight"], folded[f"{gate}.weight"])
    state = loaded.state_dict()
    for key in plan.quantized:
        rt.assert_bits_equal(state[key], folded[key], name=key)
    with torch.no_grad():
        rt.assert_bits_equal(loaded(_ids(model)).logits, rotfn.call(model, folded, plan, _ids(model)).logits)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="60KB")
    rotfn.fold_checkpoint(src, lambda m: _qwen2_moe(kind, fmt)[1], tmp_path / "stream", export="compressed-tensors",
                          max_shard_size="40KB", progress=False)
    _assert_same_tensors(stored, _tensors_in(tmp_path / "stream"))
    assert _qconfig(tmp_path / "stream") == qc


def test_an_online_transform_at_the_shared_expert_gate_is_refused(tmp_path):
    """vLLM applies no input transform or activation quantizer to the float shared_expert_gate: a plan with one
    there is a typed error naming the where= that leaves it out (which then exports)."""
    model, plan = _qwen2_moe("per_linear", rotfn.fp8("channel", scale_dtype=BF16), acts=rotfn.fp8("token"))
    folded = rotfn.fold(rotfn.params(model), plan)
    with pytest.raises(PlanError, match=r"no online transform at 'model.layers.0.mlp.shared_expert_gate'.*fix: leave "
                                        r"it out of the plan: rotfn.plans.per_linear\(\.\.\., where=lambda site, _: "
                                        r"not site.endswith\(\('shared_expert_gate', 'lm_head'\)\)\)"):
        rotfn.export_compressed(model, folded, plan, tmp_path / "no")
    assert not (tmp_path / "no").exists()
    fixed = _qwen2_moe("per_linear", rotfn.fp8("channel", scale_dtype=BF16), acts=rotfn.fp8("token"),
                       where=lambda site, _: not (site.endswith(("shared_expert_gate", "lm_head")) or
                                                  ".experts." in site))[1]  # activations at fused experts: refused
    assert not any(o.site.endswith("shared_expert_gate") for o in fixed.online)
    rotfn.export_compressed(model, rotfn.fold(rotfn.params(model), fixed), fixed, tmp_path / "yes")
    assert "model.layers.0.mlp.shared_expert_gate" in _qconfig(tmp_path / "yes")["ignore"]


def test_activations_at_fused_experts_name_the_nearest_plan_that_exports(tmp_path):
    """Online activation quantizers or rotations at fused experts' inputs are not exported yet: the PlanError names
    the nearest plan that does (the same builder without what runs online at the experts), and that plan exports with
    rotfn.call's logits. A hand-made plan that drops the experts' quantizers but keeps their packed weights is refused
    too (the config's one group would quantize the experts' inputs in vLLM)."""
    cfg = rt.make_config("qwen3_moe", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128)
    model = rt.tiny_model(cfg, dtype=torch.bfloat16, seed=1, outliers=8.0).eval()
    acts = rotfn.mxfp4("even")
    quarot = lambda **kw: rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2),  # noqa: E731
                                             weights=rotfn.mxfp4(), r3=None, **kw)
    per = lambda **kw: rotfn.plans.per_linear(model, weights=rotfn.mxfp4(), **kw)  # noqa: E731
    with_acts = quarot(acts=acts, r4=None)
    dropped = dataclasses.replace(with_acts, online=tuple(o for o in with_acts.online if not o.kind.startswith("experts")))
    nearest = r"fix: the nearest plan that exports: the same {}\(\.\.\.\) with {} \(the experts' weights export packed\)"
    cases = [
        (with_acts, r"activation quantizer at the fused experts 'model.layers.0.mlp.experts' \(kind 'experts_in': not "
                    r"exported yet\); " + nearest.format("quarot", "acts=None")),
        (quarot(acts=None, r4=rotfn.hadamard), r"R4 rotation at the fused experts .*" + nearest.format("quarot", "r4=None")),
        (quarot(acts=acts, r4=rotfn.hadamard), nearest.format("quarot", "r4=None, acts=None")),
        (per(rotation=None, acts=acts), nearest.format("per_linear", "acts=None")),
        (per(rotation=rotfn.hadamard, acts=None), r"rotation at the fused experts .*" +
         nearest.format("per_linear", "rotation=None")),
        (dropped, r"activations at the input of every quantized linear .*got quantized weights whose inputs the plan "
                  r"leaves in float: \['model.layers.0.mlp.experts.0.gate_proj'"),
    ]
    for i, (plan, pattern) in enumerate(cases):
        with pytest.raises(PlanError, match=r"export_compressed: argument 'plan': .*" + pattern):
            rotfn.export_compressed(model, rotfn.fold(rotfn.params(model), plan), plan, tmp_path / str(i))
        assert not (tmp_path / str(i)).exists(), i
    for fixed in (quarot(acts=None, r4=None), per(rotation=None, acts=None)):  # the plans the fixes name
        folded = rotfn.fold(rotfn.params(model), fixed)
        loaded = _export_and_load(tmp_path / fixed.method, model, fixed, folded)
        with torch.no_grad():
            rt.assert_bits_equal(loaded(_ids(model)).logits, rotfn.call(model, folded, fixed, _ids(model)).logits)
