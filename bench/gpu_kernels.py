"""GPU benchmark of the fused kernels against a plain copy, the eager reference and torch.compile.

Run on a CUDA machine: ``python bench/gpu_kernels.py`` (``--quick`` for one shape).
Prints one table; effective bandwidth = bytes read + written (nominal, the same
for every implementation of one op) / median time. ``xpeer``: the peer kernel's time
(``bench/peer_mxfp4.py``: block-32 Hadamard + MXFP4, AutoRound / FP-Quant style, measured in
the same run on the same tensor) over the row's; ``xcomp``: torch.compile of the reference
over the row's. Targets (issue "Kernels, round two"): block-32 fused kernels >= 1.2x the peer
and >= 75% of copy; full-size Hadamard >= 70% of copy.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

import rotfn
from rotfn import ops

sys.path.insert(0, __file__.rpartition("/")[0])
from peer_mxfp4 import peer_rotate_qdq  # noqa: E402

SHAPES = [(4096, 4096), (16384, 4096), (8192, 14336)]
FORMATS = {
    "mxfp4": rotfn.mxfp4(), "mxfp4-rceil": rotfn.mxfp4("rceil"), "mxfp8": rotfn.mxfp8(),
    "nvfp4": rotfn.nvfp4(), "nvfp4-fixed": rotfn.nvfp4(None), "int4-g32": rotfn.intq(4, group=32),
    "int8-row": rotfn.intq(8), "fp8-token": rotfn.fp8("token"),
}
BLOCKS = (16, 32, 64, 128, 256)


def bench(fn, reps_ms=200) -> float:
    """Median milliseconds of ``fn`` (CUDA events, after warm-up)."""
    return triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median")


def row(cells, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first shape only")
    parser.add_argument("--sweep", action="store_true", help="all block sizes for mxfp4 and nvfp4-fixed")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    parser.add_argument("--fwht", action="store_true", help="only the full-size Hadamard rows")
    parser.add_argument("--shape", action="append", metavar="MxN", help="shapes to run (default: the three of the issue)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shape:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shape]
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    widths = (12, 18, 6, 9, 9, 9, 9, 9, 9, 8, 8, 8)
    def emit(cells):
        print(row(cells, widths), flush=True)

    emit(("shape", "op", "block", "copy TB/s", "eager", "compile", "rotfn", "rotfn ms", "bound ms", "%copy", "xcomp",
          "xpeer"))
    compiled = {}
    # one torch.compile per (op, format, shape), all of the same lambda: lift dynamo's per-code recompile
    # limit (8 by default), past which it silently runs the eager function
    torch._dynamo.config.cache_size_limit = torch._dynamo.config.recompile_limit = 1024
    for m, n in shapes:
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        nbytes = 2 * x.numel() * x.element_size()
        out = torch.empty_like(x)
        t_copy = bench(lambda: out.copy_(x))
        copy_bw = nbytes / t_copy / 1e9
        h32 = rotfn.hadamard(32).matrix(torch.float32, "cuda").to(x.dtype)
        t_peer = bench(lambda: peer_rotate_qdq(x, h32))
        emit((f"{m}x{n}", "peer mxfp4", 32, f"{copy_bw:.2f}", "-", "-", f"{nbytes / t_peer / 1e9:.2f}", f"{t_peer:.3f}",
              f"{t_copy:.3f}", f"{100 * t_copy / t_peer:.0f}%", "-", "1.00"))
        def compare(label, block, kernel, reference, key):
            t_k = bench(kernel)
            t_e = bench(reference, reps_ms=50)
            t_c = float("nan")
            if not args.no_compile:
                try:
                    if key not in compiled:
                        compiled[key] = torch.compile(reference)
                    t_c = bench(compiled[key])
                except Exception as err:  # report, do not hide: the table shows "-"
                    print(f"torch.compile failed for {label}: {type(err).__name__}: {err}"[:300])
            bw = lambda t: f"{nbytes / t / 1e9:.2f}" if t == t else "-"  # noqa: E731
            emit((f"{m}x{n}", label, block, f"{copy_bw:.2f}", bw(t_e), bw(t_c), bw(t_k), f"{t_k:.3f}",
                  f"{t_copy:.3f}", f"{100 * t_copy / t_k:.0f}%", f"{t_c / t_k:.1f}" if t_c == t_c else "-", "-"))

        full = rotfn.hadamard(n, seed=0)  # full-size online Hadamard (FWHT kernel)
        compare("rot H_n", n, lambda: rotfn.rotate(x, full, backend="triton"),
                lambda: ops.rotate(x, full), ("rot", m, n))
        compare("rqdq H_n mxfp4", n, lambda: rotfn.rotate_qdq(x, full, FORMATS["mxfp4"], backend="triton"),
                lambda: ops.rotate_qdq(x, full, FORMATS["mxfp4"], False), ("rqdq-full", m, n))
        if args.fwht:
            continue
        for name, fmt in FORMATS.items():
            blocks = BLOCKS if (name in ("mxfp4", "nvfp4-fixed") and args.sweep) else (32,)
            for b in blocks:
                r = rotfn.hadamard(n, block=b, seed=0)
                t_k = bench(lambda: rotfn.rotate_qdq(x, r, fmt, backend="triton"))
                t_e = t_c = float("nan")
                if b == 32:
                    t_e = bench(lambda: ops.rotate_qdq(x, r, fmt, False), reps_ms=50)
                    if not args.no_compile:
                        key = (name, b, m, n)
                        try:
                            if key not in compiled:
                                compiled[key] = torch.compile(lambda v, r=r, f=fmt: ops.rotate_qdq(v, r, f, False))
                            t_c = bench(lambda: compiled[key](x))
                        except Exception as err:  # report, do not hide: the table shows "fail"
                            print(f"torch.compile failed for {name}: {type(err).__name__}: {err}"[:300])
                bw = lambda t: f"{nbytes / t / 1e9:.2f}" if t == t else "-"  # noqa: E731
                emit((f"{m}x{n}", f"rqdq {name}", b, f"{copy_bw:.2f}", bw(t_e), bw(t_c), bw(t_k), f"{t_k:.3f}",
                      f"{t_copy:.3f}", f"{100 * t_copy / t_k:.0f}%", f"{t_c / t_k:.1f}" if t_c == t_c else "-",
                      f"{t_peer / t_k:.2f}"))
        for name, fmt in FORMATS.items():
            q = rotfn.quantize(x, fmt, backend="triton")
            qbytes = x.numel() * 2 + q.nbytes
            t_q = bench(lambda: rotfn.quantize(x, fmt, backend="triton"))
            bound = qbytes * t_copy / nbytes  # ms to move these bytes at the copy's rate
            emit((f"{m}x{n}", f"quant {name}", "-", f"{copy_bw:.2f}", "-", "-", f"{qbytes / t_q / 1e9:.2f}",
                  f"{t_q:.3f}", f"{bound:.3f}", f"{100 * bound / t_q:.0f}%", "-", "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
