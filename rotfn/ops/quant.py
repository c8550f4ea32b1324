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
from rotfn.specs.formats import FP8, MX, NVFP4, Format, IntQ, ScaleRule

__all__ = [
    "quantize", "dequantize", "qdq",
    "mx_scale_exponent", "nvfp4_global_scale", "nvfp4_global_from_amax", "intq_params", "fp8_scale",
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
    """The clamped int32 scale exponent ``e`` of MX blocks with fp32 maxima ``amax``.

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

    ``"tensor"``: ``amax / 2688`` over the finite values (1 when that is 0); a float: itself; None: 1.
    """
    if fmt.global_scale == "tensor":
        return nvfp4_global_from_amax(_amax_all(torch.where(torch.isfinite(x32), x32.abs(), 0.0)))
    value = 1.0 if fmt.global_scale is None else fmt.global_scale
    return torch.tensor(value, dtype=torch.float32, device=x32.device)


def nvfp4_global_from_amax(finite_amax: torch.Tensor) -> torch.Tensor:
    """``s_g = amax / (448 * 6)`` from the amax of the finite values, 1 when that is 0."""
    s = _div(finite_amax, E4M3_MAX * E2M1_MAX)
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
        s = torch.where(amax == 0, 1.0, s)
        z = None
    else:
        s = _div(hi - lo, 2**fmt.bits - 1)
        s = torch.where(s == 0, 1.0, s)
        z = torch.where(finite, torch.round(-lo / s), 0.0)
    return torch.where(finite, s, torch.nan), z


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """``s = amax / 448`` (1 for a zero group, NaN for a non-finite one)."""
    s = torch.where(amax == 0, 1.0, _div(amax, E4M3_MAX))
    return torch.where(torch.isfinite(amax), s, torch.nan)


def _quantize_mx(x32: torch.Tensor, fmt: MX) -> QTensor:
    xg = _groups(x32, fmt.block)
    amax = xg.abs().amax(-1)
    finite = torch.isfinite(amax)
    e = mx_scale_exponent(amax, fmt)
    v = xg * exp2_exact(-e)[..., None]
    if fmt.element == "e2m1":
        codes = pack_nibbles(torch.where(finite[..., None], e2m1_encode(v), 0).flatten(-2))
    else:
        codes = torch.where(finite[..., None], e4m3_round(v).float(), 0.0).flatten(-2).to(torch.float8_e4m3fn)
    byte = torch.where(finite, e + 127, E8M0_NAN).to(torch.uint8)
    return QTensor(codes, byte.view(torch.float8_e8m0fnu), x32.shape, x32.dtype, fmt)


def _dequantize_mx(q: QTensor) -> torch.Tensor:
    n = q.shape[-1]
    if q.format.element == "e2m1":
        values = e2m1_decode(unpack_nibbles(q.codes, n))
    else:
        values = q.codes.float()
    byte = q.scales.view(torch.uint8)
    scale = exp2_exact(byte.to(torch.int32).clamp(max=254) - 127)
    scale = torch.where(byte == E8M0_NAN, torch.nan, scale)
    return (_groups(values, q.format.block) * scale[..., None]).flatten(-2)


def _quantize_nvfp4(x32: torch.Tensor, fmt: NVFP4) -> QTensor:
    s_g = nvfp4_global_scale(x32, fmt)
    xg = _groups(x32, fmt.block)
    amax = xg.abs().amax(-1)
    finite = torch.isfinite(amax)
    s_b = e4m3_round((_div(amax, E2M1_MAX) / s_g).clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX))
    s_b = torch.where(finite, s_b.float(), torch.nan).to(torch.float8_e4m3fn)
    v = (xg / (s_b.float() * s_g)[..., None]).clamp(-E2M1_MAX, E2M1_MAX)
    codes = pack_nibbles(torch.where(finite[..., None], e2m1_encode(v), 0).flatten(-2))
    return QTensor(codes, s_b, x32.shape, x32.dtype, fmt, global_scale=s_g)


def _dequantize_nvfp4(q: QTensor) -> torch.Tensor:
    values = _groups(e2m1_decode(unpack_nibbles(q.codes, q.shape[-1])), q.format.block)
    return ((values * q.scales.float()[..., None]) * q.global_scale).flatten(-2)


def _quantize_intq(x32: torch.Tensor, fmt: IntQ) -> QTensor:
    xg = _groups(x32, fmt.block)
    finite = torch.isfinite(xg).all(-1)
    lo, hi = xg.amin(-1).clamp(max=0.0), xg.amax(-1).clamp(min=0.0)
    s, z = intq_params(fmt, xg.abs().amax(-1), lo, hi, finite)
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1
        q = torch.round(xg / s[..., None]).clamp(-qmax - 1, qmax)
    else:
        q = (torch.round(xg / s[..., None]) + z[..., None]).clamp(0, 2**fmt.bits - 1)
    q = torch.where(finite[..., None], q, 0.0).flatten(-2)
    if fmt.bits <= 4:
        codes = pack_nibbles(q.to(torch.int8).view(torch.uint8) & 0xF)
    else:
        codes = q.to(torch.int8 if fmt.symmetric else torch.uint8)
    zero = None if z is None else z.to(torch.uint8)
    return QTensor(codes, s, x32.shape, x32.dtype, fmt, zero_points=zero)


def _dequantize_intq(q: QTensor) -> torch.Tensor:
    fmt = q.format
    if fmt.bits <= 4:
        nibbles = unpack_nibbles(q.codes, q.shape[-1]).to(torch.int32)
        ints = nibbles - 16 * (nibbles >= 8) if fmt.symmetric else nibbles
    else:
        ints = q.codes.to(torch.int32)
    ints = _groups(ints, fmt.block)
    if q.zero_points is not None:
        ints = ints - q.zero_points.to(torch.int32)[..., None]
    return (ints.float() * q.scales[..., None]).flatten(-2)


def _quantize_fp8(x32: torch.Tensor, fmt: FP8) -> QTensor:
    per_row = fmt.granularity != "tensor"
    amax = x32.abs().amax(-1, keepdim=True) if per_row else _amax_all(x32)
    s = fp8_scale(amax)
    codes = torch.where(torch.isfinite(s), e4m3_round(x32 / s).float(), 0.0).to(torch.float8_e4m3fn)
    return QTensor(codes, s, x32.shape, x32.dtype, fmt)


def _dequantize_fp8(q: QTensor) -> torch.Tensor:
    return q.codes.float() * q.scales


_QUANTIZE = {MX: _quantize_mx, NVFP4: _quantize_nvfp4, IntQ: _quantize_intq, FP8: _quantize_fp8}
_DEQUANTIZE = {MX: _dequantize_mx, NVFP4: _dequantize_nvfp4, IntQ: _dequantize_intq, FP8: _dequantize_fp8}


def quantize(x: torch.Tensor, fmt: Format) -> QTensor:
    """Quantize ``x`` ``[..., n]`` to codes + scales (reference). Inputs are validated by :func:`rotfn.quantize`."""
    qt = _QUANTIZE[type(fmt)](x.float(), fmt)
    return QTensor(qt.codes, qt.scales, x.shape, x.dtype, fmt, qt.global_scale, qt.zero_points)


def dequantize(q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """Decode a :class:`QTensor` to ``dtype`` (fp32 math, one cast at the end).

    Every NaN in the output is the canonical quiet NaN (``0x7FC00000`` before the
    cast), whatever sign the product of a NaN scale and a code would carry.
    """
    y = _DEQUANTIZE[type(q.format)](q).reshape(q.shape)
    return torch.where(torch.isnan(y), torch.nan, y).to(dtype)


def qdq(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Quantize then dequantize: ``dequantize(quantize(x, fmt), x.dtype)``."""
    return dequantize(quantize(x, fmt), x.dtype)
