"""One key of a fold at a time: the part of a plan that writes a key, what it reads, and pieces it can be cut into.

:func:`rotfn.fold` runs a plan's whole weight side over the whole params dict. For
one output key only a few entries matter: the norm fusions whose readers include it
(``W' = W diag(g)``, which also reads the scale ``g``), its own rotations and its qdq,
in plan order. :func:`key_fold` cuts those out as a small plan, and :func:`fold_piece`
runs it on the key or a piece of it (:func:`piece_cuts`) with :func:`rotfn.plans._fold.fold_tensors` (the same code :func:`rotfn.fold`
runs), so each tensor comes out with the bits ``rotfn.fold`` gives it:

* float64 math on exactly the same operands, in the same order, cast back once;
* a norm's own result (``g' = 1``, a LayerNorm bias ``beta' = 0``) does not depend on
  its readers' values, so one reader is given a zero stand-in of one row;
* a large tensor is cut into pieces along a dim that its entries treat row by row:
  dim 0 when no entry mixes it (input-side rotations, norm scales, row-local qdq),
  dim 1 of a 2-D weight whose only entries are output-side rotations. Every piece keeps
  at least :data:`MIN_PIECE` rows, so each matrix product keeps the kernel it has on the
  whole tensor (a one-row product can take another path, with other rounding).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping

import torch

from rotfn.plans._fold import fold_tensors
from rotfn.plans._plan import NormFusion, Plan
from rotfn.specs.formats import FP8, NVFP4, Format

__all__ = ["MIN_PIECE", "KeyFold", "fold_piece", "key_fold", "piece_cuts", "stages"]

#: Fewest rows of a piece (see the module docstring).
MIN_PIECE = 16


@dataclasses.dataclass(frozen=True)
class KeyFold:
    """How to fold one key by itself.

    Attributes:
        key: the output key.
        plan: the entries of the full plan that write ``key`` (norm fusions restricted to one
            reader, its rotations, its qdq), or None when the plan leaves the key unchanged.
        reads: other keys whose values the entries read (norm scales, a LayerNorm bias, ...).
        stand_ins: ``(key, shape)`` of readers that only need to exist (zeros of that shape).
        axis: the dim along which the key may be folded in pieces, or None.
    """

    key: str
    plan: Plan | None
    reads: tuple[str, ...] = ()
    stand_ins: tuple[tuple[str, tuple[int, ...]], ...] = ()
    axis: int | None = None


def _row_local(fmt: Format | None) -> bool:
    """True when the format's scales depend on one row only (not a whole-tensor amax)."""
    if isinstance(fmt, NVFP4):
        return fmt.global_scale != "tensor"
    if isinstance(fmt, FP8):
        return fmt.granularity != "tensor"
    return True


def _one_row(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) * (len(shape) - 1) + (shape[-1],) if len(shape) > 1 else (1,)


def _bias_of(weight_key: str) -> str:
    return weight_key.removesuffix("weight") + "bias"


def key_fold(plan: Plan, key: str, shapes: Mapping[str, tuple[int, ...]]) -> KeyFold:
    """The part of ``plan`` that writes ``key``, what it reads, and the dim it may be cut along.

    Args:
        plan: a :class:`rotfn.Plan`.
        key: a parameter key of the plan's model.
        shapes: ``{key: shape}`` of the model's parameters.

    Returns:
        A :class:`KeyFold`; :func:`fold_piece` of its pieces, put together, equals ``rotfn.fold(params, plan)[key]``.

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 40), torch.nn.Linear(40, 2))
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(4), where="0")
        >>> shapes = {k: tuple(t.shape) for k, t in rotfn.params(m).items()}
        >>> kf = key_fold(plan, "0.weight", shapes)
        >>> [w.key for w in kf.plan.weight], kf.axis, key_fold(plan, "1.weight", shapes).plan
        (['0.weight'], 0, None)
    """
    norms: list[NormFusion] = []
    reads: list[str] = []
    stand_ins: dict[str, tuple[int, ...]] = {}
    for n in plan.norms:
        biases = {_bias_of(w): w for w in n.into} if n.bias is not None else {}
        if key in n.into or key in biases:
            reader = biases.get(key, key)
        elif key in (n.norm, n.bias):
            reader = n.into[0]
            stand_ins[reader] = _one_row(shapes[reader])
            if n.bias is not None:
                stand_ins[_bias_of(reader)] = _one_row(shapes[_bias_of(reader)])
        else:
            continue
        norms.append(NormFusion(n.norm, (reader,), n.bias))
        reads += [n.norm] + ([n.bias, _bias_of(reader)] if n.bias is not None else []) + [reader]
    weight = tuple(w for w in plan.weight if w.key == key)
    quantized = (key,) if key in plan.quantized else ()
    if not (norms or weight or quantized):
        return KeyFold(key, None)
    sub = dataclasses.replace(plan, weight=weight, norms=tuple(norms), quantized=quantized, online=(), tied=(),
                              untied=(), notes=())
    reads = [k for k in dict.fromkeys(reads) if k != key and k not in stand_ins]
    sides = {w.side for w in weight}
    whole = any(n.bias is not None for n in norms) or stand_ins or (quantized and not _row_local(plan.weights))
    ndim = len(shapes[key])
    axis = None
    if not whole and (ndim >= 3 or (ndim == 2 and "output" not in sides)):
        axis = 0
    elif ndim == 2 and sides == {"output"} and not norms and not quantized:
        axis = 1
    if axis is not None and shapes[key][axis] < 2 * MIN_PIECE:
        axis = None
    return KeyFold(key, sub, tuple(reads), tuple(stand_ins.items()), axis)


def stages(kf: KeyFold, shape: tuple[int, ...]) -> tuple[KeyFold, ...]:
    """A 2-D weight rotated on both sides (o_proj, v_proj), which :func:`key_fold` leaves whole, as stages
    that can each be cut; ``()`` when the key cannot be staged.

    Each run of consecutive entries on one side becomes a stage, in plan order: input-side
    entries mix dim 1 only, so their stage is cut along dim 0; output-side ones along dim 1.
    Norm scales (``W diag(g)``, fused before any rotation) ride with a first stage cut along
    dim 0, which then reads them; a LayerNorm bias or a qdq keeps the key whole. Run on the
    work dtype throughout and cast once after the last stage, the stages apply the same
    operations to the same rows as folding the key whole, so the bits are those of
    :func:`rotfn.fold`; and pieces of one key can be folded by several threads.

    Example:
        >>> import dataclasses, torch, rotfn
        >>> m = torch.nn.Linear(64, 64)
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(64, seed=0))
        >>> out_side = rotfn.plans.WeightRotation("weight", rotfn.hadamard(64, seed=1), "output")
        >>> plan = dataclasses.replace(plan, weight=plan.weight + (out_side,))
        >>> kf = key_fold(plan, "weight", {"weight": (64, 64), "bias": (64,)})
        >>> kf.axis, [st.axis for st in stages(kf, (64, 64))]
        (None, [0, 1])
    """
    if (kf.plan is None or kf.axis is not None or len(shape) != 2 or kf.plan.quantized or kf.stand_ins
            or any(n.bias is not None for n in kf.plan.norms)):
        return ()
    runs = [tuple(run) for _, run in itertools.groupby(kf.plan.weight, key=lambda w: w.side)]
    if len(runs) < 2:
        return ()
    axes = [0 if run[0].side == "input" else 1 for run in runs]
    if (kf.plan.norms and axes[0] != 0) or any(shape[axis] < 2 * MIN_PIECE for axis in axes):
        return ()
    first = KeyFold(kf.key, dataclasses.replace(kf.plan, weight=runs[0]), kf.reads, axis=axes[0])
    return (first, *(KeyFold(kf.key, dataclasses.replace(kf.plan, weight=run, norms=()), axis=axis)
                     for run, axis in zip(runs[1:], axes[1:])))


def piece_cuts(kf: KeyFold, shape: tuple[int, ...], piece_elements: int) -> list[slice | None]:
    """How to cut a key for folding: ``[None]`` (whole) or even slices along ``kf.axis`` of about ``piece_elements``.

    Every slice keeps at least :data:`MIN_PIECE` entries of the axis.

    Example:
        >>> piece_cuts(KeyFold("w", None, axis=0), (40, 64), 64 * 16)
        [slice(0, 20, None), slice(20, 40, None)]
    """
    if kf.axis is None:
        return [None]
    size = shape[kf.axis]
    row = max(1, torch.Size(shape).numel() // max(size, 1))
    count = max(1, min(size // MIN_PIECE, -(-size * row // max(piece_elements, 1))))
    bounds = [size * i // count for i in range(count + 1)]  # even pieces, none shorter than MIN_PIECE
    return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def fold_piece(kf: KeyFold, piece: torch.Tensor, reads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Fold the key ``kf.key``, or one of its pieces from :func:`piece_cuts`, with the part of the plan that writes it.

    Args:
        kf: from :func:`key_fold`, with a plan (a key the plan leaves alone is copied, not folded).
        piece: the key's unfolded tensor, or its part along ``kf.axis``.
        reads: the tensors ``kf.reads`` names, whole.

    Returns:
        The folded tensor (or part), in ``piece``'s dtype; bit for bit the matching part of
        ``rotfn.fold(params, plan)[kf.key]``.

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Linear(64, 40)
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(64, seed=0))
        >>> p = rotfn.params(m)
        >>> kf = key_fold(plan, "weight", {k: tuple(t.shape) for k, t in p.items()})
        >>> cuts = piece_cuts(kf, (40, 64), 64 * 16)
        >>> folded = torch.cat([fold_piece(kf, p["weight"][cut], {}) for cut in cuts])
        >>> torch.equal(folded, rotfn.fold(p, plan)["weight"])
        True
    """
    base = {k: reads[k] for k in kf.reads}
    base.update({k: torch.zeros(s, dtype=piece.dtype) for k, s in kf.stand_ins})  # only their shapes matter
    with torch.no_grad():  # (a checkpoint's tensors take no gradient: nothing to record)
        return fold_tensors({**base, kf.key: piece}, kf.plan)[kf.key]
