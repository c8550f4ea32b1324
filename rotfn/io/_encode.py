"""Plans and rotations as (JSON, tensors), and tensors in a form safetensors stores.

A plan becomes ``{"plan": Plan.to_dict() with the rotation table's "signs" and "data"
set to null, "rotation_tensors": [{"signs": key | null, "block": key | null}, ...]}``
(one entry per rotation of the plan's ``"rotation_table"``) plus the tensors named there:

* ``signs``: the +-1 sign vector of a random-sign rotation, int8 ``[n]``;
* ``block``: the ``b x b`` block of a dense rotation, float64 (kind ``"matrix"``: the
  user's matrix; kind ``"orthogonal"``: the Haar matrix its seed gives). Files written
  before plan version 2 call it ``tile``; both are read.

The stored data is the authority: signs are taken from the file, never
regenerated from the seed, so a file reloads bit-identically even if torch's
generator changes. An orthogonal rotation is rebuilt from its seed and checked
against its stored block; if they differ, the stored block wins (the spec becomes
kind ``"matrix"``, with a :class:`~rotfn.errors.CheckpointWarning`).
"""

from __future__ import annotations

import base64
import dataclasses
import warnings
from collections.abc import Mapping

import torch

from rotfn.errors import CheckpointError, CheckpointWarning, SpecError, message
from rotfn.plans import Plan, upgrade_plan_dict
from rotfn.specs.rotation import Rotation, pack_signs

__all__ = ["Source", "decode_plan", "dtype_from_name", "dtype_name", "encode_plan", "rotation_tensor_names", "storable"]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32 -> "float32"`` (the name ``getattr(torch, name)`` gives back).

    Example:
        >>> dtype_name(torch.float8_e8m0fnu)
        'float8_e8m0fnu'
    """
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name) -> torch.dtype | None:
    """The torch dtype called ``name`` (as :func:`dtype_name` writes it), or None for anything else.

    Example:
        >>> dtype_from_name("bfloat16"), dtype_from_name("os")
        (torch.bfloat16, None)
    """
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on CPU, contiguous, each owning its own storage (safetensors refuses views and shared storage).

    A tensor that is already so is passed through; any other (a view, a slice,
    non-contiguous, on another device, or sharing storage with an earlier one)
    is copied. Values, dtypes and shapes are unchanged.

    Example:
        >>> base = torch.arange(6.0)
        >>> out = storable({"a": base[:2], "b": base[2:].view(2, 2)})
        >>> out["b"].tolist(), out["a"].untyped_storage().nbytes()
        ([[2.0, 3.0], [4.0, 5.0]], 8)
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if not whole or storage.data_ptr() in seen:
            t = t.contiguous().clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _rotation_table(doc: dict) -> list[Rotation]:
    return [Rotation.from_dict(d) for d in doc["rotation_table"]]


def encode_plan(plan: Plan, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A plan as a JSON-safe dict plus the tensors of its rotations' signs and dense blocks.

    Args:
        plan: a :class:`rotfn.Plan`.
        prefix: prefix of the tensor names (e.g. ``"__rotfn__.rotations."``).

    Returns:
        ``(doc, tensors)``: ``doc`` as the module docstring describes; ``tensors``
        named ``f"{prefix}{i}.signs"`` (int8 ``[n]``) and ``f"{prefix}{i}.block"``
        (float64 ``[b, b]``) for rotation ``i`` of the plan's table.

    Example:
        >>> import rotfn
        >>> plan = rotfn.plans.per_linear(torch.nn.Linear(8, 2), rotation=rotfn.hadamard(8, seed=1))
        >>> doc, tensors = encode_plan(plan, "r.")
        >>> doc["rotation_tensors"], tensors["r.0.signs"].dtype
        ([{'signs': 'r.0.signs', 'block': None}], torch.int8)
        >>> decode_plan(doc, tensors, fn="load", arg="path", source="memory") == plan
        True
    """
    doc = plan.to_dict()
    tensors: dict[str, torch.Tensor] = {}
    refs = []
    for i, (entry, rotation) in enumerate(zip(doc["rotation_table"], _rotation_table(doc), strict=True)):
        ref = {"signs": None, "block": None}
        if rotation.signs is not None:
            ref["signs"] = f"{prefix}{i}.signs"
            tensors[ref["signs"]] = rotation.sign_vector(torch.float64).to(torch.int8)
        if rotation.kind in ("orthogonal", "matrix"):
            ref["block"] = f"{prefix}{i}.block"
            tensors[ref["block"]] = (rotation.T if rotation.transposed else rotation).block_matrix(torch.float64)
        entry["signs"] = entry["data"] = None
        refs.append(ref)
    return {"plan": doc, "rotation_tensors": refs}, tensors


def _block_ref(ref: dict):
    return ref.get("block", ref.get("tile"))  # "tile": files written before plan version 2


def rotation_tensor_names(doc) -> list[str]:
    """The names of the tensors a ``{"plan": ..., "rotation_tensors": [...]}`` entry refers to.

    Example:
        >>> rotation_tensor_names({"rotation_tensors": [{"signs": "r.0.signs", "block": None}, {"tile": "r.1.tile"}]})
        ['r.0.signs', 'r.1.tile']
    """
    refs = doc.get("rotation_tensors", []) if isinstance(doc, dict) else []
    return [name for ref in refs if isinstance(ref, dict) for name in (ref.get("signs"), _block_ref(ref)) if name]


class Source:
    """What is being read, for error messages: ``fn: argument 'arg': expected <source>: <what>, got ...; fix: ...``.

    Example:
        >>> str(Source("load", "path", "a.safetensors").error("JSON metadata", "bytes"))
        "load: argument 'path': expected a.safetensors: JSON metadata, got bytes; fix: the file is damaged; write it again"
    """

    def __init__(self, fn: str, arg: str, source: str):
        self.fn, self.arg, self.source = fn, arg, source

    def error(self, expected: str, got, fix: str = "the file is damaged; write it again") -> CheckpointError:
        return CheckpointError(message(self.fn, self.arg, f"{self.source}: {expected}", got, fix))


def _tensor(tensors: Mapping[str, torch.Tensor], key, dtype: torch.dtype, shape: tuple[int, ...], at: Source):
    t = tensors.get(key) if isinstance(key, str) else None
    if t is None:
        raise at.error(f"a tensor {key!r} (rotation data named in the metadata)", "no such tensor")
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise at.error(f"tensor {key!r} as {dtype_name(dtype)} {list(shape)}", f"{dtype_name(t.dtype)} {list(t.shape)}")
    return t


def _signs_base64(t: torch.Tensor, key: str, at: Source) -> str:
    if not bool(((t == 1) | (t == -1)).all()):
        raise at.error(f"tensor {key!r} of +-1 signs", "other values")
    return base64.b64encode(pack_signs(t)).decode("ascii")


def _stored_block_wins(rotation: Rotation, block: torch.Tensor, at: Source) -> Rotation:
    """The seed-built orthogonal spec if it reproduces the stored block, else a matrix spec of the stored block."""
    base = rotation.T if rotation.transposed else rotation
    if torch.equal(base.block_matrix(torch.float64), block):
        return rotation
    warnings.warn(
        f"{at.fn}: {at.source}: {rotation!r} built from its seed differs from the matrix stored with it "
        "(torch's generator changed); using the stored matrix, as a spec of kind 'matrix'",
        CheckpointWarning, stacklevel=3,
    )
    return dataclasses.replace(rotation, kind="matrix", seed=None, data=block.numpy().tobytes())


def decode_plan(doc, tensors: Mapping[str, torch.Tensor], *, fn: str, arg: str, source: str) -> Plan:
    """Rebuild the plan :func:`encode_plan` stored, taking signs and dense blocks from ``tensors``.

    Args:
        doc: the JSON dict.
        tensors: ``{name: Tensor}`` holding at least the tensors ``doc`` names.
        fn: public function name for error messages (``"load"``, ...).
        arg: its argument that names what is read (``"path"``, ``"dir"``), for error messages.
        source: what is being read, for error messages (a path).

    Returns:
        The :class:`rotfn.Plan`.

    Raises:
        CheckpointError: a malformed ``doc``, a missing tensor, a tensor of the wrong dtype,
            shape or values, or a plan that :meth:`Plan.from_dict` rejects.
    """
    at = Source(fn, arg, source)
    refs = doc.get("rotation_tensors") if isinstance(doc, dict) else None
    plan_doc = doc.get("plan") if isinstance(doc, dict) else None
    plan_doc = upgrade_plan_dict(plan_doc) if isinstance(plan_doc, dict) else None
    table = plan_doc.get("rotation_table") if isinstance(plan_doc, dict) else None
    if not (isinstance(refs, list) and isinstance(table, list) and len(refs) == len(table)
            and all(isinstance(r, dict) and isinstance(e, dict) for r, e in zip(refs, table))):
        raise at.error("a plan entry {'plan': ..., 'rotation_tensors': [...]} written by rotfn", "a malformed entry")
    plan_doc = {**plan_doc, "rotation_table": [dict(e) for e in table]}
    dense: dict[int, torch.Tensor] = {}
    for i, (entry, ref) in enumerate(zip(plan_doc["rotation_table"], refs)):
        n, b = entry.get("n"), entry.get("block") or entry.get("n")
        if not (isinstance(n, int) and isinstance(b, int)):
            raise at.error(f"rotation {i} with int sizes 'n' and 'block'", f"n={n!r}, block={entry.get('block')!r}")
        if ref.get("signs") is None and entry.get("kind") == "hadamard" and entry.get("seed") is not None:
            raise at.error(f"rotation {i} (a random-sign Hadamard) with its stored signs", "no signs tensor named")
        if ref.get("signs") is not None:
            signs = _tensor(tensors, ref["signs"], torch.int8, (n,), at)
            entry["signs"] = _signs_base64(signs, ref["signs"], at)
        if _block_ref(ref) is not None:
            dense[i] = _tensor(tensors, _block_ref(ref), torch.float64, (b, b), at)
            if entry.get("kind") == "matrix":
                entry["data"] = base64.b64encode(dense[i].numpy().tobytes()).decode("ascii")
    try:
        plan = Plan.from_dict(plan_doc)
    except SpecError as err:
        raise at.error("a plan Plan.from_dict accepts", str(err)) from err
    table = _rotation_table(plan_doc)  # Plan.from_dict's table, in the same order
    fixed = {table[i]: _stored_block_wins(table[i], t, at)
             for i, t in dense.items() if table[i].kind == "orthogonal"}
    if all(r is after for r, after in fixed.items()):
        return plan
    return dataclasses.replace(
        plan,
        rotations=tuple(dataclasses.replace(w, rotation=fixed.get(w.rotation, w.rotation)) for w in plan.rotations),
        online=tuple(dataclasses.replace(o, rotation=fixed.get(o.rotation, o.rotation)) for o in plan.online),
    )
