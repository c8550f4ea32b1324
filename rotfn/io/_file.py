"""rotfn checkpoints: a params dict (tensors and QTensors) and its plan in one safetensors file.

The file is plain safetensors (no pickle). Its metadata key ``"rotfn"`` holds
versioned JSON::

    {"format": "rotfn", "version": 1,
     "folded": true | false,                       # params are FoldedParams of this plan
     "plan": Plan.to_dict() | null,                # signs and dense data as tensors, see rotfn.io._encode
     "rotation_tensors": [{"signs": key | null, "block": key | null}, ...],
     "tensors": {key: {"dtype": "float32", "shape": [...]}, ...},   # every tensor in the file
     "params": [{"name": ..., "kind": "tensor", "tensor": key},
                {"name": ..., "kind": "alias", "of": name},        # a tie: the same tensor as an earlier name
                {"name": ..., "kind": "qtensor", "shape": [...], "dtype": ..., "format": fmt.to_dict(),
                 "parts": {"codes": key, "scales": key, "global_scale": key, "zero_points": key}}, ...]}

Plain tensors are stored under their own names, QTensor parts as ``name::part``,
rotation data as ``__rotfn__.rotations.<i>.signs`` / ``.block`` (``<i>``: the index in the plan's rotation table). Dtypes outside the
set every safetensors release knows (e.g. ``float8_e8m0fnu`` MX scales) are stored
as their raw bytes (uint8, flattened) and viewed back on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import safetensors
import safetensors.torch
import torch

from rotfn.errors import ArgumentError, CheckpointError, DTypeError, FoldError, SpecError, message
from rotfn.io._atomic import write_atomic
from rotfn.io._encode import Source, decode_plan, dtype_from_name, dtype_name, encode_plan, storable
from rotfn.io._shard import read_header
from rotfn.plans import FoldedParams, Plan, folded_with, require_plan
from rotfn.specs import QTensor
from rotfn.specs.formats import format_from_dict

__all__ = ["FILE_FORMAT", "FILE_VERSION", "METADATA_KEY", "SECTIONS", "load", "read_file", "save", "write_file"]

FILE_FORMAT = "rotfn"
FILE_VERSION = 1
METADATA_KEY = "rotfn"
_ROTATION_PREFIX = "__rotfn__.rotations."
_QPARTS = ("codes", "scales", "global_scale", "zero_points")
# dtypes every safetensors release stores as themselves; others go as raw bytes
_NATIVE = frozenset({
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
})
_RESAVE = "the file is damaged; write it again with rotfn.save"


def _check_path(fn: str, path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(message(fn, "path", "a file path (str or os.PathLike)", type(path).__name__))
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ArgumentError(message(fn, "path", "a file path", f"the directory {path!r}", "name a file inside it"))
    return path


# ----- save ------------------------------------------------------------------------------
def _identity(value) -> object:
    """Two params with one identity are one tensor in the file (a tie)."""
    if isinstance(value, QTensor) or value.numel() == 0:
        return id(value)
    return (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
            value.stride(), value.dtype)


def _put(raw: dict, key: str, t: torch.Tensor) -> None:
    if key in raw or key.startswith(_ROTATION_PREFIX):
        raise CheckpointError(message("save", "params", f"names whose stored keys are unique (key {key!r})",
                                      "a clash with another param's key or rotfn's own prefix", "rename that param"))
    raw[key] = t


def _encode_params(params: Mapping) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The ``"params"`` entries and the tensors they name (ties stored once, QTensors as parts)."""
    entries: list[dict] = []
    raw: dict[str, torch.Tensor] = {}
    first: dict[object, str] = {}
    for name, value in params.items():
        ident = _identity(value)
        if ident in first:
            entries.append({"name": name, "kind": "alias", "of": first[ident]})
            continue
        first[ident] = name
        if isinstance(value, QTensor):
            parts = {part: f"{name}::{part}" for part in _QPARTS if getattr(value, part) is not None}
            for part, key in parts.items():
                _put(raw, key, getattr(value, part))
            entries.append({"name": name, "kind": "qtensor", "shape": list(value.shape), "dtype": dtype_name(value.dtype),
                            "format": value.format.to_dict(), "parts": parts})
        else:
            _put(raw, name, value)
            entries.append({"name": name, "kind": "tensor", "tensor": name})
    return entries, raw


def _check_save_args(params, plan) -> None:
    fn = "save"
    if not isinstance(params, Mapping):
        raise DTypeError(message(fn, "params", "a dict {name: Tensor | QTensor}", type(params).__name__,
                                 "pass rotfn.params(model) or rotfn.fold(...)'s result"))
    for k, v in params.items():
        if not isinstance(k, str) or not isinstance(v, (torch.Tensor, QTensor)):
            raise DTypeError(message(fn, "params", "a dict {name: Tensor | QTensor}",
                                     f"{type(k).__name__} key {k!r} -> {type(v).__name__}"))
    require_plan(fn, plan, optional=True)
    prior = folded_with(params)
    if prior is not None and prior != plan:
        raise FoldError(message(fn, "plan", "the plan these params were folded with", repr(plan),
                                "pass plan=params.plan, so the file records what was folded"))


def save(path: str | os.PathLike, params: Mapping, plan: Plan | None = None) -> None:
    """Write params (tensors and QTensors) and their plan to one safetensors file, atomically.

    The layout is in the module docstring: plain tensors under their names,
    QTensors as codes / scales (/ global scale / zero points) plus their format
    and shape, ties (names holding one tensor) stored once and restored as one
    tensor, the plan as versioned JSON in the metadata with random signs (int8)
    and dense rotation blocks (float64) as tensors. Params folded with ``plan``
    (a :class:`rotfn.FoldedParams`) are recorded as folded. Tensors are written
    contiguous, from CPU copies where needed; nothing passed in is modified.
    The file appears at ``path`` complete or not at all (temporary sibling,
    fsync, ``os.replace``); an older file there is kept if writing fails.

    Args:
        path: destination file (its directory must exist).
        params: ``{name: Tensor | QTensor}``, e.g. :func:`rotfn.params` or :func:`rotfn.fold` output.
        plan: the :class:`rotfn.Plan` for these params, or None.

    Raises:
        ArgumentError: path is not a file path, or its directory does not exist.
        DTypeError: params is not a dict of tensors / QTensors.
        PlanError: plan is neither a Plan nor None.
        FoldError: params were folded with another plan (or plan is None for folded params).
        CheckpointError: two params would be stored under one key.

    Example:
        >>> import os, tempfile, torch, rotfn
        >>> m = torch.nn.Linear(32, 2)
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(32, seed=0), acts=rotfn.mxfp4())
        >>> folded = rotfn.fold(rotfn.params(m), plan)
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> rotfn.save(path, folded, plan)
        >>> params, plan2 = rotfn.load(path)
        >>> plan2 == plan, params.plan == plan, torch.equal(params["weight"], folded["weight"])
        (True, True, True)

    References:
        safetensors format: https://github.com/huggingface/safetensors
    """
    write_file("save", path, params, plan)


def write_file(fn: str, path, params: Mapping, plan: Plan | None, section: tuple[str, dict] | None = None) -> None:
    """:func:`save` for ``fn``, with an optional ``(key, document)`` added to the metadata document (a calibration's
    own fields, :mod:`rotfn.calibration._file`); a file with a section is refused by :func:`load`."""
    path = _check_path(fn, path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ArgumentError(message(fn, "path", "a path in an existing directory", repr(path),
                                    "create the directory first (os.makedirs(dirname, exist_ok=True))"))
    _check_save_args(params, plan)
    entries, raw = _encode_params(params)
    plan_doc, rotation_tensors = encode_plan(plan, _ROTATION_PREFIX) if plan is not None else (
        {"plan": None, "rotation_tensors": []}, {})
    stored = storable({**raw, **rotation_tensors})
    layout = {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for k, t in stored.items()}
    tensors = {k: t if t.dtype in _NATIVE else t.reshape(-1).view(torch.uint8) for k, t in stored.items()}
    doc = {"format": FILE_FORMAT, "version": FILE_VERSION, "folded": folded_with(params) is not None,
           **plan_doc, "tensors": layout, "params": entries}
    if section is not None:
        doc[section[0]] = section[1]
    metadata = {"format": "pt", METADATA_KEY: json.dumps(doc, separators=(",", ":"))}
    write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


# ----- load ------------------------------------------------------------------------------
def _bad(at: Source, expected: str, got, fix: str = _RESAVE) -> CheckpointError:
    return at.error(expected, got, fix)


def _document(at: Source, metadata: dict) -> dict:
    """The checked ``"rotfn"`` metadata document of a file."""
    if METADATA_KEY not in metadata:
        raise _bad(at, "a rotfn checkpoint (metadata key 'rotfn')", "a safetensors file without it",
                   "read plain files with safetensors.torch.load_file")
    try:
        doc = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise _bad(at, "JSON metadata", f"unreadable JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise _bad(at, f"metadata format {FILE_FORMAT!r}", repr(got), "read it with the tool that wrote it")
    if doc.get("version") != FILE_VERSION:
        raise _bad(at, f"metadata version {FILE_VERSION}", repr(doc.get("version")),
                   "load it with the rotfn version that wrote it")
    return doc


def _read(at: Source) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata document and every tensor of a rotfn file, as stored (tensors read only once the document is)."""
    try:
        with safetensors.safe_open(at.source, framework="pt") as f:
            doc = _document(at, f.metadata() or {})
            return doc, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a Mapping
    except safetensors.SafetensorError as err:
        read_header(at.source, fn=at.fn)  # says what is wrong where it can (truncated: the sizes promised and there)
        raise _bad(at, "a complete safetensors file", f"a damaged or truncated one ({err})") from None


def _restore_tensors(at: Source, layout, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check every stored tensor against the metadata's dtype and shape; view raw bytes back."""
    if not isinstance(layout, dict):
        raise _bad(at, "a 'tensors' table", type(layout).__name__)
    missing, extra = sorted(set(layout) - set(stored)), sorted(set(stored) - set(layout))
    if missing or extra:
        raise _bad(at, "exactly the tensors its metadata lists", f"missing {missing[:5]}, unlisted {extra[:5]}")
    out = {}
    for key, info in layout.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise _bad(at, f"a shape list for tensor {key!r}", repr(shape))
        dtype = dtype_from_name(info.get("dtype"))
        if dtype is None:
            raise _bad(at, f"a torch dtype name for tensor {key!r}", repr(info.get("dtype")))
        numel = torch.Size(shape).numel()
        native = dtype in _NATIVE
        want_dtype, want_shape = (dtype, tuple(shape)) if native else (torch.uint8, (numel * dtype.itemsize,))
        t = stored[key]
        if t.dtype != want_dtype or tuple(t.shape) != want_shape:
            raise _bad(at, f"tensor {key!r} as {dtype_name(want_dtype)} {list(want_shape)}",
                       f"{dtype_name(t.dtype)} {list(t.shape)}")
        out[key] = t if native else t.view(dtype).reshape(shape)
    return out


def _part(at: Source, tensors: dict, key, what: str) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise _bad(at, f"a stored tensor for {what}", repr(key))
    return tensors[key]


def _decode_qtensor(at: Source, entry: dict, tensors: dict) -> QTensor:
    name, parts, shape = entry["name"], entry.get("parts"), entry.get("shape")
    if not isinstance(parts, dict) or not {"codes", "scales"} <= set(parts) <= set(_QPARTS):
        raise _bad(at, f"QTensor {name!r} with parts codes, scales (and global_scale, zero_points)", repr(parts))
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise _bad(at, f"a shape list for QTensor {name!r}", repr(shape))
    try:
        fmt = format_from_dict(entry.get("format"))
    except SpecError as err:
        raise _bad(at, f"a format spec for QTensor {name!r}", str(err)) from None
    dtype = dtype_from_name(entry.get("dtype"))
    if dtype is None:
        raise _bad(at, f"a torch dtype name for QTensor {name!r}", repr(entry.get("dtype")))
    got = {part: _part(at, tensors, key, f"{name}.{part}") for part, key in parts.items()}
    return QTensor(shape=torch.Size(shape), dtype=dtype, format=fmt, **got)


def _decode_params(at: Source, entries, tensors: dict) -> dict:
    if not isinstance(entries, list):
        raise _bad(at, "a 'params' list", type(entries).__name__)
    out: dict = {}
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name in out:
            raise _bad(at, "params entries with unique string names", repr(entry)[:80])
        kind = entry.get("kind")
        if kind == "tensor":
            out[name] = _part(at, tensors, entry.get("tensor"), name)
        elif kind == "alias" and entry.get("of") in out:
            out[name] = out[entry["of"]]
        elif kind == "qtensor":
            out[name] = _decode_qtensor(at, entry, tensors)
        else:
            raise _bad(at, f"entry {name!r} of kind 'tensor', 'qtensor' or 'alias' (of an earlier name)", repr(kind))
    return out


def load(path: str | os.PathLike) -> tuple[dict, Plan | None]:
    """Read a file written by :func:`save`: ``(params, plan)``, exactly as saved.

    Tensors come back on CPU, contiguous, with the saved dtypes, shapes and bits;
    QTensors with equal codes, scales, format, shape and dtype; names that held
    one tensor (ties) hold one tensor object again. Params saved folded come back
    as a :class:`rotfn.FoldedParams` recording the plan, so ``rotfn.call`` on the
    pair gives the same bits as before and folding them again is an error.

    Args:
        path: a file written by :func:`save`.

    Returns:
        ``(params, plan)``: a dict (a FoldedParams if saved folded) and the plan or None.

    Raises:
        ArgumentError: path is not a file path.
        FileNotFoundError: no file at path.
        CheckpointError: not a safetensors file, damaged or truncated, not a rotfn
            file (no ``"rotfn"`` metadata), unknown format or version, tensors missing
            or unlisted, a tensor whose dtype or shape differs from the metadata, or a
            malformed entry or plan.
        CheckpointWarning: (a warning) a seeded orthogonal rotation rebuilds differently
            on this torch; the stored matrix is used.

    Example:
        >>> import os, tempfile, torch, rotfn
        >>> path = os.path.join(tempfile.mkdtemp(), "q.safetensors")
        >>> q = rotfn.quantize(torch.randn(2, 32), rotfn.mxfp4())
        >>> rotfn.save(path, {"w": q})
        >>> params, plan = rotfn.load(path)
        >>> torch.equal(rotfn.dequantize(params["w"]), rotfn.dequantize(q)), plan
        (True, None)
    """
    params, plan, doc = read_file("load", path)
    for key, reader in SECTIONS.items():
        if key in doc:
            raise _bad(Source("load", "path", os.fspath(path)), "a params file (written by rotfn.save)", f"a file with a {key!r} section",
                       f"read it with {reader}")
    return params, plan


#: Sections of other rotfn files built on this one, and the function that reads each.
SECTIONS = {"calibration": "rotfn.calibration.load"}


def read_file(fn: str, path) -> tuple[dict, Plan | None, dict]:
    """:func:`load` for ``fn``: ``(params, plan, metadata document)``, the document holding any section."""
    path = _check_path(fn, path)
    at = Source(fn, "path", path)
    doc, stored = _read(at)
    tensors = _restore_tensors(at, doc.get("tensors"), stored)
    params = _decode_params(at, doc.get("params"), tensors)
    plan = None if doc.get("plan") is None else decode_plan(doc, tensors, fn=fn, arg="path", source=path)
    folded = doc.get("folded")
    if not isinstance(folded, bool) or (folded and plan is None):
        raise _bad(at, "'folded': a bool, true only with a plan", repr(folded))
    return (FoldedParams(params, plan) if folded else params), plan, doc
