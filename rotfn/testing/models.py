"""Tiny transformers models for tests: drawn configs, random weights built offline, and equivalence asserts.

Nothing here downloads: a model is built from a config with
``AutoModelForCausalLM.from_config`` and filled with seeded random weights
(norm scales drawn away from 1, so that norm fusion is really tested).

Note on float64: transformers' RMSNorm modules round their input to float32
(an upcast meant for half precision). In a float64 model that is a ~1e-7
relative error between any two residual streams that differ by a rotation,
unrelated to rotfn's math. :func:`tiny_model` therefore swaps each RMSNorm for
:class:`ExactRMSNorm` (same weight parameter and name, math in the input dtype)
when building float64 models; ``exact_norms=False`` keeps the stock modules.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from torch import nn

from rotfn.model import call
from rotfn.specs.rotation import Rotation, from_matrix, hadamard, orthogonal
from rotfn.testing.strategies import seeds

__all__ = [
    "FAMILY_NAMES", "ExactRMSNorm", "make_config", "model_configs", "tiny_model", "token_inputs",
    "RotationFactory", "rotation_factories", "assert_equivalent", "relative_error",
]

#: Families :func:`model_configs` draws (every adapter in :data:`rotfn.plans.FAMILIES`).
FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "qwen2_moe", "qwen3_moe")


class ExactRMSNorm(nn.Module):
    """RMSNorm computed in the input's dtype: ``y = x / sqrt(mean(x^2) + eps) * g``.

    Takes over the replaced module's ``weight`` parameter, so parameter names,
    ties and values are unchanged.
    """

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def make_config(
    family: str,
    *,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 1,
    vocab: int = 64,
    intermediate: int = 64,
    tied: bool = False,
    bias: bool = False,
    experts: int = 4,
    expert_intermediate: int = 32,
    shared_intermediate: int = 64,
    dense_layers: tuple[int, ...] = (),
    attn_implementation: str = "sdpa",
):
    """A tiny transformers config of one family (``head_dim = hidden // heads``).

    ``bias`` turns on the attention (and Llama MLP) biases where the family has
    the option; Qwen2 always has q/k/v biases and Phi-3 none. MoE families get
    ``experts`` routed experts (2 per token), Qwen2-MoE a shared expert, and
    ``dense_layers`` lists layers with a dense MLP instead.

    Example:
        >>> make_config("llama", hidden=64, heads=4, kv_heads=1).head_dim
        16
    """
    import transformers

    head_dim = hidden // heads
    common = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "tie_word_embeddings": tied,
        "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "attn_implementation": attn_implementation,
    }
    # batched_mm: transformers' default grouped_mm has no float64 kernel on CPU, and its eager loop's
    # index_add_ is very slow on CPU
    moe = {"num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": expert_intermediate,
           "mlp_only_layers": list(dense_layers), "decoder_sparse_step": 1, "experts_implementation": "batched_mm"}
    if family == "llama":
        return transformers.LlamaConfig(**common, head_dim=head_dim, attention_bias=bias, mlp_bias=bias)
    if family == "mistral":
        return transformers.MistralConfig(**common, head_dim=head_dim)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=head_dim, attention_bias=bias)
    if family == "phi3":
        return transformers.Phi3Config(**common)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, **moe, qkv_bias=bias, shared_expert_intermediate_size=shared_intermediate)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, **moe, head_dim=head_dim, attention_bias=bias)
    raise ValueError(f"make_config: argument 'family': expected one of {FAMILY_NAMES}, got {family!r}")


@st.composite
def model_configs(
    draw,
    families: tuple[str, ...] = FAMILY_NAMES,
    *,
    hidden_sizes: tuple[int, ...] = (32, 64),
    max_layers: int = 2,
    vocab_sizes: tuple[int, ...] = (64, 96, 128),
    tied: bool | None = None,
    bias: bool | None = None,
):
    """Tiny transformers configs: family, hidden size, heads, kv heads (GQA), layers, vocab, tied, bias.

    Sizes stay multiples of 16 so MX/NVFP4 groups fit every linear input, and every
    size is a Hadamard order.

    Example:
        >>> from hypothesis import given
        >>> import rotfn.testing as rt
        >>> @given(rt.model_configs(("llama",)))
        ... def test(cfg):
        ...     assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
        >>> test()
    """
    family = draw(st.sampled_from(families))
    hidden = draw(st.sampled_from(hidden_sizes))
    head_dim = draw(st.sampled_from([h for h in (8, 16) if hidden // h >= 2]))
    heads = hidden // head_dim
    kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    layers = draw(st.integers(1, max_layers))
    moe = family.endswith("_moe")
    dense = (layers - 1,) if moe and layers > 1 and draw(st.booleans()) else ()
    return make_config(
        family, hidden=hidden, heads=heads, kv_heads=kv_heads, layers=layers, vocab=draw(st.sampled_from(vocab_sizes)),
        intermediate=draw(st.sampled_from((32, 64, 96))), tied=draw(st.booleans()) if tied is None else tied,
        bias=draw(st.booleans()) if bias is None else bias, expert_intermediate=draw(st.sampled_from((32, 48))),
        shared_intermediate=draw(st.sampled_from((32, 64))), dense_layers=dense,
    )


def tiny_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float64, exact_norms: bool | None = None,
               outliers: float | None = None) -> nn.Module:
    """Build a model from a config with seeded random weights, in eval mode; no download.

    Weights ``~ N(0, 1/in)``, embeddings ``~ N(0, 1)``, biases ``~ N(0, 0.1^2)``, norm
    scales ``~ U(0.5, 1.5)``. With ``outliers=k`` a few residual channels of the
    embedding are scaled by k (LLM-like activation outliers).

    Args:
        config: a transformers config (e.g. from :func:`make_config`).
        seed: seed of the weights.
        dtype: parameter dtype.
        exact_norms: swap RMSNorms for :class:`ExactRMSNorm`; default True for float64.
        outliers: gain of the outlier channels, or None.

    Returns:
        The ``*ForCausalLM`` model.

    Example:
        >>> m = tiny_model(make_config("qwen2"), dtype=torch.float32)
        >>> m.training, next(m.parameters()).dtype
        (False, torch.float32)
    """
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "LayerNorm"))}
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for p in model.parameters():
            shape = tuple(p.shape)
            if id(p) in norms:
                value = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
            elif id(p) in embeds:
                value = torch.randn(shape, generator=gen, dtype=torch.float64)
                if outliers is not None:
                    hot = torch.randperm(shape[-1], generator=gen)[: max(1, shape[-1] // 16)]
                    value[:, hot] *= outliers
            elif p.ndim == 1:
                value = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
            else:
                value = torch.randn(shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5
            p.copy_(value.to(p.dtype))
    if exact_norms if exact_norms is not None else dtype == torch.float64:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child).__name__.endswith("RMSNorm"):
                    setattr(module, name, ExactRMSNorm(child.weight, child.variance_epsilon))
    return model


@st.composite
def token_inputs(draw, vocab: int, *, max_batch: int = 2, max_len: int = 8, padding: bool = True) -> dict:
    """Model inputs ``{"input_ids": [B, T]}`` from a drawn seed, optionally with a left-padded ``attention_mask``.

    Example:
        >>> from hypothesis import given
        >>> @given(token_inputs(64))
        ... def test(inputs):
        ...     assert inputs["input_ids"].max() < 64 and inputs["input_ids"].ndim == 2
        >>> test()
    """
    gen = torch.Generator().manual_seed(draw(seeds()))
    batch, length = draw(st.integers(1, max_batch)), draw(st.integers(2, max_len))
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    out = {"input_ids": ids}
    if padding and draw(st.booleans()):
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, : draw(st.integers(0, length - 1))] = 0
        out["attention_mask"] = mask
    return out


@dataclasses.dataclass(frozen=True)
class RotationFactory:
    """A printable function ``n -> Rotation`` (for rotation arguments that sit on several sizes).

    Attributes:
        kind: ``"hadamard"``, ``"signed"`` (random-sign Hadamard), ``"orthogonal"`` or ``"matrix"``.
        seed: seed of the random part.
        block: block size, used where it is smaller than n and divides it; None = full.
        transposed: hand out ``R.T`` (still orthogonal, and non-symmetric for random kinds).
    """

    kind: str
    seed: int
    block: int | None = None
    transposed: bool = False

    def __call__(self, n: int) -> Rotation:
        block = self.block if self.block is not None and self.block < n and n % self.block == 0 else None
        if self.kind == "hadamard":
            r = hadamard(n, block=block)
        elif self.kind == "signed":
            r = hadamard(n, block=block, seed=self.seed)
        elif self.kind == "orthogonal":
            r = orthogonal(n, seed=self.seed, block=block)
        else:
            r = from_matrix(orthogonal(block or n, seed=self.seed).matrix(), n=n)
        return r.T if self.transposed else r


@st.composite
def rotation_factories(draw, kinds: tuple[str, ...] = ("hadamard", "signed", "orthogonal", "matrix"),
                       blocks: tuple[int | None, ...] = (None, 8, 16)) -> RotationFactory:
    """:class:`RotationFactory` values of every kind, full or block-diagonal, plain or transposed.

    Example:
        >>> from hypothesis import given
        >>> @given(rotation_factories())
        ... def test(make):
        ...     assert make(48).n == 48 and make(32).n == 32
        >>> test()
    """
    return RotationFactory(draw(st.sampled_from(kinds)), draw(seeds()), draw(st.sampled_from(blocks)), draw(st.booleans()))


def _output_tensor(out) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise AssertionError(f"assert_equivalent: cannot find logits in a model output of type {type(out).__name__}")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |a|`` in float64 (inf when a is all zero and b is not)."""
    a64, b64 = a.detach().double(), b.detach().double()
    scale = a64.abs().max().item()
    diff = (a64 - b64).abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def assert_equivalent(model, params_a, plan_a, params_b, plan_b, inputs, *, rtol: float) -> float:
    """Assert two (params, plan) pairs give the same model output: ``max|a - b| / max|a| <= rtol``.

    Each side runs as ``rotfn.call(model, params, plan, ...)``; the compared tensor is
    the output's ``logits`` (or ``last_hidden_state``, or the output itself).

    Args:
        model: the ``nn.Module``.
        params_a: the reference params (e.g. ``rotfn.params(model)``).
        plan_a: the reference plan (e.g. None).
        params_b: the candidate params (e.g. ``rotfn.fold(p, plan)``).
        plan_b: the candidate plan (e.g. ``plan``).
        inputs: a tensor (first positional argument), a tuple of positional arguments, or a dict of keyword arguments.
        rtol: the largest allowed relative error.

    Returns:
        The measured relative error.

    Raises:
        AssertionError: error above rtol or not finite, with both values at the worst index.

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8)).double()
        >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.orthogonal(8, seed=0))
        >>> p = rotfn.params(m)
        >>> err = assert_equivalent(m, p, None, rotfn.fold(p, plan), plan, torch.randn(3, 8, dtype=torch.float64), rtol=1e-12)
    """
    def run(p, plan):
        if isinstance(inputs, dict):
            return _output_tensor(call(model, p, plan, **inputs))
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return _output_tensor(call(model, p, plan, *args))

    with torch.no_grad():
        a, b = run(params_a, plan_a), run(params_b, plan_b)
    if a.shape != b.shape:
        raise AssertionError(f"assert_equivalent: output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    err = relative_error(a, b)
    if not err <= rtol:
        diff = (a.double() - b.double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(torch.nan_to_num(diff, nan=float("inf"))), diff.shape))
        raise AssertionError(
            f"assert_equivalent: max relative error {err:.3g} > rtol {rtol:g}; worst at {idx}: "
            f"{a[idx].item()!r} vs {b[idx].item()!r} (plans: {plan_a!r} vs {plan_b!r})"
        )
    return err
