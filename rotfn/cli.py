"""The ``rotfn`` command: ``fold``, ``learn``, ``calibrate``, ``inspect``, ``report``, ``demo`` (also ``python -m rotfn``).

Subcommands:

* ``rotfn fold SRC DST --plan quarot --r1 hadamard --r2 hadamard``: fold a plan into a
  Hugging Face checkpoint directory on disk, streaming (:func:`rotfn.fold_checkpoint`);
  ``--plan FILE`` folds a plan file (``rotfn learn --out``); ``--export compressed-tensors``
  writes the packed checkpoint vLLM serves instead; an interrupted fold resumes when the same
  command runs again, and a different one is refused unless ``--overwrite`` says to start over;
* ``rotfn learn DIR --out FILE``: learn the rotations of a quantized plan on calibration text
  (:func:`rotfn.learn.rotations`) and write the learned plan for ``rotfn fold --plan FILE``;
* ``rotfn calibrate DIR --out FILE``: round a plan's weights by GPTQ on calibration text
  (:func:`rotfn.calibrate`) and write the result (:func:`rotfn.calibration.save`) for
  ``rotfn fold SRC DST --calibration FILE``, which folds its plan with those weights (and, with
  ``--export``, its static activation scales);
* ``rotfn inspect PATH``: what a rotfn file (:func:`rotfn.save`), a plain safetensors file, an HF
  directory or an interrupted fold's directory holds: plan, rotations, formats, tensors, bytes,
  dtypes, what is done and how to resume;
* ``rotfn report DIR --format mxfp4``: the per-layer SQNR table of :func:`rotfn.report` for a
  ``per_linear`` plan on the directory's model (``--gptq``: with round to nearest vs GPTQ columns);
* ``rotfn demo``: rotfn's main job on an embedded real model (the private ``rotfn._demo``, imported
  only when the command runs).

Exit codes, for scripts:

* 0: success (also ``--help``);
* 1: the command failed: a rotfn error (bad checkpoint, plan that does not fit, ...), a file
  system error or a missing optional dependency;
* 2: usage error: no or unknown command, unknown option, bad or conflicting values;
* 130: interrupted (Ctrl-C);
* 141: stdout closed early (``rotfn inspect DIR | head -1``): quietly, as other Unix tools.

Every failure is one line on stderr, ``rotfn COMMAND: WHAT: ...``, naming the option or
argument as it is typed on the command line (the library's argument names are translated in
one place, :func:`_cli_message`) and how to fix it; no traceback.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Sequence

import torch

import rotfn
from rotfn._command import EXIT_INTERRUPTED, is_command
from rotfn.errors import RotfnError
from rotfn.specs.formats import FP8, NVFP4, IntQ

__all__ = ["ACT_FORMATS", "EXIT_BROKEN_PIPE", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "WEIGHT_FORMATS", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what shells report for a tool whose output pipe closed (| head)

#: Format names the ``--weights`` / ``--format`` options take, and the specs they stand for.
WEIGHT_FORMATS = {
    "mxfp4": rotfn.mxfp4(), "mxfp8": rotfn.mxfp8(), "nvfp4": rotfn.nvfp4(),
    "int4": rotfn.intq(4, group=32), "int8": rotfn.intq(8), "fp8": rotfn.fp8("channel"),
}
#: ... and those of ``--acts``: the same, FP8 one scale per token (the name engines know; per row either way).
ACT_FORMATS = {**WEIGHT_FORMATS, "fp8": rotfn.fp8("token")}
_EXPORT_ACTS = ("mxfp4", "int8", "fp8")  # what --export streams: scales the engine computes (no calibration)
_STATIC_ACTS = ("nvfp4",)  # ... and with --calibration FILE: a static global scale per linear, from the file
_ROTATIONS = ("hadamard", "orthogonal", "none")
_BUILDERS = ("quarot", "per_linear")
_REPORT_TOKENS, _GPTQ_TOKENS = 32, 512  # GPTQ fits a Hessian: it needs more tokens than a linear has inputs
#: A sentence for ``rotfn report`` when the directory has no tokenizer (or with --random).
TEXT = ("Rotations spread the outliers of weights and activations over many channels, "
        "so a coarse number format loses less of the signal.")

_EPILOG = """examples:
  rotfn fold llama-3-8b llama-3-8b-quarot --plan quarot --r1 hadamard --r2 hadamard
  rotfn learn llama-3-8b --r2 hadamard --weights int4 --acts int4 --out learned.safetensors
  rotfn fold llama-3-8b llama-3-8b-learned --plan learned.safetensors
  rotfn inspect llama-3-8b-quarot
  rotfn report llama-3-8b --format mxfp4 --block 32
  rotfn demo --rows 64

exit codes: 0 ok, 1 the command failed, 2 usage error, 130 interrupted (one line on stderr says why),
141 stdout closed early (| head)
"""


def _rotation_factory(kind: str, seed: int, block: int | None) -> Callable | None:
    """``n -> Rotation`` for a rotation named on the command line, or None for ``"none"``."""
    if kind == "none":
        return None
    if kind == "hadamard":
        return lambda n: rotfn.hadamard(n, block=block, seed=seed)
    return lambda n: rotfn.orthogonal(n, seed=seed, block=block)


def _usage(parser: argparse.ArgumentParser, text: str) -> None:
    parser.error(text)  # one line on stderr (_Parser.error), exits 2


# ----- plans from the command line (rotfn fold, rotfn learn) -------------------------------------
def _rotation_options(args: argparse.Namespace) -> tuple[str, str, str, str]:
    """``(r1, r2, r3, r4)`` as given, with the defaults (r1 hadamard, the others none); usage errors for a mix
    the builder does not take."""
    r1, r2, r3, r4 = args.r1 or "hadamard", args.r2 or "none", args.r3 or "none", args.r4 or "none"
    if args.plan == "per_linear" and (r2, r3, r4) != ("none",) * 3:
        _usage(args.parser, "--r2/--r3/--r4 are quarot's; per_linear takes its rotation from --r1")
    return r1, r2, r3, r4


def _builder_plan(args: argparse.Namespace, *, servable: bool = False) -> Callable:
    """``model -> Plan`` from the plan options (seeds: R1 seed, R2 seed + 1, R3 seed + 2, R4 seed + 3); ``servable``:
    weight formats as a served checkpoint holds them (``--export``)."""
    acts = None if args.acts is None else ACT_FORMATS[args.acts]
    if servable and acts is not None:
        acts = _servable(acts, None)
    seed = args.seed or 0
    r1, r2, r3, r4 = (_rotation_factory(k, seed + i, args.block) for i, k in enumerate(_rotation_options(args)))

    def plan(model):
        weights = None if args.weights is None else WEIGHT_FORMATS[args.weights]
        if servable and weights is not None:
            weights = _servable(weights, next(model.parameters()).dtype)
        if args.plan == "per_linear":
            return rotfn.plans.per_linear(model, rotation=r1, weights=weights, acts=acts)
        _check_quarot_family(args, model)
        return rotfn.plans.quarot(model, r1=r1, r2=r2, r3=r3, r4=r4, weights=weights, acts=acts)
    return plan


def _check_quarot_family(args: argparse.Namespace, model) -> None:
    """A FamilyError whose fix is an option when quarot has no adapter for the model (GPT-2's Conv1D linears, ...):
    per_linear needs none."""
    from rotfn.errors import FamilyError, message

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    families = rotfn.plans.FAMILIES
    if not any(model_type in family.model_types for family in families.values()):
        raise FamilyError(message(args.command, "plan", f"a model of a family quarot has an adapter for ({', '.join(sorted(families))})",
                                  f"{type(model).__name__} (model_type {model_type!r})",
                                  "rerun with --plan per_linear (a rotation at each linear's input; it needs no adapter)"))


def _servable(fmt, dtype: torch.dtype | None):
    """``fmt`` as a served checkpoint holds it bit for bit: NVFP4 with a power-of-two global scale, intq / fp8
    scales in the model's dtype (see rotfn.export_compressed); ``dtype`` None: an activation format (NVFP4 only)."""
    if isinstance(fmt, NVFP4):
        return rotfn.nvfp4("pow2")
    if isinstance(fmt, (IntQ, FP8)) and dtype in (torch.bfloat16, torch.float16):
        return dataclasses.replace(fmt, scale_dtype=str(dtype).removeprefix("torch."))
    return fmt


def _plan_arg(text: str) -> str:
    """An argparse ``type=`` for ``rotfn fold --plan``: a builder's name or an existing file."""
    if text in _BUILDERS or os.path.isfile(text):
        return text
    raise argparse.ArgumentTypeError(f"expected {', '.join(_BUILDERS)} or a plan file (rotfn learn --out FILE), "
                                     f"got {text!r}")


def _plan_file(args: argparse.Namespace) -> Callable:
    """``model -> Plan`` for ``--plan FILE`` (the plan options may not be given with it): the file's plan, refused in
    the command line's words when the file holds none or the plan was built for another model than SRC's."""
    from rotfn.errors import CheckpointError, message
    from rotfn.io import METADATA_KEY

    given = [f"--{k.replace('_', '-')}" for k in ("r1", "r2", "r3", "r4", "seed", "block", "weights", "acts")
             if getattr(args, k) is not None]
    if given:
        _usage(args.parser, f"{', '.join(given)}: the plan file {args.plan} holds the rotations and formats; drop them")
    expected = "a plan file (rotfn learn --out FILE, or rotfn.save with a plan)"
    fix = "pass --plan quarot or --plan per_linear with rotation options, or a file that rotfn learn --out wrote"
    _, metadata, _ = _header(args, "plan", args.plan, expected, fix, fn="load")  # fn: what rotfn.load names
    if METADATA_KEY not in metadata:
        raise CheckpointError(message("fold", "plan", expected, f"{args.plan!r}, a safetensors file without a rotfn "
                                      "plan (a checkpoint's weights?)", fix))
    _, plan = rotfn.load(args.plan)
    if plan is None:
        raise CheckpointError(message("fold", "plan", expected, f"{args.plan!r}, which holds params only", fix))
    return _for_src(args, plan, "plan", args.plan, "learn one on SRC: rotfn learn {src} --out FILE with the options "
                    "you learned this one with")


def _for_src(args: argparse.Namespace, plan, arg: str, path: str, fix: str) -> Callable:
    """``model -> plan`` for a plan read from a file, refused in the command line's words (``arg``: the option that
    named the file) when it was built for another model than SRC's; ``fix`` may name SRC as ``{src}``."""
    from rotfn.errors import PlanError, message

    def for_src(model):
        info = rotfn.plans.describe(model)
        if plan.signature != info.signature:
            raise PlanError(message("fold", arg, f"a plan for SRC's model ({info.cls}, signature {info.signature})",
                                    f"{path!r}, a plan for {plan.model} (signature {plan.signature}), another "
                                    "model's names or shapes", fix.format(src=shlex.quote(args.src_dir))))
        return plan
    return for_src


def _calibration_plan(args: argparse.Namespace):
    """``(calibration, model -> Plan)`` for ``--calibration FILE`` (the plan options may not be given with it)."""
    given = [f"--{k.replace('_', '-')}" for k in ("plan", "r1", "r2", "r3", "r4", "seed", "block", "weights", "acts")
             if getattr(args, k) is not None]
    if given:
        _usage(args.parser, f"{', '.join(given)}: the calibration file {args.calibration} holds the plan it was made "
                            "for; drop them")
    expected = "a calibration file (rotfn calibrate --out FILE, or rotfn.calibration.save)"
    _header(args, "calibration", args.calibration, expected,
            "pass the file that rotfn calibrate --out wrote", fn="calibration.load")
    calibration = rotfn.calibration.load(args.calibration)
    return calibration, _for_src(args, calibration.plan, "calibration", args.calibration,
                                 "calibrate SRC: rotfn calibrate {src} --out FILE with the plan options")


def _header(args: argparse.Namespace, dest: str, path: str, expected: str, fix: str, fn: str | None = None):
    """:func:`rotfn.io.read_header` of a file named on the command line; a file that is no safetensors file at all
    (``config.json``, a text file) is said in the command line's words, with ``expected`` and ``fix``."""
    from rotfn.errors import CheckpointError, message
    from rotfn.io import read_header

    try:
        return read_header(path, fn=fn or args.command)
    except CheckpointError:
        if path.endswith(".safetensors"):
            raise  # a damaged safetensors file: read_header says what is wrong with it
        raise CheckpointError(message(args.command, dest, expected, f"{path!r}, which is not a safetensors file",
                                      fix)) from None


# ----- rotfn fold ---------------------------------------------------------------------------------
def _run_fold(args: argparse.Namespace) -> int:
    from rotfn.io import read_rotfn_json

    calibration = None
    if args.calibration is not None:
        calibration, plan = _calibration_plan(args)
    elif (args.plan or "quarot") in _BUILDERS:
        args.plan = args.plan or "quarot"
        if _rotation_options(args) == ("none",) * 4 and args.weights is None and args.acts is None:
            _usage(args.parser, "nothing to fold: give a rotation (--r1 ...), --weights or --acts")
        if args.export and args.acts not in (None, *_EXPORT_ACTS):
            _usage(args.parser, f"--acts {args.acts}: --export {args.export} serves activations whose scales the "
                                f"engine computes as it runs ({', '.join(_EXPORT_ACTS)}); static scales come from a "
                                f"calibration: rotfn calibrate SRC --out FILE --export {args.export} with these options, "
                                f"then rotfn fold SRC DST --calibration FILE --export {args.export}")
        plan = _builder_plan(args, servable=bool(args.export))
    else:
        plan = _plan_file(args)
    first = rotfn.distributed.first_writes()  # under torchrun: one progress bar and one summary, rank 0's
    stats = rotfn.fold_checkpoint(args.src_dir, plan, args.dst_dir, max_shard_size=args.max_shard_size,
                                  overwrite=args.overwrite, progress=not args.quiet and first, precision=args.precision,
                                  torch_threads=args.torch_threads or None, keep_freed_blocks=args.keep_freed_blocks,
                                  export=args.export, calibration=calibration, command=_command_line(args))
    (total,) = rotfn.distributed.all_reduce("fold", [torch.tensor([stats.tensors, stats.bytes_written,
                                                                   stats.shards_skipped])])  # each rank's share
    stats.tensors, stats.bytes_written, stats.shards_skipped = total.tolist()
    if not first:
        return EXIT_OK
    src, dst = args.src_dir, args.dst_dir
    if args.export:
        with open(os.path.join(dst, "config.json"), encoding="utf-8") as f:
            qconfig = json.load(f)["quantization_config"]
        transforms = ", ".join(qconfig["transform_config"].get("config_groups", {})) or "none"
        print(f"exported {src} -> {dst} ({args.export}, format {qconfig['format']}, online transforms: "
              f"{transforms}): {_count(stats.tensors, 'tensor')} in {_count(stats.shards, 'shard')}, {_size(stats.bytes_written)} in "
              f"{stats.seconds:.1f} s")
        return EXIT_OK
    plan = read_rotfn_json(dst)
    print(f"folded {src} -> {dst}: {_count(stats.tensors, 'tensor')} written in {_count(stats.shards, 'shard')}"
          + (f" ({stats.shards_skipped} kept from an interrupted run)" if stats.shards_skipped else "")
          + f", {_size(stats.bytes_written)} in {stats.seconds:.1f} s")
    print(plan)
    if plan.online:
        kinds = ", ".join(f"{k} x{n}" for k, n in collections.Counter(o.role or o.kind for o in plan.online).items())
        are = "is" if len(plan.online) == 1 else "are"
        print(f"note: {_count(len(plan.online), 'online transform')} ({kinds}) {are} not in the weights, so plain "
              "transformers refuses the directory: load with rotfn.load_hf(dst) and run with rotfn.call, or, for an inference engine, fold with --export compressed-tensors where the plan "
              "exports (docs/howto/serving.md)", file=sys.stderr)
    return EXIT_OK


def _command_line(args: argparse.Namespace) -> str:
    """The command that started this one, as the user would type it again to resume: ``rotfn ...``, or under
    ``torchrun`` (``WORLD_SIZE`` > 1) ``torchrun [--nnodes N] --nproc-per-node M -m rotfn ...`` (rendezvous
    options are the user's own)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return shlex.join(["rotfn", *args.argv])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = ["--nnodes", str(world // local)] if world > local else []
    return shlex.join(["torchrun", *nodes, "--nproc-per-node", str(local), "-m", "rotfn", *args.argv])


@contextlib.contextmanager
def _process_group(command: str):
    """The process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1) for ``rotfn fold``, ``learn``, ``calibrate``:
    NCCL with CUDA (each rank on the GPU of its ``LOCAL_RANK``), else gloo; destroyed at the end, also on error.
    A group the caller initialized is used as it is."""
    if (command not in ("fold", "learn", "calibrate") or int(os.environ.get("WORLD_SIZE", "1")) <= 1
            or torch.distributed.is_initialized()):
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
        torch.distributed.barrier()  # leave together: a rank that tears gloo down while a peer still talks to it aborts
    finally:
        torch.distributed.destroy_process_group()


def _fold_interrupted(args: argparse.Namespace) -> str:
    """What an interrupted ``rotfn fold`` kept, from the progress marker it left in DST."""
    from rotfn.io import read_progress

    progress = read_progress(args.dst_dir) if os.path.isdir(args.dst_dir) else None
    if progress is None:
        return "interrupted before anything was kept; rerun the same command"
    if not progress.shards:
        return f"interrupted; 0 of {progress.tensors} tensors done (an export restarts); rerun the same command"
    return (f"interrupted; {progress.tensors_done} of {progress.tensors} tensors done; "
            "rerun the same command to resume")


# ----- rotfn inspect ------------------------------------------------------------------------------
def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**8 else f"{nbytes / 1e6:.2f} MB" if nbytes >= 10**4 else f"{nbytes} B"


def _count(n: int, noun: str) -> str:
    """``"1 shard"``, ``"3 shards"``."""
    return f"{n} {noun}{'s' * (n != 1)}"


def _dtypes(counts: collections.Counter) -> str:
    return ", ".join(f"{str(d).removeprefix('torch.')} x{n}" for d, n in counts.most_common())


def _inspect_file(args: argparse.Namespace, path: str) -> int:
    import safetensors

    from rotfn.io import METADATA_KEY, decode_plan, rotation_tensor_names

    directory = os.path.dirname(os.path.abspath(path))
    fix = (f"pass the checkpoint directory instead: rotfn inspect {shlex.quote(os.path.dirname(path) or '.')}"
           if os.path.isfile(os.path.join(directory, "config.json")) else "pass a .safetensors file or a directory")
    entries, metadata, _ = _header(args, "path", path, "a rotfn or safetensors file or a checkpoint directory", fix)
    if METADATA_KEY not in metadata:
        return _inspect_safetensors(path, entries)
    doc = json.loads(metadata[METADATA_KEY])
    params = doc.get("params", [])
    kinds = collections.Counter(p.get("kind") for p in params)
    print(f"rotfn file {path} (format {doc.get('format')} v{doc.get('version')}, folded: {doc.get('folded')})")
    section = doc.get("calibration")
    if isinstance(section, dict):  # rotfn calibrate's file: its weights are QTensors under weights.<key>
        rounded = sum(p.get("kind") == "qtensor" for p in params)
        rtn = len(section.get("rtn") or ())
        print(f"calibration: {rounded - rtn} weights rounded by GPTQ, {rtn} to nearest, {section.get('tokens')} "
              f"tokens, settings {section.get('settings')} (fold it: rotfn fold SRC DST --calibration "
              f"{shlex.quote(path)})")
    print(f"params: {len(params)} ({', '.join(f'{k} x{n}' for k, n in kinds.items())}); stored tensors: {len(entries)}, "
          f"{_size(sum(e.nbytes for e in entries))} ({_dtypes(collections.Counter(e.dtype for e in entries))})")
    formats = collections.Counter(rotfn.format_from_dict(p["format"]) for p in params if p.get("kind") == "qtensor")
    for fmt, n in formats.items():
        print(f"  QTensor {fmt!r} x{n}")
    if doc.get("plan") is None:
        print("plan: none")
        return EXIT_OK
    names = rotation_tensor_names(doc)
    with safetensors.safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in names}
    plan = decode_plan(doc, tensors, fn="inspect", arg="path", source=path)
    print(plan)
    return EXIT_OK


def _inspect_safetensors(path: str, entries) -> int:
    """A safetensors file without rotfn metadata (e.g. one shard of an HF checkpoint): its tensors."""
    from rotfn._table import format_table

    dtypes = collections.Counter(e.dtype for e in entries)
    print(f"safetensors file {path} (not a rotfn file): {_count(len(entries), 'tensor')}, "
          f"{_size(sum(e.nbytes for e in entries))} ({_dtypes(dtypes)})")
    rows = [(e.name, str(e.dtype).removeprefix("torch."), list(e.shape), _size(e.nbytes)) for e in entries]
    print(format_table(["tensor", "dtype", "shape", "bytes"], rows, align="llrr"))
    return EXIT_OK


def _inspect_incomplete(path: str) -> int:
    """The directory of an interrupted (or running) ``rotfn fold``: what is done, what is pending, how to resume."""
    from rotfn.io import read_progress

    progress = read_progress(path)
    if progress is None:
        print(f"incomplete rotfn fold {path}: its progress marker is from another rotfn version or damaged; "
              "rerun the fold with --overwrite to start over")
        return EXIT_OK
    done = sum(d for _, _, d in progress.shards)
    print(f"incomplete rotfn fold {path} (interrupted, or still running): not a checkpoint until the fold finishes")
    print(f"source: {progress.source}")
    if progress.shards:
        print(f"tensors: {progress.tensors_done} of {progress.tensors} done; shards: {done} of {len(progress.shards)} "
              "done")
        for name, n, finished in progress.shards:
            print(f"  {name}: {'done' if finished else 'pending'}, {_count(n, 'tensor')}")
    else:
        print(f"tensors: {progress.tensors}, an export (it restarts rather than resumes)")
    print(f"plan being folded:\n{progress.plan}")
    print(f"resume: {progress.command}" if progress.command else
          "resume: rerun the same rotfn.fold_checkpoint call (same source, plan and options)")
    return EXIT_OK


def _inspect_dir(path: str) -> int:
    from rotfn.io import MARKER, inventory, is_guarded, read_rotfn_json, unguard_config

    if os.path.exists(os.path.join(path, MARKER)):
        return _inspect_incomplete(path)
    ckpt = inventory(path, fn="inspect", arg="path")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    guarded = is_guarded(config)
    config = unguard_config(config)
    keys = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "dtype", "torch_dtype")
    print(f"Hugging Face checkpoint {path}")
    print("config: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config))
    if guarded:
        print("  rotfn only: plain transformers refuses this directory (its weights need the plan's online "
              "transforms): rotfn.load_hf + rotfn.call, or re-fold with --export compressed-tensors to serve it")
    per_file = collections.defaultdict(list)
    for file, entry in ckpt.tensors.values():
        per_file[file].append(entry)
    for file in ckpt.files:
        entries = per_file[file]
        print(f"  {file}: {_count(len(entries), 'tensor')}, {_size(sum(e.nbytes for e in entries))}")
    dtypes = collections.Counter(e.dtype for _, e in ckpt.tensors.values())
    print(f"tensors: {len(ckpt.tensors)} in {_count(len(ckpt.files), 'file')}, {_size(ckpt.nbytes)} ({_dtypes(dtypes)})")
    plan = read_rotfn_json(path)
    print("plan: none (rotfn.json absent: not folded by rotfn)" if plan is None else f"plan (folded, rotfn.json):\n{plan}")
    return EXIT_OK


def _run_inspect(args: argparse.Namespace) -> int:
    from rotfn.errors import CheckpointError, message

    path = args.path
    if os.path.isdir(path):
        return _inspect_dir(path)
    if os.path.isfile(path):
        return _inspect_file(args, path)
    raise CheckpointError(message("inspect", "path", "a rotfn or safetensors file or a checkpoint directory",
                                  repr(path), "check the path"))


# ----- rotfn report -------------------------------------------------------------------------------
def _shard_size(text: str) -> str:
    """``--max-shard-size`` checked while parsing (a bad value is a usage error, exit 2); the text is passed on."""
    from rotfn.io import _shard_bytes

    try:
        _shard_bytes("fold", text)
    except RotfnError:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB or 500MiB, got {text!r}") from None
    return text


def _tokenizer(directory: str):
    """The directory's transformers tokenizer, or None when it has none that loads and encodes text (transformers 5
    builds an empty one for a checkpoint saved without tokenizer files)."""
    try:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return tokenizer if len(tokenizer("rotfn encodes text")["input_ids"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_model(directory: str, dtype: torch.dtype | str = torch.float32) -> torch.nn.Module:
    """The directory's causal LM in float32 (or ``dtype``; ``"auto"``: as stored), eval mode, local files only
    (transformers' loading bar off: stderr is for rotfn's own progress and its one-line messages)."""
    import transformers
    from transformers.utils import logging

    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                                 dtype=dtype).eval()
    finally:
        if bar:
            logging.enable_progress_bar()


def _token_ids(directory: str, count: int, seed: int, random_ids: bool, vocab: int):
    """``[1, count]`` token ids: the built-in text through the directory's tokenizer, or seeded random ids.

    A directory without a tokenizer that encodes text (none at all, or the empty one transformers 5 builds
    for a checkpoint saved without tokenizer files) gets random ids, with a note on stderr.
    """
    tokenizer = None if random_ids else _tokenizer(directory)
    if tokenizer is not None:
        ids = tokenizer(" ".join([TEXT] * (1 + count // 8)), return_tensors="pt")["input_ids"][:, :count]
        if ids.numel():
            return ids, "the built-in text through the directory's tokenizer"
    if not random_ids:
        print(f"note: {directory} has no tokenizer that encodes text (no tokenizer files): random token ids "
              "instead; pass --random to ask for them", file=sys.stderr)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, count), generator=generator), f"random token ids (seed {seed})"


def _run_report(args: argparse.Namespace) -> int:
    from rotfn.errors import FoldError, message
    from rotfn.io import inventory, read_rotfn_json

    inventory(args.dir, fn="report", arg="dir")  # a readable checkpoint, before transformers loads it
    prior = read_rotfn_json(args.dir)
    if prior is not None:
        raise FoldError(message("report", "dir", "an unfolded checkpoint (report applies the rotations itself)",
                                f"one folded with {prior!r}", "run it on the original checkpoint"))
    model = _load_model(args.dir)
    fmt = WEIGHT_FORMATS[args.format]
    plan = rotfn.plans.per_linear(model, rotation=_rotation_factory(args.rotation, args.seed, args.block),
                                  weights=fmt, acts=fmt)
    tokens = args.tokens or (_GPTQ_TOKENS if args.gptq else _REPORT_TOKENS)
    ids, what = _token_ids(args.dir, tokens, args.seed, args.random, model.config.vocab_size)
    shape = f"{args.block} x {args.block} blocks" if args.block else "full size"
    print(f"{args.dir}: per_linear {args.rotation} rotation ({shape}, seed {args.seed}), {fmt!r} weights and "
          f"activations, on {ids.shape[1]} tokens of {what}")
    widest = max(n for _, n in rotfn.plans.describe(model).linears)
    if args.gptq and ids.numel() <= widest:
        print(f"note: {ids.numel()} tokens <= {widest} in-features: GPTQ fits directions these inputs never take, "
              f"so its in-sample gain is inflated; pass --tokens {2 * widest}", file=sys.stderr)
    print(rotfn.report(model, rotfn.params(model), plan, ids, gptq=args.gptq))
    return EXIT_OK


# ----- rotfn learn --------------------------------------------------------------------------------
def _learn_text(args: argparse.Namespace) -> str | None:
    """The ``--text`` file's text, or None (rotfn's own calibration prose)."""
    from rotfn.errors import ArgumentError, message

    if args.text is None:
        return None
    try:
        with open(args.text, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ArgumentError(message("learn", "text", "a readable UTF-8 text file", f"{args.text!r} ({err})",
                                    "give a plain text file, or leave --text out for rotfn's own text")) from None


def _learn_data(args: argparse.Namespace, text: str | None, vocab: int):
    """Calibration batches: ``text`` (or rotfn's own prose) through the directory's tokenizer, or as bytes."""
    tokenizer = _tokenizer(args.dir)
    what = f"{'--text ' + args.text if text is not None else 'rotfn calibration text'} through " + (
        "the directory's tokenizer" if tokenizer is not None else f"bytes (mod {vocab}) as ids: DIR has no tokenizer")
    tokenize = tokenizer if tokenizer is not None else (lambda s: [b % vocab for b in s.encode()])
    data = rotfn.learn.calibration(tokenize, seq_len=args.seq_len, batch_size=args.batch_size,
                                   n_batches=args.n_batches, text=text)
    return data, what


def _device(text: str):
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None


def _run_learn(args: argparse.Namespace) -> int:
    from rotfn.errors import ArgumentError, FoldError, message
    from rotfn.io import inventory, read_rotfn_json

    if args.weights is None and args.acts is None:
        _usage(args.parser, "nothing to learn against: give --weights and/or --acts (rotations matter to quantizers)")
    if os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise ArgumentError(message("learn", "out", "a file path in an existing directory", repr(args.out),
                                    "create the directory first, or name a file"))  # before minutes of learning
    inventory(args.dir, fn="learn", arg="dir")  # a readable checkpoint, before transformers loads it
    prior = read_rotfn_json(args.dir)
    if prior is not None:
        raise FoldError(message("learn", "dir", "an unfolded checkpoint (learning folds the plan itself)",
                                f"one folded with {prior!r}", "run it on the original checkpoint"))
    text = _learn_text(args)
    model = _load_model(args.dir)
    plan = _builder_plan(args)(model)
    roles = tuple(r for r in rotfn.learn.LEARNABLE_ROLES if any(e.role == r for e in (*plan.rotations, *plan.online)))
    if not roles:
        _usage(args.parser, f"nothing to learn: the plan has no rotation of {', '.join(rotfn.learn.LEARNABLE_ROLES)} "
                            "(give --r1 hadamard, --r2 ...)")
    data, what = _learn_data(args, text, model.config.vocab_size)
    params = rotfn.params(model)
    first = rotfn.distributed.first_writes()  # under torchrun: rank 0 reports and writes the plan
    if not args.quiet and first:
        print(f"rotfn learn: {', '.join(roles)} of {plan!r} on {len(data)} batches of {args.batch_size} x "
              f"{args.seq_len} tokens ({what})", file=sys.stderr)
    result = rotfn.learn.rotations(model, params, plan, data, steps=args.steps, lr=args.lr, roles=roles,
                                   shard=args.shard, device=args.device, progress=not args.quiet)
    if not first:
        return EXIT_OK
    before, after = (rotfn.learn.evaluate(model, params, p, data) for p in (plan, result.plan))
    rotfn.save(args.out, {}, result.plan)
    matrices = f"{len(result.slots)} matri{'ces' if len(result.slots) != 1 else 'x'}"
    print(f"learned {', '.join(roles)} ({matrices}) in {args.steps} steps, lr {args.lr:g}: "
          f"{result.loss} on the calibration batches {before:.4f} -> {after:.4f}; wrote {args.out} "
          f"(fold it: rotfn fold {shlex.quote(args.dir)} DST --plan {shlex.quote(args.out)})")
    return EXIT_OK


# ----- rotfn calibrate ----------------------------------------------------------------------------
def _run_calibrate(args: argparse.Namespace) -> int:
    from rotfn.errors import ArgumentError, FoldError, message
    from rotfn.io import inventory, read_rotfn_json

    if args.weights is None:
        _usage(args.parser, "nothing to round: give --weights (GPTQ rounds the plan's quantized weights)")
    if args.export and args.acts not in (None, *_EXPORT_ACTS, *_STATIC_ACTS):
        _usage(args.parser, f"--acts {args.acts}: --export {args.export} serves activations quantized with scales "
                            f"the engine computes ({', '.join(_EXPORT_ACTS)}) or static ones from this calibration "
                            f"({', '.join(_STATIC_ACTS)})")
    if os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise ArgumentError(message("calibrate", "out", "a file path in an existing directory", repr(args.out),
                                    "create the directory first, or name a file"))  # before minutes of work
    inventory(args.dir, fn="calibrate", arg="dir")
    prior = read_rotfn_json(args.dir)
    if prior is not None:
        raise FoldError(message("calibrate", "dir", "an unfolded checkpoint (calibrate folds the plan itself)",
                                f"one folded with {prior!r}", "run it on the original checkpoint"))
    text = _learn_text(args)
    # the checkpoint's own dtype: the weights rounded are then those rotfn fold folds from SRC, bit for bit
    model = _load_model(args.dir, dtype="auto").to(args.device)
    plan = _builder_plan(args, servable=bool(args.export))(model)
    if args.export:  # a plan the export refuses, before minutes of calibration
        rotfn.io.check_exportable("calibrate", model, plan)
    data, what = _learn_data(args, text, model.config.vocab_size)
    first = rotfn.distributed.first_writes()  # under torchrun: every rank a share of the batches, rank 0 writes
    if not args.quiet and first:
        print(f"rotfn calibrate: {plan!r} on {len(data)} batches of {args.batch_size} x {args.seq_len} tokens ({what})",
              file=sys.stderr)
    calibration = rotfn.calibrate(model, rotfn.params(model), plan, data, sequential=args.sequential,
                                  activations=args.activations, damp=args.damp, act_order=args.act_order,
                                  progress=not args.quiet)
    if not first:
        return EXIT_OK
    rotfn.calibration.save(args.out, calibration)
    export = f" --export {args.export}" if args.export else ""
    unrouted = sum(len(e) for e in calibration.unrouted.values())
    print(f"calibrated {len(calibration.weights) - len(calibration.rtn)} weights by GPTQ"
          + (f" ({len(calibration.rtn)} to nearest: no input statistics reach them)" if calibration.rtn else "")
          + (f" ({unrouted} experts no calibration token reached: to nearest; more --batches may reach them)"
             if unrouted else "")
          + f" on {calibration.tokens} tokens; wrote {args.out} (fold it: rotfn fold {shlex.quote(args.dir)} DST "
          f"--calibration {shlex.quote(args.out)}{export})")
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    try:
        from rotfn import _demo  # the application, out of the library's import path

        return _demo.run(seed=args.seed, rows=args.rows)
    except ModuleNotFoundError as err:
        if err.name != "hypothesis":
            raise
        print("rotfn demo: needs hypothesis (for rotfn.testing); fix: pip install 'rotfn[test]'", file=sys.stderr)
        return EXIT_FAILED


# ----- the parser ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: ``rotfn fold: --block: expected ... (see rotfn fold --help)``."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message.removeprefix('argument ')} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse ``type=``: the argument as an int >= ``minimum``, else an error saying it expected ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive = _int_at_least(1, "a positive int")
_seed = _int_at_least(0, "an int >= 0")


def _positive_number(text: str) -> float:
    """An argparse ``type=``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _subparser(commands, name: str, help_text: str, epilog: str, func, interrupted=None) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func, parser=parser, interrupted=interrupted)
    return parser


def _add_plan_options(parser: argparse.ArgumentParser, plan_files: bool) -> None:
    """The options that build a plan (rotfn fold, rotfn learn); ``plan_files``: --plan also takes a plan file."""
    if plan_files:
        parser.add_argument("--plan", type=_plan_arg, default=None, metavar="{quarot,per_linear,FILE}",
                            help="plan builder (default quarot), or a plan file written by rotfn learn --out "
                                 "(or rotfn.save with a plan): then the rotation and format options come from it")
    else:
        parser.add_argument("--plan", choices=_BUILDERS, default="quarot", help="plan builder (default quarot)")
    parser.add_argument("--r1", choices=_ROTATIONS, default=None,
                        help="quarot: residual rotation R1; per_linear: the rotation of every linear input "
                             "(default hadamard)")
    for name, what in (("--r2", "per head on V and O"), ("--r3", "online on Q and K"), ("--r4", "before down_proj")):
        parser.add_argument(name, choices=_ROTATIONS, default=None, help=f"quarot only: {what} (default none)")
    parser.add_argument("--seed", type=_seed, default=None, help="seed of the random signs / orthogonal matrices "
                                                                 "(default 0)")
    parser.add_argument("--block", type=_positive, default=None, help="block-diagonal rotations with B x B blocks")
    parser.add_argument("--weights", choices=tuple(WEIGHT_FORMATS), default=None,
                        help="fake-quantize the folded weights")
    parser.add_argument("--acts", choices=tuple(ACT_FORMATS), default=None,
                        help="fake-quantize linear inputs (online, at run time" + (
                            ": the folded directory then needs rotfn.load_hf + rotfn.call, or --export "
                            "compressed-tensors for an engine)" if plan_files else ")"))


def _add_text_options(parser: argparse.ArgumentParser, written: str) -> None:
    """What rotfn learn and rotfn calibrate share: DIR, --out FILE (``written`` goes there), --text, the plan
    options, and the windows the text is cut into."""
    parser.add_argument("dir", metavar="DIR", help="an unfolded checkpoint directory")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help=f"where to write {written} (a rotfn file, see rotfn inspect FILE)")
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="calibration text, paragraphs separated by blank lines (default: rotfn's own, ~11 KB)")
    _add_plan_options(parser, plan_files=False)
    parser.add_argument("--seq-len", type=_int_at_least(2, "an int >= 2"), default=128,
                        help="tokens per window (default 128)")
    parser.add_argument("--batch-size", type=_positive, default=4, help="windows per batch (default 4)")
    parser.add_argument("--batches", dest="n_batches", type=_positive, default=4,
                        help="calibration batches, taken in turn (default 4)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``rotfn`` command, one subparser per subcommand.

    Returns:
        An ``argparse.ArgumentParser``; a parsed namespace has ``command`` and ``func(args) -> int``.

    Example:
        >>> build_parser().parse_args(["demo", "--seed", "3"]).seed
        3
        >>> build_parser().parse_args(["fold", "a", "b", "--r2", "hadamard"]).r2
        'hadamard'
    """
    parser = _Parser(
        prog="rotfn",
        description="rotfn: rotations (Hadamard, ...) and quantizers (MXFP4, NVFP4, INT, FP8) for PyTorch models.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rotfn {rotfn.__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    formats = ", ".join(f"{k} = {v!r}" for k, v in WEIGHT_FORMATS.items())

    fold = _subparser(commands, "fold", "fold a rotation plan into a Hugging Face checkpoint directory, streaming",
                      "examples:\n"
                      "  rotfn fold llama llama-quarot --plan quarot --r1 hadamard --r2 hadamard\n"
                      "  rotfn fold llama llama-w4 --plan per_linear --r1 hadamard --block 32 --weights mxfp4\n"
                      "  rotfn fold llama llama-w4a8 --r4 hadamard --weights int4 --acts int8 --export compressed-tensors\n"
                      "  rotfn fold llama llama-quarot --plan quarot --r1 orthogonal --seed 7 --overwrite\n"
                      "  rotfn fold llama llama-learned --plan learned.safetensors      (from rotfn learn --out)\n"
                      "  rotfn fold llama llama-nvfp4 --r1 hadamard --r2 hadamard --r4 hadamard --weights nvfp4 "
                      "--export compressed-tensors\n\n"
                      "An interrupted fold (Ctrl-C: exit 130) leaves DST marked incomplete (.rotfn-incomplete; "
                      "rotfn inspect DST shows it);\nrerun the same command to resume it. A different command on "
                      "that DST is refused; --overwrite starts over.\n"
                      "Seeds: R1 uses --seed, R2 --seed + 1, R3 --seed + 2, R4 --seed + 3.\n"
                      f"Formats: {formats}.", _run_fold, _fold_interrupted)
    fold.add_argument("src_dir", metavar="SRC", help="checkpoint directory (config.json + safetensors)")
    fold.add_argument("dst_dir", metavar="DST",
                      help="output directory (created; resumed if an earlier fold of the same command was interrupted)")
    _add_plan_options(fold, plan_files=True)
    fold.add_argument("--max-shard-size", default="5GB", type=_shard_size,
                      help="largest output shard, e.g. 5GB or 500MiB (default 5GB)")
    fold.add_argument("--precision", choices=("float64", "float32"), default="float64",
                      help="what the fold computes in: float64 (default, rounded once) or float32 (as fast with rotfn[cpu] "
                           "installed, faster without it; "
                           "half-precision weights may differ from the float64 fold by one ulp in rare elements)")
    fold.add_argument("--torch-threads", type=int, default=1, metavar="N",
                      help="torch intra-op threads while folding (default 1: one per worker is fastest; 0 leaves them)")
    fold.add_argument("--keep-freed-blocks", action=argparse.BooleanOptionalAction, default=True,
                      help="glibc malloc keeps freed blocks while folding (default on; faster, see fold_checkpoint)")
    fold.add_argument("--overwrite", action="store_true",
                      help="replace a complete checkpoint in DST, or start over where an interrupted fold of "
                           "another command left DST")
    fold.add_argument("--export", choices=("compressed-tensors",), default=None,
                      help="write a checkpoint vLLM serves (packed weights, quantization_config, online transforms); "
                           "--weights nvfp4 exports as nvfp4('pow2'), int/fp8 scales in the model's dtype")
    fold.add_argument("--calibration", default=None, metavar="FILE",
                      help="a file rotfn calibrate --out wrote: its plan is folded (no plan options then), the "
                           "weights it rounded by GPTQ are written with its codes, and --export takes its static "
                           "activation scales (--acts nvfp4)")
    fold.add_argument("--quiet", action="store_true", help="no progress bar")

    calibrate = _subparser(commands, "calibrate", "round a plan's weights by GPTQ against calibration text (and "
                           "measure static activation scales) and write them for rotfn fold --calibration FILE",
                           "examples:\n"
                           "  rotfn calibrate llama --r1 hadamard --r2 hadamard --weights int4 --out cal.safetensors\n"
                           "  rotfn fold llama llama-gptq --calibration cal.safetensors\n"
                           "  rotfn calibrate llama --r1 hadamard --r2 hadamard --r4 hadamard --weights nvfp4 --acts "
                           "nvfp4 --export compressed-tensors --sequential --device cuda --out nv.safetensors\n"
                           "  rotfn fold llama llama-nvfp4 --calibration nv.safetensors --export compressed-tensors\n\n"
                           "The model is loaded in its checkpoint's dtype (the weights rotfn fold reads); each quantized "
                           "linear's input Hessian is collected\nas the plan sees it, then GPTQ rounds its weight "
                           "(rotfn.calibrate). Text without --text: rotfn's own calibration prose.\n"
                           "Under torchrun the ranks split the batches and the solves; rank 0 writes FILE.\n"
                           f"Formats: {formats}.", _run_calibrate)
    _add_text_options(calibrate, "the calibration")
    calibrate.add_argument("--export", choices=("compressed-tensors",), default=None,
                           help="calibrate the plan rotfn fold --export builds from these options (servable formats)")
    calibrate.add_argument("--sequential", action="store_true",
                           help="block by block: each layer's Hessians from the model with the earlier layers rounded "
                                "(GPTQ's way; one layer's Hessians held at a time)")
    calibrate.add_argument("--activations", choices=rotfn.calibration.ACTIVATIONS, default="float",
                           help="collect the inputs with the plan's activation formats applied or not (default float)")
    calibrate.add_argument("--damp", type=_positive_number, default=0.01,
                           help="GPTQ damping, a fraction of the Hessian's mean diagonal (default 0.01)")
    calibrate.add_argument("--act-order", action="store_true", help="GPTQ columns in order of decreasing Hessian diagonal")
    calibrate.add_argument("--device", default="cpu", type=_device,
                           help="where the model runs (default cpu); cuda: each torchrun rank its LOCAL_RANK's GPU")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bar")

    learn = _subparser(commands, "learn", "learn the rotations of a quantized plan on calibration text (SpinQuant "
                       "style) and write the plan for rotfn fold --plan FILE",
                       "examples:\n"
                       "  rotfn learn llama --r2 hadamard --weights int4 --acts int4 --out learned.safetensors\n"
                       "  rotfn learn llama --plan per_linear --block 32 --weights mxfp4 --acts mxfp4 --steps 200 "
                       "--text domain.txt --out pl.safetensors\n"
                       "  rotfn fold llama llama-learned --plan learned.safetensors\n\n"
                       "The model is loaded in float32. Every rotation of the plan with a learnable role "
                       "(R1, R2, R4, per_linear) is learned;\nthe loss is next-token cross-entropy of the quantized "
                       "model. Text without --text: rotfn's own calibration prose.\n"
                       f"Formats: {formats}.", _run_learn)
    _add_text_options(learn, "the learned plan")
    learn.add_argument("--steps", type=_positive, default=50, help="Cayley SGD steps (default 50)")
    learn.add_argument("--lr", type=_positive_number, default=0.5, help="step size (default 0.5)")
    learn.add_argument("--device", default="cpu", type=_device,
                       help="where learning runs (default cpu); cuda: each torchrun rank its LOCAL_RANK's GPU")
    learn.add_argument("--shard", action="store_true",
                       help="hold the weights in pieces over the torchrun ranks (1/N each on --device); each module's "
                            "are gathered and folded when it runs")
    learn.add_argument("--quiet", action="store_true", help="no progress bar")

    inspect = _subparser(commands, "inspect", "show what a rotfn file, a safetensors file or a Hugging Face checkpoint "
                         "directory holds",
                         "examples:\n  rotfn inspect model.safetensors    a file written by rotfn.save (or any "
                         "safetensors file: its tensors)\n"
                         "  rotfn inspect llama-quarot          config, shards, tensors, dtypes and the rotfn.json plan\n"
                         "  rotfn inspect llama-partial         an interrupted fold: shards done and pending, the "
                         "plan, the command that resumes it",
                         _run_inspect)
    inspect.add_argument("path", metavar="FILE_OR_DIR", help="a rotfn or safetensors file, or a checkpoint directory")

    report = _subparser(commands, "report", "per-layer SQNR of a format with and without rotation on a checkpoint's model",
                        "examples:\n  rotfn report llama --format mxfp4\n"
                        "  rotfn report llama --format nvfp4 --rotation hadamard --block 16 --tokens 64 --random\n"
                        "  rotfn report llama --format int4 --gptq --tokens 512\n\n"
                        "The model is loaded in float32; tokens come from the directory's tokenizer on a built-in "
                        "text, or are random ids (--random, or a directory without tokenizer files: a note says so).\n"
                        f"Formats: {formats}.", _run_report)
    report.add_argument("dir", metavar="DIR", help="an unfolded checkpoint directory")
    report.add_argument("--format", choices=tuple(WEIGHT_FORMATS), default="mxfp4",
                        help="weight and activation format (default mxfp4)")
    report.add_argument("--rotation", choices=_ROTATIONS[:2], default="hadamard", help="rotation (default hadamard)")
    report.add_argument("--block", type=_positive, default=None, help="block-diagonal rotation with B x B blocks")
    report.add_argument("--seed", type=_seed, default=0, help="seed of the signs and of random ids (default 0)")
    report.add_argument("--tokens", type=_positive, default=None,
                        help=f"tokens to run (default {_REPORT_TOKENS}, {_GPTQ_TOKENS} with --gptq)")
    report.add_argument("--random", action="store_true", help="random token ids even if the directory has a tokenizer")
    report.add_argument("--gptq", action="store_true",
                        help="also the SQNR of each linear's output with its weight rounded to nearest and by GPTQ, "
                             "fitted on these same tokens (in-sample: an upper bound; give more tokens than the "
                             "in-features); holds an [in, in] float64 Hessian per linear")

    demo_parser = _subparser(commands, "demo", "print rotfn's main job on an embedded real model and built-in data "
                             "(seconds on a CPU)", "example:\n  rotfn demo --seed 1", _run_demo)
    demo_parser.add_argument("--seed", type=_seed, default=0, help="seed of the data and the sign vectors (default 0)")
    demo_parser.add_argument("--rows", type=_positive, default=256,
                             help="rows of the [rows, 4096] activations of the format table (default 256)")
    return parser


#: Library arguments that an option feeds under another name: ``(command, function, argument): option dest``.
_FED_BY = {
    ("fold", "load", "path"): "plan",  # --plan FILE, read by rotfn.load
    ("fold", "fold_checkpoint", "path"): "src_dir",  # a shard of SRC (the message names the file)
    ("report", "report", "path"): "dir", ("learn", "learn", "path"): "dir",  # a shard of DIR
    ("learn", "save", "path"): "out",  # --out FILE, written by rotfn.save
    ("fold", "calibration.load", "path"): "calibration",  # --calibration FILE
    ("calibrate", "calibration.save", "path"): "out", ("calibrate", "calibrate", "path"): "dir",
}
_ARGUMENT = re.compile(r"^([\w.]+): argument '([^']+)': ")


def _cli_message(args: argparse.Namespace, text: str) -> str:
    """A library error's text in the command line's words: ``fold_checkpoint: argument 'dst_dir': ...`` becomes
    ``DST: ...``, ``overwrite=True`` becomes ``--overwrite``, for every argument an option of the command feeds.

    The one place that translates: each option's name comes from the parser (its flag, or its metavar for a
    positional argument), keyed by the library argument it feeds (its dest, or :data:`_FED_BY`).
    """
    options = {}
    for action in args.parser._actions:
        name = action.option_strings[0] if action.option_strings else action.metavar
        if name and action.dest != "help":
            options[action.dest] = name
    match = _ARGUMENT.match(text)
    if match:
        dest = _FED_BY.get((args.command, match.group(1), match.group(2)), match.group(2))
        if dest == "plan" and getattr(args, "calibration", None):  # rotfn fold --calibration FILE: the file's plan
            dest = "calibration"
        if dest in options:
            text = f"{options[dest]}: {text[match.end():]}"
    for dest, option in options.items():
        if "_" in dest or option.startswith("--"):
            text = re.sub(rf"\b{re.escape(dest)}=True\b", option, text)
        if "_" in dest:  # library names like dst_dir; a plain word such as "path" stays a word
            text = re.sub(rf"\b{re.escape(dest)}\b", option, text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rotfn`` command.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0 on success (and for ``--help`` and ``--version``), 1 when the command failed (a rotfn
        error, a file system error or a missing optional dependency), 2 on a usage error (no or unknown command,
        unknown option, bad value), 130 when interrupted (Ctrl-C), 141 when stdout's reader went away (``rotfn
        inspect DIR | head -1``: nothing more is written, no message, as other Unix tools); every failure is one
        line on stderr.

    Example:
        >>> main(["no-such-command"])
        2
    """
    code = None
    try:
        code = _run_command(argv)
        sys.stdout.flush()  # a pipe closed early shows here, not in the interpreter's last flush
        if is_command():  # done: a Ctrl-C now would only break the interpreter's exit (a traceback, or death by it)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except BrokenPipeError:
        return _closed_stdout()
    except KeyboardInterrupt:  # outside the command's own run: while parsing, or as it returned
        if code is not None:
            return code
        print("rotfn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


def _closed_stdout() -> int:
    """Exit code for a stdout whose reader has gone; stdout now writes to ``os.devnull``, so that the interpreter's
    last flush of what is still buffered does not fail once more (a message and exit code 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (an in-process caller's stdout): nothing is flushed at exit
        pass
    return EXIT_BROKEN_PIPE


def _run_command(argv: Sequence[str] | None) -> int:
    """:func:`main` but for a closed stdout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            (args.parser if args.command else parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as stop:  # argparse exits on --help / --version (0) and on usage errors (2)
        return EXIT_OK if stop.code is None else int(stop.code)
    if args.command is None:
        print("rotfn: a command is required, e.g. rotfn demo (see rotfn --help)", file=sys.stderr)
        return EXIT_USAGE
    args.argv = argv
    prefix = f"rotfn {args.command}:"
    try:
        with _process_group(args.command):
            return args.func(args)
    except SystemExit as stop:  # a usage error found after parsing (parser.error)
        return EXIT_USAGE if stop.code is None else int(stop.code)
    except KeyboardInterrupt:
        print(f"{prefix} {args.interrupted(args) if args.interrupted else 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RotfnError as err:
        print(f"{prefix} {_cli_message(args, str(err))}", file=sys.stderr)
    except ModuleNotFoundError as err:
        print(f"{prefix} needs the Python package {err.name!r}; fix: pip install 'rotfn[hf]'", file=sys.stderr)
    except BrokenPipeError:
        raise  # stdout closed early: main's to handle, not a failure to report
    except OSError as err:
        print(f"{prefix} {err}", file=sys.stderr)
    return EXIT_FAILED
