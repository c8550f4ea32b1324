"""The one home of the ``plan=`` argument checks: that it is a plan (every entry point taking one runs this
first), and that it was built for the tensors at hand (by their names and shapes)."""

from __future__ import annotations

from rotfn.errors import PlanError, message
from rotfn.plans._plan import Plan

__all__ = ["require_plan", "check_signature"]

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


def check_signature(fn: str, plan: Plan, signature: str, expected: str, fix: str) -> None:
    """Raise PlanError unless ``plan`` was built for tensors of ``signature`` (:func:`rotfn.plans.signature`).

    Args:
        fn: the public function checking, for the message.
        plan: a :class:`Plan`.
        signature: the signature of the model or params at hand.
        expected: what was expected, in words (it names ``signature``).
        fix: how to build a fitting plan.

    Raises:
        PlanError: the signatures differ.

    Example:
        >>> plan = Plan("per_linear", None, "Linear", signature="0123")
        >>> check_signature("fold", plan, "0123", "a plan for these params", "build one from the model")
    """
    if plan.signature != signature:
        raise PlanError(message(fn, "plan", expected, f"a plan for {plan.model} (signature {plan.signature})", fix))
