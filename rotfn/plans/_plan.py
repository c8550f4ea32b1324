"""The Plan value: where rotations, norm fusions and quantizers go in one model, as data.

A plan has a weight side (folded offline by :func:`rotfn.fold`) and an online
side (applied by :func:`rotfn.call` for one call):

* ``rotations``, :class:`WeightRotation` entries: one parameter key, one :class:`rotfn.Rotation`, one side
  (``"input"``: ``W @ R``; ``"output"``: ``R.T @ W`` and ``b @ R``), optionally per
  head and on a span of rows;
* :class:`NormFusion`: a norm scale folded into the linears that read it;
* weight qdq: ``weights`` (a format) on the keys in ``quantized``;
* :class:`Online`: at a module, ``x -> qdq(x @ R, fmt)`` on a linear's input
  (``"linear"``), on queries and keys after RoPE (``"qk"``), on the keys or
  values entering attention (``"key"``, ``"value"``: KV-cache quantization), or
  inside fused experts (``"experts_in"``, ``"experts_down"``).

Plans are frozen, compare by value, print as a table (``print(plan)``) and round
trip through :meth:`Plan.to_dict` / :meth:`Plan.from_dict` (JSON-safe; rotation
specs are stored once each in a table, ``"rotation_table"``, that entries index).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Iterable

from rotfn._table import html_table
from rotfn.errors import PlanError, SpecError, message
from rotfn.specs.formats import Format, format_from_dict
from rotfn.specs.rotation import Rotation
from rotfn.transforms import (
    Chain,
    Where,
    chain,
    fuse_norm,
    qdq_weights,
    rotate_input,
    rotate_output,
    shares_global_scale,
)

__all__ = ["Plan", "WeightRotation", "NormFusion", "Online", "signature", "upgrade_plan_dict", "PLAN_VERSION",
           "ONLINE_KINDS"]

PLAN_VERSION = 2
# version 1 called the weight-side entries "weight" and the rotation table "rotations"
_V1_KEYS = {"weight": "rotations", "rotations": "rotation_table"}
ONLINE_KINDS = ("linear", "qk", "key", "value", "experts_in", "experts_down")
_SIDES = ("input", "output")


def signature(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """A short hash of parameter and buffer names with their shapes (not dtypes or values).

    Two models (or a model and its params dict) agree on it when they have the
    same architecture and sizes, so a plan built for one fits the other.

    Example:
        >>> signature([("w", (2, 3))]) == signature([("w", (2, 3))]) != signature([("w", (3, 2))])
        True
    """
    text = "\n".join(f"{name}:{tuple(shape)}" for name, shape in sorted(shapes))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class WeightRotation:
    """Rotate one parameter offline.

    Attributes:
        key: parameter key, e.g. ``"model.layers.0.self_attn.q_proj.weight"``.
        rotation: the :class:`rotfn.Rotation`.
        side: ``"input"`` (``W @ R``, last dim) or ``"output"`` (``R.T @ W`` on dim -2, ``b @ R`` for 1-D).
        per_head: rotate each consecutive chunk of ``rotation.n`` (attention heads).
        span: ``(start, stop)`` of the rotated dim, or None for all of it.
        role: a label for printing (``"R1"``, ``"R2"``, ``"per_linear"``, ...).
    """

    key: str
    rotation: Rotation
    side: str
    per_head: bool = False
    span: tuple[int, int] | None = None
    role: str = ""

    def transform(self, *, transposed: bool = False):
        """The :mod:`rotfn.transforms` primitive of this entry (``transposed``: a weight stored ``[in, out]``)."""
        where = Where.names([self.key])
        if self.side == "input":
            return rotate_input(self.rotation, where, per_head=self.per_head, transposed=transposed)
        return rotate_output(self.rotation, where, per_head=self.per_head, span=self.span, transposed=transposed)


@dataclasses.dataclass(frozen=True)
class NormFusion:
    """Fold the norm scale ``norm`` (and LayerNorm bias ``bias``) into the weights ``into``."""

    norm: str
    into: tuple[str, ...]
    bias: str | None = None

    def transform(self):
        """The :func:`rotfn.transforms.fuse_norm` primitive that applies this entry."""
        return fuse_norm(self.norm, Where.names(self.into), bias=self.bias)


@dataclasses.dataclass(frozen=True)
class Online:
    """An activation-side transform ``x -> qdq(x @ R, fmt)`` applied during :func:`rotfn.call`.

    Attributes:
        site: module name (a linear, an attention module, or a fused experts module).
        kind: ``"linear"`` (the linear's input), ``"qk"`` (queries and keys after RoPE),
            ``"key"`` / ``"value"`` (the keys / values entering attention, after ``"qk"``: what a
            KV cache holds), ``"experts_in"`` / ``"experts_down"`` (inputs of the fused experts'
            gate_up / down).
        rotation: a :class:`rotfn.Rotation` or None.
        fmt: a format for activation qdq after the rotation, or None.
        role: a label for printing.
    """

    site: str
    kind: str
    rotation: Rotation | None = None
    fmt: Format | None = None
    role: str = ""


@dataclasses.dataclass(frozen=True, repr=False)
class Plan:
    """Which rotation, norm fusion and quantizer goes where in one model.

    Build one with :func:`rotfn.plans.per_linear` or :func:`rotfn.plans.quarot`;
    apply it with :func:`rotfn.fold` (weight side) and :func:`rotfn.call` (online side).

    Attributes:
        method: ``"per_linear"`` or ``"quarot"``.
        family: the model family adapter used (``"llama"``, ...), or None.
        model: the model class name the plan was built for.
        signature: hash of the model's parameter names and shapes (see :func:`signature`).
        rotations: weight-side rotations (:class:`WeightRotation`), folded by :func:`rotfn.fold`.
        norms: norm fusions, folded first.
        online: activation-side transforms, applied by :func:`rotfn.call`.
        weights: the format of the weight qdq folded last (a format, not rotations: see ``rotations``), or None.
        quantized: keys whose weights are fake-quantized with ``weights``.
        acts: the activation format the online entries use, or None (for printing; entries carry it).
        kv: the KV-cache format of the ``"key"`` / ``"value"`` entries, or None (for printing; entries carry it).
        shared_scales: groups of ``quantized`` keys an inference engine runs as one fused linear
            (q/k/v, gate/up): an NVFP4 weight format measures one global scale over each group, as
            the engine needs (see :func:`rotfn.transforms.qdq_weights`); other formats round each key alone.
        tied: groups of keys that share one tensor in the model.
        untied: keys the plan gives their own tensor (their tie is broken, see ``notes``).
        notes: human-readable facts about the plan (ties broken, layers skipped, exactness).
        transposed: keys of linear weights stored ``[in, out]`` (GPT-2's ``Conv1D``, ``y = x @ W + b``): their
            input side is dim -2 and their output side dim -1, in rotations and qdq alike.
    """

    method: str
    family: str | None
    model: str
    signature: str
    rotations: tuple[WeightRotation, ...] = ()
    norms: tuple[NormFusion, ...] = ()
    online: tuple[Online, ...] = ()
    weights: Format | None = None
    quantized: tuple[str, ...] = ()
    acts: Format | None = None
    kv: Format | None = None
    shared_scales: tuple[tuple[str, ...], ...] = ()
    tied: tuple[tuple[str, ...], ...] = ()
    untied: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    transposed: tuple[str, ...] = ()

    # ----- derived ------------------------------------------------------------
    @property
    def needs_fold(self) -> bool:
        """True when the plan changes weights, so :func:`rotfn.call` needs folded params."""
        return bool(self.rotations or self.norms or self.quantized)

    def touched(self) -> tuple[str, ...]:
        """Every key the weight side reads and writes, in first-use order."""
        keys: dict[str, None] = {}
        for n in self.norms:
            keys.update(dict.fromkeys((n.norm, *n.into)))
            if n.bias is not None:
                keys[n.bias] = None
                keys.update(dict.fromkeys(k.removesuffix("weight") + "bias" for k in n.into))
        keys.update(dict.fromkeys(w.key for w in self.rotations))
        keys.update(dict.fromkeys(self.quantized))
        return tuple(keys)

    def without_formats(self) -> Plan:
        """The same plan without any quantizer: its rotations and norm fusions only, a float-equivalent plan.

        Keeps ``rotations``, ``norms`` and the online rotations (their ``fmt`` set to None); drops the
        weight format and ``quantized``, ``acts``, ``kv`` and every online entry that only quantizes
        (activation or KV-cache qdq). Folded and called, it computes the model's own function, up to
        float rounding: what a plan's rotations alone do, e.g. to check a learned plan.

        Returns:
            A new frozen :class:`Plan` (``self`` is unchanged).

        Example:
            >>> import torch, rotfn
            >>> m = torch.nn.Sequential(torch.nn.Linear(32, 8))
            >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(32, seed=0), weights=rotfn.mxfp4(),
            ...                               acts=rotfn.mxfp4())
            >>> exact = plan.without_formats()
            >>> exact.rotations == plan.rotations, exact.quantized, [(o.rotation, o.fmt) for o in exact.online]
            (True, (), [(Rotation(hadamard, n=32, seed=0), None)])
            >>> p = rotfn.params(m)
            >>> x = torch.randn(4, 32)
            >>> torch.allclose(rotfn.call(m, rotfn.fold(p, exact), exact, x), m(x), atol=1e-5)
            True
        """
        online = tuple(dataclasses.replace(o, fmt=None) for o in self.online if o.rotation is not None)
        return dataclasses.replace(self, online=online, weights=None, quantized=(), acts=None, kv=None,
                                   shared_scales=())

    def transform(self, rounding=None, *, rounded=None) -> Chain:
        """The weight side as one :func:`rotfn.chain`: norm fusions, then rotations, then weight qdq.

        Norm scales are fused before rotating (``W diag(g) R``); input- and
        output-side rotations of one weight commute; qdq comes last, or ``rounding(key, W)``
        in its place (see :func:`rotfn.transforms.qdq_weights`) for the keys in ``rounded``
        (None: every quantized key); the others keep ``qdq``.
        """
        fused = [k for n in self.norms for k in n.into if k in self.transposed]
        if fused:  # a norm's scale multiplies the in dim, the last of an [out, in] weight only
            raise PlanError(message("Plan.transform", "self", "norm fusions into [out, in] weights",
                                    f"fusions into weights stored [in, out] (Conv1D): {fused[:3]}",
                                    "leave those weights out of the plan's norms"))
        transposed = set(self.transposed)
        parts = [n.transform() for n in self.norms]
        parts += [w.transform(transposed=w.key in transposed) for w in self.rotations]
        by = set(self.quantized if rounding is None or rounded is None else rounded)
        for flag in (False, True):
            for own in (True, False):  # the keys ``rounding`` rounds, then those rounded to nearest
                keys = [k for k in self.quantized if (k in transposed) == flag and (k in by) == own]
                if keys:
                    parts.append(qdq_weights(self.weights, Where.names(keys), rounding=rounding if own else None,
                                             transposed=flag, shared=self.shared_scales))
        return chain(*parts)

    # ----- printing -------------------------------------------------------------
    def __repr__(self) -> str:
        parts = [self.method, f"family={self.family}", f"model={self.model}",
                 f"{len(self.rotations)} weight rotations", f"{len(self.norms)} norm fusions", f"{len(self.online)} online"]
        if self.weights is not None:
            parts.append(f"weights={self.weights!r}")
        if self.acts is not None:
            parts.append(f"acts={self.acts!r}")
        if self.kv is not None:
            parts.append(f"kv={self.kv!r}")
        if self.untied:
            parts.append(f"untied={list(self.untied)}")
        return f"Plan({', '.join(parts)})"

    def __str__(self) -> str:
        lines = [repr(self)]
        roles = collections.Counter((w.role, w.side, w.rotation) for w in self.rotations)
        for (role, side, r), count in roles.items():
            lines.append(f"  weight  {role or '-':<10} {side:<6} {r!r} x{count}")
        if self.norms:
            lines.append(f"  norms   {len(self.norms)} fused (scale -> following linears, scale set to 1)")
        kinds = collections.Counter((o.role, o.kind, o.rotation, o.fmt) for o in self.online)
        for (role, kind, r, f), count in kinds.items():
            lines.append(f"  online  {role or '-':<10} {kind:<12} {r!r} fmt={f!r} x{count}")
        if self.quantized:
            shared = (f", {len(self.shared_scales)} fused groups share one global scale each"
                      if self.shared_scales and shares_global_scale(self.weights) else "")
            lines.append(f"  qdq     {self.weights!r} on {len(self.quantized)} weights{shared}")
        lines += [f"  note    {n}" for n in self.notes]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The plan as an HTML table for Jupyter: one row per entry (norm fusion, weight rotation, online
        transform, weight qdq), the notes under it."""
        dash = lambda v: "-" if v is None else repr(v)  # noqa: E731
        rows = [["norm", "-", n.norm, f"fused into {len(n.into)}" + ("" if n.bias is None else f", bias {n.bias}"),
                 "-", "-"] for n in self.norms]
        rows += [["weight", w.role or "-", w.key, w.side + (" per head" if w.per_head else "")
                  + ("" if w.span is None else f" rows {w.span[0]}:{w.span[1]}"), dash(w.rotation), "-"]
                 for w in self.rotations]
        rows += [["online", o.role or "-", o.site, o.kind, dash(o.rotation), dash(o.fmt)] for o in self.online]
        rows += [["qdq", "-", key, "weight", "-", dash(self.weights)] for key in self.quantized]
        return html_table(["entry", "role", "key / site", "where", "rotation", "format"], rows, caption=repr(self),
                          footer=[f"note: {n}" for n in self.notes])

    # ----- serialization ----------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-safe dict; :meth:`from_dict` rebuilds an equal plan.

        Example:
            >>> import rotfn
            >>> p = Plan("quarot", "llama", "M", "0" * 16, rotations=(WeightRotation("w", rotfn.hadamard(4), "input"),))
            >>> Plan.from_dict(p.to_dict()) == p
            True
        """
        table: list[Rotation] = []

        def ref(r: Rotation | None) -> int | None:
            if r is None:
                return None
            if r not in table:
                table.append(r)
            return table.index(r)

        rotations = [{"key": w.key, "rotation": ref(w.rotation), "side": w.side, "per_head": w.per_head,
                   "span": None if w.span is None else list(w.span), "role": w.role} for w in self.rotations]
        online = [{"site": o.site, "kind": o.kind, "rotation": ref(o.rotation),
                   "fmt": None if o.fmt is None else o.fmt.to_dict(), "role": o.role} for o in self.online]
        return {
            "version": PLAN_VERSION,
            "method": self.method,
            "family": self.family,
            "model": self.model,
            "signature": self.signature,
            "rotation_table": [r.to_dict() for r in table],
            "rotations": rotations,
            "norms": [{"norm": n.norm, "into": list(n.into), "bias": n.bias} for n in self.norms],
            "online": online,
            "weights": None if self.weights is None else self.weights.to_dict(),
            "quantized": list(self.quantized),
            "acts": None if self.acts is None else self.acts.to_dict(),
            "kv": None if self.kv is None else self.kv.to_dict(),
            "shared_scales": [list(g) for g in self.shared_scales],
            "tied": [list(g) for g in self.tied],
            "untied": list(self.untied),
            "notes": list(self.notes),
            "transposed": list(self.transposed),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output.

        Dicts of an older version (files saved by an earlier rotfn) are read too,
        see :func:`upgrade_plan_dict`.

        Raises:
            SpecError: unknown version, missing keys, or malformed entries.
        """
        fn = "Plan.from_dict"
        if not isinstance(d, dict):
            raise SpecError(message(fn, "d", "a dict from Plan.to_dict()", type(d).__name__))
        d = upgrade_plan_dict(d)
        if d.get("version") != PLAN_VERSION:
            raise SpecError(message(fn, "d['version']", str(PLAN_VERSION), d.get("version"), "rebuild the plan with this rotfn"))
        fields = ("method", "family", "model", "signature", "rotation_table", "rotations", "norms", "online", "weights",
                  "quantized", "acts", "tied", "untied", "notes")
        missing = [f for f in fields if f not in d]
        if missing:
            raise SpecError(message(fn, "d", "all keys of Plan.to_dict()", f"missing {missing}"))
        try:
            table = [Rotation.from_dict(r) for r in d["rotation_table"]]

            def rot(i):
                return None if i is None else table[i]

            def fmt(f):
                return None if f is None else format_from_dict(f)

            rotations = tuple(
                WeightRotation(w["key"], rot(w["rotation"]), w["side"], w["per_head"],
                               None if w["span"] is None else tuple(w["span"]), w["role"])
                for w in d["rotations"]
            )
            norms = tuple(NormFusion(n["norm"], tuple(n["into"]), n["bias"]) for n in d["norms"])
            online = tuple(Online(o["site"], o["kind"], rot(o["rotation"]), fmt(o["fmt"]), o["role"]) for o in d["online"])
            plan = cls(
                method=d["method"], family=d["family"], model=d["model"], signature=d["signature"], rotations=rotations,
                norms=norms, online=online, weights=fmt(d["weights"]), quantized=tuple(d["quantized"]),
                acts=fmt(d["acts"]), kv=fmt(d.get("kv")),
                shared_scales=tuple(tuple(g) for g in d.get("shared_scales", ())), tied=tuple(tuple(g) for g in d["tied"]),
                untied=tuple(d["untied"]), notes=tuple(d["notes"]),
                transposed=tuple(d.get("transposed", ())),  # files before it had none
            )
        except SpecError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise SpecError(message(fn, "d", "well-formed entries as written by Plan.to_dict()", repr(err))) from None
        bad_side = [w.key for w in plan.rotations if w.side not in _SIDES or w.rotation is None]
        bad_kind = [o.site for o in plan.online if o.kind not in ONLINE_KINDS]
        if bad_side or bad_kind:
            raise SpecError(message(fn, "d", f"sides in {_SIDES} and online kinds in {ONLINE_KINDS}",
                                    f"bad entries {bad_side + bad_kind}"))
        stray = [k for g in plan.shared_scales for k in g if k not in plan.quantized]
        if stray:
            raise SpecError(message(fn, "d['shared_scales']", "groups of keys listed in 'quantized'",
                                    f"keys {stray[:3]} not quantized"))
        if plan.quantized and plan.weights is None:
            raise SpecError(message(fn, "d['weights']", "a format when 'quantized' lists keys", None))
        return plan


def upgrade_plan_dict(d: dict) -> dict:
    """``d`` in the layout of :data:`PLAN_VERSION`: a version-1 dict (keys ``"weight"`` for the
    entries and ``"rotations"`` for the table) gets the current keys and version; any other
    dict is returned as it is, for :meth:`Plan.from_dict` to check.

    Example:
        >>> v1 = {"version": 1, "rotations": [], "weight": [], "notes": []}
        >>> upgrade_plan_dict(v1)
        {'version': 2, 'rotation_table': [], 'rotations': [], 'notes': []}
    """
    if d.get("version") != 1:
        return d
    return {"version": PLAN_VERSION, **{_V1_KEYS.get(k, k): v for k, v in d.items() if k != "version"}}
