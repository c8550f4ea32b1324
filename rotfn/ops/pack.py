"""Two 4-bit codes per byte along the last dim, lower index in the low nibble."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pack_nibbles", "unpack_nibbles"]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in 0..15 ``[..., n]`` into uint8 ``[..., ceil(n / 2)]``.

    An odd n leaves the high nibble of the last byte zero (storage only; ``shape``
    in the QTensor says how many codes are real).

    Example:
        >>> pack_nibbles(torch.tensor([1, 2, 15], dtype=torch.uint8))
        tensor([33, 15], dtype=torch.uint8)
    """
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``[..., ceil(n / 2)]`` to codes ``[..., n]``."""
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]
