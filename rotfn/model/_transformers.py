"""The transformers side of the bridge: attention and experts functions registered by name, routed per module.

transformers picks an attention function by the name in ``module.config._attn_implementation``
(``ALL_ATTENTION_FUNCTIONS``) and, in transformers 5, a fused experts function by
``module.config._experts_implementation`` (``ALL_EXPERTS_FUNCTIONS``). Queries and keys after
RoPE and the inputs inside fused experts are reachable only there, so rotfn registers

* ``"rotfn_sdpa"`` / ``"rotfn_eager"``: the standard sdpa / eager attention, with the
  interception's functions applied to ``q``, ``k`` and ``v`` first;
* ``"rotfn"``: the fused experts' eager expert loop with the interception's functions at the
  gate_up (or up) input and at each expert's down input.

Registration happens once per process, on the first interception that needs it (idempotent,
under a lock). It is the only state that outlives a call, and it changes nothing for other
callers: the shared registries only gain these names (and, for the attention names, the
matching sdpa / eager mask functions), and a model that selects one of them without being
inside a rotfn interception computes exactly what the standard one does (sdpa, the model
file's eager attention, the experts class's own forward).

A module is routed to these functions without touching the model's config: the per-call clone
of the module (see :func:`rotfn.model.intercept`) gets a :class:`ConfigView` that reads as
the shared config except for the implementation name, and the functions to apply sit on that
clone as a :class:`Routed`. Nothing another thread or caller can see is written.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from rotfn.errors import PlanError, message

__all__ = ["ATTENTION_NAMES", "EXPERTS_NAME"]

#: Attention implementations rotfn registers with transformers, by the implementation they wrap.
ATTENTION_NAMES = {"sdpa": "rotfn_sdpa", "eager": "rotfn_eager"}
#: The experts implementation rotfn registers with transformers (fused MoE experts).
EXPERTS_NAME = "rotfn"
#: Where a routed module's functions sit on its per-call clone.
ROUTED = "_rotfn_routed"

_LOCK = threading.Lock()
_REGISTERED: list[bool] = []


class ConfigView:
    """A config that reads as ``config`` except for the given attributes (e.g. ``_attn_implementation``).

    Example:
        >>> import types
        >>> view = ConfigView(types.SimpleNamespace(a=1, _attn_implementation="sdpa"), _attn_implementation="x")
        >>> view.a, view._attn_implementation
        (1, 'x')
    """

    def __init__(self, config, **names: str):
        self._config = config
        self._names = names

    def __getattr__(self, name: str):
        names = self.__dict__["_names"]
        return names[name] if name in names else getattr(self.__dict__["_config"], name)


@dataclasses.dataclass
class Routed:
    """The functions at one module's registry points for one interception, and whether they ran.

    Attributes:
        fns: ``{point: (fn, ...)}``, applied in order (a None result keeps the tensor).
        active: False once the interception has ended (the clone then behaves as the original).
        ran: set by the registered function that consulted it.
    """

    fns: dict[str, tuple[Callable, ...]]
    active: list[bool]
    ran: bool = False

    def apply(self, point: str, x: torch.Tensor, *expert: int) -> torch.Tensor:
        """``x`` through the point's functions in turn (``f(x)``, or ``f(x, e)`` at an expert's point)."""
        for fn in self.fns.get(point, ()):
            y = fn(x, *expert)
            x = x if y is None else y
        return x


def _routed(module: nn.Module) -> Routed | None:
    routed = module.__dict__.get(ROUTED)
    if routed is None or not routed.active[0]:
        return None
    routed.ran = True
    return routed


def _qkv(module, query, key, value):
    routed = _routed(module)
    if routed is None:
        return query, key, value
    return routed.apply("query", query), routed.apply("key", key), routed.apply("value", value)


def _attention_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, with the interception's functions on q, k, v (after RoPE) first."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, *_qkv(module, query, key, value), attention_mask, **kwargs)


def _attention_eager(module, query, key, value, attention_mask, **kwargs):
    """The model file's own eager attention, with the interception's functions on q, k, v first."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise PlanError(message("call", "model", "an attention module whose file defines eager_attention_forward",
                                type(module).__name__, "use the sdpa implementation: model.set_attn_implementation('sdpa')"))
    return eager(module, *_qkv(module, query, key, value), attention_mask, **kwargs)


def _experts(module, hidden_states, top_k_index, top_k_weights):
    """The eager expert loop with the interception's functions at the gate_up and down inputs.

    For expert ``e`` and its tokens ``x``: ``h = gate(x' @ W_gu[e].T)``, ``y = h' @ W_down[e].T``
    weighted by the router, where ``x' = f_in(x)`` (all tokens at once) and ``h' = f_down(h)``
    (each expert's tokens); the ``expert_in`` / ``expert_down`` functions then see (and may replace) expert
    ``e``'s rows, with ``e``. The down input exists only inside this loop (transformers offers no
    interception point there), so the loop is rotfn's; the gate is the module's own
    ``_apply_gate``, as transformers' batched and grouped experts functions call it. Outside an
    interception this is the experts class's own forward.
    """
    routed = _routed(module)
    if routed is None:
        return inspect.unwrap(type(module).forward)(module, hidden_states, top_k_index, top_k_weights)
    if getattr(module, "is_transposed", False) or getattr(module, "has_post_expert_norm", False) or getattr(
        module, "_is_expert_parallel", False
    ):
        raise PlanError(message("call", "model", "fused experts in [E, out, in] layout without post norm or expert "
                                "parallelism", type(module).__name__, "use per-module experts or extend rotfn.model"))
    has_gate, has_bias = getattr(module, "has_gate", True), getattr(module, "has_bias", False)
    w_in = module.gate_up_proj if has_gate else module.up_proj
    b_in = (module.gate_up_proj_bias if has_gate else module.up_proj_bias) if has_bias else None
    x_in = routed.apply("experts_in", hidden_states)
    out = torch.zeros_like(hidden_states)
    for e in torch.unique(top_k_index).tolist():
        if e >= w_in.shape[0]:  # sentinel ids of dropped tokens
            continue
        tok, pos = torch.where(top_k_index == e)
        h = F.linear(routed.apply("expert_in", x_in[tok], e), w_in[e], None if b_in is None else b_in[e])
        h = module._apply_gate(h) if has_gate else module.act_fn(h)
        h = routed.apply("expert_down", routed.apply("experts_down", h), e)
        y = F.linear(h, module.down_proj[e], module.down_proj_bias[e] if has_bias else None)
        out.index_put_((tok,), (y * top_k_weights[tok, pos, None]).to(out.dtype), accumulate=True)
    return out


def _register() -> None:
    """Register rotfn's attention (and experts) functions with transformers, once per process."""
    with _LOCK:
        if _REGISTERED:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

        AttentionInterface.register(ATTENTION_NAMES["sdpa"], _attention_sdpa)
        AttentionInterface.register(ATTENTION_NAMES["eager"], _attention_eager)
        # a model whose config names rotfn's function builds the mask its base function expects
        AttentionMaskInterface.register(ATTENTION_NAMES["sdpa"], sdpa_mask)
        AttentionMaskInterface.register(ATTENTION_NAMES["eager"], eager_mask)
        try:
            from transformers.integrations.moe import ExpertsInterface
        except ImportError:  # transformers < 5 keeps experts as modules: input sites cover them
            pass
        else:
            ExpertsInterface.register(EXPERTS_NAME, _experts)
        _REGISTERED.append(True)


def route(fn: str, clone: nn.Module, name: str, fns: dict[str, tuple[Callable, ...]], active: list[bool],
          kind: str) -> Routed:
    """Send the per-call ``clone`` of module ``name`` through rotfn's registered ``kind`` function.

    Args:
        fn: the API name for error messages.
        clone: the module's per-call clone (its ``config`` is replaced by a :class:`ConfigView`).
        name: the module's name, for messages.
        fns: ``{point: (fn, ...)}`` for the registered function to apply.
        active: the interception's one-element "still running" flag.
        kind: ``"attention"`` or ``"experts"``.

    Returns:
        The :class:`Routed` placed on the clone (its ``ran`` says whether the function ran).

    Raises:
        PlanError: the module has no transformers config, an attention implementation other than
            sdpa / eager, or (experts) transformers older than 5.
    """
    cfg = clone.__dict__.get("config")
    if kind == "attention":
        if cfg is None or not hasattr(cfg, "_attn_implementation"):
            raise PlanError(message(fn, "sites", "query/key/value sites on transformers attention modules",
                                    f"{name!r} ({type(clone).__name__}) has no transformers config",
                                    "intercept an attention module such as model.layers.0.self_attn"))
        base = cfg._attn_implementation or "eager"
        if base not in ATTENTION_NAMES:
            raise PlanError(message(fn, "model", "attention implementation 'sdpa' or 'eager' for online "
                                    "q/k rotations", repr(base), "model.set_attn_implementation('sdpa')"))
        view = ConfigView(cfg, _attn_implementation=ATTENTION_NAMES[base])
    else:
        if cfg is None or not hasattr(cfg, "_experts_implementation"):
            raise PlanError(message(fn, "model", "transformers >= 5 for online transforms in fused experts",
                                    f"{name!r} ({type(clone).__name__})", "upgrade transformers"))
        view = ConfigView(cfg, _experts_implementation=EXPERTS_NAME)
    _register()
    routed = Routed(fns, active)
    clone.__dict__["config"] = view
    clone.__dict__[ROUTED] = routed
    return routed
