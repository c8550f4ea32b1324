"""fold: bake a plan's weight side into a params dict, once, and remember that it was done."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rotfn._table import html_table
from rotfn.errors import ArgumentError, FoldError, PlanError, message
from rotfn.plans._checks import check_signature, require_plan
from rotfn.plans._plan import Plan, signature
from rotfn.specs import QTensor
from rotfn.transforms import FoldProgram, check_params, compile_fold, precision_dtype

__all__ = ["fold", "FoldedParams", "folded_with", "check_fold_state", "fold_program", "codes_of", "calibrated_rounding"]

_MARK = "_rotfn_folded_with"  # attribute fold sets on every tensor it creates
_CODES = "_rotfn_codes"  # and, on each weight it rounds, the QTensor its values decode from


class FoldedParams(dict):
    """A params dict made by :func:`rotfn.fold`; ``.plan`` is the plan that was folded in.

    Every tensor fold wrote also carries that plan, so a plain ``dict(folded)``
    is still recognised as folded (folding it again is an error, not a second rotation).
    Params known to be folded by other means (e.g. loaded back from a file or a
    model's state) are declared so by wrapping them: ``FoldedParams(params, plan)``.

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(4))
        >>> m.load_state_dict(rotfn.fold(rotfn.params(m), plan), strict=False)  # bake the weights into the model
        <All keys matched successfully>
        >>> out = rotfn.call(m, FoldedParams(rotfn.params(m), plan), plan, torch.ones(1, 4))
    """

    def __init__(self, data: Mapping, plan: Plan):
        super().__init__(data)
        self.plan = plan

    def __repr__(self) -> str:
        return f"FoldedParams({len(self)} tensors, plan={self.plan!r})"

    def _repr_html_(self) -> str:
        """A summary for Jupyter: tensors, elements and bytes per dtype (weights rounded by the fold apart)."""
        groups: dict[tuple[str, bool], list[int]] = {}
        for t in self.values():
            row = groups.setdefault((str(t.dtype).removeprefix("torch."), codes_of(t) is not None), [0, 0, 0])
            row[0] += 1
            row[1] += t.numel()
            row[2] += t.numel() * t.element_size()
        rows = [[dtype, "yes" if rounded else "no", *counts] for (dtype, rounded), counts in sorted(groups.items())]
        return html_table(["dtype", "rounded by fold", "tensors", "elements", "bytes"], rows,
                          caption=f"FoldedParams: {len(self)} tensors folded with {self.plan!r}")

    def __reduce__(self):
        return (FoldedParams, (dict(self), self.plan))


def codes_of(t: torch.Tensor) -> QTensor | None:
    """The QTensor :func:`fold` rounded weight ``t`` to (its values are ``dequantize`` of it), or None.

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(32, 4))
        >>> plan = rotfn.plans.per_linear(m, rotation=None, weights=rotfn.mxfp4())
        >>> w = rotfn.fold(rotfn.params(m), plan)["0.weight"]
        >>> torch.equal(rotfn.dequantize(codes_of(w), w.dtype), w)
        True
    """
    return getattr(t, _CODES, None)


def folded_with(params: Mapping) -> Plan | None:
    """The plan ``params`` were folded with, or None for unfolded params.

    Raises:
        FoldError: the tensors come from folds with different plans.

    Example:
        >>> import torch
        >>> folded_with({"w": torch.ones(1)}) is None
        True
    """
    if isinstance(params, FoldedParams):
        return params.plan
    found: list[Plan] = []
    for t in params.values():
        p = getattr(t, _MARK, None)
        if p is not None and not any(p is q or p == q for q in found):
            found.append(p)
    if len(found) > 1:
        raise FoldError(message("fold", "params", "tensors folded with one plan", f"tensors from {len(found)} plans",
                                "fold the original rotfn.params(model) once"))
    return found[0] if found else None


def check_fold_state(fn: str, params: Mapping, plan: Plan | None) -> None:
    """Raise FoldError unless ``params`` are folded exactly as ``plan`` needs (for :func:`rotfn.call`)."""
    prior = folded_with(params)
    if plan is None:
        if prior is not None:
            raise FoldError(message(fn, "plan", "the plan these params were folded with", "None",
                                    f"pass plan=params.plan ({prior!r})"))
        return
    if prior is None:
        if plan.needs_fold:
            raise FoldError(message(fn, "params", "params folded with this plan", "unfolded params",
                                    "params = rotfn.fold(params, plan) first"))
    elif prior != plan:
        raise FoldError(message(fn, "params", f"params folded with {plan!r}", f"params folded with {prior!r}",
                                "fold the original params with the plan you call with"))


def fold_program(fn: str, plan: Plan, tensors: Mapping[str, torch.Tensor], rounding=None, rounded=None) -> FoldProgram:
    """The plan's weight side compiled for ``tensors`` (names, shapes, dtypes), with the plan's ties;
    ``rounding`` / ``rounded`` as for :meth:`Plan.transform`.

    The one place a plan becomes a fold program, for :func:`fold`, :func:`rotfn.fold_checkpoint` and
    :func:`rotfn.learn.rotations`: tied keys the plan keeps tied must change identically (else PlanError
    naming ``fn``) and come out as one tensor; untied ones are folded on their own.
    """
    return compile_fold(plan.transform(rounding, rounded=rounded), tensors, tied=plan.tied, untied=plan.untied, fn=fn)


def fold(params: Mapping[str, torch.Tensor], plan: Plan, *, precision: str = "float64", weights_by=None) -> FoldedParams:
    """Apply a plan's weight side to a params dict: norm fusions, rotations, weight qdq.

    ``W' = qdq((W diag(g)) @ R_in)`` with output-side ``R_out.T @ W'`` and
    ``b' = b @ R_out`` per the plan's entries (see :meth:`Plan.transform`), every
    touched tensor computed in float64 and cast back to its dtype once: the plan's
    fold program (:func:`rotfn.transforms.compile_fold`, the engine
    :func:`rotfn.fold_checkpoint` runs too) over the dict. Tied keys
    keep one shared tensor unless the plan unties them. The input dict and its
    tensors are not modified.

    Args:
        params: ``{name: Tensor}`` from :func:`rotfn.params` (all parameters and buffers).
        plan: a :class:`rotfn.plans.Plan` built for the same model.
        precision: ``"float64"`` (default): every touched tensor is computed in float64 and
            rounded once. ``"float32"``: in float32, faster on a CPU. For bfloat16 params the
            result then differs from the float64 fold in rare elements, by one unit in the last
            place, or, for elements far below the tensor's scale, by float32's rounding error
            (~1e-7 of its largest element); where weights are quantized such an element may land
            one quantization step away. Meant for half-precision checkpoints; float32 params lose
            accuracy with it. Measurements of both: ``docs/performance.md``.
        weights_by: None (the plan's weights are rounded to nearest, ``qdq``) or a
            :class:`rotfn.calibration.Calibration` of this plan: its rounding (GPTQ) in place of
            round to nearest, ``folded = rotfn.fold(params, plan, weights_by=rotfn.calibrate(...))``.

    Returns:
        A :class:`FoldedParams` (a dict) whose ``.plan`` is ``plan``. Each weight the plan rounds
        also carries the QTensor its values decode from (:func:`codes_of`: codes and scales, about
        a quarter of a bf16 weight's size for 4-bit formats), what :func:`rotfn.export_compressed`
        writes.

    Raises:
        DTypeError: params not a dict of tensors.
        ArgumentError: an unknown ``precision``.
        PlanError: plan not a Plan, built for another model, or changing tied keys differently;
            ``weights_by`` calibrated for another plan.
        FoldError: params already folded.
        ShapeError: an entry does not fit a tensor's shape.
        SelectionError: an entry names a key params do not have.

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(4))
        >>> folded = rotfn.fold(rotfn.params(m), plan)
        >>> folded.plan is plan
        True
    """
    fn = "fold"
    check_params(fn, params)
    dtype = precision_dtype(fn, precision)
    require_plan(fn, plan)
    prior = folded_with(params)
    if prior is not None:
        raise FoldError(message(fn, "params", "params not folded yet", f"params already folded with {prior!r}",
                                "fold the original rotfn.params(model) once; folding again would rotate twice"))
    sig = signature((k, tuple(t.shape)) for k, t in params.items())
    check_signature(fn, plan, sig, f"a plan for params with signature {sig}",
                    "build the plan from the model these params come from, with params = rotfn.params(model)")
    program = fold_program(fn, plan, params, *calibrated_rounding(fn, "weights_by", weights_by, plan))
    codes: dict = {}
    out = program.run(params, precision=dtype, fn=fn, codes=codes)
    for k in plan.touched():
        if k not in params:
            continue
        t = out[k]
        if t is params[k]:  # never hand back (and mark) a caller's tensor
            t = t.clone()
        setattr(t, _MARK, plan)
        if k in codes:
            setattr(t, _CODES, codes[k])
        out[k] = t
    for group in program.tied:  # marking may have cloned: tied keys share the one tensor again
        for name in group[1:]:
            out[name] = out[group[0]]
    return FoldedParams(out, plan)


def calibrated_rounding(fn: str, arg: str, calibration, plan: Plan) -> tuple:
    """``(rounding, rounded)`` for :func:`fold_program` from a calibration of ``plan`` (None: ``(None, None)``):
    its ``round``, for the keys it rounded against statistics (those it rounded to nearest, ``rtn``, keep the
    fold's own rounding to nearest, the same values, so that a streaming fold may fold them per expert)."""
    if calibration is None:
        return None, None
    if not callable(getattr(calibration, "round", None)) or not isinstance(getattr(calibration, "plan", None), Plan):
        raise ArgumentError(message(fn, arg, "None or a rotfn.calibrate(...) result", type(calibration).__name__,
                                    f"{arg}=rotfn.calibrate(model, params, plan, batches)"))
    if calibration.plan != plan:
        raise PlanError(message(fn, arg, f"a calibration of this plan ({plan!r})",
                                f"a calibration of {calibration.plan!r}", "calibrate with the plan you fold with"))
    return calibration.round, tuple(k for k in calibration.weights if k not in set(calibration.rtn))
