"""Pure transforms over parameter dicts ``{name: Tensor}``: values you build, print, compose and call.

Primitives: :func:`rotate_input` (``W @ R``), :func:`rotate_output` (``R.T @ W``,
``b @ R``), per-head variants, :func:`fuse_norm`, :func:`qdq_weights`; the
combinator :func:`chain`; selection with :func:`where`. Each returns a new dict
and never writes a tensor in place.

Example:
    >>> import torch, rotfn
    >>> from rotfn import transforms as T
    >>> R = rotfn.hadamard(8, seed=0)
    >>> t = rotfn.chain(T.rotate_input(R, "*.weight"), T.qdq_weights(rotfn.intq(8), "*.weight"))
    >>> p = {"a.weight": torch.randn(4, 8)}
    >>> q = t(p)
    >>> q is not p and q["a.weight"].shape == p["a.weight"].shape
    True
"""

from rotfn.transforms._core import (
    Chain,
    FuseNorm,
    QDQWeights,
    RotateInput,
    RotateOutput,
    Transform,
    chain,
    fuse_norm,
    qdq_weights,
    rotate_input,
    rotate_output,
)
from rotfn.transforms._core import check_params as check_params  # internal: argument check for rotfn.model, report
from rotfn.transforms._where import Where, where

__all__ = [
    "Where", "where", "chain",
    "rotate_input", "rotate_output", "fuse_norm", "qdq_weights",
    "Transform", "RotateInput", "RotateOutput", "FuseNorm", "QDQWeights", "Chain",
]
