"""The demo's serving step: a quantized QuaRot result of the tiny Llama exported for engines and reloaded with transformers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

import torch

import rotfn
import rotfn.testing as rt
from rotfn._demo.quarot import tiny_llama_config

__all__ = ["ServingUnavailable", "served_difference"]


class ServingUnavailable(RuntimeError):
    """compressed-tensors, which transformers needs to read the exported directory, is not installed."""


def served_difference(*, seed: int = 0) -> tuple[str, int, float]:
    """W4 MXFP4 QuaRot (R1, R2 folded) of the tiny bf16 Llama through ``rotfn.export_compressed`` and back.

    The folded, quantized params are written as a compressed-tensors checkpoint in a temporary
    directory, which ``transformers.AutoModelForCausalLM.from_pretrained`` loads (decompressing
    with compressed-tensors); its logits are compared with ``rotfn.call``'s on seeded tokens.
    The libraries' progress bars on stderr are kept off the demo's screen.

    Returns:
        ``(compression format, bytes written, max |served logits - rotfn.call logits|)``.

    Raises:
        ServingUnavailable: compressed-tensors or transformers is not installed.
    """
    try:
        import compressed_tensors  # noqa: F401  (what transformers reads the directory with)
        import transformers
    except ModuleNotFoundError as err:
        what = "compressed-tensors" if err.name == "compressed_tensors" else err.name
        raise ServingUnavailable(f"needs {what} (not installed); fix: pip install 'rotfn[test]'") from None

    cfg = tiny_llama_config()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    model = rt.tiny_model(cfg, dtype=torch.bfloat16, seed=seed).eval()
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=seed), r2=rotfn.hadamard(16, seed=seed + 1),
                              weights=rotfn.mxfp4())
    folded = rotfn.fold(rotfn.params(model), plan)
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stderr(io.StringIO()):
        rotfn.export_compressed(model, folded, plan, d)
        written = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        served = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        with open(os.path.join(d, "config.json")) as f:
            fmt = json.load(f)["quantization_config"]["format"]
        with torch.no_grad():
            diff = (served(ids).logits.float() - rotfn.call(model, folded, plan, ids).logits.float()).abs().max()
    return fmt, written, diff.item()
