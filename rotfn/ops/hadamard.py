"""Hadamard matrices: constructions, the order table, and the fast transform.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H @ H.T == n * I``.
rotfn builds order ``n = K * 2^m`` as the Kronecker product ``H_K (x) H_{2^m}``
of a small "factor" matrix and a Sylvester matrix, and applies it in
``O(n log n)``: a fast Walsh-Hadamard transform (FWHT) for the ``2^m`` part and a
``K x K`` matmul for the factor.

Factors ``H_K`` (K = 1, 2 or a multiple of 4) come from, in order of preference:

* Paley I: ``q = K - 1`` prime, ``q = 3 (mod 4)``; ``H = I + S`` with the skew
  conference matrix ``S`` (Paley 1933).
* Paley II: ``q = K/2 - 1`` prime, ``q = 1 (mod 4)``; the symmetric conference
  matrix ``C`` of order ``q + 1`` blown up by ``C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``.
* The Williamson-type table in :mod:`rotfn.ops.williamson` (52, 92, 116, 156, 172),
  built from published base sequences.

The choice is a pure function of ``n`` (the smallest constructible ``K``) and is
recorded in :class:`rotfn.Rotation` as ``factor`` so saved rotations never change.

References:
    R. E. A. C. Paley, "On orthogonal matrices", J. Math. Phys. 12 (1933).
    J. Williamson, "Hadamard's determinant theorem and the sum of four squares", Duke Math. J. 11 (1944).
"""

from __future__ import annotations

import functools
import math

import torch

from rotfn.ops import williamson

__all__ = [
    "MAX_FACTOR",
    "is_prime",
    "factor_matrix",
    "can_build_factor",
    "choose_factor",
    "constructible_orders",
    "fwht",
    "hadamard_apply",
    "hadamard_dense",
]


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


#: How an FWHT splits its ``m`` bits into passes. A radix-r pass is an r-wide GEMM, so narrower
#: passes cost fewer flops per element, until the GEMMs get too thin to pay. On a CPU (float64,
#: AVX-512, one thread, 256Ki-element inputs, 2026-11-29) ``ceil(m / 4)`` balanced passes, the widest
#: first (on the last axis, where a thin GEMM costs most), were fastest or within noise of it from
#: m = 6 (2x faster than one radix-128 pass at m = 7), and one pass below that. On a GPU, where GEMM
#: width is cheap and each pass is a trip through memory, the fewest passes of at most 2^7 win. The
#: split changes rounding only.
_CPU_RADIX_BITS = 4
_CPU_ONE_PASS_BITS = 5
_MAX_RADIX_BITS = 7


def radix_bits(m: int, device_type: str) -> list[int]:
    """Bits of each FWHT pass for ``2^m`` on ``device_type`` (``"cpu"``, ``"cuda"``): a balanced split, in pass order.

    Example:
        >>> radix_bits(12, "cpu"), radix_bits(7, "cpu"), radix_bits(12, "cuda")
        ([4, 4, 4], [4, 3], [6, 6])
    """
    if device_type == "cpu":
        passes = 1 if m <= _CPU_ONE_PASS_BITS else -(-m // _CPU_RADIX_BITS)
    else:
        passes = max(1, -(-m // _MAX_RADIX_BITS))
    split = [(m * (p + 1)) // passes - (m * p) // passes for p in range(passes)]
    return sorted(split, reverse=True) if device_type == "cpu" else split


@functools.lru_cache(maxsize=64)
def _sylvester(bits: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """The ``2^bits`` Sylvester matrix (symmetric, entries +-scale), cached per dtype, device and scale."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(bits):
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return (h * scale).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor, dim: int = -1, *, scale: float = 1.0) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along ``dim`` (default the last): ``x @ H_{2^m}`` there.

    ``H_{2^m}`` is the Sylvester matrix (symmetric, so this is also ``x @ H.T``).
    Mixed radix: ``H_{2^m} = H_{2^a} (x) H_{2^b} (x) ...`` with balanced factors of at
    most ``2^7``, and each factor is one small matmul along its axis of ``x`` viewed as
    ``[..., 2^a, 2^b, ...]``. That is ``ceil(m / 4)`` passes over the data on a CPU (one up to m = 5)
    (``ceil(m / 7)`` on a GPU) instead of ``m`` radix-2
    butterfly passes, still ``O(n log n)`` (each pass costs at most 128 multiply-adds per
    element). The split changes rounding only. Along a dim other than the last, every pass
    is a ``[radix, radix] @ [radix, columns]`` GEMM on the data where it lies (no transpose).
    The input is not modified.

    Args:
        x: floating tensor whose ``dim`` has size ``2^m``.
        dim: the dim to transform.
        scale: a power of two to multiply the result by, folded into the last pass's matrix
            (``+-scale`` entries): exactly ``fwht(x) * scale`` (unless results are subnormal),
            one pass over the data fewer.

    Returns:
        A new tensor of the same shape and dtype.

    Example:
        >>> fwht(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        tensor([1., 1., 1., 1.])
        >>> fwht(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), dim=0)
        tensor([[1., 2.],
                [1., 2.]])
    """
    shape = x.shape
    dim = dim % x.ndim
    n = shape[dim]
    lead = shape[:dim]
    trail = shape[dim + 1:].numel()  # elements after dim: each pass's GEMM columns start here
    right = trail
    split = radix_bits(n.bit_length() - 1, x.device.type)
    for i, bits in enumerate(split):
        radix = 1 << bits
        h = _sylvester(bits, x.dtype, x.device, scale if i == len(split) - 1 else 1.0)
        if right == 1:  # the last axis: one plain GEMM [rows, radix] @ [radix, radix]
            x = x.reshape(*lead, n // radix, radix) @ h
        else:  # a middle axis: batched GEMM over [radix, right] panels
            x = torch.matmul(h, x.reshape(*lead, n * trail // (radix * right), radix, right))
        right *= radix
    return x.reshape(shape)


def hadamard_apply(x: torch.Tensor, k: int, *, transpose: bool = False, dim: int = -1) -> torch.Tensor:
    """Normalized ``x @ H_n / sqrt(n)`` (or ``x @ H_n.T / sqrt(n)``) along ``dim``, with ``H_n = H_K (x) H_{2^m}``.

    With ``X = x.view(..., K, 2^m)``, ``x @ (A (x) B) = A.T @ X @ B``: one FWHT along
    the ``2^m`` axis, one ``K x K`` matmul along the factor axis.

    Args:
        x: floating tensor whose ``dim`` has size ``n = k * 2^m``.
        k: the factor order (see :func:`choose_factor`).
        transpose: apply ``H_n.T`` (the inverse) instead; differs when ``H_K`` is not symmetric.
        dim: the dim to transform (default the last; any other is computed where it lies in memory).

    Returns:
        Tensor of x's shape and dtype.
    """
    dim = dim % x.ndim
    n = x.shape[dim]
    lead, trail = x.shape[:dim], x.shape[dim + 1:]
    scale = 1.0 / math.sqrt(n)
    exact = k == 1 and (n.bit_length() - 1) % 2 == 0  # scale = 2^(-m/2): the FWHT's last pass applies it
    y = fwht(x.reshape(*lead, k, n // k, trail.numel()) if trail else x.reshape(*lead, k, n // k), dim=dim + 1,
             scale=scale if exact else 1.0)
    if k > 1:
        a = factor_matrix(k).to(dtype=x.dtype, device=x.device)
        y = torch.einsum("...kj,kl->...lj", y.reshape(*lead, k, n // k * trail.numel()), a.T if transpose else a)
    return y.reshape(x.shape) if exact else y.reshape(x.shape) * scale


def hadamard_dense(n: int, k: int) -> torch.Tensor:
    """The dense normalized ``H_n = (H_K (x) H_{2^m}) / sqrt(n)`` in float64 on CPU."""
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    step = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while sylvester.shape[0] * k < n:
        sylvester = torch.kron(sylvester, step)
    return torch.kron(factor_matrix(k), sylvester) / math.sqrt(n)
