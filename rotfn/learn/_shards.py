"""Frozen weights held in pieces over the ranks, gathered and folded where a module runs (``learn.rotations(shard=True)``).

Each rank keeps ``1/N`` of the tensors of every module that owns a weight (:func:`rotfn.distributed.piece`).
When such a module runs, :func:`on_use` gathers its tensors (:func:`rotfn.distributed.concat`), folds them
with the step's rotations (:meth:`rotfn.transforms.FoldProgram.values`) and runs the module's own forward
on them; the autograd node it leaves (:class:`_FoldOnUse`) keeps only the module's inputs and the rotations,
and the backward pass gathers, folds and runs the module again (``torch.func.vjp``). So no whole weight
and no folded weight outlives the module's forward or its backward: a device holds ``1/N`` of the weights,
one module's gathered tensors, and the activations. Every rank runs the same modules in the same order,
forward and backward, so the gathers of the ranks match.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from rotfn import distributed

__all__ = ["Held", "owners", "on_use"]


def owners(model: nn.Module, keys) -> dict[str, dict[str, str]]:
    """``{module name: {attribute: key}}`` of the modules that own a tensor of two or more dims among ``keys``
    (their own tensors, not their children's): the modules whose tensors are held in pieces."""
    keys = set(keys)
    out: dict[str, dict[str, str]] = {}
    for name, module in model.named_modules():
        own = {attr: f"{name}.{attr}" if name else attr
               for attr, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}
        own = {attr: key for attr, key in own.items() if key in keys}
        if any(getattr(module, attr).ndim >= 2 for attr in own):
            out[name] = own
    return out


class Held:
    """``params`` as this rank holds them on ``device``: its piece of each key in ``pieces``, the rest whole.

    Args:
        params: every key's tensor (any device: e.g. memory-mapped on the CPU).
        device: where the held tensors go.
        pieces: the keys held in pieces.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], device: torch.device, pieces) -> None:
        self.shapes = {k: params[k].shape for k in pieces}
        self.pieces = {k: distributed.piece(params[k]).to(device) for k in pieces}
        self.whole = {k: t.to(device) for k, t in params.items() if k not in self.pieces}

    def read(self, fn: str, key: str) -> torch.Tensor:
        """``key``'s whole tensor (gathered from the ranks' pieces: one all-gather)."""
        if key in self.whole:
            return self.whole[key]
        shape = self.shapes[key]
        return distributed.concat(fn, self.pieces[key])[:shape.numel()].view(shape)

    def stand_ins(self) -> dict[str, torch.Tensor]:
        """What a call's params hold: whole tensors, and each piece in place of its key (the modules that
        own pieces run on gathered tensors, see :func:`on_use`)."""
        return {**self.whole, **self.pieces}

    def nbytes(self) -> int:
        """Bytes this rank holds."""
        return sum(t.nbytes for t in (*self.whole.values(), *self.pieces.values()))


class _FoldOnUse(torch.autograd.Function):
    """``compute(*tensors)`` (a tensor or a tuple) that saves only ``tensors`` for backward, where it runs
    ``compute`` again (``torch.func.vjp``); outputs that are not floating tensors get no gradient."""

    @staticmethod
    def forward(compute, *tensors):
        return compute(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.compute = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        outs = output if isinstance(output, tuple) else (output,)
        floats = [isinstance(o, torch.Tensor) and o.dtype.is_floating_point for o in outs]
        ctx.tuple, ctx.floats = isinstance(output, tuple), [i for i, f in enumerate(floats) if f]
        ctx.like = [(outs[i].shape, outs[i].dtype, outs[i].device) for i in ctx.floats]
        ctx.mark_non_differentiable(*(o for o, f in zip(outs, floats, strict=True) if isinstance(o, torch.Tensor) and not f))

    @staticmethod
    def backward(ctx, *grads):
        def floats(*tensors):
            out = ctx.compute(*tensors)
            return tuple((out if ctx.tuple else (out,))[i] for i in ctx.floats)

        _, pull = torch.func.vjp(floats, *ctx.saved_tensors)
        cotangents = tuple(grads[i] if grads[i] is not None else torch.zeros(shape, dtype=dtype, device=device)
                           for i, (shape, dtype, device) in zip(ctx.floats, ctx.like, strict=True))
        return None, *pull(cotangents)


@contextlib.contextmanager
def _swapped(module: nn.Module, tensors: Mapping[str, torch.Tensor]):
    """``module``'s own tensors replaced by ``tensors`` (a per-call clone's dicts), restored after."""
    old = {}
    for attr, t in tensors.items():
        where = module._parameters if attr in module._parameters else module._buffers
        old[attr] = (where, where[attr])
        where[attr] = t
    try:
        yield
    finally:
        for attr, (where, t) in old.items():
            where[attr] = t


def on_use(tensors: Callable[..., Mapping[str, torch.Tensor]], own: Mapping[str, str], qs: tuple[torch.Tensor, ...]):
    """``around(module, forward)`` for :func:`rotfn.model.call_as`: the module runs on ``tensors(*qs)``.

    Args:
        tensors: ``tensors(*qs) -> {key: Tensor}``, the module's tensors gathered and folded.
        own: ``{attribute: key}`` of the module's own tensors.
        qs: the rotations ``tensors`` depends on (differentiable).

    Returns:
        ``around(module, forward) -> forward``; the forward returns a tensor and takes tensors and other values.
    """

    def around(module: nn.Module, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            values = [*args, *kwargs.values()]
            at = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point]

            def compute(*t):
                folded = tensors(*t[:len(qs)])
                given = list(values)
                for i, v in zip(at, t[len(qs):], strict=True):
                    given[i] = v
                with _swapped(module, {attr: folded[key] for attr, key in own.items()}):
                    return forward(*given[:len(args)], **dict(zip(kwargs, given[len(args):], strict=True)))

            return _FoldOnUse.apply(compute, *qs, *(values[i] for i in at))

        return run

    return around
