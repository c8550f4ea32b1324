"""GPTQ rounding (reference): quantize a weight column by column, each column's rounding error
spread over the columns not yet quantized, weighted by the inverse Hessian of the inputs.

Legend: ``W`` ``[out, n]`` (the linear computes ``x @ W.T``), ``H`` ``[n, n]`` = ``X^T X / N`` of
its inputs, ``g`` the format's group (``n`` when it has none). The algorithm is Frantar et al.,
"GPTQ" (arXiv 2210.17323), Algorithm 1, with the usual choices of its reference code:

1. dead inputs (``H[j, j] == 0``) get ``H[j, j] = 1`` and ``W[:, j] = 0``;
2. ``act_order``: columns in order of decreasing ``H[j, j]`` (stable), undone in the output;
3. damping ``H += damp * mean(diag(H)) * I``; ``U`` = upper Cholesky factor of ``H^-1``;
4. column blocks of ``block`` columns: inside a block every quantized column ``j`` updates the
   block's later columns, ``W[:, k] -= e_j * U[j, k]`` with ``e_j = (W[:, j] - Q[:, j]) / U[j, j]``;
   the later blocks get the block's errors at once, ``W[:, after] -= E @ U[block, after]``.

Scales: a group's scales are chosen (by the format's rule, or by :func:`search_scales`) from the
group's columns as they stand when its first column is reached, all earlier errors applied; blocks
are widened to a multiple of ``g`` so that a group never straddles two. Static groups (an option;
forced with ``act_order``, whose order would otherwise cut groups apart, and the only meaning for
a format with one scale per row or tensor) take every scale from the weight before any update.
NVFP4's global scale always comes from the whole weight. Each column is then coded with
:func:`rotfn.ops.quant.encode` under its group's scales, so the codes obey the format bit for bit.

The linear algebra runs in ``work`` (float64 or float32); the format's rounding in fp32, as
:mod:`rotfn.ops.quant` defines it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from rotfn.errors import ArgumentError, message
from rotfn.ops.quant import Scales, choose_scales, code_dtype, decode, encode, group_view, nvfp4_global_scale, pack
from rotfn.specs import QTensor
from rotfn.specs.formats import FP8, MX, NVFP4, Format, ScaleRule

__all__ = ["gptq", "rtn", "search_scales", "inverse_factor", "CLIP_RATIOS", "SCALE_SEARCHES"]

#: Clip ratios that ``scale_search="mse"`` tries for intq and fp8 scales (1 first: ties keep the rule's scale).
CLIP_RATIOS = tuple(1 - k / 100 for k in range(0, 21))
SCALE_SEARCHES = (None, "mse")

# float8_e4m3fn bytes of the smallest subnormal and of 448: the range of NVFP4 group scales
_E4M3_MIN_BYTE, _E4M3_MAX_BYTE = 0x01, 0x7E


def _candidates(xg: torch.Tensor, fmt: Format, rule: Scales) -> list[Scales]:
    """Scales to try for fp32 groups ``xg`` ``[..., G, g]``; ``rule`` (the format's own) first.

    MX: the floor rule's exponent and the next one up (every scale rule picks one of the two);
    NVFP4: the rule's E4M3 group scale and its two neighbours; intq, fp8: the rule applied to
    the group scaled by each of :data:`CLIP_RATIOS` (a clipped range).
    """
    if isinstance(fmt, MX):
        floor = choose_scales(xg, dataclasses.replace(fmt, scale_rule=ScaleRule.FLOOR)).scales.view(torch.uint8)
        nan = floor == 0xFF
        up = torch.where(nan, floor, (floor + 1).clamp(max=254))
        return [rule] + [Scales(b.view(torch.float8_e8m0fnu)) for b in (floor, up)]
    if isinstance(fmt, NVFP4):
        byte = rule.scales.view(torch.uint8)
        nan = byte == 0x7F
        step = lambda d: torch.where(nan, byte, (byte.int() + d).clamp(_E4M3_MIN_BYTE, _E4M3_MAX_BYTE).to(torch.uint8))  # noqa: E731
        return [rule] + [Scales(step(d).view(torch.float8_e4m3fn), rule.global_scale) for d in (-1, 1)]
    return [rule] + [choose_scales(xg * r, fmt, rule.global_scale) for r in CLIP_RATIOS[1:]]


def search_scales(xg: torch.Tensor, fmt: Format, global_scale: torch.Tensor | None = None) -> Scales:
    """Per group, the candidate scales (see :func:`_candidates`) with the least squared rounding error.

    ``sum((decode(encode(x, s), s) - x)^2)`` over each group's elements; ties keep the earlier
    candidate, so the format's own rule wins unless another scale is strictly better. A scale
    shared beyond one group (fp8 ``"tensor"``, NVFP4's global scale) is searched over all of ``xg``.
    """
    rule = choose_scales(xg, fmt, global_scale)
    options = _candidates(xg, fmt, rule)
    errors = torch.stack([_group_error(xg, fmt, s) for s in options])
    if rule.scales.ndim == 0:  # one scale for the whole tensor
        errors = errors.flatten(1).sum(1)
    best = errors.argmin(0)  # the first of equal minima
    pick = lambda field: _select([getattr(s, field) for s in options], best)  # noqa: E731
    return Scales(pick("scales"), rule.global_scale, None if rule.zero_points is None else pick("zero_points"))


def _group_error(xg: torch.Tensor, fmt: Format, sc: Scales) -> torch.Tensor:
    """Squared error per group (NaN groups count 0, so they never move the choice)."""
    err = (decode(encode(xg, fmt, sc), fmt, sc) - xg).square().sum(-1)
    return torch.nan_to_num(err, nan=0.0, posinf=math.inf)


def _select(values: list[torch.Tensor], best: torch.Tensor) -> torch.Tensor:
    """``values[best[i]][i]`` elementwise (values of any dtype, best of their shape)."""
    stacked = torch.stack([v.view(torch.uint8) if v.element_size() == 1 else v for v in values])
    picked = stacked.gather(0, best.reshape(1, *best.shape)).squeeze(0)
    return picked.view(values[0].dtype) if values[0].element_size() == 1 else picked


def _scales(xg: torch.Tensor, fmt: Format, global_scale, scale_search) -> Scales:
    return search_scales(xg, fmt, global_scale) if scale_search == "mse" else choose_scales(xg, fmt, global_scale)


def _global_scale(w32: torch.Tensor, fmt: Format) -> torch.Tensor | None:
    """A scale shared by the whole weight, fixed before GPTQ starts (NVFP4's ``s_g``)."""
    return nvfp4_global_scale(w32, fmt) if isinstance(fmt, NVFP4) else None


def rtn(w: torch.Tensor, fmt: Format, *, scale_search: str | None = None) -> QTensor:
    """Round to nearest: :func:`rotfn.ops.quant.quantize`, with the scales searched when asked."""
    w32 = w.float()
    xg = group_view(w32, fmt)
    sc = _scales(xg, fmt, _global_scale(w32, fmt), scale_search)
    return pack(encode(xg, fmt, sc), fmt, sc, w.dtype)


def inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """The upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1``, or None when the
    damped ``H`` is not positive definite; also the absolute damping added."""
    diag = torch.arange(h.shape[0], device=h.device)
    added = damp * h.diagonal().mean().item()
    h = h.clone()
    h[diag, diag] += added
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item():
        return None, added
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    # LAPACK hands back a column-major factor; the column loop reads its rows
    return (None if info.item() else upper.contiguous()), added


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: Format,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    scale_search: str | None = None,
    work: torch.dtype = torch.float64,
    columns: Callable | None = None,
) -> QTensor:
    """GPTQ codes of ``w`` ``[out, n]`` against ``h`` ``[n, n]`` (reference; validated by :func:`rotfn.gptq`).

    ``columns``: the column loop inside a block, :func:`_columns` by default; the GPTQ kernel
    (:func:`rotfn.kernels.gptq`) passes its own, so both share every other step.

    Raises:
        ArgumentError: ``h`` is not positive definite after damping.
    """
    out, n = w.shape
    W = w.to(work).clone()
    H = h.to(work).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = fmt.group or n
    s_g = _global_scale(W.float(), fmt)
    static = static_groups or act_order or g >= n or isinstance(fmt, FP8)
    if static:
        fixed = _scales(group_view(W.float(), fmt), fmt, s_g, scale_search)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, added = inverse_factor(H, damp)
    if U is None:
        raise ArgumentError(message(
            "gptq", "h", "a Hessian that is positive definite after damping",
            f"a matrix that is not (damp={damp} added {added:.3g} to its diagonal)",
            "raise damp (e.g. 0.1), or collect the Hessian over more calibration tokens"))
    block = block_size if static else math.ceil(block_size / g) * g
    codes = torch.empty(out, n, dtype=code_dtype(fmt), device=w.device)
    order = torch.arange(n, device=w.device) if perm is None else perm
    reached: list[Scales] = []
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        step = i2 - i1 if static else g
        for a in range(0, i2 - i1, step):  # a run of columns that share their scales' origin
            b = min(a + step, i2 - i1)
            cols = order[i1 + a:i1 + b]
            if static:
                sc = _gather(fixed, cols // g)
            else:
                reached.append(_scales(W1[:, None, a:a + g].float(), fmt, s_g, scale_search))
                sc = _gather(reached[-1], torch.zeros(b - a, dtype=torch.long, device=w.device))
            codes[:, cols] = (columns or _columns)(W1, U1, E1, a, b, fmt, sc)
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    sc = fixed if static else _concat(reached, s_g)
    return pack(codes.reshape(out, n // g, g), fmt, sc, w.dtype)


def _columns(W1: torch.Tensor, U1: torch.Tensor, E1: torch.Tensor, a: int, b: int, fmt: Format, sc: Scales
            ) -> torch.Tensor:
    """Round columns ``a .. b - 1`` of a column block in order, each error spread over the block's later columns.

    ``W1`` ``[out, B]`` (updated in place) and ``E1`` ``[out, B]`` (the scaled errors, written)
    are the block's working copies, ``U1`` ``[B, B]`` its part of the inverse Hessian factor;
    ``sc`` holds column ``a + p``'s scales at ``[:, p]`` (a tensor-wide scale is 0-d).
    Returns the codes ``[out, b - a]`` (:func:`rotfn.ops.quant.code_dtype`).
    """
    codes = torch.empty(W1.shape[0], b - a, dtype=code_dtype(fmt), device=W1.device)
    for p in range(b - a):
        i = a + p
        col = _column(sc, p)
        c = encode(W1[:, i, None, None].float(), fmt, col)
        q = decode(c, fmt, col)[:, 0, 0].to(W1.dtype)
        codes[:, p] = c[:, 0, 0]
        e = (W1[:, i] - q) / U1[i, i]
        W1[:, i:] -= e[:, None] * U1[i, i:]
        E1[:, i] = e
    return codes


def _gather(sc: Scales, groups: torch.Tensor) -> Scales:
    """The scales of groups ``groups`` ``[P]`` of every row, ``[out, P]`` (a tensor-wide scale stays 0-d)."""
    pick = lambda t: t if t is None or t.ndim == 0 else t[:, groups]  # noqa: E731
    return Scales(pick(sc.scales), sc.global_scale, pick(sc.zero_points))


def _column(sc: Scales, k: int) -> Scales:
    """The scales of group ``k`` of every row, shaped ``[out, 1]`` (a tensor-wide scale stays 0-d)."""
    pick = lambda t: t if t is None or t.ndim == 0 else t[:, k:k + 1]  # noqa: E731
    return Scales(pick(sc.scales), sc.global_scale, pick(sc.zero_points))


def _concat(groups: list[Scales], global_scale) -> Scales:
    zero = None if groups[0].zero_points is None else torch.cat([s.zero_points for s in groups], -1)
    return Scales(torch.cat([s.scales for s in groups], -1), global_scale, zero)
