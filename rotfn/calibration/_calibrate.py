"""``rotfn.calibrate``: GPTQ-rounded weights for a plan, from calibration batches run through the model bridge."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from rotfn import distributed
from rotfn._progress import progress_bar
from rotfn.calibration._gptq import gptq
from rotfn.errors import ArgumentError, FormatError, PlanError, message
from rotfn.functional import dequantize, quantize
from rotfn.learn import check_batches, to_device
from rotfn.model import Site, call_as
from rotfn.ops.quant import fp8_scale, nvfp4_global_from_amax, nvfp4_shared_global_scale
from rotfn.plans import FoldedParams, Plan, check_model, describe, fold, require_plan
from rotfn.specs import QTensor
from rotfn.specs.formats import FP8, NVFP4, Format, nvfp4
from rotfn.transforms import shares_global_scale, tensor_wide

__all__ = ["calibrate", "Calibration", "ACTIVATIONS"]

#: What the quantized linears' inputs are during collection.
ACTIVATIONS = ("float", "quantized")

# a module name ending in a number is a block (a decoder layer): "model.layers.3", "encoder.layer.0"
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Calibration:
    """The rounded weights of a plan's quantized linears, for :func:`rotfn.fold` (``weights_by=``).

    Attributes:
        plan: the plan the weights were rounded for (``fold`` checks it is the one it folds with).
        weights: ``{key: QTensor}``: each quantized weight, folded by the plan and rounded to its
            ``weights`` format (GPTQ where statistics were collected, round to nearest in ``rtn``).
        rtn: keys rounded to nearest because no input statistics reach them (fused experts).
        tokens: calibration tokens (rows of the linears' inputs) each Hessian was collected over.
        settings: the GPTQ and collection settings used, as keyword arguments of :func:`calibrate`.
        hessians: ``{key: [in, in] float64}`` when ``keep_hessians=True``, else None.
        input_amax: ``{key: 0-d float32}``: ``max |x|`` over the finite inputs the linear of weight
            ``key`` received during collection (as the plan sees them, see :func:`calibrate`), for
            the static activation scales of :meth:`input_scale`.
        digests: ``{key: digest}`` of each folded weight that was rounded (checked by :meth:`round`).
        unrouted: ``{key: (expert, ...)}``: the experts of fused experts' weights that no calibration token
            reached, each rounded to nearest (the other experts by GPTQ).
    """

    plan: Plan
    weights: Mapping[str, QTensor]
    rtn: tuple[str, ...]
    tokens: int
    settings: Mapping[str, object]
    hessians: Mapping[str, torch.Tensor] | None = None
    input_amax: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    digests: Mapping[str, str] = dataclasses.field(default_factory=dict)
    unrouted: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def round(self, key: str, w: torch.Tensor) -> QTensor:
        """The rounded weight ``key`` (``w``: the same weight as folded now), for :func:`rotfn.fold`.

        Raises:
            PlanError: no rounded weight for ``key``, or ``w`` is not the weight that was rounded
                (other params than the ones calibrated).
        """
        q = self.weights.get(key)
        if q is None:
            raise PlanError(message("fold", "weights_by", f"a calibration that rounded {key!r}", "one without it",
                                    "calibrate with the plan you fold with"))
        if tuple(w.shape) != tuple(q.shape) or _digest(w.to(q.dtype)) != self.digests[key]:
            raise PlanError(message("fold", "weights_by", f"a calibration of these params (weight {key!r})",
                                    "one made from other weights", "calibrate the params you fold"))
        return q

    def input_scale(self, key: str, fmt: Format) -> torch.Tensor:
        """The static tensor-wide scale of activation format ``fmt`` for the input of weight ``key``'s linear.

        From the calibration's :attr:`input_amax` ``a``: NVFP4's global scale
        ``s_g = a / (448 * 6)`` (:func:`rotfn.ops.quant.nvfp4_global_from_amax`; rounded up to a power
        of two for ``nvfp4("pow2")``), FP8's tensor scale
        ``a / 448`` (1 when ``a`` is 0), the scales a serving engine applies to the inputs
        instead of measuring each batch.

        Returns:
            A 0-d float32 tensor.

        Raises:
            PlanError: no input statistics for ``key`` (not a calibrated linear, or a fused expert).
            FormatError: ``fmt`` is not :func:`rotfn.nvfp4` or :func:`rotfn.fp8`.
        """
        amax = self.input_amax.get(key)
        if amax is None:
            raise PlanError(message("Calibration.input_scale", "key", "a weight whose inputs were collected",
                                    repr(key), f"pick one of {sorted(self.input_amax)[:3]} ..."))
        if isinstance(fmt, NVFP4):
            return nvfp4_global_from_amax(amax, pow2=fmt.global_scale == "pow2")
        if isinstance(fmt, FP8):
            return fp8_scale(amax, fmt.scale_dtype)
        raise FormatError(message("Calibration.input_scale", "fmt", "rotfn.nvfp4() or rotfn.fp8() (formats with a "
                                  "tensor-wide activation scale)", repr(fmt)))

    def __repr__(self) -> str:
        gptq_keys = len(self.weights) - len(self.rtn)
        unrouted = sum(len(e) for e in self.unrouted.values())
        return (f"Calibration({self.plan.weights!r}: {gptq_keys} weights by GPTQ, {len(self.rtn)} to nearest, "
                + (f"{unrouted} unrouted experts to nearest, " if unrouted else "")
                + f"{self.tokens} tokens, sequential={self.settings['sequential']})")


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _bytes(text: str) -> torch.Tensor:
    """The blake2b digest of ``text`` as 16 uint8s (what the ranks compare)."""
    return torch.frombuffer(bytearray(hashlib.blake2b(text.encode(), digest_size=16).digest()), dtype=torch.uint8)


def _owners(keys: list[str], out_in: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The rank that solves each key's GPTQ problem (:func:`rotfn.distributed.assign` by the cost of a solve,
    ``out * in^2 + in^3`` per expert: the column loop and the Cholesky factor)."""
    costs = [out_in[k].shape[:-2].numel() * (out + inp) * inp**2 for k in keys
             for out, inp in [out_in[k].shape[-2:]]]
    return dict(zip(keys, distributed.assign(costs), strict=True))


class _Stop(Exception):
    """Raised at a block's output to end a forward pass early (sequential mode)."""


def calibrate(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    plan: Plan,
    batches: Iterable,
    *,
    sequential: bool = False,
    activations: str = "float",
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    scale_search: str | None = None,
    precision: str = "float64",
    keep_hessians: bool = False,
    progress: bool = True,
) -> Calibration:
    r"""Round a plan's quantized weights with GPTQ against the inputs the plan gives them.

    For every weight the plan quantizes (``plan.quantized``, format ``plan.weights``), the
    Hessian :math:`H = X^\top X / N` of the inputs its linear receives is collected over the
    batches, as the plan sees them: with the plan's weight side folded (``fold`` without the
    weight rounding) and its online transforms applied (R3, R4, per-linear input rotations, and,
    with ``activations="quantized"``, the activation formats; ``"float"``, the default, collects
    unquantized activations). Then :func:`rotfn.gptq` rounds the folded weight against it.

    ``sequential=True`` goes block by block (a block: the linears under one numbered module,
    a decoder layer): block ``i``'s Hessians come from a model whose blocks ``< i`` are already
    rounded, as GPTQ and QuaRot do, and the forward stops after block ``i``; one block's
    Hessians are held at a time, and the model runs once per block. Otherwise one pass collects
    every Hessian at once (faster; memory for all of them). Linears outside numbered blocks
    (``lm_head``) come last. Fused experts (3-D weights ``[E, out, in]``) get one Hessian per expert,
    over the tokens the router sends it (as the plan sees them, inside the experts' loop), and GPTQ
    rounds each expert's weight against its own; an expert no token reaches is rounded to nearest
    (listed in ``unrouted``: give more data, or the router never picks it). A fused experts' weight
    holds ``E`` Hessians (``E x in x in`` float64), so MoE models want ``sequential=True``: one
    layer's at a time. Experts whose format has
    one scale over the whole tensor other than NVFP4's global scale (``fp8("tensor")``) are rounded
    to nearest and listed in ``rtn``.

    Under a ``torch.distributed`` process group of ``N`` ranks (initialized by the caller, e.g.
    under ``torchrun``; rotfn starts none), every rank passes the same arguments and runs its share
    of the batches (:func:`rotfn.distributed.share`: batches ``r, r + N, ...`` on rank ``r``); the
    float64 sums of :math:`X^\top X`, the token counts and the maxima ``max |x|`` are reduced over
    the ranks before GPTQ (per block when sequential); the GPTQ solves of a block are split over the
    ranks (the largest first, each to the least loaded rank) and their results sent to every rank,
    so every rank returns the same Calibration. The params are checked to be equal on every rank
    (a digest) before any work. The
    bound against one process with all batches: the Hessians are the same float64 sums taken in
    another order, a relative difference of order ``1e-15``; the rounded codes are equal unless a
    weight sits on a rounding boundary within that difference (sequential mode passes such a
    difference on to later blocks). A rank failing in its work makes every rank raise.

    The recipe is one expression: ``rotfn.fold(params, plan, weights_by=rotfn.calibrate(model,
    params, plan, batches))``; fold stays the one engine and places the rounded weights.

    Args:
        model: the ``nn.Module`` the plan was built for (not changed).
        params: unfolded ``rotfn.params(model)``.
        plan: a plan with ``weights=`` a format and quantized keys.
        batches: an iterable of batches (a tensor: the model's positional input; a dict: its
            keyword inputs), e.g. :func:`rotfn.learn.calibration`; moved to the params' device.
            Under a process group, the same on every rank (each runs its share).
        sequential: block by block (see above).
        activations: ``"float"`` or ``"quantized"`` (see above).
        block_size: as for :func:`rotfn.gptq`.
        damp: as for :func:`rotfn.gptq`.
        act_order: as for :func:`rotfn.gptq`.
        static_groups: as for :func:`rotfn.gptq`.
        scale_search: as for :func:`rotfn.gptq`.
        precision: as for :func:`rotfn.gptq`.
        keep_hessians: keep the Hessians in the result (all of them: memory).
        progress: a tqdm bar over blocks (sequential) or keys on stderr (on rank 0 of a process group).

    Returns:
        A :class:`Calibration` for ``rotfn.fold(params, plan, weights_by=...)``.

    Raises:
        PlanError: the plan quantizes no weight, or does not fit model or params.
        ArgumentError: bad batches, ``activations`` or GPTQ settings (as :func:`rotfn.gptq`);
            a Hessian not positive definite after damping.
        RotfnError: what :func:`rotfn.call` raises for the model, params and batches.
        DistributedError: under a process group, another rank failed (this rank raises its own
            error if it failed itself) or stopped; the ranks were given other params.

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard, weights=rotfn.intq(4, group=32))
        >>> calib = rotfn.calibrate(m, rotfn.params(m), plan, [torch.randn(256, 64)], progress=False)
        >>> folded = rotfn.fold(rotfn.params(m), plan, weights_by=calib)
        >>> sorted(calib.weights)
        ['0.weight', '2.weight']
    """
    fn = "calibrate"
    check_model(fn, model)
    require_plan(fn, plan)
    if plan.weights is None or not plan.quantized:
        raise PlanError(message(fn, "plan", "a plan that quantizes weights", f"{plan!r} (no weight format)",
                                "build it with weights=, e.g. rotfn.plans.quarot(model, ..., weights=rotfn.intq(4, group=128))"))
    if activations not in ACTIVATIONS:
        raise ArgumentError(message(fn, "activations", f"one of {ACTIVATIONS}", repr(activations)))
    settings = dict(block_size=block_size, damp=damp, act_order=act_order, static_groups=static_groups,
                    scale_search=scale_search, precision=precision)
    gptq(torch.zeros(1, plan.weights.group or 1), None, plan.weights, **settings)  # settings checked before any work
    collecting = dataclasses.replace(plan, weights=None, quantized=())
    if activations == "float":
        collecting = dataclasses.replace(
            collecting, acts=None, online=tuple(dataclasses.replace(o, fmt=None) for o in collecting.online))
    folded = fold(params, collecting, precision=precision)
    # every weight as [out, in], what gptq and the fold's rounding (Plan.transform) see; Conv1D's are [in, out]
    out_in = {k: folded[k].mT if k in plan.transposed else folded[k] for k in plan.quantized}
    device = next(iter(params.values())).device if params else torch.device("cpu")
    data = [to_device(b, device) for b in distributed.share(check_batches(fn, batches))]
    info = describe(model, fn=fn)
    linears = {name for name, _ in info.linears}
    points = {f"{m}.{p}": (m, point) for m, p_in, p_down in info.experts
              for p, point in ((p_in, "expert_in"), (p_down, "expert_down"))}
    # fused experts: GPTQ per expert where each expert's rows round on their own (per-group, per-row formats, or
    # NVFP4 with the global scale of the whole tensor fixed first)
    per_expert = isinstance(plan.weights, NVFP4) or not tensor_wide(plan.weights)
    stats = [k for k in plan.quantized if (k.rpartition(".")[0] in linears and folded[k].ndim == 2)  # "weight": root
             or (k in points and folded[k].ndim == 3 and per_expert)]
    rtn = tuple(k for k in plan.quantized if k not in set(stats))
    blocks = (_blocks(stats) if sequential else {None: stats}) if stats else {}  # nothing to collect: all to nearest

    current = dict(folded)
    fmts = _rounding_formats(plan, folded)
    if shares_global_scale(plan.weights):  # an expert's rows take the global scale of all experts, as fold's
        fmts.update({k: nvfp4(nvfp4_shared_global_scale([out_in[k]], plan.weights).item())
                     for k in stats if out_in[k].ndim == 3})
    weights: dict[str, QTensor] = {k: _as(quantize(out_in[k], fmts.get(k, plan.weights)), plan) for k in rtn}
    kept: dict[str, torch.Tensor] = {}
    amax: dict[str, torch.Tensor] = {}
    tokens = 0
    digests = {k: _digest(out_in[k]) for k in plan.quantized}
    rank, size = distributed.world()
    if size > 1:  # before any work: GPTQ on one rank rounds the weights of all
        distributed.same(fn, "params", [_bytes("".join(digests.values()))])
    bar = progress_bar(blocks.items(), desc=fn, disable=not progress or not distributed.first_writes(), leave=False)
    unrouted: dict[str, tuple[int, ...]] = {}
    for block, keys in bar:
        routed: dict[str, list[int]] = {}
        hessians, tokens = _collect(model, FoldedParams(current, collecting), collecting, data, keys, block, amax,
                                    {k: out_in[k] for k in keys}, plan.shared_scales, points, routed)
        unrouted.update({k: tuple(e for e, n in enumerate(counts) if not n) for k, counts in routed.items()
                         if not all(counts)})
        owners = _owners(keys, out_in)
        with distributed.together(fn):
            mine = {key: _as(_round(out_in[key], hessians[key], fmts.get(key, plan.weights), routed.get(key), settings),
                             plan) for key in keys if owners[key] == rank}
        if size > 1:  # each rank solved its keys: every rank takes the others' results
            solved = distributed.merge(fn, {k: q.to("cpu") for k, q in mine.items()})
            mine = {k: solved[k].to(device) for k in keys}
        for key in keys:
            weights[key] = mine[key]
            rounded = dequantize(mine[key], folded[key].dtype)
            current[key] = rounded.mT if key in plan.transposed else rounded
            if keep_hessians:
                kept[key] = hessians[key]
        del hessians  # before the next block's sums
    settings.update(sequential=sequential, activations=activations)
    return Calibration(plan, weights, rtn, tokens, settings, kept if keep_hessians else None, amax, digests, unrouted)


def _round(w: torch.Tensor, h: torch.Tensor, fmt: Format, routed: list[int] | None, settings) -> QTensor:
    """GPTQ of ``w`` against ``h``; fused experts' ``[E, out, in]`` one expert at a time (``routed``: each
    expert's token count; an expert without tokens is rounded to nearest), stacked as one QTensor."""
    if routed is None:
        return gptq(w, h, fmt, **settings)
    parts = [gptq(w[e], h[e], fmt, **settings) if n else quantize(w[e], fmt) for e, n in enumerate(routed)]
    return _stack(parts)


def _stack(parts: list[QTensor]) -> QTensor:
    """QTensors of equal shape and format as one with a new leading dim (codes, scales and zero points stacked;
    the global scale, one for all, of the first)."""
    first = parts[0]

    def joined(name: str):
        return None if getattr(first, name) is None else torch.stack([getattr(q, name) for q in parts])

    return dataclasses.replace(first, codes=joined("codes"), scales=joined("scales"), zero_points=joined("zero_points"),
                               shape=torch.Size([len(parts), *first.shape]))


def _rounding_formats(plan: Plan, folded: Mapping[str, torch.Tensor]) -> dict[str, Format]:
    """``{key: format}`` for the keys of fused groups (:attr:`Plan.shared_scales`): NVFP4 with the global scale
    measured over the group fixed (as :func:`rotfn.fold` rounds them); other keys round with the plan's format."""
    if not shares_global_scale(plan.weights):
        return {}
    out: dict[str, Format] = {}
    for group in plan.shared_scales:
        out.update(dict.fromkeys(group, nvfp4(nvfp4_shared_global_scale([folded[k] for k in group], plan.weights).item())))
    return out


def _as(q: QTensor, plan: Plan) -> QTensor:
    """``q`` labelled with the plan's weight format (a fused group's codes keep it, with the group's global scale)."""
    return dataclasses.replace(q, format=plan.weights)


def _blocks(keys: list[str]) -> dict[str | None, list[str]]:
    """Keys grouped by their block (the module name up to its first number), in model order; the rest last."""
    out: dict[str | None, list[str]] = collections.defaultdict(list)
    rest = []
    for key in keys:
        m = _BLOCK.match(key)
        (out[m.group(1)] if m else rest).append(key)
    out = dict(out)
    if rest:
        out[None] = rest
    return out


def _collect(model, params, plan, data, keys, stop_after, amax, out_in, shared=(), points=None,
             routed=None) -> tuple[dict[str, torch.Tensor], int]:
    """``{key: X^T X / N}`` (float64) of the inputs of ``keys``' linears over ``data``; also N.

    Fused experts' keys (in ``points``: ``{key: (module, point)}``) get ``[E, in, in]``, one Hessian per
    expert over its own tokens, and ``routed[key]`` each expert's token count (an expert without
    tokens: zeros). Also puts each key's ``max |x|`` over the finite inputs into ``amax``. Under a process group
    the sums, counts and maxima of the ranks' shares of the data are reduced first, so every rank
    returns the statistics of all batches (``out_in``: each key's ``[out, in]`` weight, whose input
    size and device a rank whose share never reaches the linear needs).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(keys, 0)
    # a fused group's linears (q/k/v, gate/up) read one input tensor: its X^T X is computed once and kept
    # until the group's last member took it
    groups = {k: len(g) for g in shared for k in g if all(m in counts for m in g)}
    last: dict = {"x": None, "version": -1, "xtx": None, "left": 0}

    def recorder(key):
        def record(x):
            rows = x.detach().reshape(-1, x.shape[-1]).double()
            if key not in groups:
                sums[key] = rows.T @ rows if key not in sums else sums[key].addmm_(rows.T, rows)
            else:
                if not (last["left"] and last["x"] is x and last["version"] == x._version):
                    last.update(x=x, version=x._version, xtx=rows.T @ rows, left=groups[key])
                sums[key] = last["xtx"].clone() if key not in sums else sums[key].add_(last["xtx"])
                last["left"] -= 1
                if not last["left"]:
                    last.update(x=None, xtx=None)
            seen(key, rows)
        return record

    def seen(key, rows):
        """Count ``rows`` for ``key`` and take their finite ``max |x|`` into ``amax``."""
        counts[key] += rows.shape[0]
        if rows.numel():
            top = torch.where(torch.isfinite(rows), rows.abs(), 0).max().float()
            amax[key] = top if key not in amax else torch.maximum(amax[key], top)

    def expert_recorder(key):
        experts, _, n = out_in[key].shape

        def record(x, e):
            rows = x.detach().reshape(-1, x.shape[-1]).double()
            if key not in sums:
                sums[key] = torch.zeros(experts, n, n, dtype=torch.float64, device=rows.device)
                routed[key] = [0] * experts
            sums[key][e].addmm_(rows.T, rows)
            routed[key][e] += rows.shape[0]
            seen(key, rows)
        return record

    def stop(_):
        raise _Stop

    points = points or {}
    sites = {Site(*points[k]) if k in points else Site(k.rpartition(".")[0]): (
        expert_recorder(k) if k in points else recorder(k)) for k in keys}
    if stop_after is not None:
        sites[Site(stop_after, "output")] = stop
    with distributed.together("calibrate"), torch.no_grad():
        for batch in data:
            try:
                if isinstance(batch, Mapping):
                    call_as("calibrate", model, params, plan, sites, kwargs=batch)
                else:
                    call_as("calibrate", model, params, plan, sites, (batch,))
            except _Stop:
                pass
    for k in keys:  # an expert key no token reached (on this rank) still has its per-expert counts
        if k in points and k not in routed:
            routed[k] = [0] * out_in[k].shape[0]
    if distributed.is_distributed():
        _reduce(keys, sums, counts, amax, out_in, routed)
    missing = [k for k in keys if counts[k] == 0]
    if missing:
        raise PlanError(message("calibrate", "batches", "batches that reach every quantized linear",
                                f"batches that never reach {missing[:3]}", "check the model runs these linears"))
    n = next((counts[k] for k in keys if k not in points), counts[keys[0]])
    out = {}
    for k in keys:
        if k in points:  # each expert's sum over its own tokens (none: zeros, rounded to nearest)
            per = torch.tensor(routed[k], dtype=torch.float64, device=sums[k].device).clamp(min=1)
            out[k] = sums[k] / per[:, None, None]
        else:
            out[k] = sums[k] / counts[k]
    return out, n


def _reduce(keys, sums, counts, amax, out_in, routed) -> None:
    """Sum ``sums``, ``counts`` and the experts' ``routed`` counts and take the max of ``amax`` over the ranks, in
    place (of rotfn's own dicts)."""
    device = out_in[keys[0]].device
    for k in keys:  # one at a time: one extra Hessian in memory, not all of them
        n = out_in[k].shape[-1]
        shape = (out_in[k].shape[0], n, n) if k in routed else (n, n)
        local = sums[k] if k in sums else torch.zeros(shape, dtype=torch.float64, device=device)
        (sums[k],) = distributed.all_reduce("calibrate", [local])
    experts = [k for k in keys if k in routed]
    flat = [counts[k] for k in keys] + [c for k in experts for c in routed[k]]
    (total,) = distributed.all_reduce("calibrate", [torch.tensor(flat, dtype=torch.int64)])
    total = total.tolist()
    counts.update(zip(keys, total[:len(keys)], strict=True))
    at = len(keys)
    for k in experts:
        routed[k] = total[at:at + len(routed[k])]
        at += len(routed[k])
    tops = torch.stack([amax.get(k, torch.zeros((), device=device)).to(device) for k in keys])
    (tops,) = distributed.all_reduce("calibrate", [tops], op="max")
    amax.update({k: top.clone() for k, top in zip(keys, tops, strict=True) if counts[k]})
