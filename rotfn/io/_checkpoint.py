"""Hugging Face checkpoint directories as data: which tensor lives in which file, and a weightless model of them.

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"weight_map": {name: file}}``). :func:`inventory`
reads only the headers; :func:`skeleton` builds the model from ``config.json`` on the
``meta`` device (shapes, no storage), which is all a plan builder needs:
``rotfn.plans.quarot(skeleton(dir), ...)`` plans an 8B model in well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import os

from rotfn.errors import ArgumentError, CheckpointError, message
from rotfn.io._shard import TensorEntry, read_header

__all__ = ["INDEX", "SINGLE", "Checkpoint", "guard_config", "inventory", "is_guarded", "is_weight_file", "skeleton",
           "unguard_config"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: Suffixes of weight files in any format: never copied next to folded weights (they would hold unfolded ones).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json")


def is_weight_file(name: str) -> bool:
    """True for a file name that holds or indexes model weights (``*.safetensors``, ``*.bin``, ``*.index.json``, ...).

    Example:
        >>> is_weight_file("model-00001-of-00002.safetensors"), is_weight_file("tokenizer.json")
        (True, False)
    """
    return name.endswith(_WEIGHT_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The weight files of an HF directory and each tensor's place in them.

    Attributes:
        dir: the directory.
        files: weight file names, in the order their tensors are read.
        tensors: ``{name: (file, TensorEntry)}`` in read order (file order, then offset).
    """

    dir: str
    files: tuple[str, ...]
    tensors: dict[str, tuple[str, TensorEntry]]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in all files."""
        return sum(e.nbytes for _, e in self.tensors.values())


def _check_dir(fn: str, arg: str, directory) -> str:
    if not isinstance(directory, (str, os.PathLike)):
        raise ArgumentError(message(fn, arg, "a directory path (str or os.PathLike)", type(directory).__name__))
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(message(fn, arg, "an existing Hugging Face checkpoint directory", repr(directory),
                                      "pass the folder holding config.json and the *.safetensors files"))
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(message(fn, arg, "a Hugging Face checkpoint directory with config.json", repr(directory),
                                      "save the model with model.save_pretrained(dir) or rotfn.export_hf"))
    return directory


def _index_files(fn: str, directory: str) -> dict[str, str]:
    """``{tensor name: file}`` from the index, checked to name files that exist."""
    path = os.path.join(directory, INDEX)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError(type(weight_map).__name__)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(message(fn, "src_dir", f"{path}: JSON with a 'weight_map' of tensor name -> file",
                                      repr(err), "write the index again (model.save_pretrained)")) from None
    missing = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(directory, v))})
    if missing:
        raise CheckpointError(message(fn, "src_dir", f"every shard {INDEX} names", f"missing {missing[:4]}",
                                      "copy or download the missing shards"))
    return weight_map


def inventory(directory: str | os.PathLike, *, fn: str = "inventory", arg: str = "dir") -> Checkpoint:
    """Read the headers of an HF checkpoint's safetensors files (no tensor data).

    Args:
        directory: a directory with ``config.json`` and ``model.safetensors`` or an index and shards.
        fn, arg: the public function and argument to name in an error.

    Returns:
        A :class:`Checkpoint`.

    Raises:
        ArgumentError: not a path. CheckpointError: no config.json, no safetensors weights,
            a damaged index or header, or an index that disagrees with its shards.

    Example:
        >>> import tempfile, torch, transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                num_attention_heads=2, num_key_value_heads=1)
        >>> d = tempfile.mkdtemp()
        >>> transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        >>> ckpt = inventory(d)
        >>> ckpt.files, len(ckpt.tensors)
        (('model.safetensors',), 12)
    """
    directory = _check_dir(fn, arg, directory)
    if os.path.isfile(os.path.join(directory, INDEX)):
        weight_map = _index_files(fn, directory)
        files = list(dict.fromkeys(sorted(weight_map.values())))
    elif os.path.isfile(os.path.join(directory, SINGLE)):
        weight_map, files = None, [SINGLE]
    else:
        raise CheckpointError(message(fn, arg, f"{SINGLE} or {INDEX} in {directory!r}", "neither",
                                      "save the model in safetensors (model.save_pretrained(dir, safe_serialization=True))"))
    tensors: dict[str, tuple[str, TensorEntry]] = {}
    for file in files:
        entries, _, _ = read_header(os.path.join(directory, file), fn=fn)
        for e in entries:
            if e.name in tensors:
                raise CheckpointError(message(fn, arg, "each tensor in one file", f"{e.name!r} in {tensors[e.name][0]} "
                                              f"and {file}", "write the checkpoint again"))
            tensors[e.name] = (file, e)
    if weight_map is not None:
        wrong = sorted(k for k, v in weight_map.items() if tensors.get(k, ("",))[0] != v)
        unlisted = sorted(set(tensors) - set(weight_map))
        if wrong or unlisted:
            raise CheckpointError(message(fn, arg, f"an {INDEX} that matches its shards",
                                          f"{len(wrong)} names not where it says (e.g. {wrong[:3]}), "
                                          f"{len(unlisted)} unlisted (e.g. {unlisted[:3]})", "write the index again"))
    return Checkpoint(directory, tuple(files), tensors)


#: ``model_type`` in the ``config.json`` of a directory whose weights are right only with rotfn's online
#: transforms (:func:`rotfn.load_hf` then :func:`rotfn.call`): plain transformers refuses to build a model from
#: it instead of running it silently wrong. The real one is kept under :data:`ORIGINAL_MODEL_TYPE`.
#: The value is what transformers' refusal ("model type ... not recognized") shows the user, so it says what to do.
GUARDED_MODEL_TYPE = "rotfn-load_hf-only: load it with rotfn.load_hf(dir), serve it via rotfn.export_compressed"
ORIGINAL_MODEL_TYPE = "rotfn_model_type"
#: The ``dtype`` / ``torch_dtype`` entries of the guarded config as they were (``{key: value}``).
ORIGINAL_DTYPES = "rotfn_dtype"
_DTYPE_KEYS = ("dtype", "torch_dtype")  # transformers >= 4.56 reads dtype, earlier ones torch_dtype
_GUARDED_BEFORE = ("rotfn-load_hf-only",)  # the value earlier rotfn versions wrote
_NOTE = "rotfn_note"
GUARD_NOTE = ("rotfn: these weights need rotfn's online transforms (see rotfn.json): load with rotfn.load_hf(dir) "
              "and run with rotfn.call; for an inference engine export with rotfn.export_compressed or "
              "rotfn fold --export compressed-tensors")


def is_guarded(config: dict) -> bool:
    """True for a ``config.json`` dict written by :func:`guard_config` (by this rotfn or an earlier one)."""
    return config.get("model_type") in (GUARDED_MODEL_TYPE, *_GUARDED_BEFORE)


def guard_config(config: dict) -> dict:
    """``config`` (a ``config.json`` dict) made unloadable by plain transformers, the real values kept beside.

    Two entries change, both to :data:`GUARDED_MODEL_TYPE`, whose text each refusal quotes:

    * ``model_type``: the Auto classes (``AutoModelForCausalLM``, ``AutoConfig``, pipelines) refuse a type
      they do not know;
    * ``dtype`` and ``torch_dtype``: a model class (``LlamaForCausalLM.from_pretrained(dir)``) only warns
      about a foreign model type, but every transformers config turns its dtype name into
      ``getattr(torch, name)`` when it is built, which raises ``AttributeError`` (even when the caller passes
      ``dtype=``, which does not reach the config).

    :func:`unguard_config` undoes both. Passing ``config=`` to ``from_pretrained`` loads the weights anyway:
    that is the caller's explicit choice.

    Example:
        >>> guarded = guard_config({"model_type": "llama", "dtype": "bfloat16", "hidden_size": 8})
        >>> guarded["model_type"] == guarded["dtype"] == guarded["torch_dtype"] == GUARDED_MODEL_TYPE
        True
        >>> unguard_config(guarded) == {"model_type": "llama", "dtype": "bfloat16", "hidden_size": 8}
        True
    """
    if is_guarded(config):
        return config
    dtypes = {k: config[k] for k in _DTYPE_KEYS if k in config}
    return {**config, ORIGINAL_MODEL_TYPE: config["model_type"], ORIGINAL_DTYPES: dtypes, "model_type": GUARDED_MODEL_TYPE,
            **dict.fromkeys(_DTYPE_KEYS, GUARDED_MODEL_TYPE), _NOTE: GUARD_NOTE}


def unguard_config(config: dict) -> dict:
    """``config`` as it was before :func:`guard_config` (unchanged if not guarded); a config guarded by an earlier
    rotfn, which kept its dtype, gets its model type back."""
    if not is_guarded(config):
        return config
    restored = {k: v for k, v in config.items() if k not in (ORIGINAL_MODEL_TYPE, ORIGINAL_DTYPES, _NOTE)}
    restored["model_type"] = config.get(ORIGINAL_MODEL_TYPE)
    if ORIGINAL_DTYPES in config:
        for key in _DTYPE_KEYS:
            restored.pop(key, None)
        restored.update(config[ORIGINAL_DTYPES])
    return restored


def read_config(directory: str):
    """The transformers config of ``directory``'s ``config.json``, a guarded one (:func:`guard_config`) with its
    real model_type and dtype. Raises what transformers raises for a config it cannot read."""
    import transformers  # an optional dependency (rotfn[hf])
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if not is_guarded(config):
        return transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    config = unguard_config(config)
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def skeleton(directory: str | os.PathLike):
    """The model of an HF directory built from its ``config.json`` on the ``meta`` device: names and shapes, no data.

    ``transformers.AutoConfig`` reads the config (local files only) and
    ``AutoModelForCausalLM.from_config`` builds the model under ``torch.device("meta")``,
    so no memory is allocated for weights. Plan builders need nothing more:
    ``rotfn.plans.quarot(skeleton(dir), r1=...)``.

    Args:
        directory: a directory holding ``config.json``.

    Returns:
        A transformers ``*ForCausalLM`` whose parameters are on the meta device.

    Raises:
        ArgumentError: not a path. CheckpointError: no config.json, or one transformers cannot build a model from.

    Example:
        >>> import tempfile, transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                num_attention_heads=2, num_key_value_heads=1)
        >>> d = tempfile.mkdtemp()
        >>> cfg.save_pretrained(d)
        >>> model = skeleton(d)
        >>> model.model.embed_tokens.weight.device, tuple(model.lm_head.weight.shape)
        (device(type='meta'), (32, 16))
    """
    import torch
    import transformers  # an optional dependency (rotfn[hf])

    fn = "skeleton"
    directory = _check_dir(fn, "dir", directory)
    try:
        config = read_config(directory)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(message(fn, "dir", "a config.json transformers builds a causal LM from",
                                      f"{type(err).__name__}: {err}"[:300],
                                      "check config.json's model_type and architectures")) from None
