"""The fast Hadamard transform: ``x @ H_n / sqrt(n)`` in ``O(n log n)`` for ``n = K * 2^m``.

A fast Walsh-Hadamard transform (FWHT) for the ``2^m`` part and a ``K x K``
matmul for the factor ``H_K``; the constructions and the order table (which
``K`` an order uses) are part of the spec, in :mod:`rotfn.specs`.
"""

from __future__ import annotations

import functools
import math

import torch

from rotfn.specs import factor_matrix

__all__ = ["radix_bits", "fwht", "hadamard_apply"]


#: How an FWHT splits its ``m`` bits into passes. A radix-r pass is an r-wide GEMM, so narrower
#: passes cost fewer flops per element, until the GEMMs get too thin to pay: on a CPU ``ceil(m / 4)``
#: balanced passes, the widest first (on the last axis, where a thin GEMM costs most), and one pass up
#: to m = 5; on a GPU, where GEMM width is cheap and each pass is a trip through memory, the fewest
#: passes of at most 2^7 (measurements: docs/performance.md, "CPU reference"). The split changes rounding only.
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
