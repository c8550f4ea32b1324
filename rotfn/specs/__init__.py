"""Frozen, hashable, serializable specs: rotations (with the Hadamard constructions), number formats, QTensor.

The lowest layer of rotfn: it imports nothing of rotfn but :mod:`rotfn.errors`.
"""

from rotfn.specs._hadamard import (
    MAX_FACTOR,
    can_build_factor,
    choose_factor,
    constructible_orders,
    factor_matrix,
    hadamard_dense,
)
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
from rotfn.specs.qtensor import QTensor
from rotfn.specs.rotation import Rotation, from_matrix, hadamard, orthogonal

__all__ = [
    "QTensor",
    "Rotation", "hadamard", "orthogonal", "from_matrix",
    "Format", "ScaleRule", "MX", "NVFP4", "IntQ", "FP8",
    "mxfp4", "mxfp8", "nvfp4", "intq", "fp8", "format_from_dict",
    "MAX_FACTOR", "can_build_factor", "choose_factor", "constructible_orders", "factor_matrix", "hadamard_dense",
]
