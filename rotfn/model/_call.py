"""call: ``functional_call`` with a plan's online transforms, as :func:`rotfn.model.intercept` + functional_call."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rotfn.model._intercept import Around, Site, SiteFn, intercepted
from rotfn.model._online import online
from rotfn.plans import Plan, check_fold_state, check_keys, check_model, check_plan, describe, require_plan
from rotfn.transforms import check_params, kept_ties, tie

__all__ = ["call", "call_with", "call_as"]


def call_with(model: nn.Module, params: Mapping[str, torch.Tensor], plan: Plan | None,
              sites: Mapping[Site, SiteFn], *args, **kwargs):
    """:func:`rotfn.call` with more site functions, applied after the plan's at a shared site.

    ``call_with(model, params, plan, sites, *args)`` is
    ``with intercept(model, online(plan), sites) as m: functional_call(m, params, args)``
    with :func:`rotfn.call`'s checks: the way to record what a layer sees under a plan
    (report, calibration) or to add learned transforms (learn).

    Args:
        model: as for :func:`rotfn.call`.
        params: as for :func:`rotfn.call`.
        plan: as for :func:`rotfn.call`.
        sites: ``{Site: f}`` (see :func:`rotfn.model.intercept`).
        *args: the model's positional inputs.
        **kwargs: the model's keyword inputs.

    Returns:
        Whatever ``model(*args, **kwargs)`` returns.

    Raises:
        RotfnError: what :func:`rotfn.call` raises (naming ``call_with``), and :func:`rotfn.model.intercept` for
            ``sites``.

    Example:
        >>> import torch, rotfn
        >>> from rotfn.model import Site, call_with
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(4))
        >>> seen = []
        >>> _ = call_with(m, rotfn.fold(rotfn.params(m), plan), plan, {Site("0"): seen.append}, torch.ones(1, 4))
        >>> torch.allclose(seen[0], rotfn.rotate(torch.ones(1, 4), rotfn.hadamard(4)))   # x @ R, as the layer sees it
        True
    """
    return call_as("call_with", model, params, plan, sites, args, kwargs)


def call_as(fn: str, model: nn.Module, params, plan: Plan | None, sites: Mapping[Site, SiteFn] | None = None,
            args: tuple = (), kwargs: Mapping | None = None, around: Mapping[str, Around] | None = None):
    """:func:`call_with` for rotfn's own entry points: every check and error names ``fn``, the public function
    the user called (``"report"``, ``"calibrate"``, ``"learn.rotations"``, ...).

    Checks, then ``functional_call`` on ``intercept(model, online(plan), sites)``; ``args`` and ``kwargs`` are
    the model's inputs; ``around`` replaces modules' forwards for the call (see ``intercepted``).
    """
    check_model(fn, model)
    check_params(fn, params)
    require_plan(fn, plan, optional=True)
    info = describe(model, fn=fn)
    if plan is not None:
        check_plan(fn, info, plan)
    check_fold_state(fn, params, plan)
    check_keys(fn, info, params)
    untied = plan.untied if plan is not None else ()
    flat = tie(fn, params, kept_ties(info.tied, untied))
    with intercepted(fn, model, (online(plan), sites or {}), around) as m:
        # every tied name is in flat, the kept ties holding one tensor (tie above): torch need not find them again
        return torch.func.functional_call(m, flat, args, kwargs or {}, tie_weights=False, strict=True)


def call(model: nn.Module, params: Mapping[str, torch.Tensor], plan: Plan | None, *args, **kwargs):
    """Run ``model(*args, **kwargs)`` with ``params`` in place of its tensors and the plan's online transforms.

    ``torch.func.functional_call(m, dict(params), args, kwargs, strict=True)`` on
    ``m`` = :func:`rotfn.model.intercept` ``(model, rotfn.model.online(plan))``: for this call
    only, ``x -> qdq(x @ R, fmt)`` at the plan's linear inputs, ``q -> q @ R3``,
    ``k -> k @ R3`` after RoPE, and the transforms inside fused experts. With
    ``params = rotfn.fold(p, plan)`` an unquantized plan computes the same function as
    ``call(model, p, None)``, e.g. ``(x @ R) @ (W @ R).T == x @ W.T``. The model is not
    changed (no hook, attribute or config value), so two threads may call one model at once.

    A rotation with a format runs as one :func:`rotfn.rotate_qdq` (one fused kernel on GPU), and
    a tensor several linears read (q/k/v the normed hidden state, gate/up too) is rotated and
    quantized once per rotation and format, not once per linear: the same bits as rotate then
    qdq at every linear (see :func:`rotfn.model.online`).

    Args:
        model: the ``nn.Module`` the plan was built for (its tensors are not used).
        params: ``{name: Tensor}`` for every parameter and buffer (see :func:`rotfn.params`);
            folded with ``plan`` when the plan changes weights.
        plan: a :class:`rotfn.plans.Plan`, or None for a plain functional call.
        *args: the model's positional inputs.
        **kwargs: the model's keyword inputs.

    Returns:
        Whatever ``model(*args, **kwargs)`` returns.

    Raises:
        ArgumentError: model not an ``nn.Module``.
        DTypeError: params not a dict of tensors.
        SelectionError: params miss or add keys.
        PlanError: plan for another model, or an attention implementation other than sdpa/eager with R3.
        FoldError: params not folded with this plan (or folded with another).

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(4, seed=0))
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(rotfn.call(m, rotfn.fold(rotfn.params(m), plan), plan, x), m(x), atol=1e-6)
        True
    """
    return call_as("call", model, params, plan, None, args, kwargs)
