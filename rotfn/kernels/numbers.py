"""Triton device functions for the element and scale types: the bits of rotfn.ops.numbers, in-kernel.

Every function reproduces its torch reference bit for bit on fp32 inputs; they
use only integer bit manipulation, comparisons, IEEE fp32 addition and correctly rounded
division (``div_rn``), so they behave the same on the GPU and under
``TRITON_INTERPRET=1``.
"""

import triton
import triton.language as tl


@triton.jit
def fp32_exponent(a):
    """Unbiased exponent from the bits of fp32 ``a`` (int32); zero and subnormals give -127."""
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def exp2_exact(e):
    """``2^e`` in fp32 from bits, int32 ``e`` in [-127, 127] (2^-127 is the subnormal 0x400000)."""
    bits = tl.where(e > -127, (e + 127) << 23, 0x400000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def rint(t):
    """Round fp32 to the nearest integer, ties to even (exact for |t| <= 2^22); a zero result is +0.

    Adding ``1.5 * 2^23`` leaves no fraction bits, so the fp32 addition itself rounds ``t``
    to an integer (ties to even); subtracting it back is exact. (An FMA contraction of a
    product into the addition rounds once, the same.) Every caller stays far inside the
    range: quantizer levels, and subnormal E4M3 steps below 8.
    """
    return (t + 12582912.0) - 12582912.0


@triton.jit
def _e2m1_magnitude(bits):
    """``|v|`` rounded to the E2M1 grid, from the int32 bits of ``|v|`` (``|v| < 8``).

    From 1 up, E2M1 is fp32 with one mantissa bit: the 22 lower mantissa bits are rounded
    away (ties to even) and 8 saturates to 6. Below 1 the grid is 0, 0.5, 1 (ties 0.25 -> 0,
    0.75 -> 1). Every caller scales into ``|v| < 8`` first.
    """
    a = bits.to(tl.float32, bitcast=True)
    normal = ((bits + (((bits >> 22) & 1) + 0x1FFFFF)) & -4194304).to(tl.float32, bitcast=True)
    small = tl.where(a >= 0.75, 1.0, tl.where(a > 0.25, 0.5, 0.0))
    return tl.where(a >= 1.0, tl.minimum(normal, 6.0), small)


@triton.jit
def e2m1_round(v):
    """fp32 ``v`` (``|v| < 8``) rounded to E2M1 (0 0.5 1 1.5 2 3 4 6), RNE, saturating at 6, sign kept.

    The value of :func:`e2m1_code` without the code (what ``qdq`` needs). Negative values
    that round to zero give -0, as code 8 does.
    """
    vbits = v.to(tl.int32, bitcast=True)
    mag = _e2m1_magnitude(vbits & 0x7FFFFFFF)
    return (mag.to(tl.int32, bitcast=True) | (vbits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_code(v):
    """E2M1 code (int32 0..15, sign in bit 3) of fp32 ``v`` (``|v| < 8``): RNE on the grid, saturating at 6.

    Magnitude codes 0..7 are 0 0.5 1 1.5 2 3 4 6: twice the value below 2, the value plus 2
    from 2 to 4, and 7 for 6.
    """
    vbits = v.to(tl.int32, bitcast=True)
    mag = _e2m1_magnitude(vbits & 0x7FFFFFFF)
    c = tl.where(mag < 2.0, mag * 2.0, tl.where(mag == 6.0, 7.0, mag + 2.0)).to(tl.int32)
    return c | ((vbits >> 28) & 8)


@triton.jit
def e4m3_value(v):
    """Round fp32 ``v`` to E4M3 (RNE, saturating at +-448) and return the fp32 value (sign of zero kept)."""
    vbits = v.to(tl.int32, bitcast=True)
    a = tl.minimum(tl.abs(v), 448.0)
    bits = a.to(tl.int32, bitcast=True)
    # normals: round the 23-bit mantissa to 3 bits, ties to even
    normal = ((bits + (((bits >> 20) & 1) + 0x7FFFF)) & -1048576).to(tl.float32, bitcast=True)
    # subnormals (a < 2^-6): multiples of 2^-9
    sub = rint(a * 512.0) * 0.001953125
    mag = tl.where(a >= 0.015625, normal, sub)
    return (mag.to(tl.int32, bitcast=True) | (vbits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_byte(y):
    """The E4M3 byte (int32 0..255) of an fp32 value already on the E4M3 grid."""
    ybits = y.to(tl.int32, bitcast=True)
    a = tl.abs(y)
    e = fp32_exponent(a)
    normal = ((e + 7) << 3) | ((a.to(tl.int32, bitcast=True) >> 20) & 7)
    sub = (a * 512.0).to(tl.int32)
    return tl.where(a >= 0.015625, normal, sub) | ((ybits >> 24) & 0x80)


@triton.jit
def exp2_any(e):
    """``2^e`` in fp32 from bits for int32 ``e`` in [-149, 127] (subnormals too)."""
    bits = tl.where(e > -127, (e + 127) << 23, 1 << tl.maximum(e + 149, 0))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def pow2_ceil(s):
    """``2^ceil(log2 s)`` of a positive finite fp32 ``s`` (``s`` itself when a power of two), as
    :func:`rotfn.ops.quant.nvfp4_global_from_amax` with ``pow2``; subnormal ``s`` from its mantissa bits."""
    bits = s.to(tl.int32, bitcast=True)
    normal = tl.where((bits & 0x7FFFFF) == 0, s, exp2_any(tl.minimum(fp32_exponent(s) + 1, 127)))
    m = bits & 0x7FFFFF  # a subnormal is m * 2^-149
    top = fp32_exponent(m.to(tl.float32))  # floor(log2 m), exact: m < 2^23
    sub = exp2_any(tl.where((m & (m - 1)) == 0, top, top + 1) - 149)
    return tl.where(bits >= 0x800000, normal, sub)


@triton.jit
def round_scale_down(s, SDT: tl.constexpr):
    """Positive fp32 scales rounded down to a bfloat16 (``SDT`` 1) or float16 (2) value, at least that dtype's
    smallest subnormal and at most its largest value, NaN kept (:func:`rotfn.ops.quant.round_scale`); 0: unchanged.

    The largest value of the dtype at most ``s`` is ``s`` with the mantissa bits the dtype lacks cleared (bf16 has
    fp32's exponents; fp16 normals from ``2^-14``, below that multiples of ``2^-24``).
    """
    if SDT == 0:
        return s
    bits = s.to(tl.int32, bitcast=True)
    if SDT == 1:
        out = tl.maximum(tl.minimum(bits & -65536, 0x7F7F0000), 0x10000).to(tl.float32, bitcast=True)
    else:
        normal = tl.minimum((bits & -8192).to(tl.float32, bitcast=True), 65504.0)
        t = s * 16777216.0  # in 2^-24 steps: exact, and in [1, 1024) where used
        tbits = t.to(tl.int32, bitcast=True)
        whole = (tbits & -(1 << (23 - tl.minimum(tl.maximum(fp32_exponent(t), 0), 23)))).to(tl.float32, bitcast=True)
        out = tl.where(s >= 6.103515625e-05, normal, tl.where(s >= 5.960464477539063e-08, whole * 5.960464477539063e-08,
                                                              5.960464477539063e-08))
    return tl.where(s != s, s, out)
