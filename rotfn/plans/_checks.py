"""The one home of the ``plan=`` argument check that every entry point taking a plan runs first."""

from __future__ import annotations

from rotfn.errors import PlanError, message
from rotfn.plans._plan import Plan

__all__ = ["require_plan"]

_FIX = "build one with rotfn.plans.per_linear(model, ...) or rotfn.plans.quarot(model, ...)"


def require_plan(fn: str, plan, *, optional: bool = False) -> Plan | None:
    """``plan`` itself when it is a :class:`Plan` (or None, when ``optional``), else a typed error.

    Args:
        fn: the public function checking, for the message.
        plan: the argument.
        optional: whether None (no plan) is accepted.

    Raises:
        PlanError: anything else.

    Example:
        >>> require_plan("call", None, optional=True) is None
        True
    """
    if isinstance(plan, Plan) or (optional and plan is None):
        return plan
    raise PlanError(message(fn, "plan", "a rotfn.plans.Plan" + (" or None" if optional else ""), type(plan).__name__,
                            _FIX))
