"""How close a quantized tensor is to its reference: the one home of the numbers report, bench and the demo print.

Example:
    >>> import torch, rotfn
    >>> x = torch.tensor([1.0, 1.0])
    >>> round(rotfn.metrics.sqnr_db(x, torch.tensor([1.1, 0.9])), 2)
    20.0
"""

from __future__ import annotations

import math

import torch

from rotfn.errors import ShapeError, message

__all__ = ["sqnr_db", "energy_ratio_db"]


def energy_ratio_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` of two energies (``sum x^2``, ``sum (x - y)^2``), e.g. summed over batches.

    Returns:
        The ratio in dB; ``inf`` for zero noise, ``-inf`` for zero signal with noise.

    Example:
        >>> energy_ratio_db(100.0, 1.0), energy_ratio_db(1.0, 0.0)
        (20.0, inf)
    """
    if noise == 0:
        return math.inf
    return -math.inf if signal == 0 else 10 * math.log10(signal / noise)


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - y)^2)`` in dB, sums in float64.

    Args:
        x: the reference tensor, any shape and floating dtype.
        y: its approximation, x's shape.

    Returns:
        The SQNR in dB; ``inf`` when ``y == x``.

    Raises:
        ShapeError: ``y``'s shape differs from ``x``'s.

    Example:
        >>> round(sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])), 2)
        20.0
    """
    if x.shape != y.shape:
        raise ShapeError(message("sqnr_db", "y", f"x's shape {list(x.shape)}", list(y.shape),
                                 "compare a tensor with its own quantized version"))
    x64, y64 = x.detach().double(), y.detach().double()
    return energy_ratio_db(x64.square().sum().item(), (x64 - y64).square().sum().item())
