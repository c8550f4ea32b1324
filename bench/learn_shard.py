"""Learned R1 / R2 with the frozen weights sharded over GPUs: step time and memory per GPU, and the rotations.

Run under torchrun, once per world size, with the same options (a Llama-3-8B-shaped random bf16 model of
``--layers`` layers, W4A4 MXFP4, next-token loss on random tokens)::

    torchrun --nproc-per-node 2 bench/learn_shard.py --shard --out two.pt
    torchrun --nproc-per-node 1 bench/learn_shard.py --accumulate 2 --out one.pt           # the same batches per step
    torchrun --nproc-per-node 1 bench/learn_shard.py --accumulate 2 --shard --out one-sharded.pt
    python bench/learn_shard.py --compare one.pt two.pt

Each run prints one row: world size, shard, the median step time over the steps after the first, the
peak CUDA memory of each rank, and what each rank holds of the weights; rank 0 saves the rotations.
``--compare`` prints the largest difference between the rotations of two runs. Without CUDA (a smoke
run on gloo) pass small shapes, e.g. ``--hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --vocab 256``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import rotfn


def model_of(args, device):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   num_hidden_layers=args.layers, vocab_size=args.vocab,
                                   max_position_embeddings=max(args.seq, 128))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)  # the same weights on every rank
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device.type == "cuda"
                                                          else torch.float32)
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (one sequence a batch)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--shard", action="store_true")
    parser.add_argument("--out", default=None, help="where rank 0 saves the learned rotations (torch.save)")
    parser.add_argument("--compare", nargs=2, metavar="FILE", default=None)
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (torch.load(f) for f in args.compare)
        print(f"max |R_a - R_b| over {len(a)} rotations: {max((x - y).abs().max().item() for x, y in zip(a, b)):.3e}")
        return 0

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rank, size = rotfn.distributed.world()
    model = model_of(args, device)  # built on the CPU: the params stay there, each rank moves what it holds
    params = rotfn.params(model)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(args.hidden, seed=0),
                              r2=rotfn.hadamard(args.hidden // args.heads, seed=1),
                              weights=rotfn.mxfp4(), acts=rotfn.mxfp4())
    gen = torch.Generator().manual_seed(1)
    per_step = args.accumulate * size
    batches = [torch.randint(0, args.vocab, (1, args.seq), generator=gen) for _ in range(per_step)]

    times, last = [], [time.perf_counter()]

    def loss(outputs, batch):  # next-token cross-entropy, timing each call (one per batch)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        logits = outputs.logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = rotfn.learn.rotations(model, params, plan, batches, steps=args.steps, lr=1.0, accumulate=args.accumulate,
                                   loss=loss, shard=args.shard, device=device, progress=False)
    step_s = statistics.median(sum(times[i:i + args.accumulate])
                               for i in range(args.accumulate, len(times), args.accumulate))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    peaks = rotfn.distributed.gather("bench", "peak", round(peak, 2))
    weights = sum(t.nbytes for t in params.values()) / 2**30
    if rotfn.distributed.first_writes():
        name = torch.cuda.get_device_name() if cuda else "cpu"
        print(f"| {name} | {size} | {args.shard} | {args.accumulate} | {step_s * 1e3:.0f} ms | "
              f"{', '.join(f'{p:.2f}' for p in peaks)} GiB | {weights / (size if args.shard else 1):.2f} of "
              f"{weights:.2f} GiB | loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} |")
        if args.out:
            torch.save([w.rotation.matrix(torch.float64) for w in result.plan.rotations], args.out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
