"""online: a plan's activation-side entries compiled to site functions for :func:`rotfn.model.intercept`."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from rotfn.functional import qdq, rotate
from rotfn.model._intercept import Site
from rotfn.plans import Plan, require_plan
from rotfn.specs import Format, Rotation

__all__ = ["online", "activation"]

#: The sites each online entry kind acts at (query and key share an entry: R3 cancels in ``q @ k.T``).
_POINTS = {"linear": ("input",), "qk": ("query", "key"), "key": ("key",), "value": ("value",),
           "experts_in": ("experts_in",), "experts_down": ("experts_down",)}


def activation(x: torch.Tensor, *, rotation: Rotation | None, fmt: Format | None) -> torch.Tensor:
    """The online transform ``x -> qdq(x @ R, fmt)`` (either part may be None: skipped).

    Example:
        >>> import torch, rotfn
        >>> x = torch.randn(2, 8)
        >>> torch.equal(activation(x, rotation=rotfn.hadamard(8), fmt=None), rotfn.rotate(x, rotfn.hadamard(8)))
        True
    """
    if rotation is not None:
        x = rotate(x, rotation)
    if fmt is not None:
        x = qdq(x, fmt)
    return x


def in_order(x: torch.Tensor, *, fns: tuple[Callable[[torch.Tensor], torch.Tensor], ...]) -> torch.Tensor:
    """``x`` through ``fns`` one after the other (the entries of one site, in plan order)."""
    for f in fns:
        x = f(x)
    return x


def online(plan: Plan | None) -> dict[Site, Callable[[torch.Tensor], torch.Tensor]]:
    """A plan's online entries as site functions: ``{Site: x -> qdq(x @ R, fmt)}``.

    A ``"linear"`` entry acts at the module's input, ``"qk"`` at its queries and keys (one
    function for both), ``"key"`` / ``"value"`` at the keys / values entering attention,
    ``"experts_in"`` / ``"experts_down"`` at those experts points. The functions are
    ``functools.partial`` of :func:`activation`, so they print their rotation and format;
    where several entries act at one site (R3 then the KV format on keys) the site gets
    ``partial(in_order, fns=(...))`` of them in plan order.

    Args:
        plan: a :class:`rotfn.plans.Plan`, or None (no sites).

    Returns:
        A new dict ``{Site: function}`` in plan order.

    Raises:
        PlanError: plan neither a Plan nor None.

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(8, seed=0), acts=rotfn.intq(4))
        >>> list(rotfn.model.online(plan))
        [Site(module='0', point='input')]
    """
    if plan is None:
        return {}
    require_plan("online", plan, optional=True)
    fns: dict[Site, list] = {}
    for o in plan.online:
        f = functools.partial(activation, rotation=o.rotation, fmt=o.fmt)
        for point in _POINTS[o.kind]:
            fns.setdefault(Site(o.site, point), []).append(f)
    return {site: fs[0] if len(fs) == 1 else functools.partial(in_order, fns=tuple(fs)) for site, fs in fns.items()}
