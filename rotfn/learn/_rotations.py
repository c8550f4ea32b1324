"""rotations: learn a plan's rotations by Cayley SGD on the quantized model's loss, with torch.func.grad."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from rotfn import distributed
from rotfn._progress import progress_bar
from rotfn.errors import ArgumentError, FoldError, message
from rotfn.functional import qdq
from rotfn.learn._cayley import cayley_step, orthogonality_error
from rotfn.learn._data import Batch, check_batches, to_device
from rotfn.learn._loss import LossArg, Objective, run
from rotfn.learn._shards import Held, on_use, owners
from rotfn.learn._slots import LEARNABLE_ROLES, Slots, find_slots, rotate_learned
from rotfn.model import Site
from rotfn.plans import FoldedParams, Plan, check_keys, check_plan, describe, fold_program, folded_with, require_plan
from rotfn.transforms import check_params

__all__ = ["rotations", "LearnResult"]


@dataclasses.dataclass(frozen=True)
class LearnResult:
    """What :func:`rotations` returns.

    Attributes:
        plan: the plan with the learned rotations (``from_matrix`` specs); fold, call, save as any plan.
        losses: the training loss of each step (the mean over that step's batches, before its update).
        orthogonality: after each step, ``max |R R^T - I|`` (float64) over the learned rotations' blocks.
        slots: one line per learned matrix (role, base rotation, scope).
        loss: which loss was minimized (``"next-token cross-entropy"``, ``"relative squared error"``, ``"custom"``).
    """

    plan: Plan
    losses: tuple[float, ...]
    orthogonality: tuple[float, ...]
    slots: tuple[str, ...]
    loss: str

    def __repr__(self) -> str:
        steps = len(self.losses)
        trend = f"loss {self.losses[0]:.4g} -> {self.losses[-1]:.4g}" if steps else "no steps"
        worst = f", max |R R^T - I| {max(self.orthogonality):.1e}" if self.orthogonality else ""
        return (f"LearnResult({self.loss!r}, {steps} steps, {trend}{worst}, {len(self.slots)} learned matrices, "
                f"plan={self.plan!r})")


def _check_number(fn: str, arg: str, value, ok, what: str, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ArgumentError(message(fn, arg, what, repr(value), fix))


def _check_roles(fn: str, roles) -> tuple[str, ...]:
    if isinstance(roles, str) or not isinstance(roles, Sequence) or not roles:
        raise ArgumentError(message(fn, "roles", f"a non-empty tuple of roles from {LEARNABLE_ROLES}", repr(roles),
                                    "e.g. roles=('R1', 'R2') or roles=('per_linear',)"))
    unknown = [r for r in roles if r not in LEARNABLE_ROLES]
    if unknown:
        fix = ("R3 rotates q and k online inside attention and stays as the plan has it; "
               if "R3" in unknown else "") + f"choose from {LEARNABLE_ROLES}"
        raise ArgumentError(message(fn, "roles", f"roles from {LEARNABLE_ROLES}", repr(tuple(unknown)), fix))
    return tuple(roles)


def _learned_inputs(plan: Plan, slots: Slots, qs: Mapping) -> dict[Site, Callable]:
    """Site functions ``x -> qdq(x @ R', fmt)`` at the learned online entries (linear inputs)."""

    def learned(x, rotation, fmt, q):
        x = rotate_learned(x, rotation, q)
        return x if fmt is None else qdq(x, fmt)

    return {Site(plan.online[i].site): functools.partial(learned, rotation=plan.online[i].rotation,
                                                         fmt=plan.online[i].fmt, q=qs[slot])
            for i, slot in slots.online.items()}


def rotations(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    plan: Plan,
    data: Iterable[Batch],
    *,
    steps: int,
    lr: float,
    roles: Sequence[str] = ("R1", "R2"),
    loss: LossArg = None,
    momentum: float = 0.9,
    shared: bool = False,
    weights: str = "quantized",
    accumulate: int = 1,
    shard: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> LearnResult:
    """Learn the rotations of a quantized plan: Cayley SGD on the orthogonal group, gradients from torch.func.grad.

    Minimizes ``L(Q) = mean_batches loss(call(model, fold(params, plan(Q)), plan(Q), batch))`` over
    orthogonal ``Q``, where ``plan(Q)`` puts ``U blockdiag(Q)`` in place of every rotation ``U``
    with a role in ``roles`` (one ``Q`` per slot: one R1 for the model, one R2 per layer, one R4
    or per_linear rotation per linear, see :mod:`rotfn.learn`; ``Q = I`` at the start). Weights and activations are
    fake-quantized as the plan says (weights only with ``weights="quantized"``; ``"float"`` learns
    under unquantized weights, SpinQuant's W16A4 setting before GPTQ), with straight-through gradients (:func:`rotfn.qdq`); the
    weight side goes through the plan's own fold program (:func:`rotfn.transforms.compile_fold`,
    run with ``rotate=`` stand-ins that multiply by ``Q``), differentiable in ``Q``. Each step takes the next batch (cycling), computes
    ``dL/dQ`` with ``torch.func.grad`` and moves every ``Q`` by one Cayley step
    (:func:`rotfn.learn.cayley_step`), which keeps it orthogonal. The float model's function
    never changes: an unquantized plan(Q) computes the same outputs for every orthogonal Q.

    ``accumulate=k`` averages the gradients (and the losses) of ``k`` consecutive batches per step:
    step ``s`` uses batches ``s*k, ..., s*k + k - 1`` of the cycling list.

    Under a ``torch.distributed`` process group of ``N`` ranks (initialized by the caller, e.g.
    under ``torchrun``; rotfn starts none), every rank passes the same arguments and learning is
    data parallel: a step takes ``k * N`` batches, ``s*k*N + j`` for ``j < k*N``, and rank ``r``
    computes the gradients of those with ``j % N == r``; the gradients and losses are summed over
    the ranks in one all-reduce per step (float64, :func:`rotfn.distributed.sum_together`), so
    every rank takes the same step and the result is that of one process with ``accumulate=k*N``
    up to the order of the float64 sums. At the end the ranks' rotations are checked to be equal
    (:func:`rotfn.distributed.same`). A rank failing in its work makes every rank raise; the
    progress bar shows on rank 0 only.

    ``shard=True`` holds the frozen weights in pieces, as FSDP's ``fully_shard`` does: rank ``r``
    of ``N`` keeps ``1/N`` of the tensors of every module that owns a weight
    (:func:`rotfn.distributed.piece`) on ``device``; when such a module runs, its tensors are
    gathered from the ranks (one all-gather each), folded with the step's rotations (the same
    operations and bits as the whole fold) and dropped after its forward; its backward gathers
    and folds them again. A device holds ``1/N`` of the weights, one module's tensors and the
    activations, for one more gather and fold per module and step; the learned rotations are
    those without sharding up to the order of the float sums. Without a process group ``shard=True``
    folds on use in the same way (one module's folded weights at a time). The params may stay where they
    are (e.g. memory-mapped on the CPU, the same on every rank) with ``device`` the learning device.

    Args:
        model: the ``nn.Module`` the plan was built for (its tensors are not used or changed).
        params: unfolded ``rotfn.params(model)``; the device of its tensors is where learning runs.
        plan: a plan with weight and/or activation formats, e.g. ``rotfn.plans.quarot(model, r1=...,
            r2=..., weights=..., acts=...)`` or ``rotfn.plans.per_linear(model, rotation=..., ...)``.
        data: an iterable of batches (tensors or dicts of tensors, e.g. tokenizer output or
            :func:`rotfn.learn.calibration`); batches are moved to the params' device.
        steps: number of steps (>= 1).
        lr: Cayley SGD step size (> 0); the step turns each Q by about ``lr * |grad|``.
        roles: which rotations to learn, from ``("R1", "R2", "R4", "per_linear")``.
        loss: None for the default (next-token cross-entropy for causal LMs, the relative squared
            error to the float model's output otherwise; see :mod:`rotfn.learn`), ``"next_token"``,
            ``"fidelity"`` (the relative squared error, also for causal LMs: their logits), a
            :func:`rotfn.learn.fidelity` value (of a view of the outputs), or ``loss(outputs, batch) -> scalar``.
        momentum: Cayley SGD momentum in ``[0, 1)``.
        shared: learn one matrix per role and rotation spec for the whole model, instead of one per
            layer (R2) or per linear (R4, per_linear).
        weights: ``"quantized"`` (the plan's weight format during learning) or ``"float"`` (none;
            the learned plan keeps the format, for :func:`rotfn.calibrate` and GPTQ afterwards).
        accumulate: batches whose gradients each step averages, per rank (>= 1); a step of ``N``
            ranks averages ``accumulate * N``.
        shard: hold the frozen weights in pieces over the ranks and fold each module's when it runs.
        device: where learning runs (None: the params' device); the params are moved (their pieces, with
            ``shard=True``) there.
        progress: show a tqdm progress bar with the step and the loss (on rank 0 of a process group).

    Returns:
        A :class:`LearnResult`: ``.plan`` (the learned plan), ``.losses``, ``.orthogonality``.

    Raises:
        ArgumentError: bad steps, lr, momentum, accumulate, shard, device, roles (unknown, or none in the plan, or an online
            rotation inside attention), weights, loss or data (empty).
        DTypeError: a batch or params of another type.
        PlanError: plan not a Plan, built for another model, or changing tied keys differently (as for
            :func:`rotfn.fold`).
        FoldError: params already folded.
        SelectionError: params miss or add keys.
        DistributedError: under a process group, another rank failed (this rank raises its own
            error if it failed itself), stopped, or ended with other rotations.

    Example:
        >>> import torch, rotfn
        >>> _ = torch.manual_seed(0)
        >>> m = torch.nn.Sequential(torch.nn.Linear(32, 32))
        >>> w4a4 = {"weights": rotfn.intq(4), "acts": rotfn.intq(4)}
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(32, seed=0), **w4a4)
        >>> data = [torch.randn(16, 32)]
        >>> res = rotfn.learn.rotations(m, rotfn.params(m), plan, data, steps=5, lr=0.5,
        ...                             roles=("per_linear",), progress=False)
        >>> res.plan.online[0].rotation, len(res.losses), max(res.orthogonality) < 1e-6
        (Rotation(matrix, n=32, signs=given), 5, True)
        >>> y = rotfn.call(m, rotfn.fold(rotfn.params(m), res.plan), res.plan, data[0])   # an ordinary plan

    References:
        SpinQuant (Liu et al. 2024, arXiv 2405.16406); J. Li, F. Li, S. Todorovic, "Efficient Riemannian
        optimization on the Stiefel manifold via the Cayley transform", ICLR 2020.
    """
    fn = "learn.rotations"
    check_params(fn, params)
    require_plan(fn, plan)
    info = describe(model, fn=fn)
    check_plan(fn, info, plan)
    check_keys(fn, info, params)
    if folded_with(params) is not None:
        raise FoldError(message(fn, "params", "unfolded params", "params already folded",
                                "pass rotfn.params(model); learning folds the plan itself"))
    _check_number(fn, "steps", steps, lambda v: isinstance(v, int) and v >= 1, "an int >= 1", "e.g. steps=100")
    _check_number(fn, "lr", lr, lambda v: v > 0, "a finite number > 0", "e.g. lr=0.5")
    _check_number(fn, "momentum", momentum, lambda v: 0 <= v < 1, "a number in [0, 1)", "e.g. momentum=0.9")
    _check_number(fn, "accumulate", accumulate, lambda v: isinstance(v, int) and v >= 1, "an int >= 1",
                  "e.g. accumulate=4 (each step averages the gradients of 4 batches)")
    for arg, value in (("shared", shared), ("shard", shard), ("progress", progress)):
        if not isinstance(value, bool):
            raise ArgumentError(message(fn, arg, "a bool", repr(value)))
    if weights not in ("quantized", "float"):
        raise ArgumentError(message(fn, "weights", "'quantized' or 'float'", repr(weights),
                                    "weights='float' learns under unquantized weights (W16A4)"))
    slots = find_slots(fn, plan, _check_roles(fn, roles), shared=shared)
    # the learning plan differs from plan in the weight format only: slot indices hold for both
    learning = plan if weights == "quantized" else dataclasses.replace(plan, weights=None, quantized=())
    program = fold_program(fn, learning, params)  # the fold's own program (and tie checks), before any model runs
    device = _device(fn, device, params)
    rank, size = distributed.world()
    data = check_batches(fn, data)
    schedule = _schedule(len(data), steps, accumulate, rank, size)
    mine = sorted({i for step in schedule for i in step})  # only the batches this rank uses travel to the device
    local = {i: j for j, i in enumerate(mine)}
    batches = [to_device(data[i], device) for i in mine]
    training = slots.training_plan(learning)
    transforms = {plan.rotations[i].transform(): s for i, s in slots.rotations.items()}
    with distributed.together(fn):
        if shard:
            forward = _Sharded(fn, model, params, device, program, transforms)
        else:
            params = {k: t.to(device) for k, t in params.items()}
            forward = functools.partial(_whole, fn, model, params, program, transforms)
        objective = Objective(fn, model, params, batches, loss, floats=forward.floats if shard else None)

    def step_loss(qs: tuple[torch.Tensor, ...], i: int):
        by_slot = dict(zip(slots.slots, qs, strict=True))
        outputs = forward(training, batches[i], _learned_inputs(plan, slots, by_slot), by_slot)
        value = objective(outputs, i)
        return value, value.detach()

    grad = torch.func.grad(step_loss, has_aux=True)
    qs = tuple(torch.eye(s.base.block_size, dtype=torch.float64, device=device) for s in slots.slots)

    def summed(step: int) -> list[torch.Tensor]:
        """This rank's gradients and loss of ``step``, summed over its batches of the step."""
        total = None
        for i in schedule[step]:
            grads, value = grad(qs, local[i])
            part = [*grads, value.double()]
            total = part if total is None else [a + b for a, b in zip(total, part, strict=True)]
        return total

    velocity = tuple(torch.zeros_like(q) for q in qs)
    blocks = [s.base.block_matrix(device=device) for s in slots.slots]
    like = [*qs, torch.zeros((), dtype=torch.float64, device=device)]
    losses, ortho = [], []
    bar = progress_bar(range(steps), desc=fn, disable=not progress or not distributed.first_writes())
    for step in bar:
        *grads, value = distributed.sum_together(fn, functools.partial(summed, step), like)
        n = accumulate * size  # batches in the step, over all ranks
        moved = [cayley_step(q, g / n, v, lr=lr, momentum=momentum)
                 for q, g, v in zip(qs, grads, velocity, strict=True)]
        qs, velocity = tuple(m[0] for m in moved), tuple(m[1] for m in moved)
        losses.append(value.item() / n)
        ortho.append(max(orthogonality_error(t @ q) for t, q in zip(blocks, qs, strict=True)))
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
    distributed.same(fn, "rotations", qs)
    note = (f"learned {', '.join(roles)} ({len(slots.slots)} matrices): {steps} Cayley SGD steps, lr {lr:g}, "
            f"{objective.kind} {losses[0]:.4g} -> {losses[-1]:.4g}")
    learned = slots.learned_plan(plan, dict(zip(slots.slots, qs, strict=True)), note)
    return LearnResult(learned, tuple(losses), tuple(ortho), tuple(s.label() for s in slots.slots), objective.kind)


def _device(fn: str, device, params) -> torch.device:
    if device is None:
        return next(iter(params.values())).device
    try:
        return torch.device(device)
    except (TypeError, RuntimeError):
        raise ArgumentError(message(fn, "device", "None, a torch.device or a device name", repr(device),
                                    "e.g. device='cuda' (under torchrun: f'cuda:{LOCAL_RANK}')")) from None


def _rotate(transforms: Mapping, by_slot: Mapping) -> dict:
    """``rotate=`` stand-ins of the fold program: each learned rotation's transform multiplies by its ``Q``."""
    return {t: functools.partial(rotate_learned, q=by_slot[s]) for t, s in transforms.items() if s in by_slot}


def _whole(fn: str, model, params, program, transforms, plan: Plan, batch: Batch, sites, by_slot):
    """The model's outputs on ``batch`` under the learning plan: every weight folded with the ``Q`` s, then the call."""
    folded = FoldedParams(program.run(params, rotate=_rotate(transforms, by_slot), fn=fn), plan)
    return run(fn, model, folded, plan, batch, sites)


class _Sharded:
    """:func:`_whole` with the weights held in pieces (``shard=True``): each module that owns a weight
    gathers and folds its tensors when it runs (:mod:`rotfn.learn._shards`); the rest is folded up front."""

    def __init__(self, fn: str, model, params, device, program, transforms):
        self.fn, self.model, self.program, self.transforms = fn, model, program, transforms
        self.own = owners(model, params)
        on_use_keys = {k for own in self.own.values() for k in own.values()}
        self.held = Held(params, device, on_use_keys)
        self.upfront = [k for k in params if k not in on_use_keys]
        # the learned rotations each module's fold multiplies by: the Q s its autograd node takes
        self.uses = {name: [s for s in dict.fromkeys(transforms.get(t) for t in program.rotations(own.values()))
                            if s is not None] for name, own in self.own.items()}

    def _read(self, key: str) -> torch.Tensor:
        return self.held.read(self.fn, key)

    def _fold(self, name: str, *qs: torch.Tensor) -> dict[str, torch.Tensor]:
        rotate = _rotate(self.transforms, dict(zip(self.uses[name], qs, strict=True)))
        return self.program.values(self._read, self.own[name].values(), rotate=rotate)

    def _gathered(self, name: str) -> dict[str, torch.Tensor]:
        return {k: self._read(k) for k in self.own[name].values()}

    def __call__(self, plan: Plan, batch: Batch, sites, by_slot):
        values = {**self.held.stand_ins(),
                  **self.program.values(self._read, self.upfront, rotate=_rotate(self.transforms, by_slot))}
        around = {name: on_use(functools.partial(self._fold, name), own, tuple(by_slot[s] for s in self.uses[name]))
                  for name, own in self.own.items()}
        return run(self.fn, self.model, FoldedParams(values, plan), plan, batch, sites, around)

    def floats(self, batch: Batch):
        """The float model's outputs (the fidelity loss's references), its weights gathered on use too."""
        around = {name: on_use(functools.partial(self._gathered, name), own, ()) for name, own in self.own.items()}
        return run(self.fn, self.model, self.held.stand_ins(), None, batch, None, around)


def _schedule(n_batches: int, steps: int, accumulate: int, rank: int, size: int) -> list[list[int]]:
    """The batch numbers of each step on this rank: step ``s`` takes the ``accumulate * size`` batches
    ``s * accumulate * size + j`` of the cycling list, and this rank those with ``j % size == rank``."""
    per_step = accumulate * size
    return [[(s * per_step + j) % n_batches for j in range(rank, per_step, size)] for s in range(steps)]
