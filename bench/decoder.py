"""What QuaRot's online transforms cost in a real forward: a Llama-3-8B-shaped bf16 model, a few layers.

Run on a CUDA machine: ``python bench/decoder.py`` (``--layers``, ``--prefill BxT``, ``--decode B``).
Times (back-to-back calls between CUDA events, the median of rounds) the plain forward of the model against ``rotfn.call`` of the
folded params with a QuaRot plan (R1, R2 folded) whose online side is: nothing (the call's own
cost), R3 + R4, R3 + R4 with MXFP4 activations, R3 + R4 with NVFP4 activations; for a prefill
(4 x 2048 tokens) and a decode step (64 sequences of one token, no cache). The weights stay in
bf16 (fake-quantized weights cost nothing online). ``over call``: against ``rotfn.call`` with nothing
online, the transforms' own cost. Target (issue "Kernels, round two"): <= 5%
over the plain forward for the prefill with MXFP4 activations.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

import rotfn


def bench(fn, calls: int = 10, rounds: int = 7) -> float:
    """Milliseconds per call of ``fn``: the median over rounds of ``calls`` back-to-back calls between two CUDA events.

    Back to back, as a serving loop runs: the host queues the next call while the device computes
    (a per-call timer that waits for each call would count the host's own time in full).
    """
    times = []
    with torch.no_grad():
        for _ in range(3):
            fn()
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def model_of(layers: int):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, num_hidden_layers=layers, vocab_size=128256,
                                   max_position_embeddings=8192, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prefill", default="4x2048", metavar="BxT")
    parser.add_argument("--decode", type=int, default=64, metavar="B")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/decoder.py needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = model_of(args.layers)
    params = rotfn.params(model)
    online = dict(r1=rotfn.hadamard(4096, seed=1), r2=rotfn.hadamard(128, seed=2))
    full = dict(online, r3=rotfn.hadamard(128), r4=rotfn.hadamard(14336, seed=3))
    plans = {
        "rotfn.call, nothing online": rotfn.plans.quarot(model, **online),
        "R3 + R4": rotfn.plans.quarot(model, **full),
        "R3 + R4 + MXFP4 acts": rotfn.plans.quarot(model, **full, acts=rotfn.mxfp4()),
        "R3 + R4 + NVFP4 acts": rotfn.plans.quarot(model, **full, acts=rotfn.nvfp4()),
    }
    folded = {name: rotfn.fold(params, plan) for name, plan in plans.items()}
    b, t = (int(v) for v in args.prefill.split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"prefill": (b, t), "decode": (args.decode, 1)}
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"Llama-3-8B-shaped, {args.layers} layers, bf16, sdpa")
    print(f"{'case':<28} {'tokens':>15} {'ms':>9} {'over plain':>11} {'over call':>10}")
    for label, (rows, cols) in shapes.items():
        ids = torch.randint(0, model.config.vocab_size, (rows, cols), device="cuda", generator=g)
        plain = bench(lambda ids=ids: model(ids))
        print(f"{'plain forward':<28} {f'{label} {rows}x{cols}':>15} {plain:9.3f} {'-':>11} {'-':>10}", flush=True)
        base = None
        for name, plan in plans.items():
            ms = bench(lambda ids=ids, p=folded[name], pl=plan: rotfn.call(model, p, pl, ids))
            base = base or ms
            print(f"{name:<28} {f'{label} {rows}x{cols}':>15} {ms:9.3f} {100 * (ms / plain - 1):10.1f}% "
                  f"{100 * (ms / base - 1):9.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
