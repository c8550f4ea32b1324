"""params: a model's tensors as a plain dict."""

from __future__ import annotations

import torch
from torch import nn

from rotfn.plans import check_model, named_tensors

__all__ = ["params"]


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers as a plain dict ``{name: Tensor}``, detached.

    Names are the state_dict names; non-persistent buffers (e.g. RoPE's
    ``inv_freq``) are included too, since :func:`rotfn.call` passes every tensor to
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
    check_model("params", model)
    detached: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in named_tensors(model):
        out[name] = detached.setdefault(id(t), t.detach())
    return out
