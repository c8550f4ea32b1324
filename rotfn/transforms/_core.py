"""Pure transforms over parameter dicts ``{name: Tensor}``, as frozen values.

Legend: a linear weight is ``W: [..., out, in]`` (``[out, in]`` for ``nn.Linear``,
``[E, out, in]`` for fused experts, ``[V, d]`` for an embedding), a bias is
``b: [out]``, a norm scale is ``g: [in]``. Row-vector convention: a linear
computes ``y = x @ W.T + b``.

* input side, :func:`rotate_input`: ``W' = W @ R``, so ``(x @ R) @ W'.T == x @ W.T``;
* output side, :func:`rotate_output`: ``W' = R.T @ W`` and ``b' = b @ R``, so the
  layer writes ``y @ R``;
* per head: the rotated dim is cut into consecutive chunks of ``R.n`` (heads) and
  each chunk is rotated by ``R``, i.e. ``blockdiag(R, ..., R)``;
* norm fusion, :func:`fuse_norm`: ``W' = W @ diag(g)`` for every linear reading
  the norm, and ``g' = 1`` (with a LayerNorm bias ``beta``: ``b' = b + W @ beta``, ``beta' = 0``);
* :func:`qdq_weights`: ``W' = qdq(W, fmt)`` along ``in``.

``transposed=True`` on the rotations and on :func:`qdq_weights` is for weights stored ``[..., in, out]``
(GPT-2's ``transformers.pytorch_utils.Conv1D``, ``y = x @ W + b``): the same math on the ``in`` / ``out``
dims, which are swapped (input side ``W' = R.T @ W``, output side ``W' = W @ R``, qdq along dim -2).

Every transform returns a **new** dict; the input dict and its tensors are never
written. A transform is a value: calling it compiles it into a fold program
(:mod:`rotfn.transforms._program`, the one engine :func:`rotfn.fold` and
:func:`rotfn.fold_checkpoint` run too) and runs that in float64, casting back to each
tensor's dtype once per primitive (:func:`rotfn.fold` casts once per plan, in its ``precision``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import torch

from rotfn.errors import (
    ArgumentError,
    DTypeError,
    FormatError,
    PlanError,
    RotationError,
    SelectionError,
    ShapeError,
    message,
)
from rotfn.functional import FLOAT_DTYPES
from rotfn.specs import QTensor
from rotfn.specs.formats import Format
from rotfn.specs.rotation import Rotation
from rotfn.transforms._program import QDQ, Fill, Rotate, Scale, ShiftBias, compile_fold, shares_global_scale
from rotfn.transforms._where import Where, where

#: ``rounding(key, W) -> QTensor``: a weight rounded to its format by the caller (GPTQ).
WeightRounding = Callable[[str, torch.Tensor], QTensor]

__all__ = [
    "Transform", "RotateInput", "RotateOutput", "FuseNorm", "QDQWeights", "Chain",
    "rotate_input", "rotate_output", "fuse_norm", "qdq_weights", "chain", "check_params",
]


def check_params(fn: str, params, arg: str = "params") -> None:
    """Raise a typed error unless ``params`` is a mapping of str to floating or integer tensors."""
    if not isinstance(params, Mapping):
        raise DTypeError(message(fn, arg, "a dict {name: Tensor}", type(params).__name__, "build one with rotfn.params(model)"))
    for k, t in params.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise DTypeError(
                message(fn, arg, "a dict {name: Tensor}", f"{type(k).__name__} key {k!r} -> {type(t).__name__}",
                        "build one with rotfn.params(model)")
            )


def _key(fn: str, params: Mapping, key: str) -> torch.Tensor:
    if key not in params:
        close = Where.names([key]).closest(params)
        raise SelectionError(message(fn, "params", f"a key {key!r}", "no such key", f"use one of the closest keys: {close}"))
    return params[key]


def _rotate_op(fn: str, key: str, t: torch.Tensor, transform, dim: int, span: tuple[int, int] | None) -> Rotate:
    """The :class:`Rotate` of dim ``dim`` of ``t`` (or its ``span``) by ``transform.rotation``, once its shape is checked."""
    r, per_head = transform.rotation, transform.per_head
    if t.dtype not in FLOAT_DTYPES:
        raise DTypeError(message(fn, f"params[{key!r}]", "a floating tensor", t.dtype))
    n = t.shape[dim]
    lo, hi = span if span is not None else (0, n)
    if hi > n:
        raise ShapeError(message(fn, f"params[{key!r}]", f"a dim of at least {hi} for span {span}", f"shape {tuple(t.shape)}"))
    m = hi - lo
    if (m % r.n if per_head else m != r.n):
        what = f"a multiple of {r.n} (heads of size R.n)" if per_head else f"{r.n} (the rotation's n)"
        where_ = f"rows {lo}:{hi} of dim {dim}" if span is not None else f"dim {dim}"
        raise ShapeError(
            message(fn, f"params[{key!r}]", f"{where_} of size {what}", f"shape {tuple(t.shape)}",
                    (f"use a rotation whose n is the head size (dividing {m})" if per_head
                     else f"build the rotation for n={m}") + " or select other keys")
        )
    return Rotate(r, dim % t.ndim, per_head, span, origin=transform)


class Transform:
    """Base of all transforms: a frozen value that maps a params dict to a new params dict.

    Call it: ``new = transform(params)``: the transform compiled for ``params``
    (:func:`rotfn.transforms.compile_fold`) and run in float64, each tensor rounded back to
    its dtype after every primitive. Subclasses implement ``_phases``: the per-key operations,
    in phases whose operations all read the phase's input.
    """

    name = "transform"

    def __call__(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_params(self.name, params)
        return compile_fold(self, params, fn=self.name).run(params, round_each=True, fn=self.name)

    def _phases(self, tensors: Mapping[str, torch.Tensor]) -> list[list[tuple[str, object]]]:
        raise NotImplementedError

    def inverse(self) -> Transform:
        """The transform that undoes this one (rotations only).

        Raises:
            ArgumentError: this transform loses information (norm fusion, qdq).
        """
        raise ArgumentError(message(f"{self.name}.inverse", "self", "an invertible transform (rotations, chains of them)",
                                    repr(self)))


def _check_rotation(fn: str, r) -> Rotation:
    if not isinstance(r, Rotation):
        raise RotationError(message(fn, "R", "a rotfn.Rotation", type(r).__name__,
                                    "build one with rotfn.hadamard, rotfn.orthogonal or rotfn.from_matrix"))
    return r


def _check_where(fn: str, w) -> Where:
    try:
        return w if isinstance(w, Where) else where(w)
    except ArgumentError:
        raise ArgumentError(message(fn, "where", "a rotfn.where filter, glob, regex or predicate", repr(w),
                                    "pass e.g. where='*.q_proj.weight'")) from None


def _check_bool(fn: str, arg: str, v) -> bool:
    if not isinstance(v, bool):
        raise ArgumentError(message(fn, arg, "a bool", repr(v)))
    return v


def _check_span(fn: str, span) -> tuple[int, int] | None:
    if span is None:
        return None
    ok = (isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                      for i in span) and 0 <= span[0] < span[1])
    if not ok:
        raise ArgumentError(message(fn, "span", "None or (start, stop) with 0 <= start < stop", repr(span)))
    return (span[0], span[1])


@dataclasses.dataclass(frozen=True, repr=False)
class RotateInput(Transform):
    """``W' = W @ R`` on the last dim of every selected tensor (dim -2 if ``transposed``; see :func:`rotate_input`)."""

    rotation: Rotation
    where: Where
    per_head: bool = False
    transposed: bool = False
    name = "rotate_input"

    def _phases(self, tensors):
        dim = -2 if self.transposed else -1
        keys = self.where.select(tensors, fn=self.name)
        return [[(k, _rotate_op(self.name, k, tensors[k], self, dim, None)) for k in keys]]

    def inverse(self) -> RotateInput:
        return dataclasses.replace(self, rotation=self.rotation.T)

    def __repr__(self) -> str:
        extra = ", per_head=True" if self.per_head else ""
        extra += ", transposed=True" if self.transposed else ""
        return f"rotate_input({self.rotation!r}, {self.where!r}{extra})"


@dataclasses.dataclass(frozen=True, repr=False)
class RotateOutput(Transform):
    """``W' = R.T @ W`` (dim -2; dim -1 if ``transposed``), ``b' = b @ R`` for 1-D tensors (:func:`rotate_output`)."""

    rotation: Rotation
    where: Where
    per_head: bool = False
    span: tuple[int, int] | None = None
    transposed: bool = False
    name = "rotate_output"

    def _phases(self, tensors):
        phase = []
        for key in self.where.select(tensors, fn=self.name):
            t = tensors[key]
            dim = -2 if t.ndim >= 2 and not self.transposed else -1
            phase.append((key, _rotate_op(self.name, key, t, self, dim, self.span)))
        return [phase]

    def inverse(self) -> RotateOutput:
        return dataclasses.replace(self, rotation=self.rotation.T)

    def __repr__(self) -> str:
        extra = ", per_head=True" if self.per_head else ""
        extra += f", span={self.span}" if self.span is not None else ""
        extra += ", transposed=True" if self.transposed else ""
        return f"rotate_output({self.rotation!r}, {self.where!r}{extra})"


@dataclasses.dataclass(frozen=True, repr=False)
class FuseNorm(Transform):
    """Fold a norm's scale (and bias) into the linears that read it (see :func:`fuse_norm`)."""

    norm: str
    into: Where
    bias: str | None = None
    name = "fuse_norm"

    def _phases(self, tensors):
        fn = self.name
        g = _key(fn, tensors, self.norm)
        keys = self.into.select(tensors, fn=fn)
        if self.bias is not None:
            _key(fn, tensors, self.bias)
        phase = []
        for key in keys:
            w = tensors[key]
            if w.shape[-1] != g.shape[-1] or g.ndim != 1:
                raise ShapeError(message(fn, f"params[{key!r}]", f"last dim {g.shape[-1]} (the size of {self.norm!r})",
                                         f"shape {tuple(w.shape)}", "fuse a norm only into the linears that read it"))
            phase.append((key, Scale(self.norm)))
            if self.bias is not None:
                bias_key = key.removesuffix("weight") + "bias"
                if bias_key == key + "bias" or bias_key not in tensors:
                    raise PlanError(message(fn, "bias", f"a bias {bias_key!r} next to {key!r} to take W @ beta",
                                            "no such key", "fuse a LayerNorm bias only into linears that have a bias"))
                phase.append((bias_key, ShiftBias(key, self.bias)))
        phase.append((self.norm, Fill(1.0)))
        if self.bias is not None:
            phase.append((self.bias, Fill(0.0)))
        return [phase]

    def __repr__(self) -> str:
        extra = f", bias={self.bias!r}" if self.bias is not None else ""
        return f"fuse_norm({self.norm!r}, into={self.into!r}{extra})"


@dataclasses.dataclass(frozen=True, repr=False)
class QDQWeights(Transform):
    """``W' = qdq(W, fmt)`` along the last dim of each selected tensor, dim -2 if ``transposed`` (:func:`qdq_weights`)."""

    fmt: Format
    where: Where
    rounding: WeightRounding | None = None
    transposed: bool = False
    shared: tuple[tuple[str, ...], ...] = ()
    name = "qdq_weights"

    def _phases(self, tensors):
        phase = []
        dim = -2 if self.transposed else -1
        selected = self.where.select(tensors, fn=self.name)
        shares = {}
        if shares_global_scale(self.fmt):
            shares = {k: tuple(o for o in group if o != k and o in selected) for group in self.shared for k in group}
        for key in selected:
            w = tensors[key]
            group = self.fmt.group
            if w.ndim < -dim or (group is not None and w.shape[dim] % group):
                what = "dim -2 (in, stored [in, out])" if self.transposed else "last dim"
                raise ShapeError(message(self.name, f"params[{key!r}]", f"{what} divisible by {self.fmt!r}'s group of "
                                         f"{group}", f"shape {tuple(w.shape)}",
                                         "leave this key out of where= (rotfn never pads)"))
            rounding = None if self.rounding is None else functools.partial(self.rounding, key)
            phase.append((key, QDQ(self.fmt, rounding, key, self.transposed, shares.get(key, ()))))
        return [phase]

    def __repr__(self) -> str:
        extra = ", transposed=True" if self.transposed else ""
        extra += f", shared={len(self.shared)} groups" if self.shared else ""
        return f"qdq_weights({self.fmt!r}, {self.where!r}{extra})"


@dataclasses.dataclass(frozen=True, repr=False)
class Chain(Transform):
    """Transforms applied left to right (see :func:`chain`)."""

    transforms: tuple[Transform, ...]
    name = "chain"

    def _phases(self, tensors):
        return [phase for t in self.transforms for phase in t._phases(tensors)]

    def inverse(self) -> Chain:
        return Chain(tuple(t.inverse() for t in reversed(self.transforms)))

    def __repr__(self) -> str:
        if len(self.transforms) > 6:
            inner = ", ".join(map(repr, self.transforms[:3])) + f", ... ({len(self.transforms) - 3} more)"
        else:
            inner = ", ".join(map(repr, self.transforms))
        return f"chain({inner})"


# ----- factories ---------------------------------------------------------------
def rotate_input(R: Rotation, where: Where | str | tuple, *, per_head: bool = False,  # noqa: N803
                 transposed: bool = False) -> RotateInput:
    """Rotate the input side of the selected params: ``W' = W @ R`` (last dim).

    A linear reading ``x @ R`` instead of ``x`` with ``W' = W @ R`` computes the same
    ``(x @ R) @ (W @ R).T == x @ W.T``. With ``per_head=True`` the last dim is cut
    into heads of ``R.n`` and each is rotated: ``W' = W @ blockdiag(R, ..., R)``.
    With ``transposed=True`` the weights are stored ``[in, out]`` (``y = x @ W``, GPT-2's ``Conv1D``):
    ``W' = R.T @ W`` on dim -2, so ``(x @ R) @ W' == x @ W``.

    Args:
        R: a :class:`rotfn.Rotation` of the last dim's size (or of the head size).
        where: which keys (a :func:`rotfn.where` filter, glob, regex, predicate or tuple).
        per_head: rotate each consecutive chunk of ``R.n``.
        transposed: the selected weights are stored ``[..., in, out]``.

    Returns:
        A frozen :class:`RotateInput`; call it on a params dict to get a new dict.

    Raises:
        RotationError: R not a Rotation.
        ArgumentError: bad where or per_head. When the transform is called:
            SelectionError (no key matches) or ShapeError (size mismatch).

    Example:
        >>> import torch, rotfn
        >>> R = rotfn.hadamard(4, seed=0)
        >>> p = {"lin.weight": torch.randn(3, 4, dtype=torch.float64)}
        >>> q = rotfn.transforms.rotate_input(R, "lin.weight")(p)
        >>> x = torch.randn(2, 4, dtype=torch.float64)
        >>> torch.allclose(rotfn.rotate(x, R) @ q["lin.weight"].T, x @ p["lin.weight"].T)
        True
    """
    fn = "rotate_input"
    return RotateInput(_check_rotation(fn, R), _check_where(fn, where), _check_bool(fn, "per_head", per_head),
                       _check_bool(fn, "transposed", transposed))


def rotate_output(
    R: Rotation, where: Where | str | tuple, *, per_head: bool = False, span: tuple[int, int] | None = None,  # noqa: N803
    transposed: bool = False,
) -> RotateOutput:
    """Rotate the output side of the selected params: ``W' = R.T @ W``, bias ``b' = b @ R``.

    A layer with ``W' = R.T @ W`` and ``b' = b @ R`` writes ``(x @ W.T + b) @ R``:
    its output is rotated. 2-D+ tensors rotate dim -2 (the out rows), 1-D tensors
    (biases) their only dim. ``per_head=True`` rotates each chunk of ``R.n`` rows
    (per attention head); ``span=(start, stop)`` limits it to those rows, e.g. the
    V rows of a fused ``qkv_proj``. With ``transposed=True`` the weights are stored ``[in, out]``
    (GPT-2's ``Conv1D``): ``W' = W @ R`` on the last dim, ``span`` on its columns.

    Args:
        R: a :class:`rotfn.Rotation` of the out size (or the head size).
        where: which keys.
        per_head: rotate each consecutive chunk of ``R.n``.
        span: ``(start, stop)`` rows to rotate, or None for all.
        transposed: the selected weights are stored ``[..., in, out]``.

    Returns:
        A frozen :class:`RotateOutput`.

    Raises:
        RotationError: R not a Rotation.
        ArgumentError: bad where, per_head or span. When the transform is called:
            SelectionError (where matches no key) or ShapeError (a tensor that does not fit R).

    Example:
        >>> import torch, rotfn
        >>> R = rotfn.orthogonal(3, seed=0)
        >>> p = {"lin.weight": torch.randn(3, 5, dtype=torch.float64), "lin.bias": torch.randn(3, dtype=torch.float64)}
        >>> q = rotfn.transforms.rotate_output(R, "lin.*")(p)
        >>> x = torch.randn(2, 5, dtype=torch.float64)
        >>> y = x @ p["lin.weight"].T + p["lin.bias"]
        >>> torch.allclose(x @ q["lin.weight"].T + q["lin.bias"], rotfn.rotate(y, R))
        True
    """
    fn = "rotate_output"
    return RotateOutput(_check_rotation(fn, R), _check_where(fn, where), _check_bool(fn, "per_head", per_head),
                        _check_span(fn, span), _check_bool(fn, "transposed", transposed))


def fuse_norm(norm: str, into: Where | str | tuple, *, bias: str | None = None) -> FuseNorm:
    """Fold a RMSNorm/LayerNorm scale into the linears that read the norm's output.

    ``norm(x) = xhat * g (+ beta)`` feeding ``W``: ``W' = W @ diag(g)``, ``g' = 1``,
    and with a LayerNorm bias ``b' = b + W @ beta``, ``beta' = 0``. Exact: the
    model computes the same function; afterwards the norm is scale-free, so a
    rotation of its input commutes with it (RMSNorm).

    Args:
        norm: key of the norm's scale ``g: [in]``.
        into: which linear weights ``[..., out, in]`` read the norm.
        bias: key of a LayerNorm bias ``beta``, or None.

    Returns:
        A frozen :class:`FuseNorm`.

    Raises:
        ArgumentError: bad arguments. When the transform is called: SelectionError
            (no such key), ShapeError (sizes differ) or PlanError (a LayerNorm bias but a
            linear without bias).

    Example:
        >>> import torch, rotfn
        >>> p = {"n.weight": torch.tensor([2.0, 3.0]), "lin.weight": torch.ones(1, 2)}
        >>> q = rotfn.transforms.fuse_norm("n.weight", "lin.weight")(p)
        >>> q["lin.weight"], q["n.weight"]
        (tensor([[2., 3.]]), tensor([1., 1.]))
    """
    fn = "fuse_norm"
    if not isinstance(norm, str):
        raise ArgumentError(message(fn, "norm", "a parameter key (str)", repr(norm)))
    if bias is not None and not isinstance(bias, str):
        raise ArgumentError(message(fn, "bias", "None or a parameter key (str)", repr(bias)))
    return FuseNorm(norm, _check_where(fn, into), bias)


def qdq_weights(fmt: Format, where: Where | str | tuple, *, rounding: WeightRounding | None = None,
                transposed: bool = False, shared: tuple[tuple[str, ...], ...] = ()) -> QDQWeights:
    """Fake-quantize the selected weights along their last (input) dim: ``W' = qdq(W, fmt)``.

    Args:
        fmt: a number format (:func:`rotfn.mxfp4`, :func:`rotfn.intq`, ...).
        where: which keys.
        rounding: ``rounding(key, W) -> QTensor`` of ``fmt`` whose values replace ``qdq(W, fmt)``
            (e.g. :meth:`rotfn.calibration.Calibration.round`: GPTQ's), or None.
        transposed: the weights are stored ``[..., in, out]`` (GPT-2's ``Conv1D``): quantized along dim -2,
            their input dim (``rounding`` gets ``W.mT``, ``[out, in]``).
        shared: groups of keys rounded with one NVFP4 global scale measured over the group (fused
            partitions an engine runs as one linear, :attr:`rotfn.plans.Plan.shared_scales`);
            other formats ignore it.

    Returns:
        A frozen :class:`QDQWeights`.

    Raises:
        FormatError: fmt not a format. When the transform is called: SelectionError
            (no key matches) or ShapeError (last dim not divisible by the format's group).

    Example:
        >>> import torch, rotfn
        >>> p = {"w": torch.tensor([[0.3, -1.2] + [0.0] * 30])}
        >>> rotfn.transforms.qdq_weights(rotfn.mxfp4(), "w")(p)["w"][0, :2]
        tensor([ 0.2500, -1.0000])
    """
    fn = "qdq_weights"
    if not isinstance(fmt, Format):
        raise FormatError(message(fn, "fmt", "a rotfn format spec", type(fmt).__name__, "build one with rotfn.mxfp4() ..."))
    if rounding is not None and not callable(rounding):
        raise ArgumentError(message(fn, "rounding", "rounding(key, W) -> QTensor, or None", type(rounding).__name__))
    if not (isinstance(shared, tuple) and all(isinstance(g, tuple) and all(isinstance(k, str) for k in g)
                                              for g in shared)):
        raise ArgumentError(message(fn, "shared", "a tuple of tuples of keys", repr(shared),
                                    "pass e.g. (('q.weight', 'k.weight', 'v.weight'),)"))
    return QDQWeights(fmt, _check_where(fn, where), rounding, _check_bool(fn, "transposed", transposed), shared)


def chain(*transforms: Transform) -> Chain:
    """Compose transforms left to right: ``chain(a, b)(p) == b(a(p))``.

    A chain of rotations has an inverse (:meth:`Chain.inverse`): the inverses in reverse order.

    Args:
        *transforms: :class:`Transform` values (chains are flattened).

    Returns:
        A frozen :class:`Chain`.

    Raises:
        ArgumentError: an argument is not a Transform.

    Example:
        >>> import torch, rotfn
        >>> R = rotfn.orthogonal(4, seed=1)
        >>> t = rotfn.chain(rotfn.transforms.rotate_input(R, "w"), rotfn.transforms.rotate_output(R, "w"))
        >>> p = {"w": torch.randn(4, 4, dtype=torch.float64)}
        >>> torch.allclose(t.inverse()(t(p))["w"], p["w"])
        True
    """
    flat: list[Transform] = []
    for t in transforms:
        if isinstance(t, Chain):
            flat.extend(t.transforms)
        elif isinstance(t, Transform):
            flat.append(t)
        else:
            raise ArgumentError(message("chain", "transforms", "rotfn transforms (rotate_input, fuse_norm, ...)",
                                        f"{type(t).__name__} {t!r}"))
    return Chain(tuple(flat))
