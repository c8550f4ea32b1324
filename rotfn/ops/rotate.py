"""Reference rotations: ``x @ R`` and ``x @ R.T`` for a :class:`rotfn.Rotation`, never densifying Hadamards.

Legend: ``x`` is ``[..., n]``; ``R = diag(s) @ blockdiag(T, ..., T)`` with ``b x b``
block ``T`` (see :mod:`rotfn.specs.rotation`). Math in fp32 (fp64 for fp64 inputs),
cast back once. Hadamard blocks go through the FWHT (``O(n log b)``); other
blocks are a ``b x b`` matmul each.
"""

from __future__ import annotations

import torch

from rotfn.ops.hadamard import hadamard_apply
from rotfn.ops.quant import qdq
from rotfn.specs.formats import Format
from rotfn.specs.rotation import Rotation

__all__ = ["rotate", "rotate_back", "rotate_qdq", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rotations compute in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_dim(x: torch.Tensor) -> int | None:
    """Where x's last dim lies in memory: ``p`` with ``x.movedim(-1, p)`` contiguous (``x.ndim - 1`` when x
    is contiguous), or None."""
    if x.is_contiguous():
        return x.ndim - 1
    return next((p for p in range(x.ndim - 1) if x.movedim(-1, p).is_contiguous()), None)


def _apply(x: torch.Tensor, r: Rotation) -> torch.Tensor:
    """``x @ r.matrix()`` in x's (compute) dtype.

    A transposed view (``x = t.movedim(p, -1)`` of a contiguous ``t``, e.g. the columns of a
    weight rotated on its output side) is rotated along dim ``p`` of ``t`` where it lies:
    GEMMs over ``[b, columns]`` panels instead of a transposed copy there and back.
    """
    p = _memory_dim(x)
    if p is None:
        x, p = x.contiguous(), x.ndim - 1
    y = x.movedim(-1, p)  # contiguous, the rotated dim at p
    lead, trail = y.shape[:p], y.shape[p + 1:]
    s = r.sign_vector(x.dtype, x.device)
    if s is not None and trail:
        s = s.reshape(r.n, *(1,) * len(trail))
    if not r.transposed and s is not None:  # R = diag(s) @ blockdiag(T): signs first
        y = y * s
    b = r.block_size
    blocks = y.reshape(*lead, r.n // b, b, *trail)
    if r.kind == "hadamard":
        blocks = hadamard_apply(blocks, r.factor, transpose=r.transposed, dim=p + 1)
    elif trail:  # (x @ T) along dim p + 1: T.T @ [b, columns] panels
        t = r.block_matrix(x.dtype, x.device)
        blocks = torch.matmul(t.mT, blocks.reshape(*lead, r.n // b, b, trail.numel()))
    else:
        blocks = blocks @ r.block_matrix(x.dtype, x.device)
    y = blocks.reshape(*lead, r.n, *trail)
    if r.transposed and s is not None:  # R.T = blockdiag(T.T) @ diag(s): signs last
        y = y * s
    return y.movedim(p, -1)


def rotate(x: torch.Tensor, r: Rotation) -> torch.Tensor:
    """``x @ R`` along the last dim (reference; validated by :func:`rotfn.rotate`)."""
    return _apply(x.to(compute_dtype(x.dtype)), r).to(x.dtype)


def rotate_back(x: torch.Tensor, r: Rotation) -> torch.Tensor:
    """``x @ R.T``, the inverse of :func:`rotate` (reference)."""
    return rotate(x, r.T)


def rotate_qdq(x: torch.Tensor, r: Rotation, fmt: Format, back: bool) -> torch.Tensor:
    """``qdq(rotate(x, R))``, and with ``back`` then ``rotate_back`` (reference).

    The rotated values are rounded to x's dtype before quantizing, exactly as the
    unfused composition ``qdq(rotate(x, R), fmt)`` does.
    """
    y = qdq(rotate(x, r), fmt)
    return rotate_back(y, r) if back else y
