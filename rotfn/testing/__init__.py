"""Public hypothesis strategies and assertion helpers for checking rotfn compositions.

Needs the ``hypothesis`` package (``pip install rotfn[test]``).

Example:
    >>> from hypothesis import given
    >>> import rotfn, rotfn.testing as rt
    >>> @given(rt.rotations(64), rt.tensors(64))
    ... def test_inverse(R, x):
    ...     rt.assert_inverse(x, R)
    >>> test_inverse()
"""

from rotfn.testing.asserts import assert_bits_equal, assert_inverse, assert_orthogonal, assert_qdq_laws, bits
from rotfn.testing.models import (
    FAMILY_NAMES,
    ExactRMSNorm,
    RotationFactory,
    assert_equivalent,
    make_config,
    model_configs,
    relative_error,
    rotation_factories,
    tiny_model,
    token_inputs,
)
from rotfn.testing.strategies import (
    DISTRIBUTIONS,
    EDGE_ROWS,
    ROTATION_KINDS,
    formats,
    hadamard_orders,
    make_tensor,
    rotations,
    row_counts,
    seeds,
    tensors,
)

__all__ = [
    "seeds", "hadamard_orders", "rotations", "formats", "row_counts", "tensors", "make_tensor",
    "DISTRIBUTIONS", "ROTATION_KINDS", "EDGE_ROWS",
    "assert_bits_equal", "assert_orthogonal", "assert_inverse", "assert_qdq_laws", "bits",
    # models
    "model_configs", "make_config", "tiny_model", "token_inputs", "rotation_factories", "RotationFactory",
    "assert_equivalent", "relative_error", "ExactRMSNorm", "FAMILY_NAMES",
]
