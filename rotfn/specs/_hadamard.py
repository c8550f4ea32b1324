"""Hadamard constructions and the order table: which orders ``n = K * 2^m`` rotfn builds, and how.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H @ H.T == n * I``.
rotfn builds order ``n = K * 2^m`` as the Kronecker product ``H_K (x) H_{2^m}``
of a small "factor" matrix and a Sylvester matrix (applied fast by :mod:`rotfn.ops`).

Factors ``H_K`` (K = 1, 2 or a multiple of 4) come from, in order of preference:

* Paley I: ``q = K - 1`` prime, ``q = 3 (mod 4)``; ``H = I + S`` with the skew
  conference matrix ``S`` (Paley 1933).
* Paley II: ``q = K/2 - 1`` prime, ``q = 1 (mod 4)``; the symmetric conference
  matrix ``C`` of order ``q + 1`` blown up by ``C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``.
* The Williamson-type table in ``rotfn/specs/_williamson.py`` (52, 92, 116, 156, 172),
  built from published base sequences.

The choice is a pure function of ``n`` (the smallest constructible ``K``) and is
recorded in :class:`rotfn.Rotation` as ``factor`` so saved rotations never change.
These constructions are part of the spec: they live beside :class:`rotfn.Rotation`
and import nothing of rotfn.

References:
    R. E. A. C. Paley, "On orthogonal matrices", J. Math. Phys. 12 (1933).
    J. Williamson, "Hadamard's determinant theorem and the sum of four squares", Duke Math. J. 11 (1944).
"""

from __future__ import annotations

import functools
import math

import torch

from rotfn.specs import _williamson as williamson

__all__ = ["MAX_FACTOR", "is_prime", "factor_matrix", "can_build_factor", "choose_factor", "constructible_orders",
           "hadamard_dense"]


#: Largest factor order K used. The K part costs K multiply-adds per element and a
#: K x K table, so larger K would stop being "fast"; orders needing one raise OrderError.
MAX_FACTOR = 1024


def is_prime(q: int) -> bool:
    """Return True when ``q`` is a prime number (trial division; q is small here)."""
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` with chi the quadratic character of GF(q), q prime."""
    residues = torch.zeros(q, dtype=torch.float64)
    residues[torch.tensor(sorted({(i * i) % q for i in range(1, q)}))] = 1.0
    chi = 2.0 * residues - 1.0
    chi[0] = 0.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _conference(q: int, *, skew: bool) -> torch.Tensor:
    """Conference matrix of order q + 1 from the Jacobsthal matrix (skew for q = 3 mod 4)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = -1.0 if skew else 1.0
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley1(k: int) -> torch.Tensor:
    return torch.eye(k, dtype=torch.float64) + _conference(k - 1, skew=True)


def _paley2(k: int) -> torch.Tensor:
    c = _conference(k // 2 - 1, skew=False)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(k // 2, dtype=torch.float64), zero)


def _construction(k: int):
    """The builder for factor order k, or None when rotfn has none."""
    if k == 1:
        return lambda _: torch.ones(1, 1, dtype=torch.float64)
    if k == 2:
        return lambda _: torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if k % 4 or k > MAX_FACTOR:
        return None
    q = k - 1
    if q % 4 == 3 and is_prime(q):
        return _paley1
    q = k // 2 - 1
    if q % 4 == 1 and is_prime(q):
        return _paley2
    if k in williamson.ORDERS:
        return williamson.williamson_hadamard
    return None


def can_build_factor(k: int) -> bool:
    """Return True when rotfn can build a Hadamard factor of order ``k``."""
    return _construction(k) is not None


@functools.lru_cache(maxsize=64)
def factor_matrix(k: int) -> torch.Tensor:
    """The unnormalized +-1 Hadamard factor ``H_K`` (float64, CPU; cached, do not modify).

    Raises:
        KeyError: when no construction covers ``k`` (callers check :func:`can_build_factor`).
    """
    build = _construction(k)
    if build is None:
        raise KeyError(k)
    h = build(k)
    h.requires_grad_(False)
    return h


def choose_factor(n: int) -> int | None:
    """The smallest constructible ``K`` with ``n = K * 2^m``, or None.

    Example:
        >>> choose_factor(4096), choose_factor(11008), choose_factor(14336)
        (1, 172, 28)
    """
    if n < 1:
        return None
    k = n
    while k % 2 == 0:
        k //= 2
    while k <= min(n, MAX_FACTOR):
        if can_build_factor(k):
            return k
        k *= 2
    return None


@functools.lru_cache(maxsize=1)
def constructible_orders(max_n: int = 1 << 15) -> tuple[int, ...]:
    """Every order ``n <= max_n`` that :func:`choose_factor` can build, ascending."""
    return tuple(n for n in range(1, max_n + 1) if choose_factor(n) is not None)


def hadamard_dense(n: int, k: int) -> torch.Tensor:
    """The dense normalized ``H_n = (H_K (x) H_{2^m}) / sqrt(n)`` in float64 on CPU."""
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    step = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while sylvester.shape[0] * k < n:
        sylvester = torch.kron(sylvester, step)
    return torch.kron(factor_matrix(k), sylvester) / math.sqrt(n)
