"""Hadamard matrices of orders 52, 92, 116, 156 and 172 from Williamson sequences.

Williamson construction (J. Williamson, "Hadamard's determinant theorem and
the sum of four squares", Duke Math. J. 11 (1944), 65-81): take four
symmetric circulant ``m x m`` matrices ``A, B, C, D`` with entries ``+-1``
such that::

    A^2 + B^2 + C^2 + D^2 = 4m * I

Circulant matrices of one order commute, and symmetric ones equal their
transposes, so the Williamson array::

    [[ A,  B,  C,  D],
     [-B,  A, -D,  C],
     [-C,  D,  A, -B],
     [-D, -C,  B,  A]]

is a ``4m x 4m`` Hadamard matrix ``H`` (``H @ H.T == 4m * I``): the
diagonal blocks of ``H @ H.T`` are ``A^2 + B^2 + C^2 + D^2`` and the
off-diagonal ones cancel pairwise (e.g. ``-AB + BA - CD + DC = 0``).

For symmetric circulants the condition is equivalent to the periodic
autocorrelations of the four first rows summing to zero at every nonzero
shift, ``PAF_A(s) + PAF_B(s) + PAF_C(s) + PAF_D(s) = 0`` for ``s != 0``.
A circulant matrix is stored by its first row ``a``: entry ``(i, j)`` is
``a[(j - i) mod m]``. Every sequence below is symmetric
(``a[i] == a[m - i]``), so all four orders use the plain Williamson array;
no Goethals-Seidel array is needed.

Sources of the sequences (first rows, ``'+'`` = +1, ``'-'`` = -1):

* ``m = 13`` (order 52): Williamson (1944); also in the complete lists of
  L. D. Baumert and M. Hall, "Hadamard matrices of the Williamson type",
  Math. Comp. 19 (1965), 442-447.
* ``m = 23`` (order 92): L. Baumert, S. W. Golomb and M. Hall,
  "Discovery of an Hadamard matrix of order 92", Bull. Amer. Math. Soc. 68
  (1962), 237-238 (solution as listed in Baumert & Hall 1965).
* ``m = 29`` (order 116): L. D. Baumert, "Hadamard matrices of orders 116
  and 232", Bull. Amer. Math. Soc. 72 (1966), 237.
* ``m = 43`` (order 172): Williamson (1944) / Baumert & Hall (1965).
  The rows for 13, 23, 29 and 43 are as tabulated in M. Hall,
  *Combinatorial Theory*, 2nd ed., Wiley.
* ``m = 39`` (order 156): Williamson matrices of this order were first
  found by D. Z. Djokovic, "Williamson matrices of order 4n for n = 33, 35,
  39", Discrete Math. 115 (1993), 267-271; the quadruple used here is the
  one given in S. London, *Constructing new Turyn type sequences,
  T-sequences and Hadamard matrices*, PhD thesis, Univ. of Illinois at
  Chicago (2013).

The rows were read from the data tables of SageMath's Hadamard-matrix
database (``sage.combinat.matrices.hadamard_matrix``; see M. Cati and
D. V. Pasechnik, "A database of constructions of Hadamard matrices",
arXiv:2411.18897), which cite the publications above. Every quadruple was
checked independently: symmetric, zero periodic-autocorrelation sum, and
``H @ H.T == 4m * I`` exactly in float64.
"""

from __future__ import annotations

import torch

__all__ = ["WILLIAMSON_SEQUENCES", "ORDERS", "williamson_hadamard"]

# m -> first rows of the symmetric circulants (A, B, C, D); Hadamard order 4m.
WILLIAMSON_SEQUENCES: dict[int, tuple[str, str, str, str]] = {
    13: (
        "++++-+--+-+++",
        "+---+-++-+---",
        "++---+--+---+",
        "++---+--+---+",
    ),
    23: (
        "++---+---+-++-+---+---+",
        "+-++-++--++++++--++-++-",
        "+++---++-+-++-+-++---++",
        "+++-+++-+------+-+++-++",
    ),
    29: (
        "+++---++--+-+----+-+--++---++",
        "+-+---++--+-++++++-+--++---+-",
        "++++-++-+---++++++---+-++-+++",
        "++--+--+-+++-++++-+++-+--+--+",
    ),
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}

#: The Hadamard orders this table builds.
ORDERS: frozenset[int] = frozenset(4 * m for m in WILLIAMSON_SEQUENCES)


def _circulant(row: str) -> torch.Tensor:
    """Circulant float64 matrix whose first row is the ``+``/``-`` string ``row``."""
    first = torch.tensor([1.0 if ch == "+" else -1.0 for ch in row], dtype=torch.float64)
    m = first.numel()
    idx = torch.arange(m)
    return first[(idx[None, :] - idx[:, None]) % m]


def williamson_hadamard(k: int) -> torch.Tensor:
    """Return a ``k x k`` Hadamard matrix built with the Williamson array.

    Args:
        k: the order, one of ``4 * m`` for ``m`` in :data:`WILLIAMSON_SEQUENCES`
            (52, 92, 116, 156, 172).

    Returns:
        A float64 tensor with entries exactly ``+-1`` (not normalized) and
        ``H @ H.T == k * I``.

    Raises:
        KeyError: if no Williamson sequences are tabulated for ``k``.

    Example:
        >>> H = williamson_hadamard(52)
        >>> bool((H @ H.T == 52 * torch.eye(52, dtype=torch.float64)).all())
        True
    """
    m, rem = divmod(k, 4) if isinstance(k, int) else (None, 1)
    if rem or m not in WILLIAMSON_SEQUENCES:
        orders = sorted(4 * n for n in WILLIAMSON_SEQUENCES)
        raise KeyError(f"williamson_hadamard: argument 'k': expected one of {orders}, got {k!r}")
    a, b, c, d = (_circulant(row) for row in WILLIAMSON_SEQUENCES[m])
    return torch.cat(
        [
            torch.cat([a, b, c, d], dim=1),
            torch.cat([-b, a, -d, c], dim=1),
            torch.cat([-c, d, a, -b], dim=1),
            torch.cat([-d, -c, b, a], dim=1),
        ],
        dim=0,
    )
