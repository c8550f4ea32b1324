"""``rotfn.export_compressed``: a compressed-tensors checkpoint that transformers and vLLM load, packed weights included.

The directory is a transformers checkpoint whose ``config.json`` carries a
``quantization_config`` with ``quant_method: "compressed-tensors"``: one config group for the
plan's quantized linears (their weight format and, when the plan quantizes their inputs, the
activation format), the linears the plan leaves in float under ``ignore``. Each quantized
linear ``X`` stores, in place of ``X.weight``, what compressed-tensors' compressor for the format
reads (the layouts are compressed-tensors'; the codes and scales are rotfn's own, taken from the
QTensor each folded weight carries, so that compressed-tensors' decompression gives rotfn's
values bit for bit):

==========================  ======================================================================
format                      tensors (weight ``[out, in]``, ``G`` groups per row)
==========================  ======================================================================
nvfp4-pack-quantized        ``weight_packed`` uint8 ``[out, in/2]`` (E2M1 codes, element ``2i`` in the
                            low nibble), ``weight_scale`` float8_e4m3fn ``[out, in/16]``,
                            ``weight_global_scale`` fp32 ``[1]`` = ``1 / s_g`` (compressed-tensors
                            divides by it: rotfn's values bit for bit when ``s_g`` is a power
                            of two, ``rotfn.nvfp4("pow2")``; with ``rotfn.nvfp4()``'s
                            ``amax / 2688`` each weight within one float32 rounding), and
                            ``input_global_scale`` ``[1]`` with NVFP4 activations (from calibration)
mxfp4-pack-quantized        ``weight_packed`` as above, ``weight_scale`` uint8 ``[out, in/32]`` (E8M0)
pack-quantized              intq weights: ``weight_packed`` int32 ``[out, ceil(in b / 32)]`` (codes
                            ``q + 2^(b-1)`` as a dense little-endian bit stream per row),
                            ``weight_scale`` fp32 ``[out, G]``, ``weight_shape`` int64 ``[2]``, and for
                            asymmetric formats ``weight_zero_point`` (``z - 2^(b-1)``, packed along
                            the output dim)
int-quantized               8-bit intq weights with 8-bit integer activations: ``weight`` int8,
                            ``weight_scale`` fp32 (``weight_zero_point`` int8 when asymmetric)
float-quantized             fp8 weights: ``weight`` float8_e4m3fn, ``weight_scale`` fp32 ``[out, 1]``
                            (per channel) or ``[1]`` (per tensor)
==========================  ======================================================================

Activation formats become ``input_activations``: fp8 and 8-bit intq per token (dynamic), MXFP4
(dynamic, per 32), NVFP4 (per 16, ``dynamic: "local"`` with each linear's static global scale
from a :class:`rotfn.calibration.Calibration`), fp8 per tensor (static, from calibration).

Fused 3-D experts (``mlp.experts.gate_up_proj`` ``[E, out, in]``) are written per expert and
projection under the names transformers saves them as (``mlp.experts.{e}.gate_proj``, ...: its
own reverse weight conversion decides which rows go where), the routers beside them under
``ignore``. Linears vLLM builds as plain float layers (an MoE family's router or shared-expert gate that
is an ``nn.Linear``, Qwen2-MoE's ``mlp.shared_expert_gate``) go under ``ignore`` too, with the plan's
folded (fake-quantized, if the plan quantizes them) values as a float ``weight``.

Online input rotations (QuaRot's R4, ``per_linear`` input rotations) become the config's
``transform_config``: one scheme per distinct rotation applying ``input`` on its linears (and
recording the ``weight_input`` inverse fold already applied), type ``"hadamard"`` for an unsigned
Sylvester Hadamard (full or block, ``head_dim`` the block) and ``"random-hadamard"`` with the
stored matrix otherwise; each rotated linear ``X`` stores ``X.<scheme>_input.weight`` =
``sqrt(m) R`` (``m x m`` fp32, ``m`` the block or the full size), which compressed-tensors and
vLLM divide by ``sqrt(m)`` and apply as ``x @ W``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os

import torch

from rotfn.errors import ArgumentError, FormatError, PlanError, RotfnError, message
from rotfn.functional import dequantize
from rotfn.io._atomic import write_text_atomic
from rotfn.io._encode import storable
from rotfn.io._hf import (
    ROTFN_JSON,
    ROTFN_TENSORS,
    _check_export,
    _config_text,
    _hf_layout,
    _remove_if_present,
    _shard_bytes,
    _weights,
    _write_weights,
)
from rotfn.plans import Plan, codes_of, describe, family_for, fused_groups
from rotfn.specs import QTensor
from rotfn.specs.formats import FP8, MX, NVFP4, NVFP4_GLOBAL_RULES, Format, IntQ
from rotfn.specs.rotation import Rotation

__all__ = ["export_compressed"]

FN = "export_compressed"


# ----- the quantization config ----------------------------------------------------------------------
def _weight_args(fn: str, fmt: Format, acts: Format | None) -> tuple[dict, str]:
    """compressed-tensors ``QuantizationArgs`` (as a dict) of a weight format, and the compression format."""
    if isinstance(fmt, NVFP4):
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}, "nvfp4-pack-quantized"
    if isinstance(fmt, MX):
        if fmt.element != "e2m1":
            raise FormatError(message(fn, "plan", "weights rotfn.mxfp4(), rotfn.nvfp4(...), rotfn.intq(...) or "
                                      "rotfn.fp8(...)", f"weights={fmt!r}", "export MXFP8 with rotfn.export_hf"))
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
                "dynamic": False, "scale_dtype": "torch.uint8"}, "mxfp4-pack-quantized"
    if isinstance(fmt, IntQ):
        args = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "dynamic": False,
                **({"group_size": fmt.group, "strategy": "group"} if fmt.group else {"strategy": "channel"})}
        int_acts = isinstance(acts, IntQ) and acts.bits == 8
        return args, "int-quantized" if fmt.bits == 8 and int_acts else "pack-quantized"
    if fmt.granularity == "token":
        raise FormatError(message(fn, "plan", "fp8 weights per channel or per tensor", f"weights={fmt!r}",
                                  "use rotfn.fp8('channel') for weights"))
    return {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
            "strategy": "tensor" if fmt.granularity == "tensor" else "channel"}, "float-quantized"


def _check_fused(fn: str, scales: dict[str, torch.Tensor]) -> None:
    """Partitions an engine fuses into one linear (q/k/v, gate/up) must share their NVFP4 global scale."""
    for group in fused_groups(scales):
        found = {name.rpartition(".")[2]: scales[name].item() for name in group}
        if len(set(found.values())) > 1:
            raise PlanError(message(
                fn, "plan", f"one NVFP4 global scale for {group[0].rpartition('.')[0]}.{{{','.join(found)}}} (vLLM "
                "runs them as one fused linear with one global scale)", f"global scales {found}",
                "fold with a plan whose shared_scales group them (rotfn.plans.quarot / per_linear do), or with one "
                "fixed power-of-two global scale, e.g. weights=rotfn.nvfp4(2.0 ** -8)"))


def _static(fmt: Format | None) -> bool:
    """Activations whose engine scale is one static value per linear: NVFP4 with a measured global scale, fp8 per tensor."""
    return (isinstance(fmt, NVFP4) and fmt.global_scale in NVFP4_GLOBAL_RULES) or (
        isinstance(fmt, FP8) and fmt.granularity == "tensor")


def _input_scales(fn: str, plan: Plan, acts: Format | None, calibration, packs) -> dict[str, torch.Tensor]:
    """``{key of packs: static input scale}`` from ``calibration`` (a calibration of ``plan``), for static ``acts``;
    ``{}`` for dynamic or fixed activation scales."""
    if calibration is not None:
        if not (isinstance(getattr(calibration, "plan", None), Plan) and callable(getattr(calibration, "input_scale", None))):
            raise ArgumentError(message(fn, "calibration", "None or a rotfn.calibrate(...) result",
                                        type(calibration).__name__,
                                        "pass calibration=rotfn.calibrate(model, params, plan, batches)"))
        if calibration.plan != plan:
            raise PlanError(message(fn, "calibration", f"a calibration of this plan ({plan!r})",
                                    f"a calibration of {calibration.plan!r}",
                                    "calibrate with the plan you export: rotfn.calibrate(model, params, plan, batches)"))
    if not _static(acts):
        return {}
    if calibration is None:
        raise ArgumentError(message(fn, "calibration", f"a rotfn.calibrate(...) result: {acts!r} activations need "
                                    "each linear's static input scale", "None",
                                    "pass calibration=rotfn.calibrate(model, params, plan, batches), computed where the "
                                    "model fits (rotfn.export_compressed and fold_checkpoint(..., export=) take it), or "
                                    "quantize activations dynamically (acts=rotfn.mxfp4('even') or rotfn.fp8('token'))"))
    return {key: calibration.input_scale(key, acts) for key in packs}


def _act_args(fn: str, fmt: Format) -> dict:
    """compressed-tensors ``QuantizationArgs`` (as a dict) of an activation format."""
    if isinstance(fmt, FP8) and fmt.granularity == "token":
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    if isinstance(fmt, IntQ) and fmt.bits == 8 and fmt.group is None and fmt.symmetric and fmt.clip == 1.0:
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    if isinstance(fmt, MX) and fmt.element == "e2m1":
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
                "dynamic": True, "scale_dtype": "torch.uint8"}
    if isinstance(fmt, NVFP4):
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn"}
    if _static(fmt):
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
    raise FormatError(message(fn, "plan", "activations fp8('token'), intq(8) per token, mxfp4(), nvfp4(...) "
                              "or fp8('tensor')", f"acts={fmt!r}", "build the plan with one of those acts="))


def _kept_float(fn: str, layout) -> set[str]:
    """Linears that vLLM builds as plain float layers, without quantization or input transforms: an MoE family's
    router and shared-expert gate where they are ``nn.Linear`` (Qwen2-MoE's ``mlp.shared_expert_gate``)."""
    try:
        moe = family_for(fn, layout.model_type, layout.cls).moe
    except RotfnError:  # no family adapter: no MoE table to read
        return set()
    if moe is None:
        return set()
    leaves = tuple(f".{m}" for m in (moe.router, moe.shared_gate) if m)
    return {name for name, _ in layout.linears if name.endswith(leaves)}


def _check_online(fn: str, plan: Plan, kept_float: set[str]) -> tuple[Format | None, list]:
    """The quantized linears' activation format and the online input rotations; PlanError for what the format lacks."""
    acts, rotated = None, []
    for o in plan.online:
        if o.site in kept_float and (o.rotation is not None or o.fmt is not None):
            raise PlanError(message(
                fn, "plan", f"no online transform at {o.site!r} (vLLM runs it as a plain float linear: no input "
                "rotation, no activation quantization)", f"an online {'rotation' if o.rotation is not None else 'quantizer'}"
                f" there ({o.role or o.kind})", "leave it out of the plan: rotfn.plans.per_linear(..., where=lambda "
                f"site, _: not site.endswith(('{o.site.rpartition('.')[2]}', 'lm_head')))"))
        if o.kind.startswith("experts"):
            what = "rotation" if o.rotation is not None else "activation quantizer"
            raise PlanError(message(
                fn, "plan", "a plan whose online side is at linear inputs (activation quantization, input rotations)",
                f"an online {o.role or o.kind} {what} at the fused experts {o.site!r} (kind {o.kind!r}: not "
                "exported yet)", _nearest_without_experts(plan) + "; or write the directory for rotfn with "
                "rotfn.export_hf"))
        if o.kind != "linear":
            what = o.role or o.kind
            raise PlanError(message(
                fn, "plan", "a plan whose online side is at linear inputs (activation quantization, input rotations)",
                f"an online {what} {'rotation' if o.rotation is not None else 'quantizer'} at {o.site!r} "
                f"(kind {o.kind!r}: compressed-tensors has no transform there that vLLM applies)",
                "drop it (quarot(..., r3=None, kv=None)), or write the directory for rotfn with rotfn.export_hf"))
        if acts is not None and o.fmt != acts:
            raise PlanError(message(fn, "plan", "one activation format for every quantized linear",
                                    f"{acts!r} and {o.fmt!r}", "build the plan with one acts="))
        acts = o.fmt
        if o.rotation is not None:
            rotated.append(o)
    return acts, rotated


def _nearest_without_experts(plan: Plan) -> str:
    """The fix of online entries at fused experts: the nearest plan that exports, the same builder without what
    runs online there (a rotation: quarot's R4 or per_linear's rotation; an activation format)."""
    at_experts = [o for o in plan.online if o.kind.startswith("experts")]
    drop = []
    if any(o.rotation is not None for o in at_experts):
        drop.append("r4=None" if plan.method == "quarot" else "rotation=None")
    if any(o.fmt is not None for o in at_experts):
        drop.append("acts=None")
    return (f"the nearest plan that exports: the same {plan.method}(...) with {', '.join(drop)} (the experts' weights "
            "export packed)")


def _check_acts_cover(fn: str, plan: Plan, acts: Format | None, packs: tuple[str, ...], splits: dict) -> None:
    """With activations, the config's one group quantizes the input of every packed linear: the plan must too."""
    if acts is None:
        return
    covered = {o.site for o in plan.online if o.kind == "linear" and o.fmt is not None}
    bare = [name for key in packs for name in splits[key] if name not in covered]
    if bare:
        raise PlanError(message(
            fn, "plan", f"{acts!r} activations at the input of every quantized linear (the config's one group "
            "quantizes them all, so vLLM would)", f"quantized weights whose inputs the plan leaves in float: {bare[:3]}"
            + (f" ... ({len(bare)} in all)" if len(bare) > 3 else ""),
            "build the plan with a builder (rotfn.plans.quarot / per_linear), or with acts=None"))


# ----- online rotations: the transform config -----------------------------------------------------------
def _sylvester(r: Rotation) -> bool:
    """``r`` is a plain (unsigned) Sylvester Hadamard, block-diagonal or full: compressed-tensors' ``"hadamard"``."""
    return r.kind == "hadamard" and r.signs is None and r.factor in (None, 1)


def _stored(r: Rotation) -> tuple[torch.Tensor, int | None]:
    """The transform weight compressed-tensors and vLLM read for ``x -> x @ R``, and its ``head_dim``.

    Both engines compute ``x @ (W / sqrt(m))`` for a stored ``m x m`` weight ``W`` (``m`` the
    head_dim, or the full size), so ``W = sqrt(m) R``: one block when ``R`` repeats it
    (no random signs), else the dense ``n x n`` matrix. Held in fp32, the schemes' precision.
    """
    if r.signs is None:
        t, head_dim = r.block_matrix(), (r.block if r.block and r.block != r.n else None)
    else:
        t, head_dim = r.matrix(), None
    return (t * math.sqrt(t.shape[0])).to(torch.float32).contiguous(), head_dim


def _transform_config(fn: str, rotated: list, linears: set[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``transform_config`` (one scheme per distinct rotation) and the transform weights of every rotated linear.

    Each scheme applies ``input`` (online, what the engine runs) on its linears and records the
    ``weight_input`` inverse that :func:`rotfn.fold` already folded into their weights (as
    llm-compressor writes it; engines apply only the online entries to a saved model).
    """
    by_rotation: dict[Rotation, list] = {}
    for o in rotated:
        by_rotation.setdefault(o.rotation, []).append(o)
    _check_fused_inputs(fn, rotated, linears)
    groups, tensors = {}, {}
    roles = collections.Counter(os_[0].role or "R" for os_ in by_rotation.values())
    seen: collections.Counter = collections.Counter()
    for r, ons in by_rotation.items():
        role = ons[0].role or "R"
        name = role if roles[role] == 1 else f"{role}_{seen[role]}"
        seen[role] += 1
        weight, head_dim = _stored(r)
        sites = [o.site for o in ons]
        groups[name] = {
            "type": "hadamard" if _sylvester(r) else "random-hadamard",
            "apply": [{"targets": sites, "location": "input", "inverse": False, "ignore": []},
                      {"targets": sites, "location": "weight_input", "inverse": True, "ignore": []}],
            "randomize": False, "requires_grad": False, "head_dim": head_dim, "precision": "torch.float32"}
        tensors.update({f"{site}.{name}_input.weight": weight.clone() for site in sites})  # safetensors: no aliases
    return {"config_groups": groups}, tensors


def _check_fused_inputs(fn: str, rotated: list, linears: set[str]) -> None:
    """Partitions an engine fuses (q/k/v, gate/up) read one input: they need one input rotation (or none)."""
    rotation = {o.site: o.rotation for o in rotated}
    for group in fused_groups(sorted(linears)):
        rots = {name.rpartition(".")[2]: rotation.get(name) for name in group}
        if len(set(rots.values())) > 1:
            raise PlanError(message(
                fn, "plan", f"one online input rotation for all of {group[0].rpartition('.')[0]}.{{{','.join(rots)}}} "
                "(vLLM runs them as one fused linear with one input transform)",
                f"{ {k: repr(v) for k, v in rots.items()} }",
                "give them one rotation, e.g. per_linear(..., rotation=lambda n: rotfn.hadamard(n, block=32))"))


def _quantization_config(fn: str, plan: Plan, acts: Format | None, linears: list[str], quantized: set[str]) -> dict:
    weights, fmt_name = _weight_args(fn, plan.weights, acts)
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
             "format": fmt_name}
    if acts is not None:
        group["input_activations"] = _act_args(fn, acts)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt_name,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": [name for name in linears if name not in quantized],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


# ----- packing ----------------------------------------------------------------------------------------
def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values ``[rows, n]`` as a dense little-endian bit stream in int32 words.

    Value ``j`` of a row occupies bits ``j * bits .. (j + 1) * bits - 1`` of the row's stream, bit
    ``k`` of the stream being bit ``k % 32`` of word ``k // 32``; the row is zero-padded to a
    multiple of 32 values. Returns ``[rows, ceil(n * bits / 32)]`` int32.

    Example:
        >>> hex(pack_int32(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4).item() & 0xFFFFFFFF)
        '0xf7654321'
    """
    rows, n = values.shape
    padded = -(-n // 32) * 32
    v = torch.nn.functional.pad(values.to(torch.int64), (0, padded - n))
    stream = ((v[..., None] >> torch.arange(bits)) & 1).reshape(rows, -1)  # [rows, padded * bits] bits
    words = (stream.reshape(rows, -1, 32) << torch.arange(32)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words[:, : -(-n * bits // 32)].contiguous()


def _unsigned(q: QTensor) -> torch.Tensor:
    """intq codes ``[out, in]`` as unsigned ``b``-bit integers ``q + 2^(b-1)`` (compressed-tensors' offset)."""
    fmt = q.format
    codes = q.codes
    if fmt.bits <= 4:
        lo, hi = codes & 0xF, codes >> 4
        codes = torch.stack([lo, hi], -1).reshape(q.shape[0], -1)[:, : q.shape[-1]]
    signed = codes.to(torch.int32)
    if fmt.symmetric:
        if fmt.bits <= 4:
            signed = signed - 16 * (signed >= 8)
        return signed + (1 << (fmt.bits - 1))
    return signed  # asymmetric codes u in [0, 2^b) are compressed-tensors' q + 2^(b-1), q = u - 2^(b-1)


def _check_scale_dtype(fn: str, key: str, fmt: Format, dtype: torch.dtype, what: str) -> None:
    """compressed-tensors loads intq / fp8 scales in the model's dtype: they must be exact in it."""
    if not isinstance(fmt, (IntQ, FP8)) or dtype == torch.float32:
        return
    name = str(dtype).removeprefix("torch.")
    if fmt.scale_dtype != name:
        raise FormatError(message(
            fn, "plan", f"{what} whose scales are {name} values ({key!r} is {name}: compressed-tensors and vLLM "
            f"hold its scales in {name})", f"{what}={fmt!r}",
            f"build the plan with {what}=rotfn.{dataclasses.replace(fmt, scale_dtype=name)!r}"))


def _tensors(name: str, q: QTensor, acts: Format | None, fmt_name: str,
             input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for linear ``name`` (weight ``q``; ``input_scale``: its static
    activation scale, None for dynamic or fixed ones); scales in the model's dtype."""
    fmt = q.format
    out: dict[str, torch.Tensor] = {}
    if isinstance(fmt, NVFP4):
        out = {"weight_packed": q.codes, "weight_scale": q.scales,
               "weight_global_scale": (1.0 / q.global_scale.float()).reshape(1)}
    elif isinstance(fmt, MX):
        out = {"weight_packed": q.codes, "weight_scale": q.scales.view(torch.uint8)}
    elif isinstance(fmt, IntQ) and fmt_name == "pack-quantized":
        out = {"weight_packed": pack_int32(_unsigned(q), fmt.bits), "weight_scale": q.scales.to(q.dtype),
               "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
        if not fmt.symmetric:  # zero points in compressed-tensors' signed range, packed along the output dim
            out["weight_zero_point"] = pack_int32(q.zero_points.to(torch.int32).T, fmt.bits).T.contiguous()
    elif isinstance(fmt, IntQ):
        out = {"weight": (_unsigned(q) - 128).to(torch.int8), "weight_scale": q.scales.to(q.dtype)}
        if not fmt.symmetric:
            out["weight_zero_point"] = (q.zero_points.to(torch.int32) - 128).to(torch.int8)
    else:
        scale = q.scales.reshape(-1, 1) if q.scales.ndim else q.scales.reshape(1)
        out = {"weight": q.codes, "weight_scale": scale.to(q.dtype)}
    if isinstance(acts, NVFP4):
        s_g = input_scale if input_scale is not None else torch.tensor(acts.global_scale or 1.0)
        out["input_global_scale"] = (1.0 / s_g.float()).reshape(1)
    elif isinstance(acts, FP8) and acts.granularity == "tensor":
        out["input_scale"] = input_scale.reshape(1).to(q.dtype)
    return {f"{name}.{part}": t.contiguous() for part, t in out.items()}


def _routers(model, experts: list[str]) -> list[str]:
    """Routers next to fused experts that are not ``nn.Linear`` in transformers (``Qwen3MoeTopKRouter``): vLLM
    loads them as linears, so the config must list them (in float) under ``ignore``."""
    found = []
    for site in experts:
        parent, _, leaf = site.rpartition(".")
        for name, module in model.get_submodule(parent).named_children():
            weight = getattr(module, "weight", None)
            if name != leaf and not isinstance(module, torch.nn.Linear) and isinstance(weight, torch.Tensor) \
                    and weight.ndim == 2:
                found.append(f"{parent}.{name}")
    return found


def _split_rows(model, key: str) -> dict[str, torch.Tensor | None]:
    """``{checkpoint linear: its rows of the param}`` as the param is saved: itself (None: all rows), or (fused
    experts) one linear per expert and projection, with the indices of its rows (transformers' own reverse
    weight conversion, applied to a row numbering, decides which rows go where)."""
    shape = model.get_parameter(key).shape
    if len(shape) == 2:
        return {key.removesuffix(".weight"): None}
    index = torch.arange(math.prod(shape[:-1])).reshape(*shape[:-1], 1)
    return {name.removesuffix(".weight"): rows.reshape(-1) for name, rows in _hf_layout(model, {key: index}).items()}


def _linear_qtensors(q: QTensor, split: dict[str, torch.Tensor | None]) -> dict[str, QTensor]:
    """``{checkpoint linear: its 2-D QTensor}`` of a param's QTensor split as :func:`_split_rows` says (each
    expert's codes and scales its rows')."""
    rows = math.prod(q.shape[:-1])

    def take(t, sel):
        if t is None or t.ndim == 0:
            return t
        return t.reshape(rows)[sel] if t.shape == q.shape[:-1] else t.reshape(rows, t.shape[-1])[sel]

    return {name: q if sel is None else QTensor(
        take(q.codes, sel), take(q.scales, sel), torch.Size([len(sel), q.shape[-1]]), q.dtype, q.format,
        q.global_scale, take(q.zero_points, sel)) for name, sel in split.items()}


def _qtensor(fn: str, key: str, t: torch.Tensor, fmt: Format, q: QTensor | None = None) -> QTensor:
    """The QTensor fold rounded ``t`` to (``q``, or the one ``t`` carries), checked against ``t``'s values."""
    q = codes_of(t) if q is None else q
    if q is None or q.format != fmt:
        raise PlanError(message(fn, "params", f"params from rotfn.fold(params, plan) (weight {key!r} carrying its "
                                f"{fmt!r} codes)", "a weight without them (loaded, copied or moved after the fold)",
                                "fold the params in this process and export the result as it comes"))
    if not torch.equal(dequantize(q, t.dtype).view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8)):
        raise PlanError(message(fn, "params", f"weight {key!r} as rotfn.fold left it", "a weight changed since",
                                "fold again and export the result unchanged"))
    return q


class Export:
    """What a plan exports as, for one model: the quantization config (with the transform config) and each
    quantized key's packed tensors. Shared by :func:`export_compressed` and the streaming export of
    :func:`rotfn.fold_checkpoint`; every check of the plan runs when it is built, before anything is written.

    Attributes:
        qconfig: the ``quantization_config`` dict of ``config.json``.
        transform_weights: ``{name: Tensor}`` of the online transforms' weights.
        packs: the quantized keys written packed; the others (linears vLLM keeps in float, e.g. Qwen2-MoE's
            ``shared_expert_gate``) hold their folded, fake-quantized values as a float ``weight``, under ``ignore``.
        input_scales: ``{key: 0-d float32}``, the static activation scale of each quantized key's linear (from the
            calibration; empty for dynamic or fixed activation scales).
    """

    def __init__(self, fn: str, model, plan: Plan, calibration=None, *, scales: bool = True):
        if plan is None or plan.weights is None or not plan.quantized:
            raise PlanError(message(fn, "plan", "a plan that quantizes weights", repr(plan),
                                    "build it with weights=, e.g. rotfn.plans.quarot(model, ..., weights=rotfn.mxfp4())"))
        conv1d = [k for k in plan.quantized if k in plan.transposed]
        if conv1d:  # compressed-tensors targets nn.Linear and packs [out, in] rows
            raise PlanError(message(fn, "plan", "quantized weights of nn.Linear modules or fused experts",
                                    f"GPT-2 Conv1D weights stored [in, out]: {conv1d[:3]}",
                                    "write a fake-quantized checkpoint instead: rotfn fold SRC DST --plan per_linear "
                                    "--weights FORMAT (without --export), or rotfn.export_hf"))
        self.fn, self.plan = fn, plan
        layout = describe(model, fn=fn)
        kept_float = _kept_float(fn, layout)
        self.acts, rotated = _check_online(fn, plan, kept_float)
        experts = [f"{site}.{param}" for site, *params in layout.experts for param in params]
        self.splits = {key: _split_rows(model, key) for key in dict.fromkeys([*experts, *plan.quantized])}
        linears = [name for name, _ in layout.linears] + [name for key in experts for name in self.splits[key]]
        linears += _routers(model, [site for site, *_ in layout.experts])
        loose = [k for k in plan.quantized if k.removesuffix(".weight") not in set(linears) and k not in experts]
        if loose:
            raise PlanError(message(fn, "plan", "quantized weights of nn.Linear modules or fused experts",
                                    f"also {loose[:3]}", "leave them out of the plan, or use rotfn.export_hf"))
        # a linear the engine keeps in float holds the plan's (fake-quantized) values as its plain weight
        self.packs = tuple(k for k in plan.quantized if k.removesuffix(".weight") not in kept_float)
        quantized = {name for key in self.packs for name in self.splits[key]}
        _check_acts_cover(fn, plan, self.acts, self.packs, self.splits)
        self.qconfig = _quantization_config(fn, plan, self.acts, linears, quantized)
        self.input_scales = _input_scales(fn, plan, self.acts, calibration, self.packs) if scales else {}
        self.qconfig["transform_config"], self.transform_weights = (
            _transform_config(fn, rotated, set(linears)) if rotated else ({}, {}))
        self.global_scales: dict[str, torch.Tensor] = {}

    def packed(self, key: str, t: torch.Tensor, q: QTensor | None = None, *, part: str | None = None
               ) -> dict[str, torch.Tensor]:
        """The tensors stored for quantized param ``key``: ``t`` its folded value, ``q`` its codes (None: the ones
        ``t`` carries from :func:`rotfn.fold`); ``part``: the checkpoint linear ``t`` and ``q`` hold alone (one
        expert's projection of fused experts ``key``, folded per expert by the streaming export)."""
        fn, fmt, acts = self.fn, self.plan.weights, self.acts
        _check_scale_dtype(fn, key, fmt, t.dtype, "weights")
        if isinstance(acts, FP8) and acts.granularity == "tensor":
            _check_scale_dtype(fn, key, acts, t.dtype, "acts")
        out = {}
        split = self.splits[key] if part is None else {part: None}
        for name, piece in _linear_qtensors(_qtensor(fn, key, t, fmt, q), split).items():
            if piece.global_scale is not None:
                self.global_scales[name] = piece.global_scale
            out.update(_tensors(name, piece, acts, self.qconfig["format"], self.input_scales.get(key)))
        return out

    def scales_digest(self) -> str:
        """A digest of :attr:`input_scales` (``""`` when empty): what a calibration adds to a streaming export's job."""
        if not self.input_scales:
            return ""
        h = hashlib.blake2b(digest_size=16)
        for key, s in sorted(self.input_scales.items()):
            h.update(key.encode() + s.float().reshape(1).numpy().tobytes())
        return h.hexdigest()

    def check_fused(self) -> None:
        """After every key: fused partitions share their NVFP4 global scale (PlanError otherwise)."""
        _check_fused(self.fn, self.global_scales)


def check_exportable(fn: str, model, plan: Plan) -> None:
    """Every check :func:`export_compressed` makes of ``plan`` for ``model`` before writing, except the calibration's
    (``rotfn calibrate --export``: a plan whose static scales the calibration being made will give)."""
    Export(fn, model, plan, scales=False)


def export_compressed(model, params, plan: Plan, dir: str | os.PathLike, *, calibration=None,
                      max_shard_size: int | str = "5GB") -> None:
    """Write folded, quantized params as a compressed-tensors checkpoint (packed weights) that vLLM and transformers load.

    The directory is what :func:`rotfn.export_hf` writes (config, generation config, sharded
    safetensors written atomically, ``config.json`` last), with each quantized linear's weight
    replaced by the packed tensors compressed-tensors defines for its format and a
    ``quantization_config`` in ``config.json`` (layouts: the module docstring of
    ``rotfn/io/_compressed.py``). The codes and scales are those :func:`rotfn.fold` rounded
    each weight to (round to nearest, or GPTQ with ``weights_by=``), so compressed-tensors'
    decompression of every weight equals :func:`rotfn.dequantize` of rotfn's QTensor, bit for
    bit, and ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` (with the
    ``compressed-tensors`` package installed) computes what ``rotfn.call`` computes, up to the
    engine's activation quantizer.

    The plan's online side may be activation quantization and rotations at linear inputs
    (``per_linear`` with or without ``rotation=``, ``quarot`` with R1/R2 folded and R4 online),
    written as a ``transform_config``; R3 and KV-cache formats are an error before anything is
    written (vLLM applies no compressed-tensors transform there).

    Args:
        model: the transformers ``*ForCausalLM`` model the params belong to.
        params: ``rotfn.fold(rotfn.params(model), plan)`` (or with ``weights_by=``), as fold returns it.
        plan: the plan folded in, with ``weights=`` one of ``rotfn.nvfp4(...)`` (``"pow2"`` serves
            rotfn's values bit for bit, the default ``"tensor"`` within one float32 rounding per weight),
            ``rotfn.mxfp4()``, ``rotfn.intq(b, group=...)`` (symmetric or not), ``rotfn.fp8("channel")``
            / ``rotfn.fp8("tensor")``, and ``acts=`` None or a format compressed-tensors has.
        dir: output directory (created if missing).
        calibration: the :func:`rotfn.calibrate` result, needed for activation formats with a static
            per-tensor scale (``nvfp4()`` / ``nvfp4("pow2")``: ``input_global_scale``; ``fp8("tensor")``:
            ``input_scale``); NVFP4 with a fixed global scale needs none. It must be a calibration of
            ``plan`` (only its input scales are read here: GPTQ-rounded weights come through ``params``,
            ``rotfn.fold(..., weights_by=calibration)``).
        max_shard_size: largest shard in bytes, or text such as ``"5GB"``.

    Raises:
        ArgumentError: model not a transformers model, dir a file, bad max_shard_size, a static
            activation format without ``calibration``, a ``calibration`` that is not a calibrate result.
        PlanError: plan None or without weights, online transforms other than at linear inputs (R3,
            KV cache), fused partitions rotated or NVFP4-scaled differently, weights that are not
            fold's (no codes, or changed since), a calibration of another plan (or model). FormatError: a format compressed-tensors cannot hold.
        DTypeError / SelectionError / FoldError: as :func:`rotfn.export_hf`.

    Example:
        >>> import os, tempfile, torch, transformers, rotfn
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                                num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        >>> plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=0), r2=rotfn.hadamard(16, seed=1),
        ...                           weights=rotfn.intq(4, group=32))
        >>> d = tempfile.mkdtemp()
        >>> rotfn.export_compressed(model, rotfn.fold(rotfn.params(model), plan), plan, d)
        >>> json_cfg = __import__("json").load(open(os.path.join(d, "config.json")))
        >>> json_cfg["quantization_config"]["format"]
        'pack-quantized'
    """
    _check_export(FN, model, params, plan)
    limit = _shard_bytes(FN, max_shard_size)
    if not isinstance(dir, (str, os.PathLike)) or os.path.isfile(dir):
        raise ArgumentError(message(FN, "dir", "a directory path", repr(dir), "name a directory (created if missing)"))
    export = Export(FN, model, plan, calibration)
    weights, untie = _weights(model, params)
    packed: dict[str, torch.Tensor] = {}
    for key in export.packs:
        packed.update(export.packed(key, weights.pop(key)))
    export.check_fused()
    dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)
    tensors = {**storable(_hf_layout(model, weights)), **packed, **export.transform_weights}

    directory = os.fspath(dir)
    os.makedirs(directory, exist_ok=True)
    _remove_if_present(os.path.join(directory, "config.json"))  # written last: a failed export does not load
    _write_weights(directory, tensors, limit)
    for stale in (ROTFN_JSON, ROTFN_TENSORS):
        _remove_if_present(os.path.join(directory, stale))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        write_text_atomic(os.path.join(directory, "generation_config.json"), generation.to_json_string(use_diff=True))
    config = json.loads(_config_text(model, dtype, untie))
    config["quantization_config"] = export.qconfig
    write_text_atomic(os.path.join(directory, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
