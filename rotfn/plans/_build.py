"""Plan builders: per_linear (QuIP / AutoRound style) and quarot (R1..R4)."""

from __future__ import annotations

from collections.abc import Callable

from rotfn.errors import FormatError, PlanError, RotationError, RotfnError, ShapeError, message
from rotfn.plans._describe import describe
from rotfn.plans._families import Family, family_for, fused_groups
from rotfn.plans._plan import NormFusion, Online, Plan, WeightRotation
from rotfn.specs.formats import Format
from rotfn.specs.rotation import Rotation
from rotfn.transforms import Where
from rotfn.transforms import where as make_where

__all__ = ["per_linear", "quarot"]

RotationArg = Rotation | Callable[[int], Rotation] | None


def _rotation(fn: str, arg: str, r: RotationArg, n: int, site: str, what: str) -> Rotation | None:
    """Resolve a rotation argument (a spec or ``n -> spec``) for a dim of size n, checking the size."""
    if r is None:
        return None
    if isinstance(r, Rotation):
        spec = r
    elif callable(r):
        try:
            spec = r(n)
        except RotfnError as err:
            raise type(err)(f"{fn}: argument '{arg}': building the rotation for {site} (n={n}) failed: {err}") from None
        if not isinstance(spec, Rotation):
            raise RotationError(message(fn, arg, "a function returning a rotfn.Rotation", f"it returned {type(spec).__name__}"))
    else:
        raise RotationError(message(fn, arg, "None, a rotfn.Rotation or a function n -> Rotation", type(r).__name__,
                                    "pass e.g. rotfn.hadamard(n, seed=0) or lambda n: rotfn.hadamard(n, block=32)"))
    if spec.n != n:
        raise ShapeError(message(fn, arg, f"a rotation of size {n} (the {what} of {site})", repr(spec),
                                 f"build it for n={n}, or pass a function n -> Rotation"))
    return spec


def _format(fn: str, arg: str, f) -> Format | None:
    if f is not None and not isinstance(f, Format):
        raise FormatError(message(fn, arg, "None or a rotfn format spec", type(f).__name__,
                                  "build one with rotfn.mxfp4(), rotfn.nvfp4(), rotfn.intq(4) ..."))
    return f


def _check_group(fn: str, arg: str, f: Format | None, n: int, site: str, what: str = "input size") -> None:
    if f is not None and f.group is not None and n % f.group:
        raise ShapeError(message(fn, arg, f"a format whose scale group divides {n} (the {what} of {site})",
                                 f"{f!r} with group {f.group}", "pick a format with a smaller group, or leave this site out"))


class _Builder:
    """Collects plan entries; merges online transforms that land on one site."""

    def __init__(self):
        self.rotations: list[WeightRotation] = []
        self.norms: list[NormFusion] = []
        self.online: dict[tuple[str, str], list] = {}
        self.quantized: list[str] = []
        self.untied: list[str] = []
        self.notes: list[str] = []

    def rotate(self, key: str, r: Rotation | None, side: str, role: str, *, per_head=False, span=None) -> None:
        if r is not None:
            self.rotations.append(WeightRotation(key, r, side, per_head, span, role))

    def add_online(self, site: str, kind: str, r: Rotation | None, f: Format | None, role: str) -> None:
        if r is None and f is None:
            return
        entry = self.online.setdefault((site, kind), [None, None, role])
        entry[0] = r if r is not None else entry[0]
        entry[1] = f if f is not None else entry[1]
        if r is not None:
            entry[2] = role

    def plan(self, method: str, family: str | None, info, weights: Format | None, acts: Format | None,
             kv: Format | None = None) -> Plan:
        online = tuple(Online(site, kind, r, f, role) for (site, kind), (r, f, role) in self.online.items())
        return Plan(
            method=method, family=family, model=info.cls, signature=info.signature, rotations=tuple(self.rotations),
            norms=tuple(self.norms), online=online, weights=weights if self.quantized else None,
            quantized=tuple(self.quantized), acts=acts, kv=kv, shared_scales=fused_groups(self.quantized),
            tied=info.tied, untied=tuple(self.untied), notes=tuple(self.notes), transposed=info.transposed,
        )


def _untie_if_touched(b: _Builder, info, key: str, why: str) -> None:
    for group in info.tied:
        if key in group and not set(group) <= set(b.untied):
            b.untied.extend(n for n in group if n not in b.untied)
            b.notes.append(f"untied {list(group)}: {why}; each name now has its own tensor")


def per_linear(
    model,
    *,
    rotation: RotationArg,
    weights: Format | None = None,
    acts: Format | None = None,
    where: Where | str | tuple | None = None,
) -> Plan:
    """A QuIP / AutoRound style plan: each selected linear gets ``x @ R`` online and ``W @ R`` folded.

    For a linear ``y = x @ W.T + b`` with input size n: online ``x' = qdq(x @ R, acts)``,
    folded ``W' = qdq(W @ R, weights)``; unquantized, ``x' @ W'.T == x @ W.T`` exactly.
    Sites are every ``nn.Linear`` and GPT-2 ``Conv1D`` (by module name; a ``Conv1D`` stores its
    weight ``[in, out]``, so its fold is ``W' = R.T @ W`` and its qdq runs along dim -2, see
    ``Plan.transposed``) and, in mixture-of-experts models, every fused experts weight
    (``<experts>.gate_up_proj``, ``<experts>.down_proj``, all experts at once). The output
    embedding (lm_head) is left out unless ``where`` names it; a tied weight that gets rotated
    is untied (see ``plan.notes``).

    Args:
        model: an ``nn.Module`` (any architecture; no family adapter is needed).
        rotation: a :class:`rotfn.Rotation` (all selected inputs must have its size), a
            function ``n -> Rotation`` (e.g. ``lambda n: rotfn.hadamard(n, block=32, seed=0)``
            for block rotations matching an MX scale group), or None (quantize only).
        weights: weight format for qdq folded after the rotation, or None.
        acts: activation format for qdq after the online rotation, or None.
        where: which sites, a :func:`rotfn.where` filter over site names (module names such as
            ``"model.layers.0.mlp.down_proj"``; predicates get ``(site, None)``); None = all but lm_head.

    Returns:
        A frozen :class:`rotfn.plans.Plan`.

    Raises:
        ArgumentError: bad model. SelectionError: ``where`` matches no site (close names listed).
        RotationError / ShapeError: a rotation that cannot be built or does not fit a site.
        FormatError / ShapeError: a format that is not one, or whose group does not divide a size.

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> plan = rotfn.plans.per_linear(m, rotation=lambda n: rotfn.hadamard(n, block=32, seed=0), acts=rotfn.mxfp4())
        >>> [(o.site, o.rotation) for o in plan.online]
        [('0', Rotation(hadamard, n=64, block=32, seed=0)), ('2', Rotation(hadamard, n=32, seed=0))]
    """
    fn = "per_linear"
    info = describe(model, fn=fn)
    weights, acts = _format(fn, "weights", weights), _format(fn, "acts", acts)
    sites: dict[str, tuple[str, str, str, int]] = {}  # site -> (module, kind, weight key, n)
    for name, n in info.linears:
        sites[name] = (name, "linear", f"{name}.weight" if name else "weight", n)
    for name, in_attr, down_attr in info.experts:
        key_in, key_down = f"{name}.{in_attr}", f"{name}.{down_attr}"
        sites[key_in] = (name, "experts_in", key_in, info.shapes[key_in][-1])
        sites[key_down] = (name, "experts_down", key_down, info.shapes[key_down][-1])
    if where is None:
        selected = [s for s in sites if s != info.output_embedding]
    else:
        filt = where if isinstance(where, Where) else make_where(where)
        selected = filt.select(dict.fromkeys(sites), fn=fn)
    b = _Builder()
    for site in selected:
        module, kind, key, n = sites[site]
        r = _rotation(fn, "rotation", rotation, n, site, "input size")
        _check_group(fn, "acts", acts, n, site)
        _check_group(fn, "weights", weights, n, site)
        b.rotate(key, r, "input", "per_linear")
        b.add_online(module, kind, r, acts, "per_linear")
        if weights is not None:
            b.quantized.append(key)
        if r is not None or weights is not None:
            _untie_if_touched(b, info, key, f"{key} is rotated/quantized as a linear input")
    try:
        family = family_for(fn, info.model_type, info.cls).name
    except RotfnError:  # per_linear needs no adapter
        family = None
    return b.plan("per_linear", family, info, weights, acts)


def _need(fn: str, info, key: str, fam: Family) -> str:
    if key not in info.shapes:
        close = Where.names([key]).closest(info.shapes)
        raise PlanError(message(fn, "model", f"a {fam.name} model with parameter {key!r}", f"{info.cls} without it",
                                f"pass the *ForCausalLM model; close keys: {close}"))
    return key


def quarot(
    model,
    *,
    r1: RotationArg,
    r2: RotationArg = None,
    r3: RotationArg = None,
    r4: RotationArg = None,
    weights: Format | None = None,
    acts: Format | None = None,
    kv: Format | None = None,
) -> Plan:
    """A QuaRot / SpinQuant plan: R1 on the residual stream, R2 per head on V/O, R3 on Q/K, R4 before down_proj.

    Row-vector math, residual ``h`` (size d), head size ``hd``:

    * R1 (d x d, folded): norm scales fused into the linears that read them
      (``W diag(g)``, ``g = 1``: exact for RMSNorm, no embedding mean subtraction),
      then ``E' = E R1`` (embedding), ``W' = W R1`` for every reader of the residual
      (q/k/v or qkv, gate/up or gate_up, the MoE router, every expert's gate_up, the
      shared expert and its gate, lm_head after the final norm), ``W' = R1.T W``,
      ``b' = b R1`` for every writer (o_proj, down_proj, every expert's down, the shared
      expert's down). The residual stream becomes ``h R1``; RMSNorm commutes with R1.
      A tied embedding is untied (lm_head also takes the final norm scale), noted in the plan.
    * R2 (hd x hd, folded): each V head's rows ``R2.T W_v,h`` and bias ``b_v,h R2``
      (GQA: every kv head), and o_proj's input per head ``W_o blockdiag(R2)``.
    * R3 (hd x hd, online): ``q R3``, ``k R3`` after RoPE (and Qwen3's q_norm/k_norm),
      through a registered attention function; ``(q R3)(k R3)^T = q k^T``.
    * R4 (I x I, online + folded): ``x R4`` before every down projection (dense,
      shared expert, each routed expert) and ``W_down' = W_down R4``.

    ``acts`` fake-quantizes every decoder linear input (after its online rotation);
    ``weights`` every decoder linear weight after folding. The MoE router, the
    shared expert gate, embeddings and lm_head stay unquantized. ``kv`` fake-quantizes
    what a KV cache holds, as it enters attention: the keys after RoPE, q/k norms and R3
    (``k R3``), and the values after v_proj (with R2 folded), each ``[batch, kv_heads,
    tokens, head_dim]`` tensor over its last dim, so a format with ``group=None`` has one
    scale per token and head (asymmetric INT4 per head, as QuaRot: ``rotfn.intq(4,
    symmetric=False)``). The cache's history is re-quantized from its float values at every
    step, which gives each token the same codes as quantizing it once when cached.
    ``quarot(model, r1=None, kv=fmt)`` is KV-cache quantization alone.

    Args:
        model: a transformers ``*ForCausalLM`` of a supported family (see :data:`rotfn.plans.FAMILIES`).
        r1: R1 (hidden size): a :class:`rotfn.Rotation` of the right size, a function
            ``n -> Rotation``, or None to leave that position out (as for r2, r3, r4).
        r2: R2 (head_dim), as r1.
        r3: R3 (head_dim), as r1.
        r4: R4 (the down projections' input size), as r1; a function ``n -> Rotation`` is
            needed when down projections differ in size, as in MoE.
        weights: weight format, or None.
        acts: activation format, or None.
        kv: KV-cache format (keys and values), or None.

    Returns:
        A frozen :class:`rotfn.plans.Plan`.

    Raises:
        FamilyError: unknown family (the message lists the supported ones).
        ShapeError: a rotation whose size does not fit its position; a format group that does not divide a size.
        RotationError: a rotation argument of the wrong type, or a factory that fails.
        PlanError: the model has parameters the adapter does not know, or R2 where V has a per-head norm.

    Example:
        >>> import torch, transformers, rotfn
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.AutoModelForCausalLM.from_config(cfg)
        >>> plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=0), r3=rotfn.hadamard(8))
        >>> plan.family, len(plan.norms), [o.kind for o in plan.online]
        ('llama', 3, ['qk'])

    References:
        QuaRot (Ashkboos et al. 2024, arXiv 2404.00456); SpinQuant (Liu et al. 2024, arXiv 2405.16406).
    """
    fn = "quarot"
    info = describe(model, fn=fn)
    fam = family_for(fn, info.model_type, info.cls)
    weights, acts, kv = _format(fn, "weights", weights), _format(fn, "acts", acts), _format(fn, "kv", kv)
    cfg = info.config
    shapes = info.shapes
    embed_key = _need(fn, info, f"{fam.embed}.weight", fam)
    head_key = _need(fn, info, f"{fam.lm_head}.weight", fam)
    norm_key = _need(fn, info, f"{fam.final_norm}.weight", fam)
    d = shapes[embed_key][-1]
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or d // heads

    o_in = shapes.get(f"{fam.layers}.0.{fam.o}.weight", (heads * hd,))[-1]
    if o_in != heads * hd:
        raise PlanError(message(fn, "model", f"{fam.o} input size heads * head_dim = {heads} * {hd}", o_in,
                                "check config.num_attention_heads and config.head_dim"))
    R1 = _rotation(fn, "r1", r1, d, fam.embed, "hidden size")  # noqa: N806
    R2 = _rotation(fn, "r2", r2, hd, f"{fam.layers}.*.{fam.v}", "head_dim")  # noqa: N806
    R3 = _rotation(fn, "r3", r3, hd, f"{fam.layers}.*.{fam.attn}", "head_dim")  # noqa: N806
    if R2 is not None and fam.v_norm is not None:
        raise PlanError(message(fn, "r2", f"no per-head norm on V in {fam.name}", f"{fam.v_norm} scales V per channel",
                                "leave r2=None: a rotation cannot pass a per-channel norm scale exactly"))

    depth = len(fam.layers.split("."))
    layers = sorted({int(k.split(".")[depth]) for k in shapes if k.startswith(fam.layers + ".")})
    known = {embed_key, head_key, norm_key}
    b = _Builder()
    b.notes.extend(fam.notes)

    def w(module: str) -> str:
        return _need(fn, info, f"{module}.weight", fam)

    def bias(module: str) -> str | None:
        key = f"{module}.bias"
        return key if key in shapes else None

    def linear_keys(module: str) -> list[str]:
        keys = [w(module)] + ([bias(module)] if bias(module) else [])
        known.update(keys)
        return keys

    has_moe = False
    for i in layers:
        p = f"{fam.layers}.{i}."
        known.update(_need(fn, info, k, fam) for k in (p + fam.attn_norm + ".weight", p + fam.mlp_norm + ".weight"))
        known.update(_need(fn, info, f"{p}{n}.weight", fam) for n in fam.head_norms)
        attn_in = [p + m for m in fam.qkv]
        for m in attn_in:
            linear_keys(m)
        o = p + fam.o
        linear_keys(o)
        q_size = heads * hd
        moe = fam.moe if fam.moe is not None and f"{p}{fam.moe.router}.weight" in shapes else None
        if moe is not None:
            has_moe = True
            experts = p + moe.experts
            exp_in = _need(fn, info, f"{experts}.{moe.experts_in}", fam)
            exp_out = _need(fn, info, f"{experts}.{moe.experts_out}", fam)
            router = _need(fn, info, f"{p}{moe.router}.weight", fam)
            known.update((exp_in, exp_out, router))
            mlp_in = [p + m for m in moe.shared_in]
            gates = [p + moe.shared_gate] if moe.shared_gate else []
            downs = [p + moe.shared_out] if moe.shared_out else []
            fused, routers = [(experts, exp_in, exp_out)], [router]
        else:
            mlp_in, gates, downs, fused, routers = [p + m for m in fam.mlp_in], [], [p + fam.mlp_out], [], []
        for m in mlp_in + gates + downs:
            linear_keys(m)
        readers = [w(m) for m in mlp_in + gates] + routers + [f[1] for f in fused]

        if R1 is not None:
            b.norms.append(NormFusion(p + fam.attn_norm + ".weight", tuple(w(m) for m in attn_in)))
            for m in attn_in:
                b.rotate(w(m), R1, "input", "R1")
            for key in linear_keys(o):
                b.rotate(key, R1, "output", "R1")
            b.norms.append(NormFusion(p + fam.mlp_norm + ".weight", tuple(readers)))
            for key in readers:
                b.rotate(key, R1, "input", "R1")
            for m in downs:
                for key in linear_keys(m):
                    b.rotate(key, R1, "output", "R1")
            for _, _, exp_out_key in fused:
                b.rotate(exp_out_key, R1, "output", "R1")
        if R2 is not None:
            v = p + fam.v
            span = (q_size + kv_heads * hd, q_size + 2 * kv_heads * hd) if fam.fused_qkv else None
            for key in linear_keys(v):
                b.rotate(key, R2, "output", "R2", per_head=True, span=span)
            b.rotate(w(o), R2, "input", "R2", per_head=True)
        b.add_online(p + fam.attn, "qk", R3, None, "R3")
        if kv is not None:
            _check_group(fn, "kv", kv, hd, p + fam.attn, "head_dim")
            b.add_online(p + fam.attn, "key", None, kv, "kv")
            b.add_online(p + fam.attn, "value", None, kv, "kv")
        for m in downs:
            n = shapes[w(m)][-1]
            r = _rotation(fn, "r4", r4, n, m, "input size")
            b.rotate(w(m), r, "input", "R4")
            b.add_online(m, "linear", r, None, "R4")
        for experts, _, exp_out_key in fused:
            n = shapes[exp_out_key][-1]
            r = _rotation(fn, "r4", r4, n, exp_out_key, "input size")
            b.rotate(exp_out_key, r, "input", "R4")
            b.add_online(experts, "experts_down", r, None, "R4")
        # activation and weight qdq at every decoder linear (router and shared-expert gate excepted)
        for m in attn_in + mlp_in:
            _check_group(fn, "acts", acts, d, m)
            b.add_online(m, "linear", None, acts, "acts")
        for m in [o] + downs:
            _check_group(fn, "acts", acts, shapes[w(m)][-1], m)
            b.add_online(m, "linear", None, acts, "acts")
        for experts, exp_in_key, exp_out_key in fused:
            _check_group(fn, "acts", acts, shapes[exp_out_key][-1], exp_out_key)
            b.add_online(experts, "experts_in", None, acts, "acts")
            b.add_online(experts, "experts_down", None, acts, "acts")
        if weights is not None:
            for key in [w(m) for m in attn_in + [o] + mlp_in + downs] + [k for f in fused for k in f[1:]]:
                _check_group(fn, "weights", weights, shapes[key][-1], key)
                b.quantized.append(key)

    if R1 is not None:
        b.norms.append(NormFusion(norm_key, (head_key,)))
        b.rotate(head_key, R1, "input", "R1")
        b.rotate(embed_key, R1, "input", "R1")
        b.notes.append("R1: residual norm scales fused into the following linears and set to 1 (RMSNorm: no mean "
                       "subtraction needed)")
        for group in info.tied:
            if embed_key in group or head_key in group:
                _untie_if_touched(b, info, head_key, "lm_head takes the final norm scale and R1, the embedding only R1")
    if has_moe:
        b.notes.append("MoE: router and shared_expert_gate read the rotated residual (R1 folded) and are not quantized")
    unknown = [k for k in shapes if k not in known and not k.startswith(fam.passive)]
    if unknown:
        raise PlanError(message(fn, "model", f"only parameters the {fam.name} adapter names", f"unknown {unknown[:6]}",
                                "extend the adapter in rotfn.plans.FAMILIES so every reader and writer of the residual "
                                "is rotated"))
    return b.plan("quarot", fam.name, info, weights, acts, kv)
