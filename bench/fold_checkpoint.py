"""Streaming fold of a Llama-3-8B-shaped checkpoint: wall time, throughput and peak memory against a plain copy.

Not a test: it writes a random bf16 checkpoint with the shapes of Llama-3-8B (hidden 4096,
intermediate 14336, 32 layers, 32 heads, 8 kv heads, vocab 128256, untied; ~16 GB) as
transformers saves one (``model-0000i-of-0000n.safetensors`` shards of at most 5 GB, an
index, config.json), generated piece by piece so memory stays low, and then measures, in
one run:

* **copy**: each shard read tensor by tensor through ``safetensors.safe_open`` (one open
  file per shard) and written back out with the same streaming writer the fold uses;
* **fold**: ``rotfn.fold_checkpoint`` with QuaRot R1 + R2 Hadamard rotations
  (``r1=hadamard(4096, seed=0)``, ``r2=hadamard(128, seed=1)``: norm fusion, R1 on every
  linear, the embedding and lm_head, R2 per head on V and O) with the library defaults, then
  with the two explicit options ``torch_threads=1`` and ``keep_freed_blocks=True``, then with
  those and ``precision="float32"`` (float32 math instead of float64, into the same directory).

The fold's first step, building the model skeleton from ``config.json``, imports transformers'
model code the first time (~2 s, once per process); the benchmark calls it once before timing.
Before each phase the source files' pages are dropped from the page cache
(``posix_fadvise(DONTNEED)``), so both read from disk. The load average (1 minute, mean of
start and end) of each phase is printed: on a shared machine other processes slow the
compute-bound fold far more than the copy. Throughput is source bytes per
second; the user and system CPU seconds of the process (all its threads) show how busy the
cores were. Peak RSS is the process's ``VmHWM`` after a reset through ``/proc/self/clear_refs``
(it includes the ~0.4 GB of the interpreter, torch and transformers). The copy's output is
deleted once measured, so the run needs about twice the checkpoint on disk (it checks, and
falls back to the largest Llama shape that fits, at least Llama-3.2-3B-sized, saying so).

Usage:
    python bench/fold_checkpoint.py              # full size: ~16 GB, tens of minutes on 2 cores
    python bench/fold_checkpoint.py --layers 2   # the same shapes with 2 layers (~2.9 GB), a few minutes
    python bench/fold_checkpoint.py --keep       # keep the generated files (printed paths)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import safetensors
import torch

import rotfn
from rotfn._table import format_table
from rotfn.io._checkpoint import INDEX, skeleton
from rotfn.io._shard import ShardWriter, TensorEntry, read_header

#: (name, config) of the shapes tried, largest first.
SHAPES = (
    ("Llama-3-8B", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}),
    ("Llama-3.2-3B (untied)", {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                               "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256,
                               "tie_word_embeddings": False}),
)
SHARD_BYTES = 5 * 10**9
GEN_PIECE = 1 << 25  # elements generated at a time (64 MiB of bf16)
RSS_GOAL = 3 * 2**30
SPEED_GOAL = 0.5


def _rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _drop_cache(directory: str) -> None:
    """Write back and evict the page cache of every file in ``directory`` (so the next read comes from disk)."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _config(shape: dict, layers: int | None):
    import transformers

    cfg = dict(shape)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return transformers.LlamaConfig(**cfg, rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16")


def _model_bytes(config) -> int:
    with torch.device("meta"):
        import transformers

        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(t.numel() * 2 for t in model.state_dict().values())


def generate(directory: str, config, seed: int = 0) -> int:
    """Write a random bf16 checkpoint of ``config`` as transformers shards it; returns its tensor bytes."""
    config.save_pretrained(directory)
    model = skeleton(directory)
    entries = [TensorEntry(k, torch.bfloat16, tuple(t.shape)) for k, t in model.state_dict().items()]
    shards, used = [], SHARD_BYTES
    for e in entries:
        if used + e.nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(e)
        used += e.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(seed)
    for name, group in zip(names, shards):
        writer = ShardWriter(os.path.join(directory, name), group, {"format": "pt"})
        for e in group:
            numel = torch.Size(e.shape).numel()
            rows = e.shape[0]
            step = max(1, GEN_PIECE * rows // numel)
            for lo in range(0, rows, step):
                piece_shape = (min(step, rows - lo), *e.shape[1:])
                x = torch.randn(piece_shape, generator=gen)
                x = 1 + 0.1 * x if e.name.endswith("norm.weight") else 0.02 * x
                writer.write(x.to(torch.bfloat16))
        writer.close()
        print(f"  wrote {name}", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": {e.name: n for n, group in zip(names, shards) for e in group}}
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return sum(e.nbytes for e in entries)


def copy(src: str, dst: str) -> None:
    """The baseline: every shard read tensor by tensor through safe_open and written back out."""
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not name.endswith(".safetensors"):
            shutil.copyfile(path, os.path.join(dst, name))
            continue
        entries, metadata, _ = read_header(path)
        writer = ShardWriter(os.path.join(dst, name), [TensorEntry(e.name, e.dtype, e.shape) for e in entries], metadata)
        with safetensors.safe_open(path, framework="pt") as f:
            for e in entries:
                writer.write(f.get_tensor(e.name))
        writer.close()


def _phase(label: str, run, src: str, nbytes: int) -> dict:
    _drop_cache(src)
    _rss_reset()
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    load = os.getloadavg()[0]
    run()
    seconds = time.perf_counter() - start
    end = resource.getrusage(resource.RUSAGE_SELF)
    load = (load + os.getloadavg()[0]) / 2
    return {"phase": label, "seconds": seconds, "gbps": nbytes / seconds / 1e9, "rss": _peak_rss(), "load": load,
            "user": end.ru_utime - cpu.ru_utime, "sys": end.ru_stime - cpu.ru_stime}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own, 32)")
    parser.add_argument("--keep", action="store_true", help="keep the generated and folded checkpoints")
    parser.add_argument("--dir", default=None, help="where to write (default: a new temporary directory)")
    args = parser.parse_args(argv)

    root = tempfile.mkdtemp(prefix="rotfn-bench-", dir=args.dir)
    free = shutil.disk_usage(root).free
    for label, shape in SHAPES:
        config = _config(shape, args.layers)
        need = 2.1 * _model_bytes(config)
        if need <= free:
            break
        print(f"{label}: needs {need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free; trying a smaller shape",
              file=sys.stderr)
    else:
        print(f"not enough disk for any shape ({free / 1e9:.1f} GB free)", file=sys.stderr)
        return 1
    src, dst, copied = (os.path.join(root, d) for d in ("src", "folded", "copy"))
    os.makedirs(src)
    layers = config.num_hidden_layers
    print(f"generating {label} with {layers} layers in {src} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    nbytes = generate(src, config)
    print(f"  {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    skeleton(src)  # the first call imports transformers' model code: once per process, not the fold's work
    print(f"  warm-up: skeleton(src) {time.perf_counter() - t0:.1f} s (imports; not timed)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with rotfn.dispatch.trace() as ran:  # the CPU kernel's first call loads (or, once per install, compiles) it
        rotfn.rotate(torch.randn(2, 64).bfloat16().double(), rotfn.hadamard(64, seed=0))  # bf16 values, as folded
    kernel = "numba kernel (rotfn.cpu)" if ran == [("rotate", "numba")] else "the torch reference (no numba)"
    print(f"  warm-up: float64 rotations run on {kernel}, {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    try:
        rows = [_phase("copy (safe_open + write)", lambda: copy(src, copied), src, nbytes)]
        shutil.rmtree(copied)
        r1, r2 = rotfn.hadamard(config.hidden_size, seed=0), rotfn.hadamard(config.head_dim, seed=1)
        stats = {}

        def fold(precision: str, **options) -> None:
            stats[precision] = rotfn.fold_checkpoint(src, lambda m: rotfn.plans.quarot(m, r1=r1, r2=r2), dst,
                                                     precision=precision, overwrite=True, **options)

        tuned = {"torch_threads": 1, "keep_freed_blocks": True}
        rows.append(_phase("fold R1+R2, library defaults", lambda: fold("float64"), src, nbytes))
        rows.append(_phase("  torch_threads=1, keep_freed_blocks", lambda: fold("float64", **tuned), src, nbytes))
        rows.append(_phase("  the same, precision='float32'", lambda: fold("float32", **tuned), src, nbytes))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    copy_row, default_row, fold_row, fold32_row = rows
    ratio, ratio32 = max(default_row["gbps"], fold_row["gbps"]) / copy_row["gbps"], fold32_row["gbps"] / copy_row["gbps"]
    print(f"\n{label}-shaped, {layers} layers, {nbytes / 1e9:.2f} GB bf16 "
          f"files; {platform.node()} {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{datetime.date.today()}; float64 rotations on {kernel}")
    print(f"fold: {stats['float64'].tensors} tensors, {stats['float64'].shards} shards, held at most "
          f"{stats['float64'].peak_held_bytes / 2**30:.2f} GiB of tensors")
    rss = max(default_row["rss"], fold_row["rss"], fold32_row["rss"])
    print(f"goals: peak RSS <= {RSS_GOAL / 2**30:.0f} GiB: {'met' if rss <= RSS_GOAL else 'NOT met'}; "
          f"throughput >= {SPEED_GOAL:.0%} of copy: float64 {ratio:.0%}, {'met' if ratio >= SPEED_GOAL else 'NOT met'}; "
          f"float32 {ratio32:.0%}, {'met' if ratio32 >= SPEED_GOAL else 'NOT met'}")
    if args.keep:
        print(f"files kept in {root}")
    print(format_table(["phase", "wall s", "GB/s", "peak RSS GiB", "load avg", "user s", "sys s"],
                       [[r["phase"], f"{r['seconds']:.1f}", f"{r['gbps']:.3f}", f"{r['rss'] / 2**30:.2f}", f"{r['load']:.1f}",
                         f"{r['user']:.1f}", f"{r['sys']:.1f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
