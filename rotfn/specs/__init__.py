"""Frozen, hashable, serializable specs: rotations and number formats."""

from rotfn.specs.formats import (
    FP8,
    MX,
    NVFP4,
    Format,
    IntQ,
    ScaleRule,
    format_from_dict,
    fp8,
    intq,
    mxfp4,
    mxfp8,
    nvfp4,
)
from rotfn.specs.rotation import Rotation, from_matrix, hadamard, orthogonal

__all__ = [
    "Rotation", "hadamard", "orthogonal", "from_matrix",
    "Format", "ScaleRule", "MX", "NVFP4", "IntQ", "FP8",
    "mxfp4", "mxfp8", "nvfp4", "intq", "fp8", "format_from_dict",
]
