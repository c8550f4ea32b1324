"""Model-family adapters: small tables of module names, one per family.

An adapter says, relative to a decoder layer ``{layers}.{i}``, which linears read
the attention norm (``qkv``), where V's rows are, which linear writes the
attention output (``o``), which read the MLP norm (``mlp_in``) and which writes
the MLP output (``mlp_out``); a mixture-of-experts table adds the router, the
fused experts and the shared expert. Adding a family is a few lines here.

Every parameter of a layer must be named by its adapter (or be a known per-head
norm): a plan builder refuses a model with a parameter it does not know, since
an unrotated reader of the residual stream would silently break exactness.
"""

from __future__ import annotations

import dataclasses

from rotfn.errors import FamilyError, message

__all__ = ["Family", "MoE", "FAMILIES", "family_for", "FUSED", "fused_groups"]

#: Leaf names of sibling linears an inference engine loads as one fused linear (vLLM's packed
#: modules): they need one NVFP4 global scale and one online input transform.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclasses.dataclass(frozen=True)
class MoE:
    """Names of a sparse MoE block (relative to the layer).

    Attributes:
        router: module whose ``weight: [E, d]`` scores experts from the normed residual.
        experts: module with fused ``experts_in: [E, 2I, d]`` (gate and up) and ``experts_out: [E, d, I]``.
        shared_in: linears of the shared expert reading the normed residual.
        shared_out: the shared expert's down projection (writes the residual), or None.
        shared_gate: the ``d -> 1`` linear gating the shared expert, or None.
    """

    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    experts_in: str = "gate_up_proj"
    experts_out: str = "down_proj"
    shared_in: tuple[str, ...] = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
    shared_out: str | None = "mlp.shared_expert.down_proj"
    shared_gate: str | None = "mlp.shared_expert_gate"


@dataclasses.dataclass(frozen=True)
class Family:
    """Names of one decoder-only family (module names; ``.weight``/``.bias`` are added).

    Attributes:
        name: the family name plans record.
        model_types: ``config.model_type`` values this adapter serves.
        qkv: linears reading the attention norm (one fused name for ``qkv_proj``).
        v: the linear whose out rows hold V (the last ``kv_heads * head_dim`` rows of a fused qkv).
        o: the attention output linear.
        attn: the attention module (where R3 acts on q and k after RoPE).
        head_norms: per-head RMSNorms on q and k (Qwen3's ``q_norm``/``k_norm``).
        v_norm: a per-head norm on V, which no R2 can pass exactly, or None.
        attn_norm, mlp_norm: the two residual norms of a layer.
        mlp_in, mlp_out: dense MLP linears reading the MLP norm / writing the residual.
        moe: the sparse block's names, or None.
        embed, final_norm, lm_head, layers: model-level names.
        passive: key prefixes holding no weight a rotation must see (RoPE buffers).
        notes: facts every plan for this family records.
    """

    name: str
    model_types: tuple[str, ...]
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    attn: str = "self_attn"
    head_norms: tuple[str, ...] = ()
    v_norm: str | None = None
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    moe: MoE | None = None
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    layers: str = "model.layers"
    passive: tuple[str, ...] = ("model.rotary_emb.",)
    notes: tuple[str, ...] = ()

    @property
    def fused_qkv(self) -> bool:
        """True when q, k and v come from one linear."""
        return len(self.qkv) == 1


_QK_NORM_NOTE = (
    "q_norm/k_norm act per head before RoPE and are not fused; R3 acts online after them and RoPE, so it is exact; "
    "no rotation is folded into q_proj/k_proj rows (it could not pass the per-head norm scale or RoPE)"
)

#: The supported families by name.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("llama",)),
        Family("mistral", ("mistral",)),
        Family("qwen2", ("qwen2",)),
        Family("qwen3", ("qwen3",), head_norms=("self_attn.q_norm", "self_attn.k_norm"), notes=(_QK_NORM_NOTE,)),
        Family("phi3", ("phi3",), qkv=("self_attn.qkv_proj",), v="self_attn.qkv_proj", mlp_in=("mlp.gate_up_proj",)),
        Family("qwen2_moe", ("qwen2_moe",), moe=MoE()),
        Family("qwen3_moe", ("qwen3_moe",), head_norms=("self_attn.q_norm", "self_attn.k_norm"),
               moe=MoE(shared_in=(), shared_out=None, shared_gate=None), notes=(_QK_NORM_NOTE,)),
    )
}


def family_for(fn: str, model_type: str | None, cls: str) -> Family:
    """The adapter for a ``config.model_type``.

    Raises:
        FamilyError: no adapter; the message lists the supported families.

    Example:
        >>> family_for("quarot", "llama", "LlamaForCausalLM").name
        'llama'
    """
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise FamilyError(
        message(fn, "model", f"a model of a supported family {sorted(FAMILIES)}", f"{cls} (model_type {model_type!r})",
                "add an adapter to rotfn.plans.FAMILIES (a small table of module names), or use rotfn.plans.per_linear")
    )


def fused_groups(names) -> tuple[tuple[str, ...], ...]:
    """Groups (two or more) of ``names`` that are partitions of one fused linear: same parent module,
    leaf names in one :data:`FUSED` set (a trailing ``.weight`` is ignored); groups in the order
    given, each in the engine's order (q, k, v; gate, up).

    Example:
        >>> fused_groups(["a.k_proj.weight", "a.q_proj.weight", "a.o_proj.weight", "b.q_proj.weight"])
        (('a.q_proj.weight', 'a.k_proj.weight'),)
    """
    groups: dict[tuple[str, int], list[str]] = {}
    for name in names:
        parent, _, leaf = name.removesuffix(".weight").rpartition(".")
        for i, fused in enumerate(FUSED):
            if leaf in fused:
                groups.setdefault((parent, i), []).append(name)
    order = {leaf: j for fused in FUSED for j, leaf in enumerate(fused)}
    return tuple(tuple(sorted(g, key=lambda n: order[n.removesuffix(".weight").rpartition(".")[2]]))
                 for g in groups.values() if len(g) > 1)
