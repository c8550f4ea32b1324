"""Hugging Face directories: export a folded model, load it back with its plan; the rotfn.json side file.

A directory written by :func:`export_hf` is a standard transformers checkpoint:
``config.json`` plus ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors``
shards and ``model.safetensors.index.json``). When the plan keeps online
transforms (R3/R4 rotations, activation qdq) that transformers cannot run, the
directory also holds ``rotfn.json`` (and ``rotfn.safetensors`` with the rotation
data when the plan has random signs or dense rotations)::

    {"format": "rotfn-hf", "version": 1,
     "plan": Plan.to_dict() (signs and dense data as tensors, see rotfn.io._encode),
     "rotation_tensors": [{"signs": name | null, "block": name | null}, ...],
     "tensors": "rotfn.safetensors" | null,
     "online": [{"site": ..., "kind": ..., "rotation": repr, "fmt": repr, "role": ...}, ...]}

:func:`load_hf` reads it back so ``rotfn.call`` runs the model with them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import safetensors
import safetensors.torch
import torch

from rotfn.errors import ArgumentError, CheckpointError, CheckpointWarning, PlanError, message
from rotfn.io._atomic import write_atomic, write_text_atomic
from rotfn.io._checkpoint import GUARDED_MODEL_TYPE, guard_config, read_config
from rotfn.io._encode import Source, decode_plan, encode_plan, storable
from rotfn.model import params as rotfn_params
from rotfn.plans import FoldedParams, Plan, check_fold_state, check_keys, check_plan, describe, require_plan
from rotfn.transforms import check_params

__all__ = [
    "HF_FORMAT",
    "HF_VERSION",
    "ROTFN_JSON",
    "ROTFN_TENSORS",
    "export_hf",
    "load_hf",
    "read_rotfn_json",
    "write_rotfn_json",
]

ROTFN_JSON = "rotfn.json"
ROTFN_TENSORS = "rotfn.safetensors"
HF_FORMAT = "rotfn-hf"
HF_VERSION = 1
_TENSOR_PREFIX = "rotations."
_AGAIN = "export the directory again"


def _check_dir(fn: str, directory) -> str:
    if not isinstance(directory, (str, os.PathLike)):
        raise ArgumentError(message(fn, "dir", "a directory path (str or os.PathLike)", type(directory).__name__))
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ArgumentError(message(fn, "dir", "an existing directory", repr(directory),
                                    "create it first (os.makedirs(dir, exist_ok=True))"))
    return directory


def _remove_if_present(path: str) -> None:
    if os.path.lexists(path):
        os.remove(path)


def write_rotfn_json(dir: str | os.PathLike, plan: Plan) -> None:
    """Write ``rotfn.json`` (and ``rotfn.safetensors`` if needed) recording ``plan`` in an HF directory.

    The JSON layout is in the module docstring; the plan's random signs and
    dense rotation blocks go to ``rotfn.safetensors`` as int8 / float64 tensors
    (a stale one is removed when the plan has none). Each file is written
    atomically; ``rotfn.json`` last, since readers start from it.

    Args:
        dir: an existing directory (an HF checkpoint written or being written).
        plan: the :class:`rotfn.Plan` the weights in ``dir`` were folded with.

    Raises:
        ArgumentError: ``dir`` is not an existing directory.
        PlanError: ``plan`` is not a Plan.

    Example:
        >>> import tempfile, torch, rotfn
        >>> from rotfn.io._hf import read_rotfn_json, write_rotfn_json
        >>> plan = rotfn.plans.per_linear(torch.nn.Linear(8, 2), rotation=rotfn.hadamard(8, seed=1))
        >>> d = tempfile.mkdtemp()
        >>> write_rotfn_json(d, plan)
        >>> read_rotfn_json(d) == plan
        True
    """
    fn = "write_rotfn_json"
    directory = _check_dir(fn, dir)
    require_plan(fn, plan)
    doc, tensors = encode_plan(plan, _TENSOR_PREFIX)
    tensors = storable(tensors)
    sidecar = os.path.join(directory, ROTFN_TENSORS)
    if tensors:
        write_atomic(sidecar, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    else:
        _remove_if_present(sidecar)
    online = [{"site": o.site, "kind": o.kind, "rotation": None if o.rotation is None else repr(o.rotation),
               "fmt": None if o.fmt is None else repr(o.fmt), "role": o.role} for o in plan.online]
    text = json.dumps({"format": HF_FORMAT, "version": HF_VERSION, **doc,
                       "tensors": ROTFN_TENSORS if tensors else None, "online": online}, indent=1)
    write_text_atomic(os.path.join(directory, ROTFN_JSON), text)


def _read_sidecar(at: Source, path: str) -> dict:
    try:
        return safetensors.torch.load_file(path)
    except FileNotFoundError:
        raise at.error(f"the rotation data file {path!r} it names", "no such file",
                       "copy the whole directory, or export it again") from None
    except safetensors.SafetensorError as err:
        raise at.error(f"a complete safetensors file at {path!r}", f"a damaged one ({err})", _AGAIN) from None


def read_rotfn_json(dir: str | os.PathLike) -> Plan | None:
    """The plan recorded in an HF directory's ``rotfn.json``, or None when there is no such file.

    Args:
        dir: an existing directory.

    Returns:
        The :class:`rotfn.Plan` written by :func:`write_rotfn_json`, or None.

    Raises:
        ArgumentError: ``dir`` is not an existing directory.
        CheckpointError: ``rotfn.json`` is not valid JSON, has another format or an unknown
            version, names rotation data that is missing or damaged, or holds a malformed plan.

    Example:
        >>> import tempfile
        >>> read_rotfn_json(tempfile.mkdtemp()) is None
        True
    """
    fn = "read_rotfn_json"
    directory = _check_dir(fn, dir)
    path = os.path.join(directory, ROTFN_JSON)
    if not os.path.exists(path):
        return None
    at = Source(fn, "dir", path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise at.error("JSON", f"unreadable text ({err})", _AGAIN) from None
    if not isinstance(doc, dict) or doc.get("format") != HF_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise at.error(f"format {HF_FORMAT!r}", repr(got), f"remove the foreign {ROTFN_JSON}, or export again with rotfn")
    if doc.get("version") != HF_VERSION:
        raise at.error(f"version {HF_VERSION}", repr(doc.get("version")),
                       "read it with the rotfn version that wrote it, or export again")
    name = doc.get("tensors")
    if name is not None and name != ROTFN_TENSORS:
        raise at.error(f"'tensors': null or {ROTFN_TENSORS!r}", repr(name), _AGAIN)
    tensors = {} if name is None else _read_sidecar(at, os.path.join(directory, name))
    return decode_plan(doc, tensors, fn=fn, arg="dir", source=path)


# ----- export ----------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", re.IGNORECASE)
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def _shard_bytes(fn: str, size) -> int:
    """Bytes of ``max_shard_size``: an int, or text such as ``"5GB"`` (10^9) or ``"512MiB"`` (2^20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        unit = match and match.group(2).upper()
        value = int(float(match.group(1)) * _UNITS[unit]) if match and unit in _UNITS else 0
    if value <= 0:
        raise ArgumentError(message(fn, "max_shard_size", "a positive int of bytes or text like '5GB' or '500MiB'",
                                    repr(size)))
    return value


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Names in order, cut greedily into groups of at most ``limit`` bytes (a bigger tensor gets a shard alone)."""
    shards: list[list[str]] = []
    used = limit
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards or [[]]


def _hf_layout(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as transformers saves them: transformers 5 loads some weights converted (e.g. MoE experts fused
    into one 3-D tensor) and saves them back in the original per-module layout; earlier versions convert nothing."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return tensors
    return revert_weight_conversion(model, tensors)


def _weights(model, params: dict) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors to write, in the model's dtypes, each tie once; and whether a tie of the model is broken."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, ref in state.items():
        t = params[name]
        if id(t) not in seen:  # a tie: the first name (the input embedding, for tied word embeddings) is written
            seen.add(id(t))
            out[name] = t.to(ref.dtype)
    broken = any(len({id(params[n]) for n in group}) > 1 for group in describe(model).tied)
    return out, broken


def _write_weights(directory: str, tensors: dict[str, torch.Tensor], limit: int) -> None:
    """The weight files (one file, or shards and their index); weight files of an older export are removed."""
    shards = _shards(tensors, limit)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        part = {k: tensors[k] for k in keys}
        write_atomic(os.path.join(directory, name),
                     lambda tmp, part=part: safetensors.torch.save_file(part, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                              "total_parameters": sum(t.numel() for t in tensors.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in sorted(keys)}}
        names.append("model.safetensors.index.json")
        write_text_atomic(os.path.join(directory, names[-1]), json.dumps(index, indent=2) + "\n")
    for stale in sorted(set(os.listdir(directory)) - set(names)):
        if _WEIGHT_FILE.fullmatch(stale):
            os.remove(os.path.join(directory, stale))


def _config_text(model, dtype: torch.dtype, untie: bool) -> str:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", str(dtype).removeprefix("torch."))
    if untie:
        config.tie_word_embeddings = False
    return config.to_json_string(use_diff=True)


def _check_export(fn: str, model, params, plan) -> None:
    if not (isinstance(model, torch.nn.Module) and hasattr(getattr(model, "config", None), "to_json_string")):
        raise ArgumentError(message(fn, "model", "a transformers model (an nn.Module with a config)",
                                    type(model).__name__, "pass e.g. transformers.AutoModelForCausalLM.from_config(cfg)"))
    check_params(fn, params)
    require_plan(fn, plan, optional=True)
    info = describe(model, fn=fn)
    check_keys(fn, info, params)
    if plan is not None:
        check_plan(fn, info, plan)
    check_fold_state(fn, params, plan)


def export_hf(model, params, plan: Plan | None, dir: str | os.PathLike, *,
              max_shard_size: int | str = "5GB") -> None:
    """Write folded params as a standard transformers checkpoint directory (plus rotfn.json if needed).

    Files: ``config.json`` (the model's config with ``architectures``, ``dtype``, and
    ``tie_word_embeddings=False`` when the params no longer share a tied tensor, e.g. a
    QuaRot plan untied the embeddings), ``generation_config.json`` when the model has
    one, and the weights: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
    shards of at most ``max_shard_size`` bytes each (a larger tensor gets a shard of its
    own) with ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...},
    "weight_map": {name: file}}``). Weights are the persistent state_dict entries of the
    model, in its dtypes and in the layout transformers saves (transformers 5's fused
    MoE experts go back to per-expert weights); a tie is written once, under its
    first name, as ``save_pretrained`` does. Each file is written atomically; weight
    files of an earlier export that this one does not rewrite are removed. An existing
    ``config.json`` is removed first and the new one written last, so an export that
    fails midway leaves a directory that neither transformers nor :func:`load_hf` loads.

    If the plan keeps online transforms (R3/R4 rotations, activation qdq), the
    weights alone are not the model: ``rotfn.json`` records the plan (see
    :func:`write_rotfn_json`), ``config.json`` is guarded so that plain transformers
    refuses the directory (``AutoModelForCausalLM.from_pretrained(dir)`` and
    ``LlamaForCausalLM.from_pretrained(dir)`` alike; see ``rotfn.io._checkpoint.guard_config``)
    instead of running the model without them, and a :class:`~rotfn.errors.CheckpointWarning`
    says so; :func:`load_hf` gives the model, params and plan for ``rotfn.call``. Without online transforms no rotfn.json is written (a stale one is
    removed) and plain transformers computes what ``rotfn.call`` computes.

    Args:
        model: the transformers ``*ForCausalLM`` model the params belong to.
        params: ``{name: Tensor}``, e.g. ``rotfn.fold(rotfn.params(model), plan)``.
        plan: the plan the params were folded with, or None for unfolded params.
        dir: output directory (created if missing).
        max_shard_size: largest shard in bytes, or text such as ``"5GB"``, ``"500MB"``, ``"2GiB"``.

    Raises:
        ArgumentError: model is not a transformers model, dir is a file, bad max_shard_size.
        DTypeError: params is not a dict of tensors. SelectionError: params keys are not the model's.
        PlanError: plan is not a Plan, or built for another model. FoldError: params are not folded
            with ``plan`` (or are folded and plan is None).

    Example:
        >>> import os, tempfile, torch, transformers, rotfn
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        >>> plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=0), r2=rotfn.hadamard(8, seed=1))
        >>> d = tempfile.mkdtemp()
        >>> rotfn.export_hf(model, rotfn.fold(rotfn.params(model), plan), plan, d)
        >>> sorted(os.listdir(d))
        ['config.json', 'generation_config.json', 'model.safetensors']
        >>> reloaded = transformers.AutoModelForCausalLM.from_pretrained(d)
    """
    fn = "export_hf"
    _check_export(fn, model, params, plan)
    limit = _shard_bytes(fn, max_shard_size)
    if not isinstance(dir, (str, os.PathLike)) or os.path.isfile(dir):
        raise ArgumentError(message(fn, "dir", "a directory path", repr(dir), "name a directory (created if missing)"))
    directory = os.fspath(dir)
    os.makedirs(directory, exist_ok=True)
    weights, untie = _weights(model, params)
    dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)
    # config.json goes first and comes back last: a failed export leaves no directory that looks loadable
    _remove_if_present(os.path.join(directory, "config.json"))
    _write_weights(directory, storable(_hf_layout(model, weights)), limit)
    if plan is not None and plan.online:
        write_rotfn_json(directory, plan)
    else:
        for stale in (ROTFN_JSON, ROTFN_TENSORS):
            _remove_if_present(os.path.join(directory, stale))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        write_text_atomic(os.path.join(directory, "generation_config.json"), generation.to_json_string(use_diff=True))
    config = _config_text(model, dtype, untie)
    if plan is not None and plan.online:  # plain transformers would run the model without them: it must refuse
        config = json.dumps(guard_config(json.loads(config)), indent=2, sort_keys=True) + "\n"
    write_text_atomic(os.path.join(directory, "config.json"), config)
    if plan is not None and plan.online:
        roles = sorted({o.role or o.kind for o in plan.online})
        warnings.warn(
            f"{fn}: {directory}: {len(plan.online)} online transforms ({', '.join(roles)}) are not in the weights; "
            "plain transformers refuses the directory (config.json model_type and dtype " + repr(GUARDED_MODEL_TYPE) + "). Load it with "
            "rotfn.load_hf(dir) and run it with rotfn.call(model, params, plan, ...)",
            CheckpointWarning, stacklevel=2,
        )


# ----- load --------------------------------------------------------------------------------
def _auto_dtype(transformers) -> dict:
    """``from_pretrained``'s keyword for "the dtype the checkpoint was saved in" (renamed in transformers 4.56)."""
    major, minor = (int(v) for v in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": "auto"} if (major, minor) >= (4, 56) else {"torch_dtype": "auto"}


def load_hf(dir: str | os.PathLike):
    """Load a directory written by :func:`export_hf`: ``(model, params, plan)`` ready for :func:`rotfn.call`.

    The model is built from ``config.json`` and filled from the safetensors
    weights by ``transformers.AutoModelForCausalLM.from_pretrained`` with local files
    only (nothing is downloaded), in the saved dtype, in eval mode. The plan comes from
    ``rotfn.json`` (:func:`read_rotfn_json`); the params (``rotfn.params(model)``) are
    then a :class:`rotfn.FoldedParams` of that plan, since the weights were folded with it.
    Without rotfn.json, plan is None and the params are a plain dict.

    Args:
        dir: a directory written by :func:`export_hf` (or by the streaming fold).

    Returns:
        ``(model, params, plan)``.

    Raises:
        ArgumentError: dir is not an existing directory.
        CheckpointError: no ``config.json``; a bad ``rotfn.json`` (see :func:`read_rotfn_json`);
            a plan that does not fit the model in the directory.

    Example:
        >>> import tempfile, warnings, torch, transformers, rotfn
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        >>> plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=0), r3=rotfn.hadamard(8))
        >>> folded = rotfn.fold(rotfn.params(model), plan)
        >>> d = tempfile.mkdtemp()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     rotfn.export_hf(model, folded, plan, d)
        >>> [type(w.message).__name__ for w in caught]
        ['CheckpointWarning']
        >>> model2, params2, plan2 = rotfn.load_hf(d)
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> torch.equal(rotfn.call(model2, params2, plan2, ids).logits, rotfn.call(model, folded, plan, ids).logits)
        True
    """
    fn = "load_hf"
    directory = _check_dir(fn, dir)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(message(fn, "dir", "a transformers checkpoint directory with config.json", repr(directory),
                                      "export one with rotfn.export_hf(model, params, plan, dir)"))
    import transformers  # an optional dependency (rotfn[hf])

    plan = read_rotfn_json(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                              config=read_config(directory),
                                                              **_auto_dtype(transformers)).eval()
    params = rotfn_params(model)
    if plan is None:
        return model, params, None
    try:
        check_plan(fn, describe(model, fn=fn), plan)
    except PlanError as err:
        raise Source(fn, "dir", directory).error(f"a {ROTFN_JSON} whose plan fits the model there", str(err), _AGAIN) from None
    return model, FoldedParams(params, plan), plan
