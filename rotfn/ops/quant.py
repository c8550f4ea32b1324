"""Reference quantizers: the bit-level spec of every format, in plain torch.

Legend: ``x`` is ``[..., n]``; a format quantizes the last dim in scale groups
of ``g`` elements, ``G = n / g`` groups per row. All math is fp32 (inputs of
other dtypes are cast to fp32 first, outputs cast back once). A group holding a
NaN or Inf dequantizes to all-NaN (its codes are stored as 0). The rules and
their sources are in ``docs/formats.md``.

``qdq(x, f)`` is *defined* as ``dequantize(quantize(x, f))`` so the two can never
disagree; Triton kernels must reproduce these bits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rotfn.ops.numbers import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    E8M0_NAN,
    e2m1_decode,
    e2m1_encode,
    e4m3_round,
    exp2_exact,
    fp32_exponent,
)
from rotfn.ops.pack import pack_nibbles, unpack_nibbles
from rotfn.specs import QTensor
from rotfn.specs.formats import FP8, MX, NVFP4, NVFP4_GLOBAL_RULES, Format, IntQ, ScaleRule

__all__ = [
    "quantize", "dequantize", "qdq",
    "Scales", "group_view", "choose_scales", "code_dtype", "encode", "decode", "pack", "unpack", "scales_of",
    "mx_scale_exponent", "finite_amax", "nvfp4_global_scale", "nvfp4_shared_global_scale", "nvfp4_global_from_amax", "intq_params", "fp8_scale", "round_scale",
]

# element facts per MX element type: (largest exponent, mantissa bits, largest value)
_MX_ELEMENT = {"e2m1": (2, 1, E2M1_MAX), "e4m3": (8, 3, E4M3_MAX)}


def _groups(x32: torch.Tensor, group: int | None) -> torch.Tensor:
    """View ``[..., n]`` as ``[..., G, g]`` (g = n when group is None)."""
    n = x32.shape[-1]
    g = group or n
    return x32.reshape(*x32.shape[:-1], n // g, g)


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    """Correctly rounded ``a / b`` on every device.

    ``tensor / python_scalar`` on CUDA multiplies by the rounded reciprocal (1 ulp
    off for b = 6, 448, 7, ...); dividing by a tensor is a true IEEE division there
    and on CPU, so the reference gives the same bits everywhere (and kernels must
    divide, not multiply by a reciprocal).
    """
    return a / torch.full_like(a, b)


def _amax_all(x32: torch.Tensor) -> torch.Tensor:
    return x32.abs().amax() if x32.numel() else x32.new_zeros(())


def mx_scale_exponent(amax: torch.Tensor, fmt: MX) -> torch.Tensor:
    """The clamped int32 scale exponent ``e`` of MX groups with fp32 maxima ``amax``.

    See :class:`rotfn.ScaleRule` for the three rules; the byte stored is ``e + 127``.
    """
    emax, mbits, max_elem = _MX_ELEMENT[fmt.element]
    if fmt.scale_rule is ScaleRule.FLOOR:
        e = fp32_exponent(amax) - emax
    elif fmt.scale_rule is ScaleRule.EVEN:
        bits = (amax.view(torch.int32) + (1 << (22 - mbits))) & ~0x7FFFFF
        e = fp32_exponent(bits.view(torch.float32)) - emax
    else:  # RCEIL
        d = amax * torch.tensor(1.0 / max_elem, dtype=torch.float32)
        bits = d.view(torch.int32)
        e = fp32_exponent(d) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        # a subnormal d rounds up to 2^-127 (bits <= 0x400000) or 2^-126
        e = torch.where(bits < 0x800000, torch.where(bits > 0x400000, -126, -127).to(torch.int32), e)
    return e.clamp(-127, 127).to(torch.int32)


def nvfp4_global_scale(x32: torch.Tensor, fmt: NVFP4) -> torch.Tensor:
    """The fp32 global scale ``s_g`` (0-d) of an NVFP4 tensor.

    ``"tensor"``: ``amax / 2688`` over the finite values (1 when that is 0); ``"pow2"``: that rounded
    up to a power of two; a float: itself; None: 1.
    """
    if fmt.global_scale in NVFP4_GLOBAL_RULES:
        amax = _amax_all(torch.where(torch.isfinite(x32), x32.abs(), 0.0))
        return nvfp4_global_from_amax(amax, pow2=fmt.global_scale == "pow2")
    value = 1.0 if fmt.global_scale is None else fmt.global_scale
    return torch.tensor(value, dtype=torch.float32, device=x32.device)


def finite_amax(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the finite values of ``x`` taken to float32 (0-d fp32; 0 when there are none)."""
    return _amax_all(torch.where(torch.isfinite(x32 := x.float()), x32.abs(), 0.0))


def nvfp4_shared_global_scale(tensors, fmt: NVFP4) -> torch.Tensor:
    """The global scale ``s_g`` (fp32 0-d) of ``fmt``'s rule measured over several tensors at once.

    ``s_g = max_i amax(finite |x_i|) / (448 * 6)`` (``"pow2"``: rounded up to a power of two): the one
    global scale of partitions a serving engine runs as one fused linear (q/k/v, gate/up), each
    quantized with it. One tensor gets :func:`nvfp4_global_scale`'s value.

    Example:
        >>> s = nvfp4_shared_global_scale([torch.tensor([1.0]), torch.tensor([-2688.0])], NVFP4("tensor"))
        >>> s.item()
        1.0
    """
    amax = torch.stack([finite_amax(t) for t in tensors]).amax()
    return nvfp4_global_from_amax(amax, pow2=fmt.global_scale == "pow2")


def nvfp4_global_from_amax(finite_amax: torch.Tensor, *, pow2: bool = False) -> torch.Tensor:
    """``s_g = amax / (448 * 6)`` from the amax of the finite values, 1 when that is 0.

    ``pow2``: ``2^ceil(log2 s_g)`` (at most ``2^127``), so that ``1 / s_g`` is exact and every group
    scale still fits E4M3 (``amax / s_g <= 2688``).
    """
    s = _div(finite_amax, E4M3_MAX * E2M1_MAX)
    if pow2:
        mantissa, exponent = torch.frexp(s)  # s = mantissa * 2^exponent, mantissa in [0.5, 1)
        s = torch.where(mantissa == 0.5, s, torch.ldexp(torch.ones_like(s), exponent.clamp(max=127)))
    return torch.where(s > 0, s, 1.0)


def intq_params(
    fmt: IntQ, amax: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, finite: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale ``s`` (and zero point ``z``, float) of intq groups from their statistics.

    ``amax = max |x|``, ``lo = min(x_min, 0)``, ``hi = max(x_max, 0)``, ``finite``: the
    group holds no NaN/Inf. A non-finite group gets ``s = NaN`` and ``z = 0``.
    """
    if fmt.symmetric:
        s = _div(amax * torch.tensor(fmt.clip, dtype=torch.float32), 2 ** (fmt.bits - 1) - 1)
        s = round_scale(torch.where(amax == 0, 1.0, s), fmt.scale_dtype)
        z = None
    else:
        s = _div(hi - lo, 2**fmt.bits - 1)
        s = round_scale(torch.where(s == 0, 1.0, s), fmt.scale_dtype)
        z = torch.where(finite, torch.round(-lo / s), 0.0)
    return torch.where(finite, s, torch.nan), z


def round_scale(s: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """Positive fp32 scales rounded down to a value of ``dtype`` (None: unchanged), at least its smallest subnormal.

    Down, not to nearest: a group's range still reaches the last code, so qdq stays idempotent
    and the outermost values are clipped by at most ``2^-8`` of a step (bf16; fp16 ``2^-11``).
    """
    if dtype is None:
        return s
    target = getattr(torch, dtype)
    info = torch.finfo(target)
    nearest = s.clamp(max=info.max).to(target)
    above = nearest.float() > s
    down = torch.where(above, (nearest.view(torch.int16) - 1).view(target), nearest).float()  # one ulp down
    return torch.where(torch.isnan(s), s, down.clamp(min=info.smallest_normal * info.eps))


def fp8_scale(amax: torch.Tensor, scale_dtype: str | None = None) -> torch.Tensor:
    """``s = amax / 448`` (1 for a zero group, NaN for a non-finite one), rounded to ``scale_dtype`` if given."""
    s = round_scale(torch.where(amax == 0, 1.0, _div(amax, E4M3_MAX)), scale_dtype)
    return torch.where(torch.isfinite(amax), s, torch.nan)


class Scales(NamedTuple):
    """The scales of a tensor's groups, as a :class:`QTensor` stores them.

    ``scales`` ``[..., G]`` in the format's storage dtype (fp8 ``"tensor"``: 0-d);
    ``global_scale``: nvfp4 only (fp32 0-d); ``zero_points``: asymmetric intq only (uint8 ``[..., G]``).
    """

    scales: torch.Tensor
    global_scale: torch.Tensor | None = None
    zero_points: torch.Tensor | None = None


def group_view(x32: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``x32`` ``[..., n]`` as ``[..., G, g]``: the scale groups of ``fmt`` (one per row when it has none)."""
    return _groups(x32, fmt.group)


def choose_scales(xg: torch.Tensor, fmt: Format, global_scale: torch.Tensor | None = None) -> Scales:
    """The scales the format's rule picks for fp32 groups ``xg`` ``[..., G, g]``.

    ``global_scale``: nvfp4's ``s_g`` when already fixed (else taken from ``xg`` by the
    format's rule); fp8 ``"tensor"`` takes one scale over all of ``xg``.
    """
    if isinstance(fmt, MX):
        byte = torch.where(torch.isfinite(amax := xg.abs().amax(-1)), mx_scale_exponent(amax, fmt) + 127, E8M0_NAN)
        return Scales(byte.to(torch.uint8).view(torch.float8_e8m0fnu))
    if isinstance(fmt, NVFP4):
        s_g = nvfp4_global_scale(xg, fmt) if global_scale is None else global_scale
        amax = xg.abs().amax(-1)
        s_b = e4m3_round((_div(amax, E2M1_MAX) / s_g).clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX))
        return Scales(torch.where(torch.isfinite(amax), s_b.float(), torch.nan).to(torch.float8_e4m3fn), s_g)
    if isinstance(fmt, IntQ):
        finite = torch.isfinite(xg).all(-1)
        lo, hi = xg.amin(-1).clamp(max=0.0), xg.amax(-1).clamp(min=0.0)
        s, z = intq_params(fmt, xg.abs().amax(-1), lo, hi, finite)
        return Scales(s, zero_points=None if z is None else z.to(torch.uint8))
    amax = xg.abs().amax(-1) if fmt.granularity != "tensor" else _amax_all(xg)
    return Scales(fp8_scale(amax, fmt.scale_dtype))


def code_dtype(fmt: Format) -> torch.dtype:
    """The dtype of :func:`encode`'s unpacked codes for ``fmt``."""
    if fmt.bits <= 4:
        return torch.uint8
    if isinstance(fmt, IntQ):
        return torch.int8 if fmt.symmetric else torch.uint8
    return torch.float8_e4m3fn


def encode(xg: torch.Tensor, fmt: Format, sc: Scales) -> torch.Tensor:
    """Element codes of fp32 groups ``xg`` ``[..., G, g]`` under fixed scales ``sc``, unpacked.

    Returns ``[..., G, g]``: uint8 4-bit codes (mxfp4, nvfp4, intq bits <= 4), float8_e4m3fn
    (mxfp8, fp8) or int8 / uint8 (intq bits > 4). A group whose scale is NaN gets codes 0.
    ``xg`` may hold any slice of its groups' columns (``g`` = 1 codes one column).
    """
    if isinstance(fmt, MX):
        byte = sc.scales.view(torch.uint8)
        finite = (byte != E8M0_NAN)[..., None]
        v = xg * exp2_exact(127 - byte.to(torch.int32))[..., None]
        if fmt.element == "e2m1":
            return torch.where(finite, e2m1_encode(v), 0)
        return torch.where(finite, e4m3_round(v).float(), 0.0).to(torch.float8_e4m3fn)
    if isinstance(fmt, NVFP4):
        s_b = sc.scales.float()
        v = (xg / (s_b * sc.global_scale)[..., None]).clamp(-E2M1_MAX, E2M1_MAX)
        return torch.where(torch.isfinite(s_b)[..., None], e2m1_encode(v), 0)
    if isinstance(fmt, IntQ):
        s = sc.scales[..., None]
        if fmt.symmetric:
            qmax = 2 ** (fmt.bits - 1) - 1
            q = torch.round(xg / s).clamp(-qmax - 1, qmax)
        else:
            q = (torch.round(xg / s) + sc.zero_points.float()[..., None]).clamp(0, 2**fmt.bits - 1)
        return _int_codes(torch.where(torch.isnan(s), 0.0, q), fmt)
    s = sc.scales if sc.scales.ndim == 0 else sc.scales[..., None]
    return torch.where(torch.isfinite(s), e4m3_round(xg / s).float(), 0.0).to(torch.float8_e4m3fn)


def _int_codes(q: torch.Tensor, fmt: IntQ) -> torch.Tensor:
    """Integer-valued floats ``q`` as intq codes: 4-bit two's complement (or offset) nibbles, else int8 / uint8."""
    if fmt.bits <= 4:
        return q.to(torch.int8).view(torch.uint8) & 0xF
    return q.to(torch.int8 if fmt.symmetric else torch.uint8)


def _quantize_ct(x: torch.Tensor, fmt: FP8 | IntQ) -> QTensor:
    """``rule="compressed-tensors"`` (see :func:`rotfn.fp8`, :func:`rotfn.intq`): each step as that library's
    quantizer computes it, rounded to the input's dtype ``D``; scales stored in float32 (they are values of D)."""
    d = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    xg = group_view(x.to(d), fmt)
    whole = isinstance(fmt, FP8) and fmt.granularity == "tensor"
    amax = _amax_all(xg) if whole else xg.abs().amax(-1)
    finite = torch.isfinite(xg).all() if whole else torch.isfinite(xg).all(-1)
    top = E4M3_MAX if isinstance(fmt, FP8) else (2**fmt.bits - 1) / 2
    s = amax / torch.full_like(amax, top)  # a division in D, as compressed-tensors divides
    s = torch.where(s == 0, torch.finfo(d).eps, s)
    v = xg / (s if whole else s[..., None]) + 0.0  # compressed-tensors adds its zero point: -0 becomes +0
    ok = finite if whole else finite[..., None]
    if isinstance(fmt, FP8):
        codes = torch.where(ok, e4m3_round(v.float()).float(), 0.0).to(torch.float8_e4m3fn)
    else:
        q = torch.round(v.float()).clamp(-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1)
        codes = _int_codes(torch.where(ok, q, 0.0), fmt)
    return pack(codes, fmt, Scales(torch.where(finite, s.float(), torch.nan)), x.dtype)


def decode(codes: torch.Tensor, fmt: Format, sc: Scales) -> torch.Tensor:
    """fp32 values ``[..., G, g]`` of unpacked element codes under scales ``sc`` (inverse of :func:`encode`)."""
    if isinstance(fmt, MX):
        values = e2m1_decode(codes) if fmt.element == "e2m1" else codes.float()
        byte = sc.scales.view(torch.uint8)
        scale = exp2_exact(byte.to(torch.int32).clamp(max=254) - 127)
        return values * torch.where(byte == E8M0_NAN, torch.nan, scale)[..., None]
    if isinstance(fmt, NVFP4):
        return (e2m1_decode(codes) * sc.scales.float()[..., None]) * sc.global_scale
    if isinstance(fmt, IntQ):
        ints = codes.to(torch.int32)
        if fmt.bits <= 4 and fmt.symmetric:
            ints = ints - 16 * (ints >= 8)
        if sc.zero_points is not None:
            ints = ints - sc.zero_points.to(torch.int32)[..., None]
        return ints.float() * sc.scales[..., None]
    return codes.float() * (sc.scales if sc.scales.ndim == 0 else sc.scales[..., None])


def pack(codes: torch.Tensor, fmt: Format, sc: Scales, dtype: torch.dtype) -> QTensor:
    """The QTensor of unpacked codes ``[..., G, g]`` and their scales (4-bit codes two per byte)."""
    shape = (*codes.shape[:-2], codes.shape[-2] * codes.shape[-1])
    flat = codes.reshape(shape)
    if fmt.bits <= 4:
        flat = pack_nibbles(flat)
    return QTensor(flat, sc.scales, torch.Size(shape), dtype, fmt, sc.global_scale, sc.zero_points)


def unpack(q: QTensor) -> torch.Tensor:
    """The unpacked element codes ``[..., G, g]`` of a QTensor (inverse of :func:`pack`)."""
    codes = unpack_nibbles(q.codes, q.shape[-1]) if q.format.bits <= 4 else q.codes
    return _groups(codes, q.format.group)


def scales_of(q: QTensor) -> Scales:
    """The :class:`Scales` a QTensor holds."""
    return Scales(q.scales, q.global_scale, q.zero_points)


def quantize(x: torch.Tensor, fmt: Format) -> QTensor:
    """Quantize ``x`` ``[..., n]`` to codes + scales (reference). Inputs are validated by :func:`rotfn.quantize`.

    The rule in three steps: :func:`choose_scales` per group, :func:`encode` under them, :func:`pack`
    (``rule="compressed-tensors"`` formats: that library's arithmetic, in the input's dtype).
    """
    if getattr(fmt, "rule", None) == "compressed-tensors":
        return _quantize_ct(x, fmt)
    xg = group_view(x.float(), fmt)
    sc = choose_scales(xg, fmt)
    return pack(encode(xg, fmt, sc), fmt, sc, x.dtype)


def dequantize(q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """Decode a :class:`QTensor` to ``dtype`` (fp32 math, one cast at the end).

    Every NaN in the output is the canonical quiet NaN (``0x7FC00000`` before the
    cast), whatever sign the product of a NaN scale and a code would carry.
    """
    y = decode(unpack(q), q.format, scales_of(q)).reshape(q.shape)
    return torch.where(torch.isnan(y), torch.nan, y).to(dtype)


def qdq(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Quantize then dequantize: ``dequantize(quantize(x, fmt), x.dtype)``."""
    return dequantize(quantize(x, fmt), x.dtype)
