"""GPTQ of one Llama-3-8B-shaped decoder layer from given Hessians: seconds per layer, and the objective against RTN.

Not a test. The seven linears of a Llama-3-8B decoder layer (q, k, v, o: 4096 -> 4096 / 1024;
gate, up: 4096 -> 14336; down: 14336 -> 4096), random bf16-valued weights, and for each input
size a Hessian ``H = X^T X / N`` of correlated inputs with outlier channels (``N = 2 * in``
rows), are made once on the device; then ``rotfn.gptq`` rounds all seven, per format and
setting, and the wall time (median of ``--runs``, after one warm-up) and the GPTQ objective
``tr((W - Q) H (W - Q)^T)`` summed over the layer, relative to round-to-nearest, are printed.
On CUDA every case runs with the GPTQ kernel (``backend="triton"``); the first case also runs
the torch reference on the same device (``backend="torch"``, one run), whose codes the kernel
must equal, to show what the kernel saves.
Layers of other sizes: ``--hidden`` / ``--intermediate`` (``--small`` is a 1024 / 2816
layer, for CPUs).

Usage:
    python bench/gptq.py                 # CUDA if present, else CPU
    python bench/gptq.py --small --runs 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rotfn


def _hessian(n: int, gen: torch.Generator, device) -> torch.Tensor:
    mix = torch.randn(n, n // 8, generator=gen).to(device)
    x = torch.randn(2 * n, n // 8, generator=gen).to(device) @ mix.T + 0.1 * torch.randn(2 * n, n, generator=gen).to(device)
    x[:, torch.randperm(n, generator=gen)[: n // 256 + 1].to(device)] *= 20.0
    return (x.T @ x / x.shape[0]).double()


def _objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    e = (w.double() - q.double())
    return float(((e @ h) * e).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--small", action="store_true", help="hidden 1024, intermediate 2816")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    d, i = (1024, 2816) if args.small else (args.hidden, args.intermediate)
    kv = d // 4
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    shapes = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "gate": (i, d), "up": (i, d), "down": (d, i)}
    weights = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16).float().to(dev) for k, s in shapes.items()}
    hs = {n: _hessian(n, gen, dev) for n in {d, i}}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# {name}  torch {torch.__version__}  layer hidden {d} intermediate {i}")
    cases = [
        ("int4-g128", rotfn.intq(4, group=128), {}),
        ("int4-g128 act_order", rotfn.intq(4, group=128), {"act_order": True}),
        ("nvfp4", rotfn.nvfp4(), {}),
        ("nvfp4 mse", rotfn.nvfp4(), {"scale_search": "mse"}),
        ("mxfp4", rotfn.mxfp4(), {}),
    ]
    backend = "triton" if dev.type == "cuda" else "torch"
    runs = [(label, fmt, kw, precision, backend, args.runs) for label, fmt, kw in cases for precision in ("float32", "float64")]
    if dev.type == "cuda":
        runs.insert(1, (*runs[0][:4], "torch", 1))
    rows, first = [], {}
    for label, fmt, kw, precision, backend, n_runs in runs:
        def layer():
            out = {k: rotfn.gptq(w, hs[w.shape[1]], fmt, precision=precision, backend=backend, **kw)
                   for k, w in weights.items()}
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return out
        if n_runs > 1 or backend != "torch" or dev.type != "cuda":
            layer()  # warm-up (compiles the kernel); the reference on CUDA is timed once, cold
        times = []
        for _ in range(n_runs):
            t0 = time.perf_counter()
            out = layer()
            times.append(time.perf_counter() - t0)
        same = ""
        if (label, precision) in first:
            same = "yes" if all(torch.equal(out[k].codes.view(torch.uint8), first[label, precision][k].codes.view(
                torch.uint8)) for k in out) else "NO"
        first.setdefault((label, precision), out)
        gptq_obj = sum(_objective(w, rotfn.dequantize(out[k], torch.float32), hs[w.shape[1]])
                       for k, w in weights.items())
        rtn_obj = sum(_objective(w, rotfn.qdq(w, fmt), hs[w.shape[1]]) for k, w in weights.items())
        rows.append((label, precision, backend, statistics.median(times), gptq_obj / rtn_obj, same))
    print(f"{'format':>22} {'precision':>9} {'backend':>7} {'s/layer':>8} {'obj/RTN':>8} {'same codes':>10}")
    for label, precision, backend, t, ratio, same in rows:
        print(f"{label:>22} {precision:>9} {backend:>7} {t:8.2f} {ratio:8.3f} {same:>10}")


if __name__ == "__main__":
    main()
