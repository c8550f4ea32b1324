"""A read-only description of a model for plan builders: :func:`describe` and :class:`ModelInfo`.

This lives in :mod:`rotfn.plans`, not in :mod:`rotfn.model`, because the builders need it
and :mod:`rotfn.model` (which runs plans) imports :mod:`rotfn.plans`: keeping the
description here keeps the arrow one way (``model -> plans``). It only reads a module
(names, shapes, tensor identities, module types); everything that runs a module, hooks
into it or talks to transformers' registries is in :mod:`rotfn.model`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import torch
from torch import nn

from rotfn.errors import ArgumentError, SelectionError, message
from rotfn.plans._checks import check_signature
from rotfn.plans._plan import Plan, signature
from rotfn.transforms import Where

__all__ = ["ModelInfo", "describe"]


def check_model(fn: str, model) -> None:
    """Raise ArgumentError unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(message(fn, "model", "a torch.nn.Module", type(model).__name__,
                                    "pass the model, e.g. transformers.AutoModelForCausalLM.from_config(cfg)"))


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter and buffer under every name it has, in state_dict order.

    Example:
        >>> import torch
        >>> [name for name, _ in named_tensors(torch.nn.Linear(3, 2))]
        ['weight', 'bias']
    """
    for prefix, module in model.named_modules(remove_duplicate=False):
        yield from _own_tensors(prefix, module)


def _own_tensors(prefix: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own parameters then buffers (what ``named_parameters`` / ``named_buffers`` with
    ``recurse=False`` list), named under ``prefix``: read from its dicts, without those generators' bookkeeping."""
    head = f"{prefix}." if prefix else ""
    for tensors in (module._parameters, module._buffers):
        for name, t in tensors.items():
            if t is not None:
                yield head + name, t


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What plans need to know about a model, read once (names, shapes, ties, linears, experts).

    Attributes:
        cls: the model class name.
        config: the model's ``config`` attribute (a transformers config) or None.
        model_type: ``config.model_type`` or None.
        shapes: ``{name: shape}`` of every parameter and buffer.
        tied: groups of names that share one tensor.
        linears: ``(module name, in_features)`` of every ``nn.Linear`` and every GPT-2 ``Conv1D``.
        transposed: weight keys of the linears that store their weight ``[in, out]`` (``Conv1D``: ``y = x @ W + b``).
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
    transposed: tuple[str, ...] = ()

    @functools.cached_property
    def signature(self) -> str:
        """:func:`rotfn.plans.signature` of ``shapes`` (computed when first asked: a plan check needs it)."""
        return signature(self.shapes.items())


def _fused_experts(module: nn.Module) -> tuple[str, str] | None:
    down = module._parameters.get("down_proj")
    up = module._parameters.get("gate_up_proj", module._parameters.get("up_proj"))
    if down is None or up is None or down.ndim != 3 or up.ndim != 3:
        return None
    return ("gate_up_proj" if "gate_up_proj" in module._parameters else "up_proj"), "down_proj"


def _conv1d_in_features(module: nn.Module) -> int | None:
    """The input size of a ``transformers.pytorch_utils.Conv1D`` (weight ``[in, out]``, ``nf`` outputs), else None.

    Matched by name and layout, not imported: plans never import transformers.
    """
    weight = module._parameters.get("weight")
    if type(module).__name__ != "Conv1D" or weight is None or weight.ndim != 2 or weight.shape[1] != getattr(
            module, "nf", None):
        return None
    return weight.shape[0]


def describe(model: nn.Module, *, fn: str = "describe") -> ModelInfo:
    """Read a model's structure for plan builders (no tensor is copied or written).

    Args:
        model: any ``nn.Module``.
        fn: the API name error messages start with.

    Returns:
        A frozen :class:`ModelInfo`.

    Raises:
        ArgumentError: model is not an ``nn.Module``.

    Example:
        >>> import torch, rotfn
        >>> rotfn.plans.describe(torch.nn.Linear(3, 2)).linears
        (('', 3),)
    """
    check_model(fn, model)
    shapes: dict[str, tuple[int, ...]] = {}
    by_tensor: dict[int, list[str]] = {}
    linears, experts, transposed = [], [], []
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    out_emb, seen = None, set()
    for prefix, module in model.named_modules(remove_duplicate=False):  # one walk; modules by their first name
        for name, t in _own_tensors(prefix, module):
            shapes[name] = tuple(t.shape)
            by_tensor.setdefault(id(t), []).append(name)
        if id(module) in seen:
            continue
        seen.add(id(module))
        if module is head and out_emb is None:
            out_emb = prefix
        if isinstance(module, nn.Linear):
            linears.append((prefix, module.in_features))
        elif (n := _conv1d_in_features(module)) is not None:
            linears.append((prefix, n))
            transposed.append(f"{prefix}.weight" if prefix else "weight")
        elif (pair := _fused_experts(module)) is not None:
            experts.append((prefix, *pair))
    tied = tuple(tuple(names) for names in by_tensor.values() if len(names) > 1)
    config = getattr(model, "config", None)
    return ModelInfo(
        cls=type(model).__name__, config=config, model_type=getattr(config, "model_type", None), shapes=shapes,
        tied=tied, linears=tuple(linears), experts=tuple(experts), output_embedding=out_emb,
        transposed=tuple(transposed),
    )


def check_plan(fn: str, info: ModelInfo, plan: Plan) -> None:
    """Raise PlanError unless ``plan`` was built for the model ``info`` describes (same names and shapes)."""
    check_signature(fn, plan, info.signature, f"a plan built for this model ({info.cls}, signature {info.signature})",
                    "build the plan from this model with rotfn.plans.*")


def check_keys(fn: str, info: ModelInfo, params: dict) -> None:
    """Raise SelectionError unless ``params`` has exactly the keys of the model ``info`` describes."""
    missing = [k for k in info.shapes if k not in params]
    extra = [k for k in params if k not in info.shapes]
    if missing or extra:
        close = Where.names(missing or extra).closest(info.shapes if extra else params)
        raise SelectionError(message(fn, "params", f"exactly the {len(info.shapes)} keys of rotfn.params(model)",
                                     f"missing {missing[:5]}, unexpected {extra[:5]}",
                                     f"build params with rotfn.params(model); close keys: {close}"))
