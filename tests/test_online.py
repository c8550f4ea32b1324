"""Online transforms in a forward: a rotation with a format is one rotate_qdq, a tensor that several linears read
is rotated and quantized once, and rotfn.call's results are those of rotate-then-qdq at every site, bit for bit."""

import pytest
import torch

import rotfn
import rotfn.testing as rt
from rotfn.model import Site, call_with, online

pytest.importorskip("transformers")

LAYERS = 2
FORMATS = [rotfn.intq(4), rotfn.intq(4, group=16, symmetric=False), rotfn.intq(8, rule="compressed-tensors"),
           rotfn.mxfp4(), rotfn.mxfp8(), rotfn.nvfp4(), rotfn.nvfp4("pow2"), rotfn.nvfp4(0.05), rotfn.fp8("token"),
           rotfn.fp8("token", rule="compressed-tensors")]
R4 = {"signed": rotfn.hadamard(128, seed=3), "blocks": rotfn.hadamard(128, block=32, seed=3),
      "orthogonal blocks": rotfn.orthogonal(128, seed=4, block=16)}
#: the sites of each entry kind (what rotfn.model.online documents)
POINTS = {"linear": ("input",), "qk": ("query", "key"), "key": ("key",), "value": ("value",)}


def _llama():
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=LAYERS, intermediate=128)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=2, outliers=4.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    return model, rotfn.params(model), ids


def _quarot(model, fmt, r4=R4["signed"], kv=None):
    return rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2),
                              r3=rotfn.hadamard(16), r4=r4, weights=fmt, acts=fmt, kv=kv)


def _two_ops(plan):
    """The plan's online side as it ran before: at every site, each entry's ``rotate`` then ``qdq``, per linear."""
    by_site = {}
    for o in plan.online:
        def step(x, r=o.rotation, fmt=o.fmt):
            x = x if r is None else rotfn.rotate(x, r)
            return x if fmt is None else rotfn.qdq(x, fmt)
        for point in POINTS[o.kind]:
            by_site.setdefault(Site(o.site, point), []).append(step)

    def chain(x, steps):
        for f in steps:
            x = f(x)
        return x

    return {site: (lambda x, steps=steps: chain(x, steps)) for site, steps in by_site.items()}


def _reference(model, folded, plan, *args, **kwargs):
    """``rotfn.call`` with the online side of :func:`_two_ops`: the same weights (unmarked copies, no plan)."""
    return call_with(model, {k: v.clone() for k, v in folded.items()}, None, _two_ops(plan), *args, **kwargs)


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
@pytest.mark.parametrize("r4", R4, ids=str)
def test_call_is_rotate_then_qdq_at_every_site_bit_for_bit(fmt, r4):
    model, p, ids = _llama()
    plan = _quarot(model, fmt, R4[r4], kv=rotfn.intq(4, group=16) if r4 == "blocks" else None)
    folded = rotfn.fold(p, plan)
    with torch.no_grad():
        rt.assert_bits_equal(rotfn.call(model, folded, plan, ids).logits,
                             _reference(model, folded, plan, ids).logits, name="logits")


@pytest.mark.parametrize("fmt", [rotfn.mxfp4(), rotfn.nvfp4(), rotfn.intq(4, group=32)], ids=repr)
def test_per_linear_rotations_with_formats_are_rotate_then_qdq_bit_for_bit(fmt):
    model, p, ids = _llama()
    plan = rotfn.plans.per_linear(model, rotation=rt.RotationFactory("hadamard", 0, block=32), acts=fmt)
    folded = rotfn.fold(p, plan)
    with torch.no_grad():
        rt.assert_bits_equal(rotfn.call(model, folded, plan, ids).logits,
                             _reference(model, folded, plan, ids).logits, name="logits")


def _ops(fn):
    """``{op: count}`` of the dispatched tensor ops while ``fn()`` runs."""
    with rotfn.dispatch.trace() as ran:
        fn()
    counts = {}
    for op, _ in ran:
        counts[op] = counts.get(op, 0) + 1
    return counts


@pytest.mark.parametrize("mode", ["no_grad", "grad", "torch.func.grad"])
def test_a_shared_input_is_quantized_once_per_forward_with_the_same_results(mode):
    """W4A4 QuaRot: q/k/v read one tensor and gate/up one, so per layer 3 qdq (q/k/v, o, gate/up) and one
    rotate_qdq (R4 and the format at down_proj's input), where rotate-then-qdq per linear ran 7 qdq and a rotate;
    the queries and keys get R3 each. Same logits and gradients bit for bit (ops counted in the dispatch
    trace, forward and backward)."""
    model, p, ids = _llama()
    plan = _quarot(model, rotfn.intq(4))
    folded = rotfn.fold(p, plan)
    emb = p["model.embed_tokens.weight"][ids].clone()

    def loss(run, e):
        return run(inputs_embeds=e).logits.square().mean()

    def ours(**kw):
        return rotfn.call(model, folded, plan, **kw)

    def theirs(**kw):
        return _reference(model, folded, plan, **kw)

    if mode == "no_grad":
        def run(f):
            with torch.no_grad():
                return f(inputs_embeds=emb).logits
    elif mode == "grad":
        def run(f):
            e = emb.clone().requires_grad_()
            loss(f, e).backward()
            return e.grad
    else:
        def run(f):
            return torch.func.grad(lambda e: loss(f, e))(emb)
    got = None

    def capture():
        nonlocal got
        got = run(ours)

    back = 0 if mode == "no_grad" else 3 * LAYERS  # the backward's rotations: g @ R3.T of queries and keys, g @ R4.T
    assert _ops(capture) == {"qdq": 3 * LAYERS, "rotate_qdq": LAYERS, "rotate": 2 * LAYERS + back}
    assert _ops(lambda: run(theirs)) == {"qdq": 7 * LAYERS, "rotate": 3 * LAYERS + back}
    rt.assert_bits_equal(got, run(theirs), name=mode)


def test_an_input_changed_in_place_or_under_another_grad_mode_is_computed_again():
    model, _, _ = _llama()
    plan = rotfn.plans.per_linear(model, rotation=None, acts=rotfn.intq(4))
    sites = online(plan)
    q, k = (sites[Site(f"model.layers.0.self_attn.{m}_proj")] for m in "qk")
    assert q is k  # equal entries share one function
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    first = q(x)
    assert k(x) is first  # the same tensor, unchanged: computed once
    x.mul_(3)
    changed = k(x)
    assert changed is not first
    rt.assert_bits_equal(changed, rotfn.qdq(x, rotfn.intq(4)), name="after an in-place change")
    with torch.enable_grad():
        leaf = torch.randn(3, 64, requires_grad=True)
        with torch.no_grad():
            plain = q(leaf)
        tracked = k(leaf)
    assert plain.grad_fn is None and tracked.grad_fn is not None
    with torch.inference_mode():
        y = torch.randn(3, 64)
        assert q(y) is not k(y)  # inference tensors have no version counter: never remembered
    assert "intq" in repr(q)


def test_r3_and_the_kv_format_on_keys_are_one_rotate_qdq():
    """Keys after RoPE get R3 then the KV cache format: one rotate_qdq per layer (the queries keep their R3 alone,
    the values their format), the logits those of rotate-then-qdq bit for bit."""
    model, p, ids = _llama()
    plan = _quarot(model, rotfn.intq(4), kv=rotfn.intq(4, group=16))
    folded = rotfn.fold(p, plan)
    key = online(plan)[Site("model.layers.0.self_attn", "key")]
    assert (key.rotation, key.fmt) == (rotfn.hadamard(16), rotfn.intq(4, group=16))
    with torch.no_grad():
        got = None

        def capture():
            nonlocal got
            got = rotfn.call(model, folded, plan, ids).logits

        assert _ops(capture) == {"qdq": 4 * LAYERS, "rotate_qdq": 2 * LAYERS, "rotate": LAYERS}
        rt.assert_bits_equal(got, _reference(model, folded, plan, ids).logits, name="logits")
