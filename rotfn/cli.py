"""The ``rotfn`` command: ``rotfn fold``, ``rotfn inspect``, ``rotfn report``, ``rotfn demo`` (also ``python -m rotfn``).

Subcommands:

* ``rotfn fold SRC DST --plan quarot --r1 hadamard --r2 hadamard``: fold a plan into a
  Hugging Face checkpoint directory on disk, streaming (:func:`rotfn.fold_checkpoint`);
  ``--export compressed-tensors`` writes the packed checkpoint vLLM serves instead;
* ``rotfn inspect PATH``: what a rotfn file (:func:`rotfn.save`) or an HF directory holds:
  plan, rotations, formats, tensors, bytes, dtypes;
* ``rotfn report DIR --format mxfp4``: the per-layer SQNR table of :func:`rotfn.report` for a
  ``per_linear`` plan on the directory's model (``--gptq``: with round to nearest vs GPTQ columns);
* ``rotfn demo``: rotfn's main job on an embedded real model (the private ``rotfn._demo``, imported
  only when the command runs).

Exit codes, for scripts:

* 0: success (also ``--help``);
* 1: the command failed: a rotfn error (bad checkpoint, plan that does not fit, ...), a file
  system error or a missing optional dependency; one line on stderr says what and how to fix it;
* 2: usage error: no or unknown command, unknown option, bad or conflicting values (usage on stderr).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

import torch

import rotfn
from rotfn.errors import RotfnError
from rotfn.specs.formats import FP8, NVFP4, IntQ

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "WEIGHT_FORMATS", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: Format names the ``--weights`` / ``--format`` options take, and the specs they stand for.
WEIGHT_FORMATS = {
    "mxfp4": rotfn.mxfp4(), "mxfp8": rotfn.mxfp8(), "nvfp4": rotfn.nvfp4(),
    "int4": rotfn.intq(4, group=32), "int8": rotfn.intq(8), "fp8": rotfn.fp8("channel"),
}
_ROTATIONS = ("hadamard", "orthogonal", "none")
_REPORT_TOKENS, _GPTQ_TOKENS = 32, 512  # GPTQ fits a Hessian: it needs more tokens than a linear has inputs
#: A sentence for ``rotfn report`` when the directory has no tokenizer (or with --random).
TEXT = ("Rotations spread the outliers of weights and activations over many channels, "
        "so a coarse number format loses less of the signal.")

_EPILOG = """examples:
  rotfn fold llama-3-8b llama-3-8b-quarot --plan quarot --r1 hadamard --r2 hadamard
  rotfn inspect llama-3-8b-quarot
  rotfn report llama-3-8b --format mxfp4 --block 32
  rotfn demo --rows 64

exit codes: 0 ok, 1 the command failed (message on stderr), 2 usage error
"""


def _rotation_factory(kind: str, seed: int, block: int | None) -> Callable | None:
    """``n -> Rotation`` for a rotation named on the command line, or None for ``"none"``."""
    if kind == "none":
        return None
    if kind == "hadamard":
        return lambda n: rotfn.hadamard(n, block=block, seed=seed)
    return lambda n: rotfn.orthogonal(n, seed=seed, block=block)


def _usage(parser: argparse.ArgumentParser, text: str) -> None:
    parser.error(text)  # prints usage and the text on stderr, exits 2


# ----- rotfn fold ---------------------------------------------------------------------------------
def _fold_plan(args: argparse.Namespace) -> Callable:
    """``model -> Plan`` from the fold options (seeds: R1 seed, R2 seed + 1, R3 seed + 2, R4 seed + 3)."""
    r1, r2, r3, r4 = (_rotation_factory(k, args.seed + i, args.block) for i, k in enumerate(
        (args.r1, args.r2, args.r3, args.r4)))

    def plan(model):
        weights = None if args.weights is None else WEIGHT_FORMATS[args.weights]
        if args.export and weights is not None:
            weights = _servable(weights, next(model.parameters()).dtype)
        if args.plan == "per_linear":
            return rotfn.plans.per_linear(model, rotation=r1, weights=weights)
        return rotfn.plans.quarot(model, r1=r1, r2=r2, r3=r3, r4=r4, weights=weights)
    return plan


def _servable(fmt, dtype: torch.dtype):
    """``fmt`` as a served checkpoint holds it bit for bit: NVFP4 with a power-of-two global scale, intq / fp8
    scales in the model's dtype (see rotfn.export_compressed)."""
    if isinstance(fmt, NVFP4):
        return rotfn.nvfp4("pow2")
    if isinstance(fmt, (IntQ, FP8)) and dtype in (torch.bfloat16, torch.float16):
        return dataclasses.replace(fmt, scale_dtype=str(dtype).removeprefix("torch."))
    return fmt


def _run_fold(args: argparse.Namespace) -> int:
    from rotfn.io import read_rotfn_json

    if args.plan == "per_linear" and (args.r2, args.r3, args.r4) != ("none",) * 3:
        _usage(args.parser, "--r2/--r3/--r4 are quarot's; per_linear takes its rotation from --r1")
    if args.r1 == "none" and args.r2 == args.r3 == args.r4 == "none" and args.weights is None:
        _usage(args.parser, "nothing to fold: give a rotation (--r1 ...) or --weights")
    stats = rotfn.fold_checkpoint(args.src, _fold_plan(args), args.dst, max_shard_size=args.max_shard_size,
                                  overwrite=args.overwrite, progress=not args.quiet, precision=args.precision,
                                  torch_threads=args.torch_threads or None, keep_freed_blocks=args.keep_freed_blocks,
                                  export=args.export)
    if args.export:
        with open(os.path.join(args.dst, "config.json"), encoding="utf-8") as f:
            qconfig = json.load(f)["quantization_config"]
        transforms = ", ".join(qconfig["transform_config"].get("config_groups", {})) or "none"
        print(f"exported {args.src} -> {args.dst} ({args.export}, format {qconfig['format']}, online transforms: "
              f"{transforms}): {stats.tensors} tensors in {stats.shards} shards, {_size(stats.bytes_written)} in "
              f"{stats.seconds:.1f} s")
        return EXIT_OK
    plan = read_rotfn_json(args.dst)
    print(f"folded {args.src} -> {args.dst}: {stats.tensors} tensors written in {stats.shards} shards"
          + (f" ({stats.shards_skipped} kept from an interrupted run)" if stats.shards_skipped else "")
          + f", {_size(stats.bytes_written)} in {stats.seconds:.1f} s")
    print(plan)
    if plan.online:
        print(f"note: {len(plan.online)} online transforms (R3/R4) are not in the weights, so plain transformers "
              "refuses the directory: load with rotfn.load_hf(dst) and run with rotfn.call, or fold with "
              "--export compressed-tensors for an inference engine", file=sys.stderr)
    return EXIT_OK


# ----- rotfn inspect ------------------------------------------------------------------------------
def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**8 else f"{nbytes / 1e6:.2f} MB" if nbytes >= 10**4 else f"{nbytes} B"


def _dtypes(counts: collections.Counter) -> str:
    return ", ".join(f"{str(d).removeprefix('torch.')} x{n}" for d, n in counts.most_common())


def _inspect_file(path: str) -> int:
    import safetensors

    from rotfn.errors import CheckpointError, message
    from rotfn.io import METADATA_KEY, decode_plan, read_header, rotation_tensor_names

    entries, metadata, _ = read_header(path, fn="inspect")
    if METADATA_KEY not in metadata:
        raise CheckpointError(message("inspect", "path", "a rotfn file (written by rotfn.save) or a checkpoint directory",
                                      f"{path!r}, a safetensors file without rotfn metadata",
                                      "inspect the directory that holds it, or read it with safetensors"))
    doc = json.loads(metadata[METADATA_KEY])
    params = doc.get("params", [])
    kinds = collections.Counter(p.get("kind") for p in params)
    print(f"rotfn file {path} (format {doc.get('format')} v{doc.get('version')}, folded: {doc.get('folded')})")
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


def _inspect_dir(path: str) -> int:
    from rotfn.io import GUARDED_MODEL_TYPE, MARKER, ORIGINAL_MODEL_TYPE, inventory, read_rotfn_json

    ckpt = inventory(path, fn="inspect", arg="path")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    guarded = config.get("model_type") == GUARDED_MODEL_TYPE
    if guarded:
        config["model_type"] = config.get(ORIGINAL_MODEL_TYPE)
    keys = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "dtype", "torch_dtype")
    print(f"Hugging Face checkpoint {path}")
    if os.path.exists(os.path.join(path, MARKER)):
        print("  INCOMPLETE: an interrupted rotfn fold is writing this directory; rerun the same `rotfn fold` to finish it")
    print("config: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config))
    if guarded:
        print("  rotfn only: plain transformers refuses this directory (its weights need the plan's online "
              "transforms): rotfn.load_hf + rotfn.call, or re-fold with --export compressed-tensors to serve it")
    per_file = collections.defaultdict(list)
    for file, entry in ckpt.tensors.values():
        per_file[file].append(entry)
    for file in ckpt.files:
        entries = per_file[file]
        print(f"  {file}: {len(entries)} tensors, {_size(sum(e.nbytes for e in entries))}")
    dtypes = collections.Counter(e.dtype for _, e in ckpt.tensors.values())
    print(f"tensors: {len(ckpt.tensors)} in {len(ckpt.files)} files, {_size(ckpt.nbytes)} ({_dtypes(dtypes)})")
    plan = read_rotfn_json(path)
    print("plan: none (rotfn.json absent: not folded by rotfn)" if plan is None else f"plan (folded, rotfn.json):\n{plan}")
    return EXIT_OK


def _run_inspect(args: argparse.Namespace) -> int:
    from rotfn.errors import CheckpointError, message

    path = args.path
    if os.path.isdir(path):
        return _inspect_dir(path)
    if os.path.isfile(path):
        return _inspect_file(path)
    raise CheckpointError(message("inspect", "path", "a rotfn file or a checkpoint directory", repr(path),
                                  "check the path"))


# ----- rotfn report -------------------------------------------------------------------------------
def _token_ids(directory: str, count: int, seed: int, random_ids: bool, vocab: int):
    """``[1, count]`` token ids: the built-in text through the directory's tokenizer, or seeded random ids.

    A directory without a tokenizer that encodes text (none at all, or the empty one transformers 5 builds
    for a checkpoint saved without tokenizer files) gets random ids, with a note on stderr.
    """
    import torch

    if not random_ids:
        try:
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
            ids = tokenizer(" ".join([TEXT] * (1 + count // 8)), return_tensors="pt")["input_ids"][:, :count]
        except (OSError, ValueError, KeyError, TypeError):
            ids = None
        if ids is not None and ids.numel():
            return ids, "the built-in text through the directory's tokenizer"
        print(f"note: {directory} has no tokenizer that encodes text (no tokenizer files): random token ids "
              "instead; pass --random to ask for them", file=sys.stderr)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, count), generator=generator), f"random token ids (seed {seed})"


def _run_report(args: argparse.Namespace) -> int:
    import torch

    from rotfn.errors import FoldError, message
    from rotfn.io import inventory, read_rotfn_json

    inventory(args.dir, fn="report", arg="dir")  # a readable checkpoint, before transformers loads it
    prior = read_rotfn_json(args.dir)
    if prior is not None:
        raise FoldError(message("report", "dir", "an unfolded checkpoint (report applies the rotations itself)",
                                f"one folded with {prior!r}", "run it on the original checkpoint"))
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, local_files_only=True, dtype=torch.float32).eval()
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


def _subparser(commands, name: str, help_text: str, epilog: str, func) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func, parser=parser)
    return parser


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
    parser = argparse.ArgumentParser(
        prog="rotfn",
        description="rotfn: rotations (Hadamard, ...) and quantizers (MXFP4, NVFP4, INT, FP8) for PyTorch models.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    formats = ", ".join(f"{k} = {v!r}" for k, v in WEIGHT_FORMATS.items())

    fold = _subparser(commands, "fold", "fold a rotation plan into a Hugging Face checkpoint directory, streaming",
                      "examples:\n"
                      "  rotfn fold llama llama-quarot --plan quarot --r1 hadamard --r2 hadamard\n"
                      "  rotfn fold llama llama-w4 --plan per_linear --r1 hadamard --block 32 --weights mxfp4\n"
                      "  rotfn fold llama llama-quarot --plan quarot --r1 orthogonal --seed 7 --overwrite\n"
                      "  rotfn fold llama llama-nvfp4 --r1 hadamard --r2 hadamard --r4 hadamard --weights nvfp4 "
                      "--export compressed-tensors\n\n"
                      "An interrupted fold leaves DST marked incomplete (.rotfn-incomplete); rerun the same command "
                      "to finish it.\nSeeds: R1 uses --seed, R2 --seed + 1, R3 --seed + 2, R4 --seed + 3.\n"
                      f"Formats: {formats}.", _run_fold)
    fold.add_argument("src", metavar="SRC", help="checkpoint directory (config.json + safetensors)")
    fold.add_argument("dst", metavar="DST", help="output directory (created; resumed if an earlier fold was interrupted)")
    fold.add_argument("--plan", choices=("quarot", "per_linear"), default="quarot", help="plan builder (default quarot)")
    fold.add_argument("--r1", choices=_ROTATIONS, default="hadamard",
                      help="quarot: residual rotation R1; per_linear: the rotation of every linear input (default hadamard)")
    for name, what in (("--r2", "per head on V and O"), ("--r3", "online on Q and K"), ("--r4", "before down_proj")):
        fold.add_argument(name, choices=_ROTATIONS, default="none", help=f"quarot only: {what} (default none)")
    fold.add_argument("--seed", type=_seed, default=0, help="seed of the random signs / orthogonal matrices (default 0)")
    fold.add_argument("--block", type=_positive, default=None, help="block-diagonal rotations with B x B blocks")
    fold.add_argument("--weights", choices=tuple(WEIGHT_FORMATS), default=None, help="fake-quantize the folded weights")
    fold.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MiB (default 5GB)")
    fold.add_argument("--precision", choices=("float64", "float32"), default="float64",
                      help="what the fold computes in: float64 (default, rounded once) or float32 (as fast with rotfn[cpu] "
                           "installed, faster without it; "
                           "half-precision weights may differ from the float64 fold by one ulp in rare elements)")
    fold.add_argument("--torch-threads", type=int, default=1, metavar="N",
                      help="torch intra-op threads while folding (default 1: one per worker is fastest; 0 leaves them)")
    fold.add_argument("--keep-freed-blocks", action=argparse.BooleanOptionalAction, default=True,
                      help="glibc malloc keeps freed blocks while folding (default on; faster, see fold_checkpoint)")
    fold.add_argument("--overwrite", action="store_true", help="replace a complete checkpoint in DST")
    fold.add_argument("--export", choices=("compressed-tensors",), default=None,
                      help="write a checkpoint vLLM serves (packed weights, quantization_config, online transforms); "
                           "--weights nvfp4 exports as nvfp4('pow2'), int/fp8 scales in the model's dtype")
    fold.add_argument("--quiet", action="store_true", help="no progress bar")

    inspect = _subparser(commands, "inspect", "show what a rotfn file or a Hugging Face checkpoint directory holds",
                         "examples:\n  rotfn inspect model.safetensors    a file written by rotfn.save\n"
                         "  rotfn inspect llama-quarot          config, shards, tensors, dtypes and the rotfn.json plan",
                         _run_inspect)
    inspect.add_argument("path", metavar="FILE_OR_DIR", help="a rotfn file or a checkpoint directory")

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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rotfn`` command.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0 on success (and for ``--help``), 1 when the command failed (a rotfn
        error, a file system error or a missing optional dependency; message on stderr),
        2 on a usage error (no or unknown command, unknown option, bad value; message on stderr).

    Example:
        >>> main(["no-such-command"])
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help (0) and on usage errors (2)
        return EXIT_OK if stop.code is None else int(stop.code)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("rotfn: error: a command is required (e.g. rotfn demo)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except SystemExit as stop:  # a usage error found after parsing (parser.error)
        return EXIT_USAGE if stop.code is None else int(stop.code)
    except RotfnError as err:  # the library's fixes name keyword arguments; here they are options
        print(f"rotfn {args.command}: {str(err).replace('pass overwrite=True', 'pass --overwrite')}", file=sys.stderr)
    except ModuleNotFoundError as err:
        print(f"rotfn {args.command}: needs the Python package {err.name!r}; fix: pip install 'rotfn[hf]'", file=sys.stderr)
    except OSError as err:
        print(f"rotfn {args.command}: {err}", file=sys.stderr)
    return EXIT_FAILED
