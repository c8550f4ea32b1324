"""Fused Triton kernels: block rotation (on the tensor cores) + quantization in one pass.

Legend: ``x`` is viewed as ``[M, N]`` (rows = all leading dims) and cut into
*chunks* of ``W`` consecutive elements of a row, ``W`` spanning whole rotation
blocks (``B``) and whole scale groups (``G``); chunk ``k`` is row ``k // (N / W)``.
Every program handles ``BR`` consecutive chunks, a ``[BR, W]`` tile that is one
contiguous stretch of memory for a contiguous ``x``. Three kernels share the
tile helpers:

* :func:`rotate_kernel`: ``x @ R`` per block;
* :func:`stats_kernel`: pass 1 of formats whose scale covers a whole row or the
  whole tensor: per-row / per-tensor ``max|x|``, ``max(x, 0)``, ``max(-x, 0)`` and a
  NaN/Inf flag, accumulated with integer atomics on the (non-negative) float bits;
* :func:`quant_kernel`: rotate, quantize, then either store the dequantized
  values (optionally rotated back) or the packed codes and per-group scales.

A rotation is the sign vector, then ``x @ T`` per ``B``-block on the tensor cores
(for a transposed spec: ``T.T``, then the signs), times ``1/sqrt(B)`` for +-1
Hadamard blocks, and is rounded to x's dtype exactly where the unfused
``rotfn.rotate`` would round it. The quantizers are :mod:`rotfn.ops.quant` line by
line (``div_rn`` for every division, scales from bits), so codes, scales and
values equal the torch reference's bit for bit on the same rotated input.
"""

import triton
import triton.language as tl

from rotfn.kernels.numbers import (
    e2m1_code,
    e2m1_round,
    e4m3_byte,
    e4m3_value,
    exp2_exact,
    fp32_exponent,
    pow2_ceil,
    rint,
    round_scale_down,
)

# FMT codes: 0 none, 1 MXFP4, 2 MXFP8, 3 NVFP4, 4 intq symmetric, 5 intq asymmetric, 6 FP8.
# SCOPE codes: scale groups inside the tile, one scale per row, one per tensor.
GROUP = tl.constexpr(0)
ROW = tl.constexpr(1)
TENSOR = tl.constexpr(2)


@triton.jit
def _nan():
    return tl.full([], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _rotate_tile(v, cols, t_ptr, tlo_ptr, s_ptr, BR: tl.constexpr, W: tl.constexpr, B: tl.constexpr,
                 TWO: tl.constexpr, SIGN_FIRST: tl.constexpr, HAS_SIGNS: tl.constexpr, TSCALE: tl.constexpr,
                 PREC: tl.constexpr):
    """``(v * s) @ blockdiag(T)`` (signs first), or ``(v @ blockdiag(T.T)) * s`` for a transposed spec; fp32.

    ``v`` is a ``[BR, W]`` tile in x's dtype and ``cols`` its ``[BR, W]`` column indices (for the signs).
    """
    if HAS_SIGNS:
        s = tl.load(s_ptr + cols)
    if SIGN_FIRST and HAS_SIGNS:
        v = (v.to(tl.float32) * s).to(v.dtype)  # a sign flip is exact in any dtype
    rb = tl.arange(0, B)
    if W != B:
        v = tl.reshape(v, [BR * W // B, B])
    acc = tl.dot(v, tl.load(t_ptr + rb[:, None] * B + rb[None, :]), input_precision=PREC, out_dtype=tl.float32)
    if TWO:  # hi + lo parts of a dense block in half precision
        acc += tl.dot(v, tl.load(tlo_ptr + rb[:, None] * B + rb[None, :]), input_precision=PREC,
                      out_dtype=tl.float32)
    if W != B:
        acc = tl.reshape(acc, [BR, W])
    acc = acc * TSCALE
    if (not SIGN_FIRST) and HAS_SIGNS:
        acc = acc * s
    return acc


@triton.jit
def _chunks(CPR, stride_x, BR: tl.constexpr, W: tl.constexpr):
    """Chunk ids of this program, their rows, and the ``[BR, W]`` input offsets and column indices."""
    k = tl.program_id(0) * BR + tl.arange(0, BR)
    row = k // CPR
    cols = ((k - row * CPR) * W)[:, None] + tl.arange(0, W)[None, :]
    return k, row, row[:, None] * stride_x + cols, cols


@triton.jit
def _load_rotated(x_ptr, offs, cols, kmask, t_ptr, tlo_ptr, s_ptr,
                  ROT: tl.constexpr, BR: tl.constexpr, W: tl.constexpr, B: tl.constexpr, TWO: tl.constexpr,
                  SIGN_FIRST: tl.constexpr, HAS_SIGNS: tl.constexpr, TSCALE: tl.constexpr, PREC: tl.constexpr):
    """The ``[BR, W]`` tile of ``rotate(x, R)`` as fp32 (already rounded to x's dtype), and x itself."""
    x = tl.load(x_ptr + offs, mask=kmask[:, None], other=0.0)
    if ROT:
        v = _rotate_tile(x, cols, t_ptr, tlo_ptr, s_ptr, BR, W, B, TWO, SIGN_FIRST, HAS_SIGNS, TSCALE, PREC)
        v = v.to(x.dtype).to(tl.float32)
    else:
        v = x.to(tl.float32)
    return v, x


@triton.jit
def _mx_exponent(amax, RULE: tl.constexpr, EMAX: tl.constexpr, MBITS: tl.constexpr, INV_MAX: tl.constexpr):
    """Clamped int32 scale exponent of MX groups (ScaleRule: 0 floor, 1 even, 2 rceil)."""
    if RULE == 0:
        e = fp32_exponent(amax) - EMAX
    elif RULE == 1:
        r = (amax.to(tl.int32, bitcast=True) + (1 << (22 - MBITS))) & -8388608
        e = fp32_exponent(r.to(tl.float32, bitcast=True)) - EMAX
    else:
        d = amax * INV_MAX
        dbits = d.to(tl.int32, bitcast=True)
        e = fp32_exponent(d) + ((dbits & 0x7FFFFF) != 0).to(tl.int32)
        e = tl.where(dbits < 0x800000, tl.where(dbits > 0x400000, -126, -127), e)
    return tl.minimum(tl.maximum(e, -127), 127)


@triton.jit
def _stats_scale(stats_ptr, sidx, kmask, FMT: tl.constexpr, BITS: tl.constexpr, CLIP: tl.constexpr,
                 SDT: tl.constexpr):
    """Scales ``s``, zero points ``z`` and the NaN/Inf flags (``[BR, 1]``) of the rows ``sidx`` (or the tensor) from
    pass 1's statistics ``[max |x|, max x+, max -x-, NaN/Inf seen]`` of the finite values: the reference's
    :func:`rotfn.ops.quant.intq_params` / :func:`~rotfn.ops.quant.fp8_scale`, in the kernel (no host work between
    the passes)."""
    base = stats_ptr + sidx * 4
    amax = tl.load(base, mask=kmask, other=0).to(tl.float32, bitcast=True)
    bad = tl.load(base + 3, mask=kmask, other=0) != 0
    z = amax * 0.0
    if FMT == 4:
        s = round_scale_down(tl.where(amax == 0, 1.0, tl.math.div_rn(amax * CLIP, (1 << (BITS - 1)) - 1.0)), SDT)
    elif FMT == 5:
        pos = tl.load(base + 1, mask=kmask, other=0).to(tl.float32, bitcast=True)
        neg = tl.load(base + 2, mask=kmask, other=0).to(tl.float32, bitcast=True)
        s = tl.math.div_rn(pos + neg, (1 << BITS) - 1.0)
        s = round_scale_down(tl.where(s == 0, 1.0, s), SDT)
        z = tl.where(bad, 0.0, rint(tl.math.div_rn(neg, s)))
    else:  # FP8
        s = round_scale_down(tl.where(amax == 0, 1.0, tl.math.div_rn(amax, 448.0)), SDT)
    return tl.where(bad, _nan(), s)[:, None], z[:, None], bad[:, None]


@triton.jit
def _global_scale(stats_ptr, gscale_ptr, GLOBAL: tl.constexpr):
    """NVFP4's global scale: given (``GLOBAL`` 0), or from pass 1's ``max |x|`` as
    :func:`rotfn.ops.quant.nvfp4_global_from_amax` (1: ``amax / 2688``, 2: that rounded up to a power of two)."""
    if GLOBAL == 0:
        return tl.load(gscale_ptr)
    s = tl.math.div_rn(tl.load(stats_ptr).to(tl.float32, bitcast=True), 2688.0)
    if GLOBAL == 2:
        return tl.where(s > 0, pow2_ceil(tl.where(s > 0, s, 1.0)), 1.0)
    return tl.where(s > 0, s, 1.0)


@triton.jit
def _quantize_tile(vg, row, kmask, stats_ptr, gscale_ptr,
                   FMT: tl.constexpr, RULE: tl.constexpr, BITS: tl.constexpr, SCOPE: tl.constexpr,
                   CLIP: tl.constexpr, EMAX: tl.constexpr, MBITS: tl.constexpr, INV_MAX: tl.constexpr,
                   SDT: tl.constexpr, GLOBAL: tl.constexpr):
    """Quantize fp32 groups ``vg [BR, NG, G]``.

    Returns ``(y, code, scale, zero, bad, s_g)``: dequantized values, int32 codes, the
    per-group scale as stored (a byte for MX/NVFP4, fp32 for intq; ``[BR, 1]`` for row and tensor scopes), the
    zero point (asymmetric intq), the NaN/Inf group mask ``[BR, NG]`` and NVFP4's global scale.
    """
    bad = tl.max(((vg.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000).to(tl.int32), axis=2) > 0
    amax = tl.max(tl.abs(vg), axis=2)
    z = amax * 0.0
    s_g = 1.0
    if SCOPE != GROUP:  # one scale per row or for the tensor, from pass 1's statistics
        s, z, bad = _stats_scale(stats_ptr, row if SCOPE == ROW else row * 0, kmask, FMT, BITS, CLIP, SDT)
    if FMT == 1 or FMT == 2:
        s = _mx_exponent(amax, RULE, EMAX, MBITS, INV_MAX)
        scale = tl.where(bad, 255, s + 127)
    elif FMT == 3:
        s_g = _global_scale(stats_ptr, gscale_ptr, GLOBAL)
        s = e4m3_value(tl.minimum(tl.maximum(tl.math.div_rn(tl.math.div_rn(amax, 6.0), s_g), 0.001953125), 448.0))
        scale = tl.where(bad, 0x7F, e4m3_byte(s))
    elif FMT == 4 or FMT == 5:
        if SCOPE == GROUP:
            if FMT == 4:
                s = tl.math.div_rn(amax * CLIP, (1 << (BITS - 1)) - 1.0)
                s = round_scale_down(tl.where(amax == 0, 1.0, s), SDT)
            else:
                lo = tl.minimum(tl.min(vg, axis=2), 0.0)
                s = tl.math.div_rn(tl.maximum(tl.max(vg, axis=2), 0.0) - lo, (1 << BITS) - 1.0)
                s = round_scale_down(tl.where(s == 0, 1.0, s), SDT)
                z = tl.where(bad, 0.0, rint(tl.math.div_rn(-lo, s)))
            s = tl.where(bad, _nan(), s)
        scale = s
    else:  # FP8, one scale per row or tensor
        scale = s
    y, code = code_value(vg, s[:, :, None], z[:, :, None], s_g, bad[:, :, None], FMT, BITS)
    return y, code, scale, z, bad, s_g


@triton.jit
def code_value(v, s, z, s_g, bad, FMT: tl.constexpr, BITS: tl.constexpr):
    """int32 codes and dequantized fp32 values of ``v`` under given scales, broadcast to ``v``.

    ``s``: MX the int32 scale exponent, NVFP4 the E4M3 group scale (fp32, with the global
    ``s_g``), intq and FP8 the fp32 scale; ``z``: asymmetric intq's zero point (float);
    ``bad``: groups whose codes are 0 and values NaN (a NaN/Inf group).
    """
    if FMT == 1 or FMT == 2:
        scaled = v * exp2_exact(-s)
        if FMT == 1:
            code = e2m1_code(scaled)  # only the quantize kernel stores codes; qdq uses the value alone
            val = e2m1_round(scaled)
        else:
            val = e4m3_value(scaled)
            code = e4m3_byte(val)
        y = val * exp2_exact(s)
    elif FMT == 3:
        scaled = tl.minimum(tl.maximum(tl.math.div_rn(v, s * s_g), -6.0), 6.0)
        code = e2m1_code(scaled)
        y = (e2m1_round(scaled) * s) * s_g
    elif FMT == 4 or FMT == 5:
        q = rint(tl.math.div_rn(v, s))
        if FMT == 4:
            q = tl.minimum(tl.maximum(q, -(1 << (BITS - 1)) * 1.0), (1 << (BITS - 1)) - 1.0)
            y = q * s
        else:
            q = tl.minimum(tl.maximum(q + z, 0.0), (1 << BITS) - 1.0)
            y = (q - z) * s
        code = q.to(tl.int32) & 0xFF  # two's complement byte; nibble packing keeps the low 4 bits
    else:
        val = e4m3_value(tl.math.div_rn(v, s))
        code = e4m3_byte(val)
        y = val * s
    code = tl.where(bad, 0, code)
    y = tl.where(bad | (y != y), _nan(), y)  # canonical NaN, as the reference
    return y, code


@triton.jit(do_not_specialize=["K"])  # one compiled kernel for every token count
def rotate_kernel(x_ptr, y_ptr, t_ptr, tlo_ptr, s_ptr, K, CPR, stride_x,
                  BR: tl.constexpr, W: tl.constexpr, B: tl.constexpr, TWO: tl.constexpr,
                  SIGN_FIRST: tl.constexpr, HAS_SIGNS: tl.constexpr, TSCALE: tl.constexpr, PREC: tl.constexpr):
    k, row, offs, cols = _chunks(CPR, stride_x, BR, W)
    kmask = k < K
    v, x = _load_rotated(x_ptr, offs, cols, kmask, t_ptr, tlo_ptr, s_ptr,
                         True, BR, W, B, TWO, SIGN_FIRST, HAS_SIGNS, TSCALE, PREC)
    out = k[:, None] * W + tl.arange(0, W)[None, :]
    tl.store(y_ptr + out, v.to(y_ptr.dtype.element_ty), mask=kmask[:, None])


@triton.jit(do_not_specialize=["K"])
def stats_kernel(x_ptr, stats_ptr, t_ptr, tlo_ptr, s_ptr, K, CPR, stride_x,
                 ROT: tl.constexpr, BR: tl.constexpr, W: tl.constexpr, B: tl.constexpr, TWO: tl.constexpr,
                 SIGN_FIRST: tl.constexpr, HAS_SIGNS: tl.constexpr, TSCALE: tl.constexpr, PREC: tl.constexpr,
                 SCOPE: tl.constexpr):
    k, row, offs, cols = _chunks(CPR, stride_x, BR, W)
    kmask = k < K
    v, x = _load_rotated(x_ptr, offs, cols, kmask, t_ptr, tlo_ptr, s_ptr,
                         ROT, BR, W, B, TWO, SIGN_FIRST, HAS_SIGNS, TSCALE, PREC)
    bad_el = (v.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000
    amax = tl.max(tl.where(bad_el, 0.0, tl.abs(v)), axis=1)
    pos = tl.max(tl.where(bad_el, 0.0, tl.maximum(v, 0.0)), axis=1)
    neg = tl.max(tl.where(bad_el, 0.0, tl.maximum(-v, 0.0)), axis=1)
    bad = tl.max(bad_el.to(tl.int32), axis=1)
    if SCOPE == ROW:
        base = stats_ptr + row * 4
        tl.atomic_max(base, amax.to(tl.int32, bitcast=True), mask=kmask)
        tl.atomic_max(base + 1, pos.to(tl.int32, bitcast=True), mask=kmask)
        tl.atomic_max(base + 2, neg.to(tl.int32, bitcast=True), mask=kmask)
        tl.atomic_max(base + 3, bad, mask=kmask)
    else:  # chunks past K were loaded as zeros, so they cannot raise a maximum
        tl.atomic_max(stats_ptr, tl.max(amax, axis=0).to(tl.int32, bitcast=True))
        tl.atomic_max(stats_ptr + 1, tl.max(pos, axis=0).to(tl.int32, bitcast=True))
        tl.atomic_max(stats_ptr + 2, tl.max(neg, axis=0).to(tl.int32, bitcast=True))
        tl.atomic_max(stats_ptr + 3, tl.max(bad, axis=0))


@triton.jit(do_not_specialize=["K"])
def quant_kernel(
    x_ptr, y_ptr, codes_ptr, scales_ptr, zeros_ptr, stats_ptr, gscale_ptr, rowscale_ptr, gout_ptr,
    t_ptr, tlo_ptr, tb_ptr, tblo_ptr, s_ptr, K, CPR, stride_x,
    STORE_CODES: tl.constexpr, BR: tl.constexpr, W: tl.constexpr,
    ROT: tl.constexpr, B: tl.constexpr, TWO: tl.constexpr, SIGN_FIRST: tl.constexpr, HAS_SIGNS: tl.constexpr,
    TSCALE: tl.constexpr, BACK: tl.constexpr, BACK_SIGN_FIRST: tl.constexpr, PREC: tl.constexpr,
    FMT: tl.constexpr, RULE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, BITS: tl.constexpr,
    SCOPE: tl.constexpr, CLIP: tl.constexpr, EMAX: tl.constexpr, MBITS: tl.constexpr, INV_MAX: tl.constexpr,
    SDT: tl.constexpr, GLOBAL: tl.constexpr,
):
    """Quantize (or qdq) ``[BR, W]`` tiles. Row and tensor scales and NVFP4's measured global scale come from
    ``stats_ptr`` (pass 1); with ``STORE_CODES`` the kernel also writes the codes, the group scales, each row's (or
    the tensor's) ``(s, z)`` to ``rowscale_ptr`` and the global scale to ``gout_ptr``."""
    k, row, offs, cols = _chunks(CPR, stride_x, BR, W)
    kmask = k < K
    v, x = _load_rotated(x_ptr, offs, cols, kmask, t_ptr, tlo_ptr, s_ptr,
                         ROT, BR, W, B, TWO, SIGN_FIRST, HAS_SIGNS, TSCALE, PREC)
    y, code, scale, z, bad, s_g = _quantize_tile(tl.reshape(v, [BR, NG, G]), row, kmask, stats_ptr, gscale_ptr,
                                                 FMT, RULE, BITS, SCOPE, CLIP, EMAX, MBITS, INV_MAX, SDT, GLOBAL)
    if not STORE_CODES:
        y = tl.reshape(y, [BR, W])
        if BACK:  # R.T: the transposed tile, with the signs on the other side
            y = _rotate_tile(y.to(x.dtype), cols, tb_ptr, tblo_ptr, s_ptr, BR, W, B, TWO, BACK_SIGN_FIRST,
                             HAS_SIGNS, TSCALE, PREC)
        out = k[:, None] * W + tl.arange(0, W)[None, :]
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=kmask[:, None])
    else:
        code = tl.reshape(code, [BR, W])
        if BITS <= 4:
            lo, hi = tl.split(tl.reshape(code, [BR, W // 2, 2]))
            out = k[:, None] * (W // 2) + tl.arange(0, W // 2)[None, :]
            tl.store(codes_ptr + out, ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8), mask=kmask[:, None])
        else:
            out = k[:, None] * W + tl.arange(0, W)[None, :]
            tl.store(codes_ptr + out, code.to(tl.uint8), mask=kmask[:, None])
        if SCOPE == GROUP:
            out = k[:, None] * NG + tl.arange(0, NG)[None, :]
            tl.store(scales_ptr + out, scale.to(scales_ptr.dtype.element_ty), mask=kmask[:, None])
            if FMT == 5:
                tl.store(zeros_ptr + out, z.to(tl.uint8), mask=kmask[:, None])
        else:  # the first chunk of each row (of the tensor) writes its scale and zero point
            if SCOPE == ROW:
                first = kmask & (k == row * CPR)
                sidx = row
            else:
                first = k == 0
                sidx = row * 0
            tl.store(rowscale_ptr + sidx * 2, tl.reshape(scale, [BR]), mask=first)
            tl.store(rowscale_ptr + sidx * 2 + 1, tl.reshape(z, [BR]), mask=first)
        if GLOBAL != 0:
            tl.store(gout_ptr, s_g, mask=tl.program_id(0) == 0)
