"""The only bridge to ``nn.Module``: :func:`params`, :func:`call`, and a read-only model description for plans.

:func:`call` runs a model through ``torch.func.functional_call`` (strict keys, a
shallow copy of the dict, ties kept or broken as the plan says) with the plan's
online transforms active for that call only:

* linear inputs: forward pre-hooks that return ``(qdq(x @ R, fmt), *rest)``;
* queries and keys after RoPE: a registered transformers attention function
  (``"rotfn_sdpa"`` / ``"rotfn_eager"``) that rotates q and k with
  :func:`rotfn.rotate` and then calls the standard sdpa / eager implementation;
  it is selected through the config's attention implementation for the call and
  the previous value is restored after;
* fused mixture-of-experts weights (transformers 5 ``Experts`` modules): a
  registered experts function (``"rotfn"``) that computes the eager expert loop
  with the online transforms at the gate_up and down inputs, selected the same way.

No model class is patched; after the call the model has the hooks, config
values and parameters it had before.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import sys

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from rotfn.errors import ArgumentError, PlanError, SelectionError, message
from rotfn.functional import qdq, rotate
from rotfn.plans._fold import check_fold_state
from rotfn.plans._plan import Plan, signature
from rotfn.transforms._core import check_params
from rotfn.transforms._where import Where

__all__ = ["params", "call", "describe", "check_plan", "check_keys", "ModelInfo", "ATTENTION_NAMES", "EXPERTS_NAME"]

#: Attention implementations rotfn registers with transformers, by the implementation they wrap.
ATTENTION_NAMES = {"sdpa": "rotfn_sdpa", "eager": "rotfn_eager"}
#: The experts implementation rotfn registers with transformers (fused MoE experts).
EXPERTS_NAME = "rotfn"


# ----- params and model description --------------------------------------------------
def _check_model(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise ArgumentError(message(fn, "model", "a torch.nn.Module", type(model).__name__,
                                    "pass the model, e.g. transformers.AutoModelForCausalLM.from_config(cfg)"))


def _named_tensors(model: nn.Module):
    """``(name, tensor)`` of every parameter and buffer under every name it has, in state_dict order."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        head = f"{prefix}." if prefix else ""
        for name, t in module.named_parameters(recurse=False, remove_duplicate=False):
            yield head + name, t
        for name, t in module.named_buffers(recurse=False, remove_duplicate=False):
            yield head + name, t


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers as a plain dict ``{name: Tensor}``, detached.

    Names are the state_dict names; non-persistent buffers (e.g. RoPE's
    ``inv_freq``) are included too, since :func:`call` passes every tensor to
    ``functional_call(strict=True)``. Tied weights appear under every name they
    have, as one and the same tensor object. The tensors share memory with the
    model (no copy); rotfn never writes them.

    Args:
        model: any ``torch.nn.Module``.

    Returns:
        A new dict of detached tensors.

    Raises:
        ArgumentError: model is not an ``nn.Module``.

    Example:
        >>> import torch, rotfn
        >>> p = rotfn.params(torch.nn.Linear(3, 2))
        >>> sorted(p), p["weight"].requires_grad
        (['bias', 'weight'], False)
    """
    _check_model("params", model)
    detached: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in _named_tensors(model):
        out[name] = detached.setdefault(id(t), t.detach())
    return out


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What plans need to know about a model, read once (names, shapes, ties, linears, experts).

    Attributes:
        cls: the model class name.
        config: the model's ``config`` attribute (a transformers config) or None.
        model_type: ``config.model_type`` or None.
        shapes: ``{name: shape}`` of every parameter and buffer.
        tied: groups of names that share one tensor.
        linears: ``(module name, in_features)`` of every ``nn.Linear``.
        experts: ``(module name, in param, down param)`` of fused experts modules
            (3-D ``gate_up_proj``/``up_proj`` ``[E, out, in]`` and ``down_proj``).
        output_embedding: module name of the output embedding (lm_head), or None.
        signature: :func:`rotfn.plans.signature` of ``shapes``.
    """

    cls: str
    config: object
    model_type: str | None
    shapes: dict
    tied: tuple[tuple[str, ...], ...]
    linears: tuple[tuple[str, int], ...]
    experts: tuple[tuple[str, str, str], ...]
    output_embedding: str | None
    signature: str


def _fused_experts(module: nn.Module) -> tuple[str, str] | None:
    down = module._parameters.get("down_proj")
    up = module._parameters.get("gate_up_proj", module._parameters.get("up_proj"))
    if down is None or up is None or down.ndim != 3 or up.ndim != 3:
        return None
    return ("gate_up_proj" if "gate_up_proj" in module._parameters else "up_proj"), "down_proj"


def describe(model: nn.Module, *, fn: str = "describe") -> ModelInfo:
    """Read a model's structure for plan builders (no tensor is copied or written).

    Example:
        >>> import torch, rotfn
        >>> rotfn.apply.describe(torch.nn.Linear(3, 2)).linears
        (('', 3),)
    """
    _check_model(fn, model)
    shapes: dict[str, tuple[int, ...]] = {}
    by_tensor: dict[int, list[str]] = {}
    for name, t in _named_tensors(model):
        shapes[name] = tuple(t.shape)
        by_tensor.setdefault(id(t), []).append(name)
    tied = tuple(tuple(names) for names in by_tensor.values() if len(names) > 1)
    linears, experts = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linears.append((name, module.in_features))
        elif (pair := _fused_experts(module)) is not None:
            experts.append((name, *pair))
    out_emb = None
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        out_emb = next((n for n, m in model.named_modules() if m is head), None)
    config = getattr(model, "config", None)
    return ModelInfo(
        cls=type(model).__name__, config=config, model_type=getattr(config, "model_type", None), shapes=shapes,
        tied=tied, linears=tuple(linears), experts=tuple(experts), output_embedding=out_emb,
        signature=signature(shapes.items()),
    )


def check_plan(fn: str, info: ModelInfo, plan: Plan) -> None:
    """Raise PlanError unless ``plan`` was built for the model ``info`` describes (same names and shapes)."""
    if plan.signature != info.signature:
        raise PlanError(message(fn, "plan", f"a plan built for this model ({info.cls}, signature {info.signature})",
                                f"a plan for {plan.model} (signature {plan.signature})",
                                "build the plan from this model with rotfn.plans.*"))


def check_keys(fn: str, info: ModelInfo, params: dict) -> None:
    """Raise SelectionError unless ``params`` has exactly the keys of the model ``info`` describes."""
    missing = [k for k in info.shapes if k not in params]
    extra = [k for k in params if k not in info.shapes]
    if missing or extra:
        close = Where.names(missing or extra).closest(info.shapes if extra else params)
        raise SelectionError(message(fn, "params", f"exactly the {len(info.shapes)} keys of rotfn.params(model)",
                                     f"missing {missing[:5]}, unexpected {extra[:5]}",
                                     f"build params with rotfn.params(model); close keys: {close}"))


# ----- online transforms -----------------------------------------------------------
@dataclasses.dataclass
class _CallState:
    """Online transforms of the running call, looked up by module identity."""

    qk: dict[int, tuple]
    experts: dict[int, dict[str, tuple]]
    ran: set[int] = dataclasses.field(default_factory=set)


_STATE: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar("rotfn_call_state", default=None)
_REGISTERED: list[bool] = []


def _apply_online(x: torch.Tensor, rotation, fmt) -> torch.Tensor:
    if rotation is not None:
        x = rotate(x, rotation)
    if fmt is not None:
        x = qdq(x, fmt)
    return x


def _linear_hook(rotation, fmt):
    def hook(module, args):
        return (_apply_online(args[0], rotation, fmt), *args[1:])

    return hook


def _rotate_qk(module, query, key):
    state = _STATE.get()
    entry = state.qk.get(id(module)) if state is not None else None
    if entry is None:
        return query, key
    state.ran.add(id(module))
    return _apply_online(query, *entry), _apply_online(key, *entry)


def _attention_sdpa(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention with the call's online transform on q and k (after RoPE) first."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key = _rotate_qk(module, query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _attention_eager(module, query, key, value, attention_mask, **kwargs):
    """The model file's own eager attention with the call's online transform on q and k first."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise PlanError(message("call", "model", "an attention module whose file defines eager_attention_forward",
                                type(module).__name__, "use the sdpa implementation: model.set_attn_implementation('sdpa')"))
    query, key = _rotate_qk(module, query, key)
    return eager(module, query, key, value, attention_mask, **kwargs)


def _experts(module, hidden_states, top_k_index, top_k_weights):
    """The eager expert loop with the call's online transforms at the gate_up and down inputs.

    For expert ``e`` and its tokens ``x``: ``h = gate(x' @ W_gu[e].T)``, ``y = h' @ W_down[e].T``
    weighted by the router, where ``x' = qdq(x @ R_in)`` and ``h' = qdq(h @ R_down)``.
    """
    if getattr(module, "is_transposed", False) or getattr(module, "has_post_expert_norm", False) or getattr(
        module, "_is_expert_parallel", False
    ):
        raise PlanError(message("call", "model", "fused experts in [E, out, in] layout without post norm or expert "
                                "parallelism", type(module).__name__, "use per-module experts or extend rotfn.apply"))
    state = _STATE.get()
    entry = state.experts.get(id(module), {}) if state is not None else {}
    if entry:
        state.ran.add(id(module))
    has_gate, has_bias = getattr(module, "has_gate", True), getattr(module, "has_bias", False)
    w_in = module.gate_up_proj if has_gate else module.up_proj
    b_in = (module.gate_up_proj_bias if has_gate else module.up_proj_bias) if has_bias else None
    x_in = _apply_online(hidden_states, *entry.get("experts_in", (None, None)))
    out = torch.zeros_like(hidden_states)
    for e in torch.unique(top_k_index).tolist():
        if e >= w_in.shape[0]:  # sentinel ids of dropped tokens
            continue
        tok, pos = torch.where(top_k_index == e)
        h = F.linear(x_in[tok], w_in[e], None if b_in is None else b_in[e])
        h = module._apply_gate(h) if has_gate else module.act_fn(h)
        h = _apply_online(h, *entry.get("experts_down", (None, None)))
        y = F.linear(h, module.down_proj[e], module.down_proj_bias[e] if has_bias else None)
        out.index_put_((tok,), (y * top_k_weights[tok, pos, None]).to(out.dtype), accumulate=True)
    return out


def _register() -> None:
    """Register rotfn's attention (and experts) functions with transformers, once."""
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(ATTENTION_NAMES["sdpa"], _attention_sdpa)
    AttentionInterface.register(ATTENTION_NAMES["eager"], _attention_eager)
    AttentionMaskInterface.register(ATTENTION_NAMES["sdpa"], sdpa_mask)
    AttentionMaskInterface.register(ATTENTION_NAMES["eager"], eager_mask)
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:  # transformers < 5 keeps experts as modules: hooks cover them
        pass
    else:
        ExpertsInterface.register(EXPERTS_NAME, _experts)
    _REGISTERED.append(True)


def _configs(model: nn.Module) -> list:
    seen: dict[int, object] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _module(model: nn.Module, site: str, plan: Plan) -> nn.Module:
    try:
        return model.get_submodule(site)
    except AttributeError:
        names = [n for n, _ in model.named_modules()]
        raise PlanError(message("call", "plan", f"a plan whose online sites exist in {type(model).__name__}",
                                f"no module {site!r} (plan for {plan.model})",
                                f"build the plan from this model; close modules: {Where.names([site]).closest(names)}")) from None


def _tie_fix(fn: str, flat: dict, tied, untied: set[str]) -> None:
    """Make each kept tie group one tensor object in ``flat`` (bit-equal values), else raise."""
    for group in tied:
        kept = [n for n in group if n not in untied]
        if len(kept) < 2:
            continue
        first = flat[kept[0]]
        for name in kept[1:]:
            t = flat[name]
            if t is first:
                continue
            if t.dtype != first.dtype or t.shape != first.shape or not torch.equal(t, first):
                raise PlanError(message(fn, "params", f"one value for the tied keys {kept}", "different tensors",
                                        "give tied keys the same tensor, or use a plan that unties them"))
            flat[name] = first


@contextlib.contextmanager
def _online_transforms(fn: str, model: nn.Module, plan: Plan | None):
    """Install the plan's online transforms for one call; afterwards remove every hook and restore every config.

    On a normal exit, raises PlanError if a q/k or experts transform never ran (the
    model did not go through the registered functions), since its folded half
    would then be wrong or its quantization missing.
    """
    online = plan.online if plan is not None else ()
    state = _CallState(qk={}, experts={})
    hooks, restore, token = [], [], None
    try:
        for o in online:
            module = _module(model, o.site, plan)
            if o.kind == "linear":
                hooks.append(module.register_forward_pre_hook(_linear_hook(o.rotation, o.fmt)))
            elif o.kind == "qk":
                state.qk[id(module)] = (o.rotation, o.fmt)
            else:
                state.experts.setdefault(id(module), {})[o.kind] = (o.rotation, o.fmt)
        if state.qk or state.experts:
            _register()
            for cfg in _configs(model):
                if state.qk:
                    base = cfg._attn_implementation or "eager"
                    if base not in ATTENTION_NAMES:
                        raise PlanError(message(fn, "model", "attention implementation 'sdpa' or 'eager' for online "
                                                "q/k rotations", repr(base), "model.set_attn_implementation('sdpa')"))
                    restore.append((cfg, "_attn_implementation", cfg._attn_implementation))
                    cfg._attn_implementation = ATTENTION_NAMES[base]
                if state.experts:
                    if not hasattr(cfg, "_experts_implementation"):
                        raise PlanError(message(fn, "model", "transformers >= 5 for online transforms in fused experts",
                                                type(model).__name__, "upgrade transformers"))
                    restore.append((cfg, "_experts_implementation", cfg._experts_implementation))
                    cfg._experts_implementation = EXPERTS_NAME
        token = _STATE.set(state)
        yield
        skipped = [o.site for o in online if o.kind != "linear" and id(model.get_submodule(o.site)) not in state.ran]
        if skipped:
            raise PlanError(message(fn, "model", "a model whose attention / experts modules call the registered rotfn "
                                    "functions (transformers attention and experts interfaces)",
                                    f"online transforms that did not run at {skipped[:4]}",
                                    "use a transformers model built with attn_implementation 'sdpa' or 'eager'"))
    finally:
        if token is not None:
            _STATE.reset(token)
        for cfg, attr, value in reversed(restore):
            setattr(cfg, attr, value)
        for h in hooks:
            h.remove()


def call(model: nn.Module, params: dict[str, torch.Tensor], plan: Plan | None, *args, **kwargs):
    """Run ``model(*args, **kwargs)`` with ``params`` in place of its tensors and the plan's online transforms.

    ``torch.func.functional_call(model, dict(params), args, kwargs, strict=True)``
    with, for this call only: ``x -> qdq(x @ R, fmt)`` at the plan's linear inputs
    (forward pre-hooks), ``q -> q @ R3``, ``k -> k @ R3`` after RoPE (a registered
    attention function), and the transforms inside fused experts. With
    ``params = rotfn.fold(p, plan)`` an unquantized plan computes the same function
    as ``call(model, p, None)``, e.g. ``(x @ R) @ (W @ R).T == x @ W.T``.

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
    fn = "call"
    _check_model(fn, model)
    check_params(fn, params)
    if plan is not None and not isinstance(plan, Plan):
        raise PlanError(message(fn, "plan", "a rotfn.plans.Plan or None", type(plan).__name__,
                                "build one with rotfn.plans.per_linear(model, ...) or rotfn.plans.quarot(model, ...)"))
    info = describe(model, fn=fn)
    if plan is not None:
        check_plan(fn, info, plan)
    check_fold_state(fn, params, plan)
    check_keys(fn, info, params)
    flat = dict(params)
    untied = set(plan.untied) if plan is not None else set()
    _tie_fix(fn, flat, info.tied, untied)
    with _online_transforms(fn, model, plan):
        return torch.func.functional_call(model, flat, args, kwargs, tie_weights=not untied, strict=True)
