"""The host's own cost of ``rotfn.call``: a tiny Llama on one token, where the Python around the model dominates.

Run anywhere (CPU is fine): ``python bench/call_overhead.py`` (``--layers``, ``--hidden``, ``--calls``,
``--rounds``, ``--profile CASE`` for a cProfile listing of one case). Each case is the median over
rounds of the mean wall time (``time.perf_counter``) of back-to-back calls under ``torch.no_grad``,
in microseconds per call, on one thread. Cases: the model's own forward, ``torch.func.functional_call``
of the same params, ``rotfn.call`` without a plan, and ``rotfn.call`` with QuaRot plans: nothing online
(R1, R2 folded), R3 + R4, and W4A4 (R3 + R4 + int4 weights and activations). ``over fc``: µs above
``functional_call``, the part rotfn adds (checks, interception, the online transforms themselves).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import torch

import rotfn
import rotfn.testing as rt


def per_call_us(fn, calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean µs of ``calls`` back-to-back calls of ``fn`` (after warm-up calls)."""
    with torch.no_grad():
        for _ in range(5):
            fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def cases(layers: int, hidden: int):
    """``{name: zero-argument function}`` of the timed calls, on one model and one token."""
    cfg = rt.make_config("llama", hidden=hidden, heads=4, kv_heads=2, layers=layers, intermediate=2 * hidden)
    model = rt.tiny_model(cfg, dtype=torch.float32)
    params = rotfn.params(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 1), generator=torch.Generator().manual_seed(0))
    head_dim = hidden // 4
    folded = dict(r1=rotfn.hadamard(hidden, seed=1), r2=rotfn.hadamard(head_dim, seed=2))
    online = dict(folded, r3=rotfn.hadamard(head_dim), r4=rotfn.hadamard(2 * hidden, seed=3))
    plans = {
        "rotfn.call, quarot nothing online": rotfn.plans.quarot(model, **folded),
        "rotfn.call, quarot R3 + R4": rotfn.plans.quarot(model, **online),
        "rotfn.call, quarot W4A4 R3 + R4": rotfn.plans.quarot(model, **online, weights=rotfn.intq(4, group=32),
                                                            acts=rotfn.intq(4)),
    }
    out = {
        "model(ids)": lambda: model(ids),
        "functional_call": lambda: torch.func.functional_call(model, dict(params), (ids,), strict=True),
        "rotfn.call, no plan": lambda: rotfn.call(model, params, None, ids),
    }
    for name, plan in plans.items():
        out[name] = lambda p=rotfn.fold(params, plan), plan=plan: rotfn.call(model, p, plan, ids)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", metavar="CASE", help="print a cProfile listing of this case instead of timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a process of its own: the one-token matmuls gain nothing from threads
    runs = cases(args.layers, args.hidden)
    if args.profile:
        fn = runs[args.profile]
        with torch.no_grad():
            fn()
            profile = cProfile.Profile()
            profile.runcall(lambda: [fn() for _ in range(args.calls)])
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
        return 0
    print(f"# torch {torch.__version__}, Llama {args.layers} layers, hidden {args.hidden}, fp32, 1 token, CPU 1 thread")
    print(f"{'case':<36} {'us/call':>9} {'over fc':>9}")
    base = None
    for name, fn in runs.items():
        us = per_call_us(fn, args.calls, args.rounds)
        base = us if name == "functional_call" else base
        over = f"{us - base:9.0f}" if base is not None and name != "functional_call" else f"{'-':>9}"
        print(f"{name:<36} {us:9.0f} {over}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
