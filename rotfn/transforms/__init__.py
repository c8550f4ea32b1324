"""Pure transforms over parameter dicts ``{name: Tensor}``: values you build, print, compose and call.

Primitives: :func:`rotate_input` (``W @ R``), :func:`rotate_output` (``R.T @ W``,
``b @ R``), per-head variants, :func:`fuse_norm`, :func:`qdq_weights`; the
combinator :func:`chain`; selection with :func:`where`. Each returns a new dict
and never writes a tensor in place.

The fold program (:func:`compile_fold` -> :class:`FoldProgram`): a transform compiled once for
tensors' names, shapes and dtypes into per-key operations (:class:`Rotate`, :class:`Scale`,
:class:`ShiftBias`, :class:`Fill`, :class:`QDQ`), their reads, stages and piece cuts
(:func:`piece_cuts`). :func:`rotfn.fold` runs it in memory, :func:`rotfn.fold_checkpoint` over a
checkpoint's pieces, :func:`rotfn.learn.rotations` with differentiable rotations (``rotate=``).
:func:`check_params` is the dict-of-tensors argument check the other packages share.

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
    check_params,
    fuse_norm,
    qdq_weights,
    rotate_input,
    rotate_output,
)
from rotfn.transforms._program import (
    MIN_PIECE,
    PIECE_ELEMENTS,
    PRECISIONS,
    QDQ,
    Fill,
    FoldProgram,
    KeyProgram,
    Rotate,
    RotateFn,
    Scale,
    ShiftBias,
    Stage,
    compile_fold,
    piece_cuts,
    precision_dtype,
)
from rotfn.transforms._program import Rounded as Rounded  # internal: rotfn.fold_checkpoint
from rotfn.transforms._program import kept_ties as kept_ties  # internal (not in __all__): rotfn.fold and rotfn.call
from rotfn.transforms._program import key_program as key_program  # internal: rotfn.fold_checkpoint
from rotfn.transforms._program import pin_roundings as pin_roundings
from rotfn.transforms._program import pin_shared_scales as pin_shared_scales  # internal: rotfn.fold_checkpoint
from rotfn.transforms._program import shares_global_scale as shares_global_scale  # internal: rotfn.calibrate
from rotfn.transforms._program import tensor_wide as tensor_wide
from rotfn.transforms._program import tie as tie
from rotfn.transforms._where import Where, where

__all__ = [
    "Where", "where", "chain",
    "rotate_input", "rotate_output", "fuse_norm", "qdq_weights",
    "Transform", "RotateInput", "RotateOutput", "FuseNorm", "QDQWeights", "Chain",
    # the fold program: what rotfn.fold, rotfn.fold_checkpoint and rotfn.learn run
    "compile_fold", "FoldProgram", "KeyProgram", "Stage", "Rotate", "Scale", "ShiftBias", "Fill", "QDQ", "RotateFn",
    "piece_cuts", "PIECE_ELEMENTS", "MIN_PIECE", "PRECISIONS", "precision_dtype",
    # helper for the other packages' argument checks
    "check_params",
]
