"""The loss rotfn.learn minimizes and reports: the user's, or a default picked from the model's output.

Built in, per batch (``y`` the quantized model's output, ``y0`` the float model's):

* ``"next_token"``, the default for a causal LM (the output has ``logits [B, T, V]`` and
  the batch has ``input_ids [B, T]``): next-token cross-entropy
  ``mean_t -log softmax(logits[:, t])[labels[:, t + 1]]`` with ``labels = batch["labels"]``
  if given, else ``input_ids``; positions with label -100 or ``attention_mask == 0`` are left out;
* ``"fidelity"``, the default otherwise (encoders, embeddings, plain modules): the relative
  squared error ``sum (y - y0)^2 / sum y0^2`` over the output (``last_hidden_state``,
  ``logits``, or the output tensor), real tokens only when the batch has an ``attention_mask``;
  :func:`fidelity` compares a view of the outputs instead (e.g. sentence embeddings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F  # noqa: N812

from rotfn.errors import ArgumentError, message
from rotfn.learn._data import Batch, check_batches, to_device
from rotfn.model import Site, SiteFn, call_as
from rotfn.plans import Plan, describe, fold
from rotfn.transforms import check_params

__all__ = ["Objective", "Fidelity", "fidelity", "run", "evaluate", "LossFn", "LossArg", "ViewFn"]

#: A custom loss: ``loss(outputs, batch) -> scalar tensor`` (outputs as the model returns them).
LossFn = Callable[[object, Batch], torch.Tensor]
#: A view of the outputs that :func:`fidelity` compares: ``view(outputs, batch) -> tensor``.
ViewFn = Callable[[object, Batch], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """The relative squared error of a view of the outputs against the float model's (see :func:`fidelity`)."""

    view: ViewFn | None = None


def fidelity(view: ViewFn | None = None) -> Fidelity:
    """The loss ``sum (v - v0)^2 / sum v0^2`` of ``v = view(outputs, batch)`` against the float model's ``v0``.

    With ``view=None`` ``v`` is the output tensor (``last_hidden_state``, ``logits`` or the
    output itself), over real tokens when the batch has an ``attention_mask``. A view picks what
    should stay faithful, e.g. unit sentence embeddings, for which the loss is ``2 - 2 cos``.

    Args:
        view: None, or ``view(outputs, batch) -> tensor`` (differentiable in outputs).

    Returns:
        A :class:`Fidelity` to pass as ``loss=`` to :func:`rotfn.learn.rotations` or :func:`rotfn.learn.evaluate`.

    Raises:
        ArgumentError: view neither None nor callable.

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(32, 8))
        >>> plan = rotfn.plans.per_linear(m, rotation=None, weights=rotfn.intq(2))
        >>> unit = rotfn.learn.fidelity(lambda out, batch: torch.nn.functional.normalize(out, dim=-1))
        >>> 0 < rotfn.learn.evaluate(m, rotfn.params(m), plan, [torch.randn(4, 32)], loss=unit) < 4
        True
    """
    if view is not None and not callable(view):
        raise ArgumentError(message("learn.fidelity", "view", "None or a function view(outputs, batch) -> tensor",
                                    type(view).__name__))
    return Fidelity(view)


#: What ``loss=`` takes: None (picked by the model's output), ``"next_token"``, ``"fidelity"``,
#: a :func:`fidelity` value or a function ``loss(outputs, batch)``.
LossArg = LossFn | Fidelity | str | None
_NAMES = ("next_token", "fidelity")


def run(fn: str, model, params, plan: Plan | None, batch: Batch, sites: Mapping[Site, SiteFn] | None = None,
        around=None):
    """``rotfn.call`` on one batch, with more ``sites`` if given (see :func:`rotfn.model.call_with`) and modules'
    forwards replaced as ``around`` says (fold on use); errors name ``fn``.

    A tensor batch is the positional input, a dict the keyword inputs (but ``labels``).
    """
    if isinstance(batch, torch.Tensor):
        return call_as(fn, model, params, plan, sites, (batch,), around=around)
    return call_as(fn, model, params, plan, sites, kwargs={k: v for k, v in batch.items() if k != "labels"},
                   around=around)


def _output(out) -> torch.Tensor:
    for attr in ("last_hidden_state", "logits"):
        if isinstance(getattr(out, attr, None), torch.Tensor):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def _ids(batch: Batch) -> torch.Tensor | None:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    return ids if isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point else None


def _mask(batch: Batch, y: torch.Tensor) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask if mask is not None and y.ndim >= 2 and tuple(mask.shape) == tuple(y.shape[:2]) else None


def _is_causal(out, batch: Batch) -> bool:
    logits, ids = getattr(out, "logits", None), _ids(batch)
    return isinstance(logits, torch.Tensor) and logits.ndim == 3 and ids is not None and ids.shape == logits.shape[:2]


def _next_token(out, batch: Batch) -> torch.Tensor:
    logits = out.logits
    labels = batch.get("labels", batch["input_ids"]) if isinstance(batch, Mapping) else batch
    mask = _mask(batch, logits)
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def _relative_error(v: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    err, ref = (v.float() - reference.float()).square(), reference.float().square()
    if mask is not None:
        weight = mask.to(err.dtype).reshape(*mask.shape, *([1] * (v.ndim - 2)))
        err, ref = err * weight, ref * weight
    return err.sum() / ref.sum().clamp(min=torch.finfo(torch.float32).tiny)


class Objective:
    """The loss of batch ``i`` of a fixed list (see the module docstring for the built-in ones).

    Built once per run: for a fidelity loss it runs the float model on every batch (no
    gradient) and keeps its views as the references; ``floats(batch)`` runs it in place of
    ``run(fn, model, params, None, batch)`` when given.
    """

    def __init__(self, fn: str, model, params, batches: list[Batch], loss: LossArg,
                 floats: Callable[[Batch], object] | None = None):
        if not (loss is None or loss in _NAMES or isinstance(loss, Fidelity) or callable(loss)):
            raise ArgumentError(message(fn, "loss", f"None, one of {_NAMES}, rotfn.learn.fidelity(...) or a function "
                                        "loss(outputs, batch) -> scalar tensor", repr(loss),
                                        "leave loss=None for the default"))
        self.fn, self.batches, self.loss, self.references = fn, batches, loss, None
        if callable(loss) and not isinstance(loss, Fidelity):
            return
        if floats is None:
            floats = lambda batch: run(fn, model, params, None, batch)  # noqa: E731
        with torch.no_grad():
            first = floats(batches[0])
            causal = _is_causal(first, batches[0])
            if loss == "next_token" and not causal:
                raise ArgumentError(message(fn, "loss", "'next_token' for a causal LM (logits [B, T, V], batches with "
                                            "input_ids [B, T])", f"outputs of type {type(first).__name__}",
                                            "use loss='fidelity'"))
            if loss == "fidelity" or (loss is None and not causal):
                self.loss = Fidelity()
            if isinstance(self.loss, Fidelity):
                self.references = [self._view(first, batches[0]).detach()] + [
                    self._view(floats(b), b).detach() for b in batches[1:]]

    def _view(self, outputs, batch: Batch) -> torch.Tensor:
        return _output(outputs) if self.loss.view is None else self.loss.view(outputs, batch)

    @property
    def kind(self) -> str:
        """``"custom"``, ``"next-token cross-entropy"`` or ``"relative squared error"``."""
        if isinstance(self.loss, Fidelity):
            return "relative squared error"
        return "custom" if callable(self.loss) else "next-token cross-entropy"

    def __call__(self, outputs, i: int) -> torch.Tensor:
        batch = self.batches[i]
        if isinstance(self.loss, Fidelity):
            v = self._view(outputs, batch)
            value = _relative_error(v, self.references[i], _mask(batch, v) if self.loss.view is None else None)
        elif callable(self.loss):
            value = self.loss(outputs, batch)
        else:
            value = _next_token(outputs, batch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.dtype.is_floating_point:
            raise ArgumentError(message(self.fn, "loss", "a loss (and view) giving a scalar floating tensor",
                                        f"{type(value).__name__} {getattr(value, 'shape', '')}"))
        return value.reshape(())


def evaluate(model, params: Mapping[str, torch.Tensor], plan: Plan | None, data: Iterable[Batch], *,
             loss: LossArg = None, weights_by=None) -> float:
    """The mean loss of ``plan`` over ``data``, through the ordinary ``rotfn.fold`` and ``rotfn.call``.

    The same loss :func:`rotfn.learn.rotations` minimizes (see :mod:`rotfn.learn`): with the
    default on an encoder, 0 means the output equals the float model's.

    Args:
        model: the ``nn.Module``.
        params: unfolded ``rotfn.params(model)``.
        plan: a plan (folded here), or None for the float model.
        data: an iterable of batches (tensors or dicts of tensors), e.g. held-out ones.
        loss: None for the default, ``"next_token"``, ``"fidelity"``, a :func:`rotfn.learn.fidelity` value,
            or ``loss(outputs, batch) -> scalar tensor``.
        weights_by: a :func:`rotfn.calibrate` result for ``plan`` (GPTQ-rounded weights), passed
            to :func:`rotfn.fold`; None rounds to nearest as the plan says.

    Returns:
        The mean of the per-batch losses, a float.

    Raises:
        ArgumentError: model not an ``nn.Module``, empty data, bad loss.
        DTypeError: params or a batch of another type.
        PlanError: a plan that does not fit (as :func:`rotfn.fold` and :func:`rotfn.call` raise it).

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(32, 32))
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(32, seed=0), acts=rotfn.intq(4))
        >>> data = [torch.randn(4, 32, generator=torch.Generator().manual_seed(0))]
        >>> 0 < rotfn.learn.evaluate(m, rotfn.params(m), plan, data) < 0.1
        True
    """
    fn = "learn.evaluate"
    describe(model, fn=fn)
    check_params(fn, params)
    batches = check_batches(fn, data)
    device = next(iter(params.values())).device if params else torch.device("cpu")
    batches = [to_device(b, device) for b in batches]
    objective = Objective(fn, model, params, batches, loss)
    folded = params if plan is None else fold(params, plan, weights_by=weights_by)
    with torch.no_grad():
        values = [objective(run(fn, model, folded, plan, b), i).item() for i, b in enumerate(batches)]
    return sum(values) / len(values)
