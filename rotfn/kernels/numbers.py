"""Triton device functions for the element and scale types: the bits of rotfn.ops.numbers, in-kernel.

Every function reproduces its torch reference bit for bit on fp32 inputs; they
use only integer bit manipulation, comparisons, ``floor`` and correctly rounded
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
    """Round fp32 to the nearest integer, ties to even (exact for |t| < 2^23)."""
    f = tl.floor(t)
    frac = t - f
    odd = (f.to(tl.int32) & 1) == 1
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return f + up.to(tl.float32)


@triton.jit
def e2m1_code(v):
    """E2M1 code (int32 0..15, sign in bit 3) of fp32 ``v``: RNE on the grid, saturating at 6."""
    m = tl.abs(v)
    c = (m > 0.25).to(tl.int32) + (m >= 0.75).to(tl.int32) + (m > 1.25).to(tl.int32)
    c += (m >= 1.75).to(tl.int32) + (m > 2.5).to(tl.int32) + (m >= 3.5).to(tl.int32) + (m > 5.0).to(tl.int32)
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return c | (sign << 3)


@triton.jit
def e2m1_value(code):
    """fp32 value of an int32 E2M1 code (0 0.5 1 1.5 2 3 4 6, sign in bit 3; code 8 is -0)."""
    mag = code & 7
    v = tl.where(mag < 4, mag.to(tl.float32) * 0.5, tl.where(mag == 7, 6.0, (mag - 2).to(tl.float32)))
    # the sign goes in by bits so that code 8 is -0 whatever the compiler does with zero signs
    return (v.to(tl.int32, bitcast=True) | ((code & 8) << 28)).to(tl.float32, bitcast=True)


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
