"""GPTQ's column loop as one Triton kernel: a run of columns of a block rounded in registers.

GPTQ rounds a weight one column at a time; the reference (:mod:`rotfn.ops._gptq`) runs that
loop in Python, a handful of small torch ops per column. Here one launch takes a run of
columns that share where their scales come from (a scale group, or a whole block when the
scales are fixed up front), and each program holds ``BR`` rows of the block's working copy
``W1`` in registers for the whole run: per column it takes the column out of the tile, codes
it with the format's rule under the given scales (:func:`rotfn.kernels.fused.code_value`, the
fused quantizer's own coding), and subtracts ``e * U1[i, i:]`` from the tile. Rows are
independent (``U`` is shared), so programs never talk to each other.

Every step rounds where the reference's torch ops round: the error is ``div_rn`` (or an IEEE
float64 division), the update a product then a difference, with fp contraction off so that
no fused multiply-add changes a bit; the codes equal the reference's on the same device and
in the same ``precision``. Scales, the lazy block updates ``E1 @ U`` and the Cholesky factor
stay in the reference's host loop, which both share.
"""

import torch
import triton
import triton.language as tl

from rotfn import ops
from rotfn.kernels.fused import code_value
from rotfn.kernels.launch import _fmt_code
from rotfn.ops.quant import Scales, code_dtype
from rotfn.specs import QTensor
from rotfn.specs.formats import MX, Format

__all__ = ["gptq"]

_ROWS = 16  # rows per program: out / 16 programs fill every SM for out >= 2048


@triton.jit
def columns_kernel(w_ptr, u_ptr, e_ptr, codes_ptr, s_ptr, z_ptr, gs_ptr, OUT, A, P, WIDTH, stride_w, stride_ur,
                   stride_uc, BR: tl.constexpr, BW: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr,
                   F64: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BW)
    rmask = rows < OUT
    tmask = rmask[:, None] & (cols < WIDTH)[None, :]
    tile = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=tmask, other=0.0)
    s_g = tl.load(gs_ptr)
    for p in range(P):
        i = A + p
        # -0.0 fill: the sum is the column's value itself, sign of zero included
        col = tl.sum(tl.where(cols[None, :] == i, tile, -0.0), axis=1)
        s = tl.load(s_ptr + rows * P + p, mask=rmask, other=1.0)
        z = tl.load(z_ptr + rows * P + p, mask=rmask, other=0.0)
        bad = s != s
        if FMT == 1 or FMT == 2:
            s = tl.where(bad, 0.0, s).to(tl.int32)  # the MX exponent, exact in fp32
        y, code = code_value(col.to(tl.float32), s, z, s_g, bad, FMT, BITS)
        d = tl.load(u_ptr + i * stride_ur + i * stride_uc)
        if F64:
            e = (col - y.to(tl.float64)) / d  # float64 division is IEEE (correctly rounded) on the GPU
        else:
            e = tl.math.div_rn(col - y, d)
        u = tl.load(u_ptr + i * stride_ur + cols * stride_uc, mask=(cols >= i) & (cols < WIDTH), other=0.0)
        tile = tile - e[:, None] * u[None, :]
        tl.store(codes_ptr + rows * P + p, code, mask=rmask)
        tl.store(e_ptr + rows * stride_w + i, e, mask=rmask)
    tl.store(w_ptr + rows[:, None] * stride_w + cols[None, :], tile, mask=tmask)


def _scale_values(sc: Scales, fmt: Format, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``[out, P]`` scale and zero-point values and the fp32 global scale, as :func:`code_value` takes them."""
    if isinstance(fmt, MX):
        byte = sc.scales.view(torch.uint8).to(torch.int32)
        s = torch.where(byte == 255, torch.nan, (byte - 127).float())
    else:
        s = sc.scales.float()
    z = sc.zero_points.float() if sc.zero_points is not None else torch.zeros((), device=s.device)
    g = sc.global_scale if sc.global_scale is not None else torch.ones((), device=s.device)
    return s.expand(shape).contiguous(), z.expand(shape).contiguous(), g.float().reshape(1)


def _codes(raw: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The kernel's int32 codes as :func:`rotfn.ops.quant.encode` stores them."""
    dtype = code_dtype(fmt)
    if fmt.bits <= 4:
        return (raw & 0xF).to(torch.uint8)
    byte = (raw & 0xFF).to(torch.uint8)
    return byte if dtype == torch.uint8 else byte.view(dtype)


def _columns(W1: torch.Tensor, U1: torch.Tensor, E1: torch.Tensor, a: int, b: int, fmt: Format, sc: Scales
             ) -> torch.Tensor:
    """:func:`rotfn.ops._gptq._columns` in one launch (same arguments, same results)."""
    out, width = W1.shape
    s, z, g = _scale_values(sc, fmt, (out, b - a))
    raw = torch.empty(out, b - a, dtype=torch.int32, device=W1.device)
    bw = triton.next_power_of_2(width)
    br = _ROWS if bw <= 256 else max(2, 4096 // bw)  # wide blocks: fewer rows, so the tile stays in registers
    columns_kernel[(triton.cdiv(out, br),)](
        W1, U1, E1, raw, s, z, g, out, a, b - a, width, W1.stride(0), U1.stride(0), U1.stride(1),
        BR=br, BW=bw, FMT=_fmt_code(fmt), BITS=fmt.bits, F64=W1.dtype == torch.float64, num_warps=4,
        enable_fp_fusion=False)
    return _codes(raw, fmt)


def gptq(w: torch.Tensor, h: torch.Tensor, fmt: Format, **settings) -> QTensor:
    """:func:`rotfn.ops.gptq` with the column loop in :func:`columns_kernel` (same arguments, same codes)."""
    return ops.gptq(w, h, fmt, columns=_columns, **settings)
