"""The demo's QuaRot check: R1..R4 folded into a tiny random Llama compute the same logits."""

from __future__ import annotations

import torch

import rotfn
import rotfn.testing as rt

__all__ = ["tiny_llama_config", "quarot_equivalence"]


def tiny_llama_config():
    """The demo's tiny random Llama: hidden 64, 2 layers, 4 heads over 2 KV heads (GQA), MLP 128, vocab 128."""
    return rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128, vocab=128)


def quarot_equivalence(*, seed: int = 0) -> tuple[rotfn.Plan, dict]:
    """QuaRot R1..R4 on a tiny random Llama: max relative logit error of the folded, rotated model.

    Returns:
        ``(plan, {dtype name: relative error})`` for float32 and float64 copies of the model.
    """
    cfg = tiny_llama_config()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    errors, plan = {}, None
    for dtype in (torch.float32, torch.float64):
        model = rt.tiny_model(cfg, dtype=dtype, seed=seed)
        plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=seed), r2=rotfn.hadamard(16, seed=seed + 1),
                                  r3=rotfn.hadamard(16), r4=rotfn.hadamard(128, seed=seed + 2))
        p = rotfn.params(model)
        errors[str(dtype).removeprefix("torch.")] = rt.assert_equivalent(model, p, None, rotfn.fold(p, plan), plan, ids,
                                                                         rtol=1e-3)
    return plan, errors
