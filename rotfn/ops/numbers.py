"""Element and scale number types, bit for bit: E2M1 (FP4), E4M3 (FP8), E8M0 and fp32 exponents.

The facts (value grids, maxima, rounding rule) are in ``docs/formats.md``. All
rounding here is round-to-nearest, ties to even, on fp32 inputs.
"""

from __future__ import annotations

import torch

__all__ = [
    "E2M1_VALUES",
    "E2M1_MAX",
    "E4M3_MAX",
    "E4M3_MIN_SUBNORMAL",
    "E8M0_NAN",
    "e2m1_encode",
    "e2m1_decode",
    "e4m3_round",
    "fp32_exponent",
    "exp2_exact",
]

#: Magnitudes of E2M1 codes 0..7 (code = sign << 3 | magnitude code).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
E8M0_NAN = 255

# Rounding thresholds between neighbouring E2M1 magnitudes. At a midpoint RNE
# picks the even code, so the comparison is ">" when the lower code is even and
# ">=" when it is odd: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to E2M1 (RNE, saturating at +-6) and return 4-bit codes.

    Code = ``sign << 3 | m`` with ``|value| = E2M1_VALUES[m]``; the sign of zero is kept
    (``-0.25 -> code 8 = -0``). NaN gives code 0 (callers mark NaN groups separately).

    Args:
        v: fp32 tensor, any shape.

    Returns:
        uint8 tensor of codes in 0..15, same shape.

    Example:
        >>> e2m1_encode(torch.tensor([0.25, 0.75, 2.5, 5.0, 7.0, -0.25]))
        tensor([0, 2, 4, 6, 7, 8], dtype=torch.uint8)
    """
    mag = v.abs()
    steps = [(mag >= mid) if ties_up else (mag > mid) for mid, ties_up in _E2M1_MIDPOINTS]
    code = torch.stack(steps).sum(0, dtype=torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """fp32 values of 4-bit E2M1 codes (uint8 in 0..15)."""
    table = torch.tensor(E2M1_VALUES + tuple(-x for x in E2M1_VALUES), dtype=torch.float32, device=code.device)
    return table[code.long()]


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 to E4M3 (RNE), saturating at +-448; NaN stays NaN. Returns float8_e4m3fn."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fp32_exponent(a: torch.Tensor) -> torch.Tensor:
    """Unbiased exponent from the bits of fp32 ``a`` (int32); zero and subnormals give -127.

    Exact for every input (no ``log2``): ``((bits >> 23) & 0xFF) - 127``.
    """
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def exp2_exact(e: torch.Tensor) -> torch.Tensor:
    """``2^e`` in fp32 built from bits, for int32 ``e`` in [-127, 127] (2^-127 is subnormal)."""
    normal = ((e + 127).clamp(min=1) << 23).view(torch.float32)
    return torch.where(e == -127, torch.full_like(normal, 2.0**-127), normal)
