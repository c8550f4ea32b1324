"""Triton kernel: large Hadamard rotations (``b = K * 2^m``, 512 <= b <= 32768) by a mixed-radix FWHT.

Legend: ``x`` is ``[M, N]``; every program rotates one *block* of ``B = K * P``
consecutive elements of a row (``P = 2^m``; a full rotation has ``B = N``). The
block is held in registers as ``X[KP, P]`` (the factor axis ``k`` padded to the
power of two ``KP``; padded rows load as zeros and are never stored), and

    ``X @ H_B = A.T @ X @ H_P``,  ``H_P = H_R3 (x) H_R2 (x) H_R1``,

as in :func:`rotfn.ops.hadamard.hadamard_apply`: one small GEMM per radix
``R1, R2, R3`` (tables loaded from a ``128 x 128`` Sylvester matrix; the same balanced split of the ``m`` bits as the reference FWHT,
so the sums run in the same groups; ``H_R1`` from the right on the contiguous
axis, ``H_R2`` and ``H_R3`` from the left, so the data never changes order), then
the ``K x K`` factor ``A`` along ``k`` in chunks of ``KC`` output rows, then
``1/sqrt(B)``. Small blocks are batched, ``ROWS`` per program.

Precision: every product is exact and sums accumulate in fp32. The first GEMM
takes a half-precision input as is; later GEMMs (fp32 inputs) cut each value
into ``PARTS`` bfloat16 pieces on the tensor cores: 3 (the whole 24-bit
mantissa) for fp32 outputs, 2 (16 bits, far below one ulp of the half-precision
output) for fp16/bf16 outputs; ``PARTS=1`` (one exact fp32 GEMM) under the
interpreter, whose bf16 arithmetic is unreliable.
"""

import triton
import triton.language as tl


@triton.jit
def _sylvester(h_ptr, R: tl.constexpr):
    """The ``R x R`` +-1 Sylvester matrix: the top-left corner of the ``128 x 128`` table at ``h_ptr``."""
    i = tl.arange(0, R)
    return tl.load(h_ptr + i[:, None] * 128 + i[None, :])


@triton.jit
def _dot(h, v, acc, LEFT: tl.constexpr):
    """``acc + h @ v`` (``LEFT``) or ``acc + v @ h``, fp32 accumulation (2-D or batched 3-D)."""
    if LEFT:
        acc = tl.dot(h, v, acc, input_precision="ieee", out_dtype=tl.float32)
    else:
        acc = tl.dot(v, h, acc, input_precision="ieee", out_dtype=tl.float32)
    return acc


@triton.jit
def _mul(h, v, LEFT: tl.constexpr, PARTS: tl.constexpr):
    """``h @ v`` (``LEFT``) or ``v @ h`` in fp32, for an integer-valued ``h`` (exact in any float dtype).

    A half-precision ``v`` goes to the tensor cores as is (exact products). An fp32
    ``v`` is cut into ``PARTS`` bfloat16 pieces that sum to it (2: 16 bits, 3: the whole
    24-bit mantissa), one tensor-core GEMM each; ``PARTS=1`` is one exact fp32 GEMM.
    """
    if LEFT:
        acc = tl.zeros([v.shape[0], h.shape[1], v.shape[2]] if len(v.shape) == 3 else [h.shape[0], v.shape[1]],
                       tl.float32)
    else:
        acc = tl.zeros(v.shape, tl.float32)
    if v.dtype != tl.float32:
        acc = _dot(h.to(v.dtype), v, acc, LEFT)
    elif PARTS == 1:
        acc = _dot(h.to(tl.float32), v, acc, LEFT)
    else:
        hb = h.to(tl.bfloat16)
        part = v.to(tl.bfloat16)
        rest = v - part.to(tl.float32)
        acc = _dot(hb, part, acc, LEFT)
        if PARTS == 3:
            part = rest.to(tl.bfloat16)
            rest = rest - part.to(tl.float32)
            acc = _dot(hb, part, acc, LEFT)
        acc = _dot(hb, rest.to(tl.bfloat16), acc, LEFT)
    return acc


@triton.jit
def _left(h, v, OUTER: tl.constexpr, RI: tl.constexpr, INNER: tl.constexpr, PARTS: tl.constexpr):
    """``h [RO, RI] @ v[o]`` for ``v`` viewed as ``[OUTER, RI, INNER]`` (batched over ``o``); fp32."""
    if OUTER == 1:
        v = _mul(h, tl.reshape(v, [RI, INNER]), True, PARTS)
    else:
        v = _mul(tl.broadcast_to(h[None, :, :], [OUTER, h.shape[0], RI]), tl.reshape(v, [OUTER, RI, INNER]), True,
                 PARTS)
    return v


@triton.jit
def fwht_block(x, h_ptr, NK: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
               PARTS: tl.constexpr):
    """Unnormalized ``X @ H_P`` of ``x [NK, P]`` along its last axis (``P = R3 R2 R1``); fp32, same layout.

    Each row is ``[R3, R2, R1]``: ``H_R1`` multiplies the contiguous axis from the
    right, ``H_R2`` and ``H_R3`` multiply their axes from the left (batched over the
    outer axes), so the data never changes order.
    """
    P: tl.constexpr = R1 * R2 * R3
    v = _mul(_sylvester(h_ptr, R1), tl.reshape(x, [NK * R3 * R2, R1]), False, PARTS)
    if R2 > 1:
        v = _left(_sylvester(h_ptr, R2), v, NK * R3, R2, R1, PARTS)
    if R3 > 1:
        v = _left(_sylvester(h_ptr, R3), v, NK, R3, R2 * R1, PARTS)
    return tl.reshape(v, [NK, P])


@triton.jit
def _store(y_ptr, v, offs, mask, s_ptr, soffs, SCALE: tl.constexpr, HAS_SIGNS: tl.constexpr,
           SIGN_FIRST: tl.constexpr):
    """Scale by ``1/sqrt(B)``, apply trailing signs (transposed spec), round to y's dtype once, store."""
    v = v * SCALE
    if HAS_SIGNS and not SIGN_FIRST:
        v = v * tl.load(s_ptr + soffs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["NB"])  # one compiled kernel for every token count
def hadamard_kernel(x_ptr, y_ptr, h_ptr, a_ptr, s_ptr, NB, CPR, stride_x,
                    ROWS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, KC: tl.constexpr, R1: tl.constexpr,
                    R2: tl.constexpr, R3: tl.constexpr, SCALE: tl.constexpr, HAS_SIGNS: tl.constexpr,
                    SIGN_FIRST: tl.constexpr, TRANSPOSE: tl.constexpr, PARTS: tl.constexpr):
    """``y = x @ R`` for ``ROWS`` blocks per program: signs, Hadamard, ``1/sqrt(B)``, rounded to y's dtype once.

    ``NB`` blocks in all, ``CPR`` per row. The factor stage ``A.T @ V`` (``A``
    zero-padded to ``KP x KP``; ``A.T`` becomes ``A`` for a transposed spec) runs in
    chunks of ``KC`` output rows, each stored at once, so registers hold ``V`` and
    one ``KC x KP`` slice of ``A``, never all of ``A``.
    """
    P: tl.constexpr = R1 * R2 * R3
    c = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row = c // CPR
    col0 = (c - row * CPR) * (K * P)
    j = tl.arange(0, P)
    inner = tl.arange(0, KP)[:, None] * P + j[None, :]
    live = (c < NB)[:, None, None]
    mask = live & (inner < K * P)[None, :, :]
    soffs = col0[:, None, None] + inner[None, :, :]
    x = tl.load(x_ptr + (row * stride_x)[:, None, None] + soffs, mask=mask, other=0.0)
    if HAS_SIGNS and SIGN_FIRST:
        x = (x.to(tl.float32) * tl.load(s_ptr + soffs, mask=mask, other=0.0)).to(x.dtype)  # exact
    v = fwht_block(tl.reshape(x, [ROWS * KP, P]), h_ptr, ROWS * KP, R1, R2, R3, PARTS)
    out = y_ptr + (c * (K * P))[:, None, None]
    if K == 1:
        _store(out, tl.reshape(v, [ROWS, KP, P]), inner[None, :, :], mask, s_ptr, soffs, SCALE, HAS_SIGNS,
               SIGN_FIRST)
    else:
        rows = tl.arange(0, KP)
        for chunk in tl.static_range(KP // KC):
            kk = chunk * KC + tl.arange(0, KC)
            if TRANSPOSE:  # rows kk of A
                a = tl.load(a_ptr + kk[:, None] * KP + rows[None, :])
            else:  # rows kk of A.T
                a = tl.load(a_ptr + rows[None, :] * KP + kk[:, None])
            blk = tl.reshape(_left(a, v, ROWS, KP, P, PARTS), [ROWS, KC, P])  # output rows kk
            boffs = (kk[:, None] * P + j[None, :])[None, :, :]
            _store(out, blk, boffs, live & (boffs < K * P), s_ptr, col0[:, None, None] + boffs, SCALE, HAS_SIGNS,
                   SIGN_FIRST)
