"""Exact float64 Hadamard rotations on the CPU (numba): the reference's bits where they are provably order-free.

The reference (:func:`rotfn.ops.rotate`) computes ``x @ R`` for ``R = diag(s) @ blockdiag(H_b) / sqrt(b)``
(Sylvester ``H_b``, ``b = 2^m``) with a radix split of matrix products; in float64 a rounding
can happen in any of its sums, and then the bits depend on the order of the additions. This
module computes the same rotation with fused radix-8 butterflies (one pass over a vector in
cache instead of a matrix product per radix pass), and returns a result only where every sum
either algorithm forms is exact, so the bits cannot differ:

* every output of a block is ``sum_j +-v_j`` over the block's inputs ``v`` (signs included), and
  every partial sum of any order is a signed sum of a subset of them, so
  ``|partial| <= S = sum_j |v_j|``;
* with ``2^e <= S_computed < 2^(e+1)`` (``S_computed`` is within ``b * 2^-53`` of ``S``)
  ``S < 2^(e+2)``; put ``L = e - 51``: when every ``v_j`` is a multiple of ``2^L``, every partial
  sum is a multiple of ``2^L`` below ``2^(L+53)``, which float64 holds exactly;
* the normalization is applied once to the exact sum (``2^(-m/2)`` exactly for even ``m``,
  which the reference folds into its last pass; one rounded product for odd ``m``, the same
  product the reference forms), and the output signs are exact.

A block whose inputs miss the test (a value whose finest bit lies more than 51 binades below
the block's sum ``S``, a NaN or infinity, or ``L < -1000``), or whose output has an exact zero
(whose sign depends on the order), makes :func:`rotate` decline the whole call; the
dispatcher then runs the reference. So what passes depends on the block size ``b`` as much as
on the data. In large blocks, weights in bf16/fp16 (also times a bf16/fp16 norm scale folded
in) pass; fp32 values (24 significant bits) fail wherever one lies more than ~2^28 below
``S``, which a large fp32 weight usually has in some row. In small blocks (2 up to a few dozen
entries) the spread is harmless, but bf16/fp16 data have exact zero outputs (in a block of 2,
any ``|v_0| == |v_1|``), so calls on whole bf16/fp16 weights mostly decline there, while
fp32 copies pass. The float64 results of a first rotation (an input to a second one) do not
pass.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from rotfn.ops.rotate import _memory_dim
from rotfn.specs.rotation import Rotation

__all__ = ["rotate", "unsupported"]

#: Finest bit allowed (``L`` above): keeps ``2^-L`` and the normalized results far from float64's range ends.
_MIN_EXPONENT = -1000
#: Columns rotated together when the rotated dim is not the last (a ``[b, strip]`` panel stays in L2).
_STRIP = 16

_jit = numba.njit(nogil=True, cache=True, boundscheck=False)


@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc"})
def _abs_sum(v):
    """``sum_j |v_j|`` in any order (vectorized): within ``len(v) * 2^-53`` of the exact sum, which is all the test needs."""
    s = 0.0
    for j in range(v.shape[0]):
        s += abs(v[j])
    return s


@_jit
def _exact_scale(s):
    """``2^-L`` for a block whose ``sum |v_j|`` is ``s`` (see the module docstring), or 0.0 when no ``L`` fits."""
    if not s < math.inf or s == 0.0:  # NaN, infinity, or an all-zero block (zero outputs)
        return 0.0
    low = math.frexp(s)[1] - 1 - 51  # frexp: s = f * 2^E with 0.5 <= f < 1, so e = E - 1
    return math.ldexp(1.0, -low) if low >= _MIN_EXPONENT else 0.0


@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc"})
def _off_grid(v, q):
    """``sum_j frac(v_j * q)``: 0.0 exactly when every ``v_j`` is a multiple of ``1 / q`` (the terms are >= 0)."""
    f = 0.0
    for j in range(v.shape[0]):
        t = v[j] * q
        f += t - math.floor(t)
    return f


@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc"})
def _panel_off_grid(a, grid):
    """:func:`_off_grid` of a ``[rows, w]`` panel (flat) whose column ``c`` has the grid ``1 / grid[c]``."""
    w = grid.shape[0]
    f = 0.0
    for j in range(a.shape[0] // w):
        for c in range(w):
            t = a[j * w + c] * grid[c]
            f += t - math.floor(t)
    return f


@_jit
def _low8(src, dst, signs, use_signs):
    """The first three butterfly levels on groups of 8 adjacent entries, ``dst = (src * signs) @ (I (x) H_8)``."""
    for g in range(src.shape[0] // 8):
        i = 8 * g
        if use_signs:
            a0 = src[i] * signs[i]
            a1 = src[i + 1] * signs[i + 1]
            a2 = src[i + 2] * signs[i + 2]
            a3 = src[i + 3] * signs[i + 3]
            a4 = src[i + 4] * signs[i + 4]
            a5 = src[i + 5] * signs[i + 5]
            a6 = src[i + 6] * signs[i + 6]
            a7 = src[i + 7] * signs[i + 7]
        else:
            a0 = src[i]
            a1 = src[i + 1]
            a2 = src[i + 2]
            a3 = src[i + 3]
            a4 = src[i + 4]
            a5 = src[i + 5]
            a6 = src[i + 6]
            a7 = src[i + 7]
        b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
        b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
        c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
        c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
        dst[i], dst[i + 1], dst[i + 2], dst[i + 3] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
        dst[i + 4], dst[i + 5], dst[i + 6], dst[i + 7] = c0 - c4, c1 - c5, c2 - c6, c3 - c7


@_jit
def _radix8(src, dst, h):
    """Three butterfly levels ``h, 2h, 4h`` on a flat vector: 8 strided runs of ``h`` entries in each span of ``8h``."""
    for i in range(0, src.shape[0], 8 * h):
        s0, s1, s2, s3 = src[i:i + h], src[i + h:i + 2 * h], src[i + 2 * h:i + 3 * h], src[i + 3 * h:i + 4 * h]
        s4, s5, s6, s7 = src[i + 4 * h:i + 5 * h], src[i + 5 * h:i + 6 * h], src[i + 6 * h:i + 7 * h], src[i + 7 * h:i + 8 * h]
        d0, d1, d2, d3 = dst[i:i + h], dst[i + h:i + 2 * h], dst[i + 2 * h:i + 3 * h], dst[i + 3 * h:i + 4 * h]
        d4, d5, d6, d7 = dst[i + 4 * h:i + 5 * h], dst[i + 5 * h:i + 6 * h], dst[i + 6 * h:i + 7 * h], dst[i + 7 * h:i + 8 * h]
        for j in range(h):
            b0, b1, b2, b3 = s0[j] + s1[j], s0[j] - s1[j], s2[j] + s3[j], s2[j] - s3[j]
            b4, b5, b6, b7 = s4[j] + s5[j], s4[j] - s5[j], s6[j] + s7[j], s6[j] - s7[j]
            c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
            c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
            d0[j], d1[j], d2[j], d3[j] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
            d4[j], d5[j], d6[j], d7[j] = c0 - c4, c1 - c5, c2 - c6, c3 - c7


@_jit
def _radix2(src, dst, h):
    """One butterfly level ``h`` on a flat vector."""
    for i in range(0, src.shape[0], 2 * h):
        s0, s1, d0, d1 = src[i:i + h], src[i + h:i + 2 * h], dst[i:i + h], dst[i + h:i + 2 * h]
        for j in range(h):
            a, b = s0[j], s1[j]
            d0[j], d1[j] = a + b, a - b


@_jit
def _fwht_flat(a, t, h):
    """Butterfly levels ``h, 2h, ...`` of a flat vector ``a`` (``t``: scratch of a's size); returns the array holding the result.

    ``h`` is the run length the levels start at: 1 for a vector, the panel width for a ``[b, strip]`` panel
    (the levels then mix whole rows).
    """
    src, dst = a, t
    n = a.shape[0]
    while h * 8 <= n:
        _radix8(src, dst, h)
        src, dst = dst, src
        h *= 8
    while h < n:
        _radix2(src, dst, h)
        src, dst = dst, src
        h *= 2
    return src


@_jit
def _rows(x, out, signs, signs_first, signs_last, scale):
    """Rotate every ``b``-block of the rows of ``x`` ``[blocks, b]`` into ``out``; False where a block is not exact.

    ``signs`` is ``[blocks per row, b]`` (applied before the transform with ``signs_first``, after it with
    ``signs_last``).
    """
    blocks, b = x.shape
    per_row = signs.shape[0]
    a = np.empty(b)
    t = np.empty(b)
    for k in range(blocks):
        v = x[k]
        q = _exact_scale(_abs_sum(v))
        if q == 0.0 or _off_grid(v, q) != 0.0:
            return False
        sg = signs[k % per_row]
        if b >= 8:
            _low8(v, a, sg, signs_first)
            res = _fwht_flat(a, t, 8)
        else:
            for j in range(b):
                a[j] = v[j] * sg[j] if signs_first else v[j]
            res = _fwht_flat(a, t, 1)
        o = out[k]
        zeros = 0
        for j in range(b):
            o[j] = res[j] * scale * (sg[j] if signs_last else 1.0)  # the sign is exact, as in _columns
            zeros += o[j] == 0.0
        if zeros:
            return False
    return True


@_jit
def _columns(x, out, signs, signs_first, signs_last, scale, strip):
    """Rotate ``x`` ``[blocks, b, columns]`` along its middle dim into ``out``; False where a column is not exact.

    Columns go in strips: each strip is copied to a ``[b, strip]`` panel (signs applied), transformed with
    butterflies that mix its rows, and written back normalized.
    """
    blocks, b, columns = x.shape
    per_row = signs.shape[0]
    sums = np.empty(strip)
    grid = np.empty(strip)
    panel = np.empty(b * strip)
    scratch = np.empty(b * strip)
    for k in range(blocks):
        sg = signs[k % per_row]
        for c0 in range(0, columns, strip):
            w = min(strip, columns - c0)
            a = panel[:b * w]
            sums[:w] = 0.0  # per column, summed down the rows (vectorized across columns)
            for j in range(b):
                f = sg[j] if signs_first else 1.0
                row = x[k, j, c0:c0 + w]
                for c in range(w):
                    sums[c] += abs(row[c])
                    a[j * w + c] = row[c] * f
            for c in range(w):
                grid[c] = _exact_scale(sums[c])
                if grid[c] == 0.0:
                    return False
            if _panel_off_grid(a, grid[:w]) != 0.0:
                return False
            res = _fwht_flat(a, scratch[:b * w], w)
            zeros = 0
            for j in range(b):
                f = sg[j] if signs_last else 1.0
                row = out[k, j, c0:c0 + w]
                for c in range(w):
                    y = res[j * w + c] * scale * f  # (the sign is exact: the same bits as scaling alone, then flipping)
                    zeros += y == 0.0
                    row[c] = y
            if zeros:
                return False
    return True


def unsupported(op: str, x: torch.Tensor, **spec) -> str | None:
    """Why these kernels cannot serve ``op`` on ``x`` (``spec``: the call's rotation, format ...), or None when
    they can try (:func:`rotate` may still decline)."""
    rotation = spec.get("rotation")
    if op != "rotate" or rotation is None:
        return f"no CPU kernel for {op}"
    if x.device.type != "cpu" or x.dtype != torch.float64:
        return "CPU kernels take float64 CPU tensors"
    if rotation.kind != "hadamard" or rotation.factor != 1:
        return "CPU kernels take Sylvester Hadamard rotations"
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return "inside a torch.func transform"
    return None


def rotate(x: torch.Tensor, r: Rotation) -> torch.Tensor | None:
    """``x @ R`` with the bits of :func:`rotfn.ops.rotate`, or None where they cannot be proven (see the module docstring).

    Args:
        x: float64 CPU tensor ``[..., n]``; a transposed view (the rotated dim lies first in memory, e.g.
            a weight's columns) is rotated where it lies.
        r: a Sylvester Hadamard rotation (``factor == 1``), any block size and signs.

    Returns:
        A new float64 tensor, laid out like the reference's result, or None.

    Example:
        >>> import torch, rotfn
        >>> from rotfn import ops
        >>> x = torch.randn(4, 64, dtype=torch.float64).to(torch.bfloat16).double()
        >>> r = rotfn.hadamard(64, seed=0)
        >>> torch.equal(rotate(x, r), ops.rotate(x, r))
        True
    """
    p = _memory_dim(x)
    if p is None or x.numel() == 0:
        return None
    y = x.detach().movedim(-1, p)  # contiguous, the rotated dim at p
    b, n = r.block_size, r.n
    lead = y.shape[:p].numel()
    columns = y.shape[p + 1:].numel()
    s = r.sign_vector(torch.float64, x.device)
    first, last = s is not None and not r.transposed, s is not None and r.transposed  # R.T: signs last
    signs = (torch.ones(n, dtype=torch.float64) if s is None else s).reshape(n // b, b).numpy()
    out = torch.empty(y.shape, dtype=torch.float64)
    scale = 1.0 / math.sqrt(b)
    if columns == 1:
        ok = _rows(y.reshape(-1, b).numpy(), out.view(-1, b).numpy(), signs, first, last, scale)
    else:
        ok = _columns(y.reshape(lead * (n // b), b, columns).numpy(), out.view(lead * (n // b), b, columns).numpy(),
                      signs, first, last, scale, _STRIP)
    return out.movedim(p, -1) if ok else None
