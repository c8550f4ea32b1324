"""The demo's rotation and format tables: Hadamard constructions at model widths, and SQNR per format and rotation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import rotfn
from rotfn.testing import make_tensor

__all__ = ["WIDTHS", "DISTRIBUTIONS", "FORMATS", "rotation_rows", "sqnr_rows"]

#: Hidden and MLP widths of common LLMs (Llama 2/3, Qwen 2/2.5, Mistral) plus two small ones.
WIDTHS = (64, 128, 2048, 3584, 4096, 5120, 8192, 11008, 13824, 14336, 18944, 27648, 28672, 29568)
#: Distributions of the format table (see :func:`rotfn.testing.make_tensor`).
DISTRIBUTIONS = ("normal", "student_t", "outliers")
#: Formats of the format table.
FORMATS = (
    rotfn.mxfp4("floor"),
    rotfn.mxfp4("even"),
    rotfn.mxfp4("rceil"),
    rotfn.mxfp8(),
    rotfn.nvfp4(),
    rotfn.intq(4, group=32),
    rotfn.intq(8),
    rotfn.fp8("token"),
)


def rotation_rows(widths: Sequence[int] = WIDTHS, *, seed: int = 0, probes: int = 8, rows: int = 16) -> list[list[str]]:
    """One row per width: construction, orthogonality error and round-trip error of ``rotfn.hadamard``.

    Orthogonality: ``probes`` basis vectors ``e_i`` spread over ``[0, n)`` are rotated
    in float64, giving rows ``e_i R`` of R, and ``max |R R^T - I|`` is taken over them.
    Round trip: ``max |rotate_back(rotate(x, R), R) - x|`` for ``R = hadamard(n, seed=seed)``
    and ``x`` a ``[rows, n]`` float32 standard normal (seeded).

    Args:
        widths: sizes n to build.
        seed: seed of the sign vector and of x.
        probes: basis vectors per orthogonality check.
        rows: rows of x in the round-trip check.

    Returns:
        Rows of cells ``[n, "K x 2^m", K, 2^m, orthogonality error, round-trip error]``.

    Example:
        >>> rotation_rows([12])[0][:4]
        ['12', '12 x 2^0', '12', '1']
    """
    out = []
    for n in widths:
        rotation = rotfn.hadamard(n, seed=seed)
        k = rotation.factor
        m = (n // k).bit_length() - 1
        pick = torch.linspace(0, n - 1, min(probes, n), dtype=torch.float64).round().long().unique()
        basis = torch.zeros(len(pick), n, dtype=torch.float64)
        basis[torch.arange(len(pick)), pick] = 1.0
        some_rows = rotfn.rotate(basis, rotfn.hadamard(n))
        ortho = (some_rows @ some_rows.T - torch.eye(len(pick), dtype=torch.float64)).abs().max().item()
        x = make_tensor("normal", (rows, n), seed)
        inverse = (rotfn.rotate_back(rotfn.rotate(x, rotation), rotation) - x).abs().max().item()
        out.append([str(n), f"{k} x 2^{m}", str(k), str(2**m), f"{ortho:.1e}", f"{inverse:.1e}"])
    return out


def sqnr_rows(dist: str, *, shape: tuple[int, int] = (256, 4096), seed: int = 0,
              formats: Sequence[rotfn.Format] = FORMATS) -> list[tuple[rotfn.Format, float, float, float]]:
    """SQNR (dB) of each format on one distribution: no rotation, full Hadamard, block-32 Hadamard.

    ``x = make_tensor(dist, shape, seed)`` (float32). The rotated columns are
    ``rotate_qdq(x, R, fmt, back=True)``, i.e. ``R^T Q(x R)``, measured in x's basis,
    with ``R = hadamard(n, seed=seed)`` and ``hadamard(n, block=32, seed=seed)``.

    Args:
        dist: one of :data:`rotfn.testing.DISTRIBUTIONS`.
        shape: ``[rows, n]`` of x; n a multiple of 32 with a constructible Hadamard.
        seed: seed of x and of the sign vectors.
        formats: format specs to compare.

    Returns:
        One ``(format, none, full, block 32)`` tuple per format.

    Example:
        >>> fmt, none, full, block = sqnr_rows("normal", shape=(4, 64), formats=[rotfn.mxfp8()])[0]
        >>> fmt, 25 < none < 35
        (mxfp8(scale_rule='floor'), True)
    """
    x = make_tensor(dist, shape, seed)
    full = rotfn.hadamard(shape[-1], seed=seed)
    block = rotfn.hadamard(shape[-1], block=32, seed=seed)
    out = []
    for fmt in formats:
        plain = rotfn.metrics.sqnr_db(x, rotfn.qdq(x, fmt))
        rotated = [rotfn.metrics.sqnr_db(x, rotfn.rotate_qdq(x, r, fmt, back=True)) for r in (full, block)]
        out.append((fmt, plain, *rotated))
    return out
