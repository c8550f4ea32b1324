"""Which rotations of a plan are learned together, and how a learned one acts.

A *slot* is one learned matrix. Every plan entry (weight rotation or online transform)
whose role is learned belongs to the slot ``(role, base, scope)``: ``base`` is the entry's
rotation spec with the transpose taken off, ``scope`` the part of the model the role couples
(:data:`SCOPES`): None for R1 (one residual rotation from the embedding to lm_head), the
numbered block for R2 (``model.layers.3``: its V heads and the o_proj reading them), the
module for R4 and per_linear (a linear's online input and its folded weight). Entries that
must hold one matrix for the plan to stay exact therefore always share a slot; ``shared=True``
drops the scope (one matrix per role and spec).

A slot holds a ``b x b`` orthogonal ``Q`` (``b`` = the spec's block size), starting at ``I``.
With the base spec ``U = diag(s) blockdiag(T, ..., T)`` the learned rotation is

    U' = U blockdiag(Q, ..., Q) = diag(s) blockdiag(T Q, ..., T Q)

so the plan starts exactly where it was, a Hadamard base keeps its fast transform during
learning, and the result is again a block plus signs: ``from_matrix(T Q, n=n)`` with the
signs of ``U`` (an entry that held ``U.T`` gets ``U'.T``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch

from rotfn.errors import ArgumentError, message
from rotfn.functional import rotate
from rotfn.plans import Online, Plan, WeightRotation
from rotfn.specs import Rotation, from_matrix

__all__ = ["Slot", "Slots", "find_slots", "rotate_learned", "block_of", "scope_of", "SCOPES", "LEARNABLE_ROLES"]

#: What one learned matrix covers, by role: the whole model (R1 rotates the residual stream from the
#: embedding to lm_head), one numbered block (R2: the V heads and the o_proj reading them), or one
#: module (R4, per_linear: a linear's online input and its folded weight).
SCOPES = {"R1": "model", "R2": "layer", "R4": "module", "per_linear": "module"}
#: Roles whose rotations can be learned.
LEARNABLE_ROLES = tuple(SCOPES)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One learned matrix: a role, an untransposed base spec and a scope (see the module docstring)."""

    role: str
    base: Rotation
    scope: str | None

    def learned(self, q: torch.Tensor) -> Rotation:
        """The spec of ``U blockdiag(Q)``: ``from_matrix(T Q, n=n)`` with the base's signs."""
        block = self.base.block_matrix() @ q.detach().to(device="cpu", dtype=torch.float64)
        spec = from_matrix(block, n=self.base.n)
        return spec if self.base.signs is None else dataclasses.replace(spec, signs=self.base.signs)

    def label(self) -> str:
        return f"{self.role} {self.base!r}" + (f" in {self.scope}" if self.scope else "")


def block_of(name: str) -> str | None:
    """The numbered block a key or module name lies in (``"model.layers.3"``), or None.

    Example:
        >>> block_of("model.layers.3.self_attn.v_proj.weight"), block_of("lm_head.weight")
        ('model.layers.3', None)
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


@dataclasses.dataclass(frozen=True)
class Slots:
    """The learned slots of a plan and which entries use each.

    Attributes:
        slots: the slots, in first-use order.
        rotations: ``{index into plan.rotations: slot}``.
        online: ``{index into plan.online: slot}`` (all of kind ``"linear"``).
    """

    slots: tuple[Slot, ...]
    rotations: dict[int, Slot]
    online: dict[int, Slot]

    def training_plan(self, plan: Plan) -> Plan:
        """``plan`` without the learned online entries (learning puts its own site functions there)."""
        return dataclasses.replace(plan, online=tuple(o for i, o in enumerate(plan.online) if i not in self.online))

    def learned_plan(self, plan: Plan, qs: Mapping[Slot, torch.Tensor], note: str) -> Plan:
        """``plan`` with every learned entry's rotation replaced by its slot's learned spec."""
        specs = {s: s.learned(qs[s]) for s in self.slots}

        def spec(r: Rotation, s: Slot) -> Rotation:
            return specs[s].T if r.transposed else specs[s]

        rotations = tuple(dataclasses.replace(w, rotation=spec(w.rotation, self.rotations[i])) if i in self.rotations
                          else w for i, w in enumerate(plan.rotations))
        online = tuple(dataclasses.replace(o, rotation=spec(o.rotation, self.online[i])) if i in self.online else o
                       for i, o in enumerate(plan.online))
        return dataclasses.replace(plan, rotations=rotations, online=online, notes=(*plan.notes, note))


def scope_of(entry: WeightRotation | Online) -> str | None:
    """The part of the model one learned matrix of this entry covers (see :data:`SCOPES`).

    Example:
        >>> import rotfn
        >>> w = WeightRotation("model.layers.3.self_attn.v_proj.weight", rotfn.hadamard(4), "output", role="R2")
        >>> [scope_of(dataclasses.replace(w, role=role)) for role in ("R2", "per_linear", "R1")]
        ['model.layers.3', 'model.layers.3.self_attn.v_proj', None]
    """
    name = entry.key.rpartition(".")[0] if isinstance(entry, WeightRotation) else entry.site
    scope = SCOPES[entry.role]
    if scope == "module":
        return name
    return block_of(name) if scope == "layer" else None


def find_slots(fn: str, plan: Plan, roles: Iterable[str], *, shared: bool) -> Slots:
    """Group the plan's entries with a role in ``roles`` into slots (see the module docstring).

    Raises:
        ArgumentError: no entry has one of the roles; a learned online entry is not at a linear's input.
    """
    roles = tuple(roles)
    entries: list[tuple[str, int, WeightRotation | Online]] = [
        ("rotations", i, w) for i, w in enumerate(plan.rotations) if w.role in roles
    ] + [("online", i, o) for i, o in enumerate(plan.online) if o.role in roles and o.rotation is not None]
    if not entries:
        present = sorted({w.role for w in plan.rotations} | {o.role for o in plan.online if o.rotation is not None})
        raise ArgumentError(message(fn, "roles", f"roles of rotations in the plan, one of {present}", repr(roles),
                                    f"pass roles={tuple(r for r in present if r in LEARNABLE_ROLES)}"))
    for side, _, entry in entries:
        if side == "online" and entry.kind != "linear":
            raise ArgumentError(message(fn, "roles", "roles whose online rotations sit at linear inputs",
                                        f"{entry.role!r} rotates {entry.kind!r} at {entry.site}",
                                        f"leave {entry.role!r} out of roles (its rotation stays as it is)"))

    order: dict[Slot, None] = {}
    found: dict[str, dict[int, Slot]] = {"rotations": {}, "online": {}}
    for side, i, entry in entries:
        base = entry.rotation.T if entry.rotation.transposed else entry.rotation
        slot = Slot(entry.role, base, None if shared else scope_of(entry))
        order[slot] = None
        found[side][i] = slot
    return Slots(tuple(order), found["rotations"], found["online"])


def _blocks(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(Q, ..., Q)`` on the last dim, in x's dtype."""
    lead, n, b = x.shape[:-1], x.shape[-1], q.shape[-1]
    return (x.reshape(*lead, n // b, b) @ q.to(x.dtype)).reshape(*lead, n)


def rotate_learned(x: torch.Tensor, r: Rotation, q: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """``x @ R'`` along ``dim`` for an entry holding ``r``: ``R' = U blockdiag(Q)`` (``r = U``) or its transpose (``r = U.T``).

    Differentiable in x and q; the base goes through :func:`rotfn.rotate` (FWHT for Hadamards). The signature
    of :func:`rotfn.rotate` (``dim`` as a keyword), so a fold program runs it in place of the rotation.

    Example:
        >>> import torch, rotfn
        >>> r, q = rotfn.hadamard(8, block=4, seed=0), rotfn.orthogonal(4, seed=1).matrix()
        >>> x = torch.randn(3, 8, dtype=torch.float64)
        >>> learned = Slot("R1", r, None).learned(q)
        >>> torch.allclose(rotate_learned(x, r, q), rotfn.rotate(x, learned))
        True
        >>> torch.allclose(rotate_learned(x, r.T, q), rotfn.rotate(x, learned.T))
        True
    """
    if dim != -1:
        return rotate_learned(x.movedim(dim, -1), r, q).movedim(-1, dim)
    if r.transposed:
        return rotate(_blocks(x, q.T), r)
    return _blocks(rotate(x, r), q)
