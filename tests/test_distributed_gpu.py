"""rotfn.distributed on NCCL: two spawned ranks, one GPU each, against one process (runs where two GPUs are).

The gloo tests (test_distributed*.py) prove the algorithms; these prove the NCCL wire: CUDA tensors in the
collectives, bf16 pieces gathered bit for bit, and learning with the weights sharded over two GPUs.
"""

import pytest
import torch
from ranks import run

import rotfn
import rotfn.testing as rt
from rotfn import distributed

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _primitives():
    rank, size = distributed.world()
    device = torch.device("cuda", rank)
    x = torch.arange(6, dtype=torch.float64, device=device) * (rank + 1)
    (summed,) = distributed.all_reduce("test", [x])
    (top,) = distributed.all_reduce("test", [x], op="max")
    stepped = distributed.sum_together("test", lambda: [x.float()], [x.float()])
    weight = torch.randn(5, 7, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0)).to(device)
    whole = distributed.concat("test", distributed.piece(weight))[:weight.numel()].view(weight.shape)
    distributed.same("test", "weight", [whole])
    merged = distributed.merge("test", {f"r{rank}": rank})
    return dict(summed=summed.cpu(), top=top.cpu(), stepped=stepped[0].cpu(), gathered=torch.equal(whole, weight),
                devices=(summed.device.type, whole.device.type), merged=merged)


def test_collectives_move_cuda_tensors_bit_for_bit():
    for r in run(_primitives, backend="nccl"):
        assert r.error is None, r
        v = r.value
        base = torch.arange(6, dtype=torch.float64)
        assert torch.equal(v["summed"], 3 * base) and torch.equal(v["top"], 2 * base)
        assert torch.equal(v["stepped"], 3 * base.float())
        assert v["gathered"] and v["devices"] == ("cuda", "cuda") and v["merged"] == {"r0": 0, "r1": 1}


def _learn(shard: bool, accumulate: int):
    rank = distributed.world()[0]
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128, vocab=256)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=1, outliers=8.0)
    fmt = rotfn.intq(4, group=16)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16), weights=fmt, acts=fmt)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (2, 16), generator=gen) for _ in range(2)]
    res = rotfn.learn.rotations(model.to(f"cuda:{rank}"), rotfn.params(model), plan, batches, steps=2, lr=0.5,
                                shard=shard, accumulate=accumulate, device=f"cuda:{rank}", progress=False)
    return [w.rotation.matrix(torch.float64).cpu() for w in res.plan.rotations], res.losses


def test_learning_sharded_over_two_gpus_learns_what_one_gpu_learns():
    ranks = run(_learn, True, 1, backend="nccl")
    assert all(r.error is None for r in ranks), ranks
    one, losses = _learn(False, 2)
    for r in ranks:
        got, got_losses = r.value
        torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(losses), rtol=1e-5, atol=0)
        for a, b in zip(got, one, strict=True):  # the GPU's float32 sums in other orders: not bit for bit
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(ranks[0].value[0], ranks[1].value[0], strict=True):
        assert torch.equal(a, b)
