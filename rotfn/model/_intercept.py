"""intercept: run a model with plain functions at named points (sites), on a per-call clone of its module tree.

A site is a point in the model where a tensor passes: a module's input or output, the queries,
keys or values after RoPE inside an attention module, or the inputs inside fused experts. A
site function ``f(x)`` returns the tensor to use in place of ``x``, or None to leave it as it
is (so recording is ``lambda x: seen.append(x.detach())``).

The functions are installed (as hooks, or through transformers' registries) on a shallow clone
of the module tree made for the interception, never on the model: the clone shares every
parameter, buffer and config with the model but has its own parameter dicts, hook dicts and
submodule dicts, so ``functional_call`` and the site functions of one call are invisible to any
other call, thread or the model itself, and nothing needs removing afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gc
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from rotfn.errors import ArgumentError, PlanError, SelectionError, message
from rotfn.model._transformers import Routed, route
from rotfn.plans import check_model
from rotfn.transforms import Where

__all__ = ["Site", "SiteFn", "POINTS", "intercept"]

#: The points a :class:`Site` can name, and what the site function receives there.
POINTS = {
    "input": "the module's first positional argument (a linear's input x)",
    "output": "the module's return value, as it is (a tensor, tuple or ModelOutput)",
    "query": "an attention module's queries after RoPE, [batch, heads, tokens, head_dim]",
    "key": "an attention module's keys after RoPE, [batch, kv_heads, tokens, head_dim]",
    "value": "an attention module's values, [batch, kv_heads, tokens, head_dim]",
    "experts_in": "the tokens entering fused experts' gate_up (or up) projection, [tokens, hidden]",
    "experts_down": "one expert's down projection input, [its tokens, intermediate], once per expert",
    "expert_in": "one expert's gate_up (or up) input, [its tokens, hidden] (after experts_in's functions), once per "
                 "expert: f(x, expert) with the expert's index",
    "expert_down": "one expert's down input, [its tokens, intermediate] (after experts_down's functions): "
                   "f(x, expert)",
}
_ROUTED_KIND = {"query": "attention", "key": "attention", "value": "attention",
                "experts_in": "experts", "experts_down": "experts", "expert_in": "experts", "expert_down": "experts"}

#: A site function: the tensor at the site in, a replacement (or None: keep it) out (at the ``expert_*`` points
#: also the expert's index: ``f(x, expert)``).
SiteFn = Callable[..., "torch.Tensor | None"]

#: The dicts and sets every ``nn.Module`` owns (parameters, buffers, submodules, hooks): copied per clone.
_MODULE_STATE = frozenset(k for k, v in vars(nn.Module()).items() if isinstance(v, (dict, set)))
#: Containers whose ``copy()`` keeps their type (a faster copy than ``type(v)(v)``).
_COPY_KEEPS_TYPE = frozenset({dict, set, collections.OrderedDict})


@dataclasses.dataclass(frozen=True)
class Site:
    """A point in a model where a tensor passes: a module name and a point of :data:`POINTS`.

    Attributes:
        module: the module's name in ``model.named_modules()`` (``""`` is the model itself).
        point: one of :data:`POINTS` (default ``"input"``).

    Raises:
        ArgumentError: module not a str, or an unknown point.

    Example:
        >>> Site("model.layers.0.mlp.down_proj"), Site("model.layers.0.self_attn", "query").point
        (Site(module='model.layers.0.mlp.down_proj', point='input'), 'query')
    """

    module: str
    point: str = "input"

    def __post_init__(self):
        if not isinstance(self.module, str):
            raise ArgumentError(message("Site", "module", "a module name (str)", type(self.module).__name__))
        if self.point not in POINTS:
            raise ArgumentError(message("Site", "point", f"one of {tuple(POINTS)}", repr(self.point)))


def _gather(fn: str, site_maps) -> dict[str, dict[str, tuple[SiteFn, ...]]]:
    """``{module: {point: (f, ...)}}`` from the site maps, functions in map order."""
    out: dict[str, dict[str, tuple[SiteFn, ...]]] = {}
    for sites in site_maps:
        if not isinstance(sites, Mapping):
            raise ArgumentError(message(fn, "sites", "mappings {rotfn.model.Site: function}", type(sites).__name__))
        for site, f in sites.items():
            if not isinstance(site, Site) or not callable(f):
                raise ArgumentError(message(fn, "sites", "{rotfn.model.Site: function} entries",
                                            f"{site!r}: {type(f).__name__}", "e.g. {Site('0'): lambda x: x * 2}"))
            points = out.setdefault(site.module, {})
            points[site.point] = (*points.get(site.point, ()), f)
    return out


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as it was after it): the clone allocates ~15
    containers per module, enough to start a full collection of the process's objects every few calls of a
    large model, which cost more than the clone itself (numbers in docs/performance.md)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _clone(model: nn.Module) -> nn.Module:
    """A shallow clone of the module tree: new module objects with their own state dicts, shared tensors."""
    with _collector_paused():
        return _clone_tree(model)


def _clone_tree(model: nn.Module) -> nn.Module:
    memo: dict[int, nn.Module] = {}
    held: list[tuple[dict, str, nn.Module]] = []  # modules held as plain attributes: (clone's dict, name, module)

    def copy(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        c = object.__new__(type(m))
        memo[id(m)] = c
        state = c.__dict__
        for k, v in vars(m).items():  # one pass: copy the state dicts, note the module attributes
            if k in _MODULE_STATE:
                v = v.copy() if type(v) in _COPY_KEEPS_TYPE else type(v)(v)
            elif isinstance(v, nn.Module):
                held.append((state, k, v))
            state[k] = v
        for name, child in m._modules.items():
            if child is not None:
                c._modules[name] = copy(child)
        return c

    clone = copy(model)
    for state, k, v in held:  # a module held as a plain attribute too must mean its clone
        if id(v) in memo:
            state[k] = memo[id(v)]
    return clone


def _through(fns: tuple[SiteFn, ...], x):
    for f in fns:
        y = f(x)
        x = x if y is None else y
    return x


def _hook(fn: str, module: nn.Module, name: str, points: dict, active: list[bool]) -> None:
    """Hooks on the clone ``module`` for its input and output sites.

    The input functions run as the last forward pre-hook and the output functions as the first
    forward hook, so hooks the model already has see the module's input and output as the
    module itself does (as transformed by the sites).
    """
    inputs, outputs = points.get("input", ()), points.get("output", ())

    def pre(module, args):
        if not active[0]:
            return None
        if not args:
            raise ArgumentError(message(fn, "sites", "an input site on a module called with a positional input",
                                        f"{name!r} called without positional arguments",
                                        "intercept its output, or the module that calls it"))
        return (_through(inputs, args[0]), *args[1:])

    def post(module, args, out):
        return _through(outputs, out) if active[0] else None

    if inputs:
        module.register_forward_pre_hook(pre)
    if outputs:
        module.register_forward_hook(post, prepend=True)


def _live(active: list[bool], forward: Callable, *args, **kwargs):
    """``forward(*args, **kwargs)`` with the clone's sites on: an ``around`` may run it again after the
    block (a backward pass that recomputes the module), and it must see what the block saw."""
    was, active[0] = active[0], True
    try:
        return forward(*args, **kwargs)
    finally:
        active[0] = was


#: ``around(module, forward) -> forward``: a module's forward for one interception, given the clone's own.
Around = Callable[[nn.Module, Callable], Callable]


@contextlib.contextmanager
def intercepted(fn: str, model: nn.Module, site_maps, around: Mapping[str, Around] | None = None) -> Iterator[nn.Module]:
    """:func:`intercept` with the API name ``fn`` for messages (for :func:`rotfn.call` and friends).

    ``around``: ``{module name: around}`` replaces those modules' ``forward`` on the clone by
    ``around(module, forward)`` (hooks and sites still run around it): how :func:`rotfn.learn.rotations`
    folds a module's weights when it runs (``shard=True``).
    """
    check_model(fn, model)
    by_module = _gather(fn, site_maps)
    clone = _clone(model)
    active = [True]
    routed: dict[str, Routed] = {}
    try:
        for name, points in by_module.items():
            try:
                module = clone.get_submodule(name)
            except AttributeError:
                names = [n for n, _ in model.named_modules()]
                raise SelectionError(message(fn, "sites", f"sites at modules of {type(model).__name__}",
                                             f"no module {name!r}",
                                             f"close modules: {Where.names([name]).closest(names)}")) from None
            if "input" in points or "output" in points:
                _hook(fn, module, name, points, active)
            kinds = {_ROUTED_KIND[p] for p in points if p in _ROUTED_KIND}
            if len(kinds) > 1:
                raise ArgumentError(message(fn, "sites", "attention or experts points on one module, not both",
                                            f"{name!r}: {sorted(points)}"))
            if kinds:
                routed[name] = route(fn, module, name, points, active, kinds.pop())
        for name, wrap in (around or {}).items():
            module = clone.get_submodule(name)
            module.forward = wrap(module, functools.partial(_live, active, module.forward))
        yield clone
        skipped = [name for name, r in routed.items() if not r.ran]
        if skipped:
            raise PlanError(message(fn, "model", "a model whose attention / experts modules call the registered rotfn "
                                    "functions (transformers attention and experts interfaces)",
                                    f"intercepted functions that did not run at {skipped[:4]}",
                                    "use a transformers model built with attn_implementation 'sdpa' or 'eager'"))
    finally:
        active[0] = False


def intercept(model: nn.Module, *sites: Mapping[Site, SiteFn]) -> contextlib.AbstractContextManager[nn.Module]:
    """Run ``model`` with plain functions at named sites: ``with intercept(model, {site: f}) as m: m(x)``.

    Inside the block, ``m`` is a per-call shallow clone of ``model`` (same parameters, buffers
    and config objects; its own parameter, hook and submodule dicts) on which, wherever a
    tensor ``x`` passes a site, ``x`` is replaced by ``f(x)`` (kept when ``f`` returns None).
    Run ``m`` directly or through ``torch.func.functional_call(m, ...)``. Several maps, or
    several entries for one site, apply in the order given. ``model`` itself gets no hook, no
    attribute and no config change, so other threads may run it (or intercept it) meanwhile;
    after the block ``m`` behaves as ``model``.

    Input and output sites are forward pre-hooks / hooks on the clone (after / before the hooks
    the model already has, so those see what the module sees); query / key / value sites route the
    clone's attention through rotfn's registered attention function and experts sites its
    experts through rotfn's experts function (see :mod:`rotfn.model._transformers`: registered
    once per process, standard behaviour outside an interception).

    Args:
        model: any ``nn.Module``; query / key / value sites need transformers attention modules
            (sdpa or eager), experts sites transformers 5 fused experts.
        *sites: mappings ``{Site: f}``, ``f(x) -> Tensor | None`` (see :data:`POINTS` for ``x``).

    Returns:
        A context manager that yields the intercepted clone.

    Raises:
        ArgumentError: model not an ``nn.Module``; sites not ``{Site: callable}``; an input site on
            a module called without a positional input.
        SelectionError: a site at a module the model does not have (close names listed).
        PlanError: attention sites on a model whose attention implementation is neither sdpa nor
            eager; and, on leaving the block normally, an attention / experts site whose module never
            called rotfn's registered function (the model bypasses transformers' interfaces).

    Example:
        >>> import torch, rotfn
        >>> from rotfn.model import Site, intercept
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> seen = []
        >>> with intercept(m, {Site("2"): lambda x: seen.append(x.shape)}, {Site("0"): lambda x: 2 * x}) as im:
        ...     y = im(torch.ones(5, 4))
        >>> seen, m._forward_pre_hooks, torch.equal(y, m(2 * torch.ones(5, 4)))
        ([torch.Size([5, 3])], OrderedDict(), True)
    """
    return intercepted("intercept", model, sites)
