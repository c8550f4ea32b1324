"""How close a quantized tensor is to its reference: the one home of the numbers report, bench and the demo print.

Example:
    >>> import torch, rotfn
    >>> x = torch.tensor([1.0, 1.0])
    >>> round(rotfn.metrics.sqnr_db(x, torch.tensor([1.1, 0.9])), 2)
    20.0
"""

from __future__ import annotations

import math
import numbers

import torch

from rotfn.errors import ArgumentError, DTypeError, ShapeError, message

__all__ = ["sqnr_db", "energy_ratio_db"]


def _check_energy(fn: str, arg: str, value) -> float:
    """``value`` as a float when it is a finite real number >= 0 (an energy), else a typed error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DTypeError(message(fn, arg, "a real number (an energy such as sum x^2)", type(value).__name__,
                                 "pass a Python float, e.g. t.square().sum().item()"))
    if not math.isfinite(value) or value < 0:
        raise ArgumentError(message(fn, arg, "a finite energy >= 0", repr(value),
                                    "sum squares of finite values (in float64, so they do not overflow)"))
    return float(value)


def _check_pair(fn: str, x, y) -> None:
    """Raise a typed error unless ``x`` and ``y`` are non-empty finite floating tensors of one shape and device."""
    for arg, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(message(fn, arg, "a torch.Tensor", type(t).__name__, "wrap it with torch.as_tensor"))
        if not t.is_floating_point():
            raise DTypeError(message(fn, arg, "a floating tensor", t.dtype, f"cast with {arg}.float()"))
    if x.shape != y.shape:
        raise ShapeError(message(fn, "y", f"x's shape {list(x.shape)}", list(y.shape),
                                 "compare a tensor with its own quantized version"))
    if x.device != y.device:
        raise ShapeError(message(fn, "y", f"a tensor on x's device {x.device}", f"device {y.device}",
                                 f"move it with y.to({str(x.device)!r})"))
    if x.numel() == 0:
        raise ShapeError(message(fn, "x", "a non-empty tensor", f"shape {list(x.shape)}",
                                 "measure a tensor with at least one element"))
    for arg, t in (("x", x), ("y", y)):
        if not bool(torch.isfinite(t).all()):
            raise ArgumentError(message(fn, arg, "finite values", "NaN or Inf",
                                        "find where the non-finite values come from before measuring"))


def energy_ratio_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` of two energies (``sum x^2``, ``sum (x - y)^2``), e.g. summed over batches.

    Args:
        signal: ``sum x^2``, a finite real number >= 0.
        noise: ``sum (x - y)^2``, a finite real number >= 0.

    Returns:
        The ratio in dB; ``inf`` for zero noise, ``-inf`` for zero signal with noise.

    Raises:
        DTypeError: an argument that is not a real number (a bool, a tensor, a string, ...).
        ArgumentError: a negative, NaN or infinite energy.

    Example:
        >>> energy_ratio_db(100.0, 1.0), energy_ratio_db(1.0, 0.0)
        (20.0, inf)
    """
    signal = _check_energy("energy_ratio_db", "signal", signal)
    noise = _check_energy("energy_ratio_db", "noise", noise)
    if noise == 0:
        return math.inf
    return -math.inf if signal == 0 else 10 * math.log10(signal / noise)


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - y)^2)`` in dB, sums in float64.

    Both tensors are first scaled by one power of two (exact: the ratio is unchanged) that brings
    their largest magnitude near 1, so the squares of large float64 values do not overflow.

    Args:
        x: the reference tensor, any shape (non-empty) and floating dtype, finite.
        y: its approximation, x's shape and device (any floating dtype), finite.

    Returns:
        The SQNR in dB; ``inf`` when ``y == x``, ``-inf`` when ``x`` is all zeros and ``y`` is not.

    Raises:
        DTypeError: ``x`` or ``y`` not a floating tensor.
        ShapeError: ``y``'s shape or device differs from ``x``'s, or ``x`` is empty.
        ArgumentError: NaN or Inf in ``x`` or ``y``.

    Example:
        >>> round(sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])), 2)
        20.0
    """
    _check_pair("sqnr_db", x, y)
    x64, y64 = x.detach().double(), y.detach().double()
    peak = max(x64.abs().max().item(), y64.abs().max().item())
    if peak > 0:  # a power of two that brings the peak into [0.5, 1): the same ratio, and no square overflows
        scale = math.ldexp(1.0, -max(math.frexp(peak)[1], -1021))
        x64, y64 = x64 * scale, y64 * scale
    return energy_ratio_db(x64.square().sum().item(), (x64 - y64).square().sum().item())
