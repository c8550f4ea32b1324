"""Sweep the FWHT kernel's launch settings (factor rows per chunk, warps) for Hadamard sizes ``K * 2^m``.

Run on a CUDA machine: ``python bench/fwht_sweep.py [--n 11008 --n 14336 ...]``. For each size the
default launch and every (kc, warps) pair are timed on ``rows x n`` bf16 (median, CUDA events); each
result must equal the default's bit for bit (the settings change the schedule, not the sums).
Prints one table: GB/s counting bytes read + written, and the speed-up over the default.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

import rotfn
from rotfn.kernels import launch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="Hadamard sizes (default: 11008, 14336, 12288, 3584)")
    parser.add_argument("--rows", type=int, default=4096)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"{'n':>7} {'K':>4} {'kc':>4} {'warps':>5} {'ms':>8} {'GB/s':>8} {'x default':>9}")
    for n in args.n or [11008, 14336, 12288, 3584]:
        r = rotfn.hadamard(n)
        x = torch.randn(args.rows, n, device="cuda", dtype=torch.bfloat16)
        ref = launch._fwht_rotate(x, r)
        nbytes = 2 * x.numel() * x.element_size()
        base = triton.testing.do_bench(lambda: launch._fwht_rotate(x, r), warmup=25, rep=200, return_mode="median")
        print(f"{n:>7} {r.factor:>4} {'def':>4} {'def':>5} {base:>8.3f} {nbytes / base / 1e6:>8.0f} {1.0:>9.2f}")
        for kc in (8, 16, 32, 64):
            for warps in (4, 8, 16):
                try:
                    out = launch._fwht_rotate(x, r, kc=kc, warps=warps)
                except Exception as err:  # noqa: BLE001 - a setting the compiler rejects (registers, shared memory)
                    print(f"{n:>7} {r.factor:>4} {kc:>4} {warps:>5}  failed: {type(err).__name__}")
                    continue
                same = torch.equal(out.view(torch.int16), ref.view(torch.int16))
                ms = triton.testing.do_bench(lambda kc=kc, warps=warps: launch._fwht_rotate(x, r, kc=kc, warps=warps),
                                             warmup=25, rep=200, return_mode="median")
                print(f"{n:>7} {r.factor:>4} {kc:>4} {warps:>5} {ms:>8.3f} {nbytes / ms / 1e6:>8.0f} "
                      f"{base / ms:>9.2f}{'' if same else '  BITS DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
