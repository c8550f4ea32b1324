"""CPU throughput of rotfn's torch reference: Hadamard rotation (FWHT) vs dense matmul, and qdq per format.

Not a test: it prints tables (the ones in ``docs/performance.md``). Each cell is the
median wall time (``time.perf_counter``) of repeated calls after one warm-up call;
the FWHT and the dense matmul of one size run interleaved. GB/s counts the bytes of
the input plus the output.

On a shared machine, another process that takes a core slows the FWHT about 8x and the
matmul about 2x: the FWHT is ~3 log2(n) parallel ops and in each one our threads wait for
the preempted one. Runs during which the scheduler preempted us often (involuntary context
switches, see :func:`time_ms`) are dropped and counted in the report.

The reference FWHT allocates about three full-size temporaries per butterfly pass.
With glibc's default settings freed 16 MiB blocks may go back to the OS and be
page-faulted in again on the next call. So by default the benchmark first asks
glibc malloc to keep them (:func:`rotfn.io._malloc.keep_freed_blocks`: the effect of
``MALLOC_MMAP_MAX_=0`` and ``MALLOC_TRIM_THRESHOLD_``, or of jemalloc) and measures the steady state;
``--default-malloc`` measures without that.

Usage:
    python bench/cpu.py                   # about 1-2 minutes on 2 idle cores
    python bench/cpu.py --quick           # fewer sizes and repeats, under a minute
    python bench/cpu.py --default-malloc  # glibc malloc as the environment configured it
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

import rotfn
from rotfn._demo.tables import FORMATS
from rotfn._table import format_table
from rotfn.io._malloc import SETTING, keep_freed_blocks

try:
    import resource
except ImportError:  # Windows has no resource module: no contention filter there
    resource = None

#: Powers of two, then K * 2^m model widths (K = 28, 172, 28).
SIZES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 3584, 11008, 14336)
QUICK_SIZES = (256, 1024, 4096, 16384, 3584)
#: Largest n timed as a dense matmul: M is n^2 float32 (1 GiB at 16384, 4 GiB at 32768).
DENSE_MAX = 16384
#: Input bytes per rotate call (the output adds as many).
CALL_BYTES = 16 << 20
QDQ_SHAPE = (4096, 4096)
GOAL_N, GOAL_SPEEDUP = 4096, 4.0
#: Involuntary context switches per second above which a run counts as contended (see :func:`time_ms`).
CONTENDED_SWITCHES_PER_S = 100


def rows_for(n: int) -> int:
    """Rows of the ``[rows, n]`` float32 input of one rotate call, so that it holds :data:`CALL_BYTES`."""
    return max(1, CALL_BYTES // (4 * n))


class Timing(NamedTuple):
    """Wall times of one function, in ms, over its uncontended runs (all runs if fewer than 3 were)."""

    median: float
    best: float
    runs: int
    contended: int

    @property
    def flagged(self) -> bool:
        """True when fewer than 3 runs were free of contention, so the numbers are of contended runs."""
        return self.runs - self.contended < 3


def _involuntary_switches() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw if resource else 0


def time_ms(fns: dict[str, Callable[[], object]], *, reps: int, min_s: float, max_s: float) -> dict[str, Timing]:
    """Time zero-argument functions, interleaved, and drop the runs during which another process took our cores.

    A run is contended when it saw at least 3 involuntary context switches and more than
    :data:`CONTENDED_SWITCHES_PER_S` per second: the scheduler kept preempting our threads for
    someone else's (an idle machine gives a few per run).

    Args:
        fns: name -> function to time.
        reps: uncontended runs wanted per function (after one warm-up call each).
        min_s: keep adding rounds until this many seconds have passed.
        max_s: stop after this many seconds even if fewer than ``reps`` runs were uncontended.

    Returns:
        name -> :class:`Timing`.

    Example:
        >>> sorted(time_ms({"noop": lambda: None}, reps=3, min_s=0.0, max_s=1.0))
        ['noop']
    """
    for fn in fns.values():
        fn()
    runs: dict[str, list[tuple[float, bool]]] = {name: [] for name in fns}
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        enough = all(sum(not bad for _, bad in r) >= reps for r in runs.values())
        if (enough and elapsed >= min_s) or elapsed >= max_s:
            break
        for name, fn in fns.items():
            switches, t0 = _involuntary_switches(), time.perf_counter()
            fn()
            seconds, switches = time.perf_counter() - t0, _involuntary_switches() - switches
            runs[name].append((1e3 * seconds, switches >= 3 and switches > CONTENDED_SWITCHES_PER_S * seconds))
    out = {}
    for name, r in runs.items():
        clean = [ms for ms, bad in r if not bad]
        use = clean if len(clean) >= 3 else [ms for ms, _ in r]
        out[name] = Timing(statistics.median(use), min(use), len(r), len(r) - len(clean))
    return out


def gbps(nbytes: int, ms: float) -> float:
    """Throughput in GB/s (1e9 bytes per second) of moving ``nbytes`` in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def machine_info() -> str:
    """One line: date, torch version, threads, cores and the CPU model."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"{datetime.date.today()}  torch {torch.__version__}  threads {torch.get_num_threads()}"
        f"  cores {os.cpu_count()}  {cpu} ({torch.backends.cpu.get_cpu_capability()})"
    )


def _ms(t: Timing, digits: int) -> str:
    return f"{t.median:.{digits}f}" + ("*" if t.flagged else "")


def _contention_note(timings: Sequence[Timing]) -> str:
    dropped, total = sum(t.contended for t in timings), sum(t.runs for t in timings)
    flagged = " ('*': fewer than 3 uncontended runs, all runs used)" if any(t.flagged for t in timings) else ""
    return f"runs dropped as contended (another process preempted us): {dropped} of {total}{flagged}"


def bench_rotate(sizes: Sequence[int], *, reps: int, min_s: float, max_s: float) -> dict[int, dict[str, Timing]]:
    """Time ``rotfn.rotate(x, hadamard(n), backend="torch")`` against ``x @ M`` and print the table.

    Args:
        sizes: orders n; dense is skipped above :data:`DENSE_MAX`.
        reps, min_s, max_s: see :func:`time_ms`.

    Returns:
        n -> ``{"fwht": Timing, "dense": Timing}`` ("dense" absent when skipped).
    """
    cells, results = [], {}
    for n in sizes:
        rows = rows_for(n)
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
        rotation = rotfn.hadamard(n)
        fns = {"fwht": lambda: rotfn.rotate(x, rotation, backend="torch")}
        if n <= DENSE_MAX:
            m = rotation.matrix(torch.float32)
            fns["dense"] = lambda: x @ m
            diff = (fns["fwht"]() - fns["dense"]()).abs().max().item()
        results[n] = t = time_ms(fns, reps=reps, min_s=min_s, max_s=max_s)
        moved = 2 * x.numel() * x.element_size()
        fwht = t["fwht"].median
        dense_cells = ["too big", "-", "-", "-"]
        if "dense" in t:
            dense = t["dense"].median
            dense_cells = [_ms(t["dense"], 1), f"{gbps(moved, dense):.2f}", f"{dense / fwht:.2f}x", f"{diff:.0e}"]
        k = rotation.factor
        cells.append([
            n, f"{k} x 2^{(n // k).bit_length() - 1}", rows, _ms(t["fwht"], 1), f"{gbps(moved, fwht):.2f}",
            *dense_cells, f"{fwht * 1e6 / x.numel() / math.log2(n):.2f}",
        ])
    header = ["n", "K x 2^m", "rows", "FWHT ms", "FWHT GB/s", "dense ms", "dense GB/s", "speed-up", "max|diff|",
              "ns/elem/log2n"]
    print(format_table(header, cells))
    print(f"dense = x @ M, M = R.matrix(float32) precomputed; 'too big' = skipped for n > {DENSE_MAX}"
          f" (M alone: {4 * DENSE_MAX**2 / 2**30:.0f} GiB at n = {DENSE_MAX}, 4x that at 2n).")
    print("speed-up = dense ms / FWHT ms; max|diff| = max |FWHT - dense| over the output;")
    print("ns/elem/log2n = FWHT ns per element / log2(n): flat means O(n log n) growth.")
    print(_contention_note([timing for t in results.values() for timing in t.values()]))
    return results


def summarize(results: dict[int, dict[str, Timing]]) -> None:
    """Print the goal check (FWHT >= 4x dense at n = 4096) and the O(n log n) growth check (powers of two).

    Growth: the exponent p of time per element ~ n^p, fitted over the powers of two.
    An O(n log n) transform has p near ``log(log2 n_max / log2 n_min) / log(n_max / n_min)``
    (0.13 for 256..32768), a dense matmul p = 1. The verdict asks for p < 0.5.
    """
    if "dense" in results.get(GOAL_N, {}):
        fwht, dense = results[GOAL_N]["fwht"], results[GOAL_N]["dense"]
        ratio = dense.median / fwht.median
        print(f"goal: FWHT >= {GOAL_SPEEDUP:g}x faster than dense at n = {GOAL_N}: {ratio:.2f}x by medians"
              f" ({dense.best / fwht.best:.2f}x best-of-runs) -> {'met' if ratio >= GOAL_SPEEDUP else 'NOT met'}")
    pow2 = sorted(n for n in results if n & (n - 1) == 0)
    if len(pow2) >= 3:
        fwht = growth_exponent({n: results[n]["fwht"].median / (rows_for(n) * n) for n in pow2})
        dense_n = [n for n in pow2 if "dense" in results[n]]
        dense = (
            f", dense p = {growth_exponent({n: results[n]['dense'].median / (rows_for(n) * n) for n in dense_n}):.2f}"
            if len(dense_n) >= 2 else ""
        )
        log_part = math.log(math.log2(pow2[-1]) / math.log2(pow2[0])) / math.log(pow2[-1] / pow2[0])
        verdict = "O(n log n) growth" if fwht < 0.5 else "growth worse than O(n log n)"
        print(f"growth: time per element ~ n^p over n = {pow2[0]}..{pow2[-1]}: FWHT p = {fwht:.2f}{dense}"
              f" (O(n log n) predicts p ~ {log_part:.2f}, O(n^2) p = 1) -> {verdict}")


def growth_exponent(per_element: dict[int, float]) -> float:
    """Least-squares slope p of ``log(time per element)`` against ``log(n)``: time per element ~ ``n^p``.

    Example:
        >>> round(growth_exponent({256: 1.0, 1024: 4.0, 4096: 16.0}), 6)
        1.0
    """
    xs = [math.log(n) for n in per_element]
    ys = [math.log(t) for t in per_element.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def bench_qdq(*, reps: int, max_s: float) -> None:
    """Time ``rotfn.qdq(x, fmt, backend="torch")`` on a ``[4096, 4096]`` float32 normal x and print the table."""
    x = torch.randn(*QDQ_SHAPE, generator=torch.Generator().manual_seed(0))
    moved = 2 * x.numel() * x.element_size()
    cells, timings = [], []
    for fmt in FORMATS:
        t = time_ms({"qdq": lambda: rotfn.qdq(x, fmt, backend="torch")}, reps=reps, min_s=0.0, max_s=max_s)["qdq"]
        timings.append(t)
        cells.append([repr(fmt), _ms(t, 0), f"{gbps(moved, t.median):.2f}"])
    print(format_table(["format", "ms", "GB/s"], cells))
    print(_contention_note(timings))


def main(argv: Sequence[str] | None = None) -> int:
    """Run both benchmarks and print their tables.

    Args:
        argv: command-line arguments without the program name (``--quick``, ``--default-malloc``).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(prog="bench/cpu.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (under a minute)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc as the environment configured it (see the module docstring)")
    args = parser.parse_args(argv)
    allocator = "as configured (--default-malloc)" if args.default_malloc else (
        SETTING if keep_freed_blocks() else "default (mallopt unavailable)")
    sizes, reps, min_s, max_s = (QUICK_SIZES, 3, 0.0, 3.0) if args.quick else (SIZES, 7, 1.0, 10.0)
    start = time.perf_counter()
    print(f"rotfn {rotfn.__version__} CPU benchmark: {machine_info()}")
    print(f"median of >= {reps} uncontended runs{f' and >= {min_s:g} s' if min_s else ''} per cell (at most"
          f" {max_s:g} s) after one warm-up{' (--quick)' if args.quick else ''}; allocator: {allocator}")
    print()
    print(f"(i) rotate: x float32 [rows, n], rows * n * 4 = {CALL_BYTES >> 20} MiB; R = rotfn.hadamard(n);"
          " FWHT = rotfn.rotate(x, R, backend='torch')")
    results = bench_rotate(sizes, reps=reps, min_s=min_s, max_s=max_s)
    print()
    summarize(results)
    print()
    print(f"(ii) qdq: x float32 {list(QDQ_SHAPE)} ~ N(0, 1); rotfn.qdq(x, fmt, backend='torch')")
    bench_qdq(reps=reps if args.quick else 5, max_s=max_s)
    print()
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
