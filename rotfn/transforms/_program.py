"""The fold program: a transform chain compiled once, for given tensor names, shapes and dtypes, into per-key operations.

Legend: a key's tensor is ``x`` (a weight ``W: [..., out, in]``, a bias ``b: [out]``, a norm
scale ``g: [in]``); its operations, in chain order, are

* :class:`Rotate`: ``x`` rotated along one dim (``W @ R`` on ``in``, ``R.T @ W`` on ``out``,
  ``b @ R``), per head or on a span of rows if asked;
* :class:`Scale`: ``W diag(g)``, reading the norm scale ``g``;
* :class:`ShiftBias`: ``b + W @ beta``, reading the weight ``W`` and a LayerNorm bias ``beta``;
* :class:`Fill`: every element set to one value (a fused norm's ``g' = 1``, ``beta' = 0``);
* :class:`QDQ`: ``qdq(W, fmt)`` along ``in``.

A weight stored ``[in, out]`` (GPT-2's ``Conv1D``, ``y = x @ W + b``) is *transposed*: its ``in`` is dim -2,
so its input side rotates dim -2 (``R.T @ W``), its output side dim -1 (``W @ R``) and its qdq runs along dim -2.

A :class:`FoldProgram` holds one :class:`KeyProgram` per key: its operations, the keys they
read (each at the version it has at that point of the chain: 0 is the tensor as given), and
its :class:`Stage` s: consecutive operations that leave one dim unmixed, along which the key
(or the stage) may be cut into pieces of about ``piece_elements`` (:func:`piece_cuts`). Every
piece keeps at least :data:`MIN_PIECE` entries of its dim, so each matrix product keeps the
kernel (and every element the rounding) it has on the whole tensor: a key folded whole, in
pieces, or in stages by several threads gets the same bits. The same rule cuts a rotation's
work inside a tensor, so the FWHT's passes stay in cache.

:meth:`FoldProgram.run` runs the program over an in-memory ``{name: Tensor}`` source
(:func:`rotfn.fold`, the transforms' ``__call__``); :mod:`rotfn.io` runs the same stages over
a checkpoint's pieces (:meth:`Stage.run`). Precision and piece size are arguments of the run.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Mapping

import torch

from rotfn.errors import ArgumentError, PlanError, message
from rotfn.functional import dequantize, qdq, quantize, rotate
from rotfn.ops.quant import finite_amax, nvfp4_shared_global_scale
from rotfn.specs import QTensor
from rotfn.specs.formats import FP8, NVFP4, NVFP4_GLOBAL_RULES, Format, nvfp4
from rotfn.specs.rotation import Rotation

__all__ = [
    "PIECE_ELEMENTS", "MIN_PIECE", "PRECISIONS", "precision_dtype", "piece_cuts", "RotateFn",
    "Rotate", "Scale", "ShiftBias", "Fill", "QDQ", "tensor_wide", "shares_global_scale", "Stage", "KeyProgram", "FoldProgram", "compile_fold", "key_program", "pin_shared_scales", "kept_ties",
    "tie",
]

#: Elements per piece: 2 MiB of float64 per temporary, so the FWHT passes stay in cache.
PIECE_ELEMENTS = 1 << 18
#: Fewest entries of the cut dim in a piece (see the module docstring).
MIN_PIECE = 16
#: ``precision=`` of :func:`rotfn.fold` and :func:`rotfn.fold_checkpoint`: the dtype the fold computes in.
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}

#: ``rotate_fn(x, R, dim=d)``: ``x @ R`` along dim ``d``, :func:`rotfn.rotate` or a stand-in with its signature.
RotateFn = Callable[..., torch.Tensor]


def precision_dtype(fn: str, precision) -> torch.dtype:
    """The dtype of a ``precision=`` argument (``"float64"`` or ``"float32"``).

    Raises:
        ArgumentError: another value.

    Example:
        >>> precision_dtype("fold", "float32")
        torch.float32
    """
    if precision not in PRECISIONS:
        raise ArgumentError(message(fn, "precision", f"one of {sorted(PRECISIONS)}", repr(precision),
                                    'keep "float64" (the default) unless a half-precision checkpoint must fold faster'))
    return PRECISIONS[precision]


def piece_cuts(size: int, row_elements: int, piece_elements: int) -> list[slice]:
    """Even slices of ``range(size)`` of about ``piece_elements`` elements, each at least :data:`MIN_PIECE` long.

    Args:
        size: length of the cut dim.
        row_elements: elements per entry of that dim.
        piece_elements: the piece size to aim at.

    Returns:
        ``count`` slices, ``count = max(1, min(size // MIN_PIECE, ceil(size * row_elements / piece_elements)))``.

    Example:
        >>> piece_cuts(40, 64, 64 * 16)
        [slice(0, 20, None), slice(20, 40, None)]
    """
    count = max(1, min(size // MIN_PIECE, -(-size * row_elements // max(piece_elements, 1))))
    bounds = [size * i // count for i in range(count + 1)]
    return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]


@dataclasses.dataclass(frozen=True)
class _Run:
    """The arguments of one run: work dtype, piece size, rotation stand-ins (keyed by the transform that made the op)."""

    dtype: torch.dtype
    piece_elements: int
    rotate: Mapping
    codes: dict | None = None  # {key: QTensor} of each QDQ, when the caller keeps them


# ----- operations ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rotate:
    """``x`` rotated by ``rotation`` along ``dim`` (each ``R.n``-chunk if ``per_head``; rows ``span`` only if given)."""

    rotation: Rotation
    dim: int
    per_head: bool = False
    span: tuple[int, int] | None = None
    origin: object = dataclasses.field(default=None, compare=False, repr=False)  # the transform, for rotate=
    reads = ()

    def mixes(self, ndim: int) -> set[int]:
        return {self.dim}

    def apply(self, x: torch.Tensor, reads, run: _Run) -> torch.Tensor:
        r, dim = self.rotation, self.dim
        n = x.shape[dim]
        lo, hi = self.span if self.span is not None else (0, n)
        part = x.narrow(dim, lo, hi - lo)
        # [vectors, r.n, columns]: every r.n-vector along dim 1 rotates on its own; columns > 1 for a dim other than
        # the last, whose vectors rotfn.rotate(dim=1) rotates where they lie in memory, not transposed
        columns = x.shape[dim + 1:].numel()
        x3 = part.reshape(-1, r.n, columns)
        axis = 0 if columns == 1 else 2  # pieces of whole vectors: rows, or columns of every vector
        row = r.n if columns == 1 else x3.shape[0] * r.n
        fn = run.rotate.get(self.origin, rotate)
        rotated = [fn(x3[(slice(None),) * axis + (cut,)].contiguous(), r, dim=1)
                   for cut in piece_cuts(x3.shape[axis], row, run.piece_elements)]
        out = (rotated[0] if len(rotated) == 1 else torch.cat(rotated, axis)).reshape(part.shape)
        if self.span is not None:
            out = torch.cat([x.narrow(dim, 0, lo), out, x.narrow(dim, hi, n - hi)], dim)
        return out.contiguous()


@dataclasses.dataclass(frozen=True)
class Scale:
    """``x * g`` on the last dim, ``g`` the norm scale ``norm`` at version ``at``."""

    norm: str
    at: int = 0

    @property
    def reads(self) -> tuple[tuple[str, int], ...]:
        return ((self.norm, self.at),)

    def mixes(self, ndim: int) -> set[int]:
        return {ndim - 1}

    def apply(self, x, reads, run):
        return x * reads[self.norm]


@dataclasses.dataclass(frozen=True)
class ShiftBias:
    """``b + W @ beta``: the bias of ``weight`` taking a LayerNorm bias ``beta``."""

    weight: str
    beta: str
    weight_at: int = 0
    beta_at: int = 0

    @property
    def reads(self) -> tuple[tuple[str, int], ...]:
        return ((self.weight, self.weight_at), (self.beta, self.beta_at))

    def mixes(self, ndim: int) -> set[int]:
        return set(range(ndim))

    def apply(self, x, reads, run):
        return x + reads[self.weight] @ reads[self.beta]


@dataclasses.dataclass(frozen=True)
class Fill:
    """Every element set to ``value``."""

    value: float
    reads = ()

    def mixes(self, ndim: int) -> set[int]:
        return set()

    def apply(self, x, reads, run):
        return torch.full_like(x, self.value)


@dataclasses.dataclass(frozen=True)
class QDQ:
    """``qdq(x, fmt)`` along the last dim, or the values of ``rounding(x)`` (a QTensor, e.g. GPTQ's for this key).

    ``transposed``: a weight stored ``[in, out]`` (GPT-2's ``Conv1D``), quantized along dim -2, its ``in``: the
    format, the rounding and a kept QTensor see it as ``[out, in]`` (``x.mT``).
    ``shares``: the other keys of a fused group (q/k/v, gate/up), read at ``at`` (their values before
    their own QDQ): an NVFP4 global scale is measured over the group
    (:func:`rotfn.ops.quant.nvfp4_shared_global_scale`); ``global_scale`` pins it instead (a streaming
    fold measures the group first). The codes keep ``fmt``; their global scale is the group's.
    A run that keeps codes (``FoldProgram.run(codes=...)``) records the QTensor under ``key``.
    """

    fmt: Format
    rounding: Callable[[torch.Tensor], QTensor] | None = None
    key: str = ""
    transposed: bool = False
    shares: tuple[str, ...] = ()
    at: tuple[int, ...] = ()
    global_scale: float | None = None

    @property
    def reads(self) -> tuple[tuple[str, int], ...]:
        """The group's other keys, read for a global scale measured here (none with a rounding of its own)."""
        measured = self.global_scale is None and self.rounding is None
        return tuple(zip(self.shares, self.at, strict=True)) if measured else ()

    def mixes(self, ndim: int) -> set[int]:
        """The ``in`` dim, or every dim for a format with one scale for the whole tensor or a rounding of its own."""
        whole = (tensor_wide(self.fmt) and self.global_scale is None) or self.rounding is not None
        return set(range(ndim)) if whole else {ndim - 2 if self.transposed else ndim - 1}

    def pinned(self, global_scale: float) -> QDQ:
        """This op with the group's global scale fixed (it reads no other key then)."""
        return dataclasses.replace(self, global_scale=global_scale)

    def apply(self, x, reads, run):
        w = x.mT.contiguous() if self.transposed else x
        fmt = self.fmt
        if self.rounding is None and (self.shares or self.global_scale is not None):
            s_g = self.global_scale
            if s_g is None:
                s_g = nvfp4_shared_global_scale([w, *(reads[k] for k in self.shares)], self.fmt).item()
            fmt = nvfp4(s_g)  # the codes the group's global scale gives
        if self.rounding is None and run.codes is None:
            out = qdq(w, fmt)
        else:
            q = quantize(w, fmt) if self.rounding is None else self.rounding(w)
            if run.codes is not None:
                run.codes[self.key] = q if q.format == self.fmt else dataclasses.replace(q, format=self.fmt)
            out = dequantize(q, x.dtype)
        return out.mT.contiguous() if self.transposed else out


def shares_global_scale(fmt: Format) -> bool:
    """True for NVFP4 with a measured global scale: the one scale fused partitions share (fp8 ``"tensor"``
    partitions need not: engines requantize them to one scale themselves)."""
    return isinstance(fmt, NVFP4) and fmt.global_scale in NVFP4_GLOBAL_RULES


def tensor_wide(fmt: Format) -> bool:
    """True for a format with a scale measured over the whole tensor (NVFP4's global scale, fp8 ``"tensor"``)."""
    return shares_global_scale(fmt) or (isinstance(fmt, FP8) and fmt.granularity == "tensor")


Op = Rotate | Scale | ShiftBias | Fill | QDQ


def _bind(op: Op, versions: Mapping[str, int]) -> Op:
    """``op`` reading each key at the version it has at this point of the chain."""
    if isinstance(op, Scale):
        return dataclasses.replace(op, at=versions[op.norm])
    if isinstance(op, ShiftBias):
        return dataclasses.replace(op, weight_at=versions[op.weight], beta_at=versions[op.beta])
    if isinstance(op, QDQ) and op.shares:
        return dataclasses.replace(op, at=tuple(versions[k] for k in op.shares))
    return op


# ----- stages and keys ------------------------------------------------------------------------------
def _read_keys(ops: tuple[Op, ...]) -> tuple[str, ...]:
    """The keys ``ops`` read (at any version), each once, in first-read order."""
    return tuple(dict.fromkeys(k for op in ops for k, _ in op.reads))


@dataclasses.dataclass(frozen=True)
class Stage:
    """Consecutive operations of one key and the dim along which they may be cut (None: run on the whole key)."""

    ops: tuple[Op, ...]
    axis: int | None

    @property
    def reads(self) -> tuple[str, ...]:
        """Other keys the operations read (as given: the program reads them at version 0)."""
        return _read_keys(self.ops)

    def cuts(self, shape: tuple[int, ...], piece_elements: int) -> list[slice | None]:
        """``[None]`` (whole) or :func:`piece_cuts` along :attr:`axis` of a key of ``shape``."""
        if self.axis is None:
            return [None]
        size = shape[self.axis]
        return piece_cuts(size, torch.Size(shape).numel() // max(size, 1), piece_elements)

    def run(self, x: torch.Tensor, reads: Mapping[str, torch.Tensor], *, precision: torch.dtype = torch.float64,
            piece_elements: int = PIECE_ELEMENTS, out_dtype: torch.dtype | None = None,
            codes: dict | None = None) -> torch.Tensor:
        """This stage on ``x`` (the key, or a piece of it along :attr:`axis`), computed in ``precision``.

        Args:
            x: the key's tensor, its piece, or the previous stage's result.
            reads: the tensors :attr:`reads` names, whole, as given.
            precision: the work dtype.
            piece_elements: the piece size of the rotations' work inside ``x``.
            out_dtype: the result's dtype (None: ``x``'s).
            codes: a dict that receives ``{key: QTensor}`` of the stage's rounding (of ``x``'s rows, for a piece).

        Returns:
            The result, rounded once to ``out_dtype``.

        Example:
            >>> stage = Stage((Scale("g"),), 0)
            >>> stage.run(torch.ones(2, 3, dtype=torch.bfloat16), {"g": torch.tensor([1.0, 2.0, 3.0])})
            tensor([[1., 2., 3.],
                    [1., 2., 3.]], dtype=torch.bfloat16)
        """
        run = _Run(precision, piece_elements, {}, codes)
        return _apply(self.ops, x, lambda k, _: reads[k], run, each=False).to(out_dtype or x.dtype)


@dataclasses.dataclass(frozen=True)
class KeyProgram:
    """How one key is folded: its operations in chain order, and its stages (one, or several to cut each)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    ops: tuple[Op, ...]
    stages: tuple[Stage, ...]

    @property
    def reads(self) -> tuple[str, ...]:
        """Other keys the operations read."""
        return _read_keys(self.ops)

    @property
    def reads_given(self) -> bool:
        """True when every read is of a key as given (no key read after an operation changed it)."""
        return all(at == 0 for op in self.ops for _, at in op.reads)


def _free(ops, shape) -> list[int]:
    """Dims that no op of ``ops`` mixes, in the order they are preferred for cutting (keys of 2+ dims only)."""
    if len(shape) < 2:
        return []
    mixed = set().union(*(op.mixes(len(shape)) for op in ops))
    return [d for d in range(len(shape)) if d not in mixed]


def _stages(ops: tuple[Op, ...], shape: tuple[int, ...]) -> tuple[Stage, ...]:
    """One stage cut along a free dim; else runs of consecutive ops that each leave a dim free (e.g. o_proj rotated
    on both sides: the output-side run cut along ``in``, the input-side one along ``out``); else the whole key."""
    if not ops:
        return (Stage((), None),)
    fits = lambda axes: [a for a in axes if shape[a] >= 2 * MIN_PIECE]  # noqa: E731
    free = fits(_free(ops, shape))
    if free:
        return (Stage(ops, free[0]),)
    runs: list[list[Op]] = [[]]
    for op in ops:
        if runs[-1] and not _free([*runs[-1], op], shape):
            runs.append([])
        runs[-1].append(op)
    axes = [fits(_free(run, shape)) for run in runs]
    if len(runs) > 1 and all(axes):
        return tuple(Stage(tuple(run), a[0]) for run, a in zip(runs, axes, strict=True))
    return (Stage(ops, None),)


def key_program(key: str, shape: tuple[int, ...], dtype: torch.dtype, ops: tuple[Op, ...]) -> KeyProgram:
    """The :class:`KeyProgram` of ``ops`` for a key of this shape and dtype, its stages cut as :func:`compile_fold` cuts them."""
    return KeyProgram(key, tuple(shape), dtype, tuple(ops), _stages(tuple(ops), tuple(shape)))


def _apply(ops, x: torch.Tensor, value, run: _Run, *, each: bool) -> torch.Tensor:
    """``ops`` on ``x`` in the work dtype; ``value(key, at)`` gives what an op reads. ``each``: round to ``x``'s
    dtype after every op (as calling transforms one by one does), else keep the work dtype (the caller rounds once)."""
    dtype = x.dtype
    for op in ops:
        reads = {k: value(k, at).to(run.dtype) for k, at in op.reads}
        x = op.apply(x.to(run.dtype), reads, run)
        if each:
            x = x.to(dtype)
    return x.to(run.dtype) if not each else x


# ----- ties ---------------------------------------------------------------------------------------------
def kept_ties(tied, untied=(), keys=None) -> tuple[tuple[str, ...], ...]:
    """The tie groups that stay tied: each group's keys not in ``untied`` (and in ``keys``, if given), 2 or more.

    Example:
        >>> kept_ties([("emb", "head"), ("a", "b", "c")], untied=("head",))
        (('a', 'b', 'c'),)
    """
    groups = ([k for k in group if k not in untied and (keys is None or k in keys)] for group in tied)
    return tuple(tuple(g) for g in groups if len(g) > 1)


def tie(fn: str, tensors: Mapping[str, torch.Tensor], groups) -> dict[str, torch.Tensor]:
    """A new dict in which each group's keys hold the group's first tensor, after checking they hold one value.

    The one tie check of :func:`rotfn.fold` (:meth:`FoldProgram.run`) and :func:`rotfn.call`.

    Args:
        fn: the public function to name in an error.
        tensors: ``{name: Tensor}`` with every key of ``groups``.
        groups: tie groups that stay tied (:func:`kept_ties`).

    Raises:
        PlanError: a group whose tensors differ in dtype, shape or a value.

    Example:
        >>> w = torch.ones(2)
        >>> out = tie("fold", {"emb": w, "head": w.clone()}, [("emb", "head")])
        >>> out["head"] is out["emb"] is w
        True
    """
    out = dict(tensors)
    for group in groups:
        first = out[group[0]]
        for name in group[1:]:
            t = out[name]
            if t is not first and (t.dtype != first.dtype or t.shape != first.shape or not torch.equal(t, first)):
                raise PlanError(message(fn, "params", f"one value under the tied keys {list(group)}", "different tensors",
                                        "give tied keys one tensor, or untie them in the plan (Plan.untied)"))
            out[name] = first
    return out


# ----- the program -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FoldProgram:
    """A transform chain compiled for a set of tensors (see :func:`compile_fold`).

    Attributes:
        keys: ``{name: KeyProgram}`` for every tensor, in the order given.
        tied: groups of keys that stay one tensor (checked to get the same operations).
    """

    keys: Mapping[str, KeyProgram]
    tied: tuple[tuple[str, ...], ...] = ()

    def run(self, params: Mapping[str, torch.Tensor], *, precision: torch.dtype = torch.float64,
            piece_elements: int = PIECE_ELEMENTS, rotate: Mapping[object, RotateFn] | None = None, round_each: bool = False,
            fn: str = "fold", codes: dict | None = None) -> dict[str, torch.Tensor]:
        """The program on an in-memory source: a new dict, ``params`` and its tensors untouched.

        Args:
            params: ``{name: Tensor}`` with the names, shapes and dtypes the program was compiled for.
            precision: the work dtype (float64 or float32).
            piece_elements: the piece size of the rotations' work (:func:`piece_cuts`); any size gives the same bits.
            rotate: ``{rotation transform of the chain: rotate_fn}``: for the :func:`rotate_input` /
                :func:`rotate_output` values given as keys, ``rotate_fn(x, R, dim=d)`` computes ``x @ R`` along
                dim ``d`` in place of :func:`rotfn.rotate` (e.g. ``x @ (R.matrix() @ Q)`` with a differentiable ``Q``,
                as :func:`rotfn.learn.rotations` does); it gets the same cutting. The run is differentiable in
                the tensors ``rotate_fn`` closes over and in ``params``.
            round_each: round to each tensor's dtype after every operation (what calling a chain of
                transforms does) instead of once at the end (what :func:`rotfn.fold` does).
            fn: the public function to name in an error.
            codes: a dict that receives ``{key: QTensor}`` of every quantized key (its rounded values' codes).

        Returns:
            ``{name: Tensor}``: keys without operations keep the given tensor object; tied keys share one.

        Raises:
            PlanError: keys that stay tied hold different tensors.

        Example:
            >>> import torch, rotfn
            >>> t = rotfn.transforms.rotate_input(rotfn.hadamard(4), "w")
            >>> p = {"w": torch.eye(4, dtype=torch.float64)}
            >>> torch.equal(compile_fold(t, p).run(p)["w"], t(p)["w"])
            True
        """
        run = _Run(precision, piece_elements, rotate or {}, codes)
        params = tie(fn, params, self.tied)
        # changed versions that ops read, kept until their last reader (the owner's own fold continues from the
        # latest one, so a fused group's pre-rounding values are computed once and not held to the end)
        left: collections.Counter = collections.Counter()
        latest: dict[str, int] = {}
        for kp in self.keys.values():
            for op in kp.ops:
                for k, at in op.reads:
                    if at > 0:
                        left[k, at] += 1
                        latest[k] = max(latest.get(k, 0), at)
        for k, at in latest.items():
            left[k, at] += 1
        memo: dict[tuple[str, int], torch.Tensor] = {}

        def compute(key: str, at: int) -> torch.Tensor:
            start = next((a for a in range(at - 1, 0, -1) if (key, a) in memo), 0)
            x = params[key] if start == 0 else memo[key, start]
            return _apply(self.keys[key].ops[start:at], x, value, run, each=round_each)

        def value(key: str, at: int) -> torch.Tensor:
            if at == 0:
                return params[key]
            t = memo[key, at] if (key, at) in memo else compute(key, at)
            left[key, at] -= 1
            if left[key, at] > 0:
                memo[key, at] = t
            else:
                memo.pop((key, at), None)
            return t

        shared = {name: group[0] for group in self.tied for name in group[1:]}
        out = dict(params)
        for key, kp in self.keys.items():
            if kp.ops and key not in shared:
                a = latest.get(key, 0)
                done = _apply(kp.ops[a:], value(key, a), value, run, each=round_each) if a else compute(key, len(kp.ops))
                out[key] = done.to(kp.dtype)
        for name, first in shared.items():
            out[name] = out[first]
        return out

    def values(self, read: Callable[[str], torch.Tensor], keys, *, precision: torch.dtype = torch.float64,
               rotate: Mapping[object, RotateFn] | None = None) -> dict[str, torch.Tensor]:
        """The folded values of ``keys`` only, reading each key they need once through ``read``: a fold on use.

        Each value has the bits :meth:`run` gives it (the same operations in the same work dtype, rounded once);
        keys that others read (norm scales, a fused group's partners) are read and folded as far as needed.

        Args:
            read: ``read(name)``: a key's tensor as given.
            keys: the keys to fold.
            precision: the work dtype.
            rotate: rotation stand-ins, as for :meth:`run`.

        Returns:
            ``{key: Tensor}`` for ``keys``; a key without operations is ``read(key)`` itself.

        Example:
            >>> import torch, rotfn
            >>> t = rotfn.chain(rotfn.transforms.fuse_norm("n", "w"), rotfn.transforms.rotate_input(rotfn.hadamard(4), "w"))
            >>> p = {"n": torch.arange(1.0, 5.0), "w": torch.eye(4)}
            >>> prog = compile_fold(t, p)
            >>> torch.equal(prog.values(p.__getitem__, ["w"])["w"], prog.run(p)["w"])
            True
        """
        run = _Run(precision, PIECE_ELEMENTS, rotate or {})
        given: dict[str, torch.Tensor] = {}
        memo: dict[tuple[str, int], torch.Tensor] = {}

        def source(key: str) -> torch.Tensor:
            if key not in given:
                given[key] = read(key)
            return given[key]

        def value(key: str, at: int) -> torch.Tensor:
            if at == 0:
                return source(key)
            if (key, at) not in memo:
                memo[key, at] = _apply(self.keys[key].ops[:at], source(key), value, run, each=False)
            return memo[key, at]

        out = {}
        try:
            for key in keys:
                kp = self.keys[key]
                out[key] = _apply(kp.ops, source(key), value, run, each=False).to(kp.dtype) if kp.ops else source(key)
        finally:  # value() refers to itself: the closures are a cycle, which must not keep what was read alive
            given.clear()
            memo.clear()
        return out

    def rotations(self, keys) -> set:
        """The rotation transforms (``rotate=`` keys of :meth:`run`) whose operations folding ``keys`` runs,
        through the keys they read.

        Example:
            >>> import torch, rotfn
            >>> t = rotfn.transforms.rotate_input(rotfn.hadamard(4), "w")
            >>> prog = compile_fold(t, {"w": torch.eye(4), "b": torch.ones(4)})
            >>> prog.rotations(["w"]) == {t}, prog.rotations(["b"])
            (True, set())
        """
        seen, todo, found = set(), list(keys), set()
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            found |= {op.origin for op in self.keys[key].ops if isinstance(op, Rotate) and op.origin is not None}
            todo += self.keys[key].reads
        return found


def compile_fold(transform, tensors: Mapping[str, torch.Tensor], *, tied=(), untied=(), fn: str = "fold") -> FoldProgram:
    """Compile a transform (e.g. ``plan.transform()``) for tensors of these names, shapes and dtypes.

    Selection (``where=``) and every shape and dtype check run here, once; the tensors' values are
    not read (meta tensors will do).

    Args:
        transform: a :class:`rotfn.transforms.Transform` (a primitive or a :func:`rotfn.chain`).
        tensors: ``{name: Tensor}``, values unused.
        tied: groups of keys that are one tensor (a plan's ``tied``); those not in ``untied`` stay one.
        untied: keys folded on their own (a plan's ``untied``).
        fn: the public function to name in an error.

    Returns:
        A :class:`FoldProgram`.

    Raises:
        SelectionError, ShapeError, DTypeError, PlanError: as the transforms raise them; PlanError also
            when tied keys would get different operations.

    Example:
        >>> import torch, rotfn
        >>> from rotfn import transforms as T
        >>> t = rotfn.chain(T.fuse_norm("n", "w"), T.rotate_output(rotfn.hadamard(64), "w"))
        >>> prog = compile_fold(t, {"n": torch.ones(64), "w": torch.empty(64, 64, device="meta")})
        >>> kp = prog.keys["w"]
        >>> [type(op).__name__ for op in kp.ops], [st.axis for st in kp.stages], kp.reads
        (['Scale', 'Rotate'], [0, 1], ('n',))
    """
    ops: dict[str, list[Op]] = {k: [] for k in tensors}
    for phase in transform._phases(tensors):
        versions = {k: len(v) for k, v in ops.items()}  # every op of a phase reads the phase's input
        for key, op in phase:
            ops[key].append(_bind(op, versions))
    keys = {k: key_program(k, tuple(t.shape), t.dtype, tuple(ops[k])) for k, t in tensors.items()}
    groups = kept_ties(tied, untied, keys)
    for group in groups:
        if len({(keys[k].ops, keys[k].shape, keys[k].dtype) for k in group}) > 1:
            raise PlanError(message(fn, "plan", f"a plan that changes the tied keys {list(group)} identically or "
                                    "unties them", "different changes", "untie them in the plan (Plan.untied)"))
    return FoldProgram(keys, groups)


@dataclasses.dataclass(frozen=True, eq=False)
class Rounded:
    """A rounding already made: ``rounding(W)`` of a whole key, returned as it is (:func:`pin_roundings`)."""

    q: QTensor

    def __call__(self, w: torch.Tensor) -> QTensor:
        return self.q


def pin_roundings(program: FoldProgram, read: Callable[[str], torch.Tensor], keys: tuple[str, ...], *,
                  precision: torch.dtype = torch.float64) -> FoldProgram:
    """``program`` with the rounding of each of ``keys`` made once, on the key folded whole up to it, and pinned
    (:class:`Rounded`): a source that holds the key in parts (fused experts held per expert) can then fold each
    part with its rows of the QTensor, after the rounding (a calibration's) checked the whole.

    Args:
        program: a compiled fold program.
        read: ``read(name)``: a key's tensor as given, whole.
        keys: keys whose last op is a QDQ with a rounding (others are left as they are).
        precision: the work dtype of the run that follows.
    """
    run = _Run(precision, PIECE_ELEMENTS, {})
    out = dict(program.keys)
    for k in keys:
        kp = program.keys[k]
        op = kp.ops[-1] if kp.ops else None
        if not (isinstance(op, QDQ) and op.rounding is not None) or op.transposed:
            continue
        x = _apply(kp.ops[:-1], read(k), lambda name, _: read(name), run, each=False)
        out[k] = key_program(k, kp.shape, kp.dtype, (*kp.ops[:-1], dataclasses.replace(op, rounding=Rounded(op.rounding(x)))))
        del x
    return FoldProgram(out, program.tied)


def pin_shared_scales(program: FoldProgram, read: Callable[[str], torch.Tensor], *,
                      precision: torch.dtype = torch.float64, alone: tuple[str, ...] = ()) -> FoldProgram:
    """``program`` with every fused group's NVFP4 global scale measured and pinned (:meth:`QDQ.pinned`).

    A source read key by key (:func:`rotfn.fold_checkpoint`) cannot give a QDQ the other partitions'
    rotated values; this measures them first, each member of a group folded up to its QDQ (whole,
    as :meth:`FoldProgram.run` does, so the scale has the same bits), and the pinned program reads
    no changed tensor. Keys whose other operations read changed tensors are left as they are.

    Args:
        program: a compiled fold program.
        read: ``read(name)``: a key's tensor as given.
        precision: the work dtype of the run that follows.
        alone: keys whose measured NVFP4 global scale is pinned too, each on its own (a tensor the
            source holds in parts, e.g. fused experts held per expert).

    Returns:
        A :class:`FoldProgram` (``program`` itself when there is nothing to pin).

    Example:
        >>> import torch, rotfn
        >>> t = rotfn.transforms.qdq_weights(rotfn.nvfp4("pow2"), "*", shared=(("a", "b"),))
        >>> p = {"a": torch.ones(2, 16), "b": torch.full((2, 16), 4.0)}
        >>> pinned = pin_shared_scales(compile_fold(t, p), p.__getitem__)
        >>> [prog.ops[-1].global_scale for prog in pinned.keys.values()] == [2.0**-9] * 2
        True
    """
    pin = {k: kp for k, kp in program.keys.items() if kp.ops and isinstance(kp.ops[-1], QDQ)
           and (kp.ops[-1].shares or (k in alone and shares_global_scale(kp.ops[-1].fmt)))
           and kp.ops[-1].rounding is None and all(at == 0 for op in kp.ops[:-1] for _, at in op.reads)}
    if not pin:
        return program
    run = _Run(precision, PIECE_ELEMENTS, {})
    amax = {k: finite_amax(_apply(kp.ops[:-1], read(k), lambda name, _: read(name), run, each=False))
            for k, kp in pin.items()}
    keys = dict(program.keys)
    for k, kp in pin.items():
        op = kp.ops[-1]
        if all(o in amax for o in op.shares):
            s_g = nvfp4_shared_global_scale([amax[o] for o in (k, *op.shares)], op.fmt).item()
            keys[k] = key_program(k, kp.shape, kp.dtype, (*kp.ops[:-1], op.pinned(s_g)))
    return FoldProgram(keys, program.tied)
