"""online: a plan's activation-side entries compiled to site functions for :func:`rotfn.model.intercept`."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch

from rotfn.functional import qdq, rotate, rotate_qdq
from rotfn.model._intercept import Site
from rotfn.plans import Plan, require_plan
from rotfn.specs import Format, Rotation

__all__ = ["online", "activation"]

#: The sites each online entry kind acts at (query and key share an entry: R3 cancels in ``q @ k.T``).
_POINTS = {"linear": ("input",), "qk": ("query", "key"), "key": ("key",), "value": ("value",),
           "experts_in": ("experts_in",), "experts_down": ("experts_down",)}


def activation(x: torch.Tensor, *, rotation: Rotation | None, fmt: Format | None) -> torch.Tensor:
    """The online transform ``x -> qdq(x @ R, fmt)`` (either part may be None: skipped).

    With both parts it is one :func:`rotfn.rotate_qdq` call (one fused kernel on GPU), which is
    ``qdq(rotate(x, R), fmt)`` bit for bit on every device (see :mod:`rotfn.dispatch`).

    Example:
        >>> import torch, rotfn
        >>> x, R = torch.randn(2, 32), rotfn.hadamard(32, seed=0)
        >>> torch.equal(activation(x, rotation=R, fmt=None), rotfn.rotate(x, R))
        True
        >>> torch.equal(activation(x, rotation=R, fmt=rotfn.mxfp4()), rotfn.qdq(rotfn.rotate(x, R), rotfn.mxfp4()))
        True
    """
    if rotation is not None and fmt is not None:
        return rotate_qdq(x, rotation, fmt)
    if rotation is not None:
        return rotate(x, rotation)
    return x if fmt is None else qdq(x, fmt)


class _OncePerInput:
    """:func:`activation` of one (rotation, format), computed once per input tensor for the sites that share it.

    Linears that read one tensor (q/k/v the normed hidden state, gate/up too) get the same
    result: the last input is remembered (weakly: the result is dropped when the input is freed)
    with its version counter, the result's, and the grad mode, and a call with that same tensor,
    unchanged, under the same grad mode, returns the remembered result. Inference tensors carry
    no version counter, so they are computed every time.
    """

    __slots__ = ("rotation", "fmt", "_last", "__weakref__")

    def __init__(self, rotation: Rotation | None, fmt: Format | None):
        self.rotation, self.fmt = rotation, fmt
        self._last = None  # (weakref to x, x._version, grad mode, result, result._version)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        last, inference = self._last, x.is_inference()
        if (last is not None and not inference and last[0]() is x and last[1] == x._version
                and last[2] == torch.is_grad_enabled() and last[4] == last[3]._version):
            return last[3]
        y = activation(x, rotation=self.rotation, fmt=self.fmt)
        if not inference and not y.is_inference():
            forget = functools.partial(_forget, weakref.ref(self))  # no reference cycle: the memo dies with its dict
            self._last = (weakref.ref(x, forget), x._version, torch.is_grad_enabled(), y, y._version)
        return y

    def __repr__(self) -> str:
        return f"online activation(rotation={self.rotation!r}, fmt={self.fmt!r})"


def _forget(memo: weakref.ref, x: weakref.ref) -> None:
    """Drop the remembered result of a freed input (a weakref callback)."""
    m = memo()
    if m is not None and m._last is not None and m._last[0] is x:
        m._last = None


def in_order(x: torch.Tensor, *, fns: tuple[Callable[[torch.Tensor], torch.Tensor], ...]) -> torch.Tensor:
    """``x`` through ``fns`` one after the other (the entries of one site, in plan order)."""
    for f in fns:
        x = f(x)
    return x


def online(plan: Plan | None) -> dict[Site, Callable[[torch.Tensor], torch.Tensor]]:
    """A plan's online entries as site functions: ``{Site: x -> qdq(x @ R, fmt)}``.

    A ``"linear"`` entry acts at the module's input, ``"qk"`` at its queries and keys (one
    function for both), ``"key"`` / ``"value"`` at the keys / values entering attention,
    ``"experts_in"`` / ``"experts_down"`` at those experts points. Each function computes
    :func:`activation` of its entry's rotation and format (and prints them); a rotation-only entry
    followed at its site by a format-only one (R3, then the KV format on keys) is one function of
    both (one :func:`rotfn.rotate_qdq`, the same bits); other entries acting at one site get
    ``partial(in_order, fns=(...))`` of them in plan order.

    Entries with equal rotation and format share one function, which computes its result once
    per input tensor: q/k/v (and gate/up) read the same tensor, so it is rotated and quantized
    once for the three, with the same bits as three times. It remembers the last input it saw
    (while that tensor lives, unchanged in place, under the same grad mode), so build the dict
    per call, as :func:`rotfn.call` does; nothing outlives the dict.

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
    shared: dict[tuple, _OncePerInput] = {}

    def once(rotation: Rotation | None, fmt: Format | None) -> _OncePerInput:
        f = shared.get((rotation, fmt))
        if f is None:
            f = shared[rotation, fmt] = _OncePerInput(rotation, fmt)
        return f

    fns: dict[Site, list] = {}
    for o in plan.online:
        for point in _POINTS[o.kind]:
            fs = fns.setdefault(Site(o.site, point), [])
            last = fs[-1] if fs else None
            if last is not None and last.fmt is None and o.rotation is None and o.fmt is not None:
                fs[-1] = once(last.rotation, o.fmt)  # a rotation then a format (R3, the KV format): one rotate_qdq
            else:
                fs.append(once(o.rotation, o.fmt))
    return {site: fs[0] if len(fs) == 1 else functools.partial(in_order, fns=tuple(fs)) for site, fs in fns.items()}
