"""A :class:`Calibration` in one file: what ``rotfn calibrate`` writes and ``rotfn fold --calibration`` reads.

The file is a rotfn file (:func:`rotfn.save`'s layout: safetensors, no pickle) whose params are the
calibration's tensors under prefixes, ``weights.<key>`` (QTensors: the rounded weights),
``input_amax.<key>`` (0-d float32) and, when kept, ``hessians.<key>``; its plan is the
calibration's plan; the metadata document gets a ``"calibration"`` section::

    {"version": 1, "rtn": [key, ...], "unrouted": {key: [expert, ...]}, "tokens": int, "settings": {...},
     "digests": {key: hex}, "hessians": bool}

:func:`rotfn.load` refuses such a file (and :func:`load` a plain params file), naming the other.
"""

from __future__ import annotations

import os

import torch

from rotfn.calibration._calibrate import Calibration
from rotfn.errors import ArgumentError, CheckpointError, message
from rotfn.io import read_file, write_file
from rotfn.specs import QTensor

__all__ = ["load", "save"]

SECTION = "calibration"
VERSION = 1
_PARTS = ("weights", "input_amax", "hessians")


def save(path: str | os.PathLike, calibration: Calibration) -> None:
    """Write a calibration (GPTQ-rounded weights, input statistics, settings, plan) to one file, atomically.

    The rounded weights are stored as QTensors (codes and scales: a quarter to an eighth of the float
    weights for 4-bit formats), so a calibration made where the model fits (a GPU machine) can round the
    weights of a streaming fold elsewhere: ``rotfn.fold_checkpoint(src, plan, dst,
    calibration=rotfn.calibration.load(path))``. Tensors are written from CPU copies; the file appears
    complete or not at all (as :func:`rotfn.save`).

    Args:
        path: destination file (its directory must exist).
        calibration: a :func:`rotfn.calibrate` result.

    Raises:
        ArgumentError: ``calibration`` is not a Calibration; ``path`` as for :func:`rotfn.save`.

    Example:
        >>> import os, tempfile, torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard, weights=rotfn.intq(4, group=32))
        >>> calib = rotfn.calibrate(m, rotfn.params(m), plan, [torch.randn(256, 64)], progress=False)
        >>> path = os.path.join(tempfile.mkdtemp(), "calibration.safetensors")
        >>> rotfn.calibration.save(path, calib)
        >>> again = rotfn.calibration.load(path)
        >>> again.plan == plan, torch.equal(rotfn.fold(rotfn.params(m), plan, weights_by=again)["0.weight"],
        ...                                 rotfn.fold(rotfn.params(m), plan, weights_by=calib)["0.weight"])
        (True, True)
    """
    fn = "calibration.save"
    if not isinstance(calibration, Calibration):
        raise ArgumentError(message(fn, "calibration", "a rotfn.calibrate(...) result", type(calibration).__name__,
                                    "pass calibration=rotfn.calibrate(model, params, plan, batches)"))
    tensors: dict[str, torch.Tensor | QTensor] = {}
    for part in _PARTS:
        for key, value in (getattr(calibration, part) or {}).items():
            tensors[f"{part}.{key}"] = value.to("cpu")
    section = {"version": VERSION, "rtn": list(calibration.rtn), "tokens": calibration.tokens,
               "unrouted": {k: list(e) for k, e in calibration.unrouted.items()},
               "settings": dict(calibration.settings), "digests": dict(calibration.digests),
               "hessians": calibration.hessians is not None}
    write_file(fn, path, tensors, calibration.plan, (SECTION, section))


def load(path: str | os.PathLike) -> Calibration:
    """Read a file written by :func:`save`: the calibration, equal in every tensor and field (on the CPU).

    Args:
        path: a file written by :func:`rotfn.calibration.save` (or ``rotfn calibrate``).

    Returns:
        The :class:`Calibration`, for ``rotfn.fold(..., weights_by=)``, :func:`rotfn.fold_checkpoint`
        and :func:`rotfn.export_compressed` (``calibration=``).

    Raises:
        ArgumentError: ``path`` is not a file path. FileNotFoundError: no file there.
        CheckpointError: not a rotfn file, a params file (:func:`rotfn.save`'s, no calibration section), a
            calibration section of another version or malformed, or damaged tensors (as :func:`rotfn.load`).

    Example:
        See :func:`save`.
    """
    fn = "calibration.load"
    params, plan, doc = read_file(fn, path)
    section = doc.get(SECTION)

    def bad(expected: str, got, fix: str = "write it again with rotfn.calibration.save") -> CheckpointError:
        return CheckpointError(message(fn, "path", f"{os.fspath(path)}: {expected}", got, fix))

    if section is None:
        raise bad("a calibration file (written by rotfn.calibration.save or rotfn calibrate)",
                  "a params file without a calibration section", "read it with rotfn.load")
    if not isinstance(section, dict) or section.get("version") != VERSION:
        got = section.get("version") if isinstance(section, dict) else type(section).__name__
        raise bad(f"calibration section version {VERSION}", repr(got), "load it with the rotfn version that wrote it")
    if plan is None:
        raise bad("the plan the calibration was made for", "a file without a plan")
    parts: dict[str, dict] = {part: {} for part in _PARTS}
    for name, value in params.items():
        part, _, key = name.partition(".")
        if part not in parts or not key or isinstance(value, QTensor) != (part == "weights"):
            raise bad("tensors named weights.<key> (QTensors), input_amax.<key>, hessians.<key>", repr(name))
        parts[part][key] = value
    rtn, digests, settings = section.get("rtn"), section.get("digests"), section.get("settings")
    unrouted = section.get("unrouted")
    shapes_ok = (isinstance(rtn, list) and set(rtn) <= set(parts["weights"]) and isinstance(digests, dict)
                 and isinstance(unrouted, dict) and set(unrouted) <= set(parts["weights"])
                 and all(isinstance(e, list) and all(isinstance(i, int) for i in e) for e in unrouted.values())
                 and set(digests) == set(parts["weights"]) and isinstance(settings, dict)
                 and isinstance(section.get("tokens"), int) and isinstance(section.get("hessians"), bool))
    if not shapes_ok:
        raise bad("a calibration section with rtn (rounded keys), unrouted (experts per key), digests (one per "
                  "weight), settings, tokens, hessians", repr({k: type(v).__name__ for k, v in section.items()}))
    return Calibration(plan, parts["weights"], tuple(rtn), section["tokens"], settings,
                       parts["hessians"] if section["hessians"] else None, parts["input_amax"], digests,
                       {k: tuple(e) for k, e in unrouted.items()})
