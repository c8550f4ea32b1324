"""rotfn.learn: learned rotations on a tiny Llama (W4A4), the Cayley step, slots, calibration, bad inputs."""

import copy
import dataclasses
import functools
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, DTypeError, FoldError, PlanError, SelectionError
from rotfn.learn import calibration, cayley_step, evaluate, fidelity, orthogonality_error, rotations
from rotfn.learn._slots import Slot, find_slots, rotate_learned


def byte_tokens(text: str) -> list[int]:
    return list(text.encode())


def quarot_plan(model, fmt):
    r1, r2 = rotfn.hadamard(64, seed=0), rotfn.hadamard(16, seed=1)
    return rotfn.plans.quarot(model, r1=r1, r2=r2, weights=fmt, acts=fmt)


def without_formats(plan: rotfn.Plan) -> rotfn.Plan:
    """The same rotations with no weight or activation qdq (so the plan must be exact)."""
    online = tuple(dataclasses.replace(o, fmt=None) for o in plan.online if o.rotation is not None)
    return dataclasses.replace(plan, weights=None, quantized=(), acts=None, online=online)


@pytest.fixture(scope="module")
def llama():
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128, vocab=256)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=0)
    return model, rotfn.params(model)


@pytest.fixture(scope="module")
def data():
    train = calibration(byte_tokens, seq_len=32, batch_size=4, n_batches=8)
    held_out = calibration(byte_tokens, seq_len=32, batch_size=4, n_batches=4, skip=8)
    return train, held_out


@pytest.fixture(scope="module")
def learned(llama, data):
    """R1 and R2 of a W4A4 (MXFP4) QuaRot plan, learned for 20 steps from random Hadamards."""
    model, p = llama
    plan = quarot_plan(model, rotfn.mxfp4())
    return plan, rotations(model, p, plan, data[0], steps=20, lr=1.0, loss="fidelity", progress=False)


# ----- evidence on the tiny Llama -------------------------------------------------------------
def test_learned_rotations_beat_random_hadamard_on_held_out_batches(llama, data, learned):
    model, p = llama
    plan, result = learned
    hadamard = evaluate(model, p, plan, data[1], loss="fidelity")
    learned_loss = evaluate(model, p, result.plan, data[1], loss="fidelity")
    assert learned_loss < 0.95 * hadamard, (learned_loss, hadamard)


def test_orthogonal_at_every_step(learned):
    _, result = learned
    assert len(result.orthogonality) == len(result.losses) == 20
    assert max(result.orthogonality) <= 1e-6
    for w in result.plan.rotations:
        rt.assert_orthogonal(w.rotation, atol=1e-6)
        m = w.rotation.matrix(torch.float32)
        assert (m @ m.T - torch.eye(m.shape[0])).abs().max() <= 1e-6


def test_slots_follow_spinquant_one_r1_one_r2_per_layer(learned):
    _, result = learned
    assert result.slots == ("R1 Rotation(hadamard, n=64, seed=0)",
                            "R2 Rotation(hadamard, n=16, seed=1) in model.layers.0",
                            "R2 Rotation(hadamard, n=16, seed=1) in model.layers.1")
    r1 = {w.rotation for w in result.plan.rotations if w.role == "R1"}
    r2 = {w.key.split(".")[2]: w.rotation for w in result.plan.rotations if w.role == "R2"}
    assert len(r1) == 1 and r2["0"] != r2["1"] and all(r.kind == "matrix" for r in r1 | set(r2.values()))


def test_learned_plan_folds_calls_and_is_exact_without_formats(llama, learned):
    model, p = llama
    _, result = learned
    exact = without_formats(result.plan)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    rt.assert_equivalent(model, p, None, rotfn.fold(p, exact), exact, ids, rtol=1e-4)
    out = rotfn.call(model, rotfn.fold(p, result.plan), result.plan, ids).logits
    assert out.shape == (2, 16, 256) and torch.isfinite(out).all()


def test_learned_plan_round_trips_through_its_dict(llama, learned):
    _, p = llama
    _, result = learned
    again = rotfn.Plan.from_dict(result.plan.to_dict())
    assert again == result.plan
    a, b = rotfn.fold(p, result.plan), rotfn.fold(p, again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_fold_program_with_learned_rotations_at_identity_is_fold(llama):
    model, p = llama
    plan = quarot_plan(model, rotfn.intq(4))
    slots = find_slots("test", plan, ("R1", "R2"), shared=False)
    eye = {s: torch.eye(s.base.block_size, dtype=torch.float64) for s in slots.slots}
    fns = {plan.rotations[i].transform(): functools.partial(rotate_learned, q=eye[s])
           for i, s in slots.rotations.items()}
    ours, reference = rotfn.transforms.compile_fold(plan.transform(), p).run(p, rotate=fns), rotfn.fold(p, plan)
    for k in reference:
        torch.testing.assert_close(ours[k], reference[k], rtol=0, atol=1e-6)


# ----- gradients: torch.func only, and right ------------------------------------------------------
def test_gradients_come_from_torch_func_grad(llama, data, monkeypatch):
    model, p = llama
    calls = []
    real_grad = torch.func.grad

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real_grad(*args, **kwargs)

    def no_backward(*args, **kwargs):
        raise AssertionError("rotfn.learn must not call .backward()")

    monkeypatch.setattr(torch.func, "grad", spy)
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    result = rotations(model, p, quarot_plan(model, rotfn.intq(4)), data[0][:2], steps=2, lr=0.5, progress=False)
    assert len(calls) == 1 and len(result.losses) == 2


def test_learning_under_float_weights_keeps_the_weight_format_for_gptq(llama, data):
    """SpinQuant's order: learn R1/R2 under W16A4, then round the weights with GPTQ."""
    model, p = llama
    fmt = rotfn.intq(4, group=32)
    plan = quarot_plan(model, fmt)
    w16 = rotations(model, p, plan, data[0][:2], steps=3, lr=1.0, loss="fidelity", weights="float", progress=False)
    w4 = rotations(model, p, plan, data[0][:2], steps=3, lr=1.0, loss="fidelity", progress=False)
    a4 = rotations(model, p, dataclasses.replace(plan, weights=None, quantized=()), data[0][:2], steps=3, lr=1.0,
                   loss="fidelity", progress=False)
    assert w16.losses == a4.losses and w16.losses != w4.losses   # the same learning as a W16A4 plan
    assert w16.plan.weights == fmt and w16.plan.quantized == plan.quantized
    assert [w.rotation for w in w16.plan.rotations] == [w.rotation for w in a4.plan.rotations]
    calib = rotfn.calibrate(model, p, w16.plan, data[0][:2], progress=False)
    folded = rotfn.fold(p, w16.plan, weights_by=calib)
    assert torch.isfinite(rotfn.call(model, folded, w16.plan, **data[1][0]).logits).all()


def test_an_unquantized_plan_has_nothing_to_learn(llama, data):
    model, p = llama
    plan = without_formats(quarot_plan(model, rotfn.intq(4)))
    result = rotations(model, p, plan, data[0][:1], steps=2, lr=1.0, loss="fidelity", progress=False)
    assert max(result.losses) < 1e-10


@settings(max_examples=5, deadline=None)
@given(rt.seeds())
def test_cayley_sgd_recovers_a_rotation(seed):
    """A smooth problem (a folded weight with no online partner, so the output depends on Q): loss -> 0."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(rotfn.orthogonal(16, seed=seed).matrix())
    base = rotfn.hadamard(16, seed=seed)
    plan = dataclasses.replace(rotfn.plans.per_linear(model, rotation=base), online=())
    skew = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    target_q = torch.linalg.matrix_exp(0.1 * (skew - skew.T))
    x = torch.randn(256, 16, generator=gen, dtype=torch.float64)
    target = x @ (model[0].weight.detach() @ base.matrix() @ target_q).T

    def loss(out, batch):
        return (out - target).square().mean()

    result = rotations(model, rotfn.params(model), plan, [x], steps=60, lr=2.0, momentum=0.0, roles=("per_linear",),
                       loss=loss, progress=False)
    assert result.losses[-1] < 1e-8 * result.losses[0]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(result.losses[:-1], result.losses[1:], strict=True))   # descent
    assert max(result.orthogonality) < 1e-12


@settings(max_examples=25, deadline=None)
@given(rt.rotations(max_n=64), rt.seeds())
def test_rotate_learned_is_rotate_by_the_learned_spec(r, seed):
    gen = torch.Generator().manual_seed(seed)
    q = rotfn.orthogonal(r.block_size, seed=seed).matrix()
    x = torch.randn(3, r.n, generator=gen, dtype=torch.float64)
    base = r.T if r.transposed else r
    spec = Slot("per_linear", base, None).learned(q)
    torch.testing.assert_close(rotate_learned(x, r, q), rotfn.rotate(x, spec.T if r.transposed else spec))
    rt.assert_orthogonal(spec, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(rt.seeds(), st.sampled_from([2, 8, 32]), st.floats(0.0, 0.95))
def test_cayley_step_stays_orthogonal_and_goes_downhill(seed, b, momentum):
    gen = torch.Generator().manual_seed(seed)
    x = rotfn.orthogonal(b, seed=seed).matrix()
    v = torch.zeros_like(x)
    for _ in range(100):
        g = torch.randn(b, b, generator=gen, dtype=torch.float64)
        x, v = cayley_step(x, g, v, lr=0.3, momentum=momentum)
    assert orthogonality_error(x) < 1e-12
    g = torch.randn(b, b, generator=gen, dtype=torch.float64)
    x2, _ = cayley_step(x, g, torch.zeros_like(x), lr=1e-3, momentum=0.0)
    assert (x2 * g).sum() <= (x * g).sum()


# ----- losses --------------------------------------------------------------------------------
def test_default_loss_of_a_causal_lm_is_next_token_cross_entropy(llama, data):
    model, p = llama
    batches = data[1][:2]
    with torch.no_grad():
        expected = sum(model(**b, labels=b["input_ids"]).loss.item() for b in batches) / len(batches)
    assert evaluate(model, p, None, batches) == pytest.approx(expected, rel=1e-5)
    result = rotations(model, p, quarot_plan(model, rotfn.intq(4)), data[0][:1], steps=1, lr=0.5, progress=False)
    assert result.loss == "next-token cross-entropy" and all(2 < v < 10 for v in result.losses)


def test_default_loss_elsewhere_is_fidelity_to_the_float_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    p, x = rotfn.params(model), [torch.randn(8, 32)]
    plan = rotfn.plans.per_linear(model, rotation=rotfn.hadamard(32, seed=0), weights=rotfn.intq(3), acts=rotfn.intq(3))
    assert evaluate(model, p, None, x) == 0
    assert 0 < evaluate(model, p, plan, x) < 1
    unit = fidelity(lambda out, batch: torch.nn.functional.normalize(out, dim=-1))
    assert 0 < evaluate(model, p, plan, x, loss=unit) < evaluate(model, p, plan, x)
    result = rotations(model, p, plan, x, steps=2, lr=0.5, roles=("per_linear",), loss=unit, progress=False)
    assert result.loss == "relative squared error" and len(result.slots) == 2


def test_per_linear_rotations_learn_one_block_per_linear(llama, data):
    model, p = llama
    plan = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.hadamard(n, block=16, seed=0), weights=rotfn.intq(4),
                                  acts=rotfn.intq(4, group=16))
    own = rotations(model, p, plan, data[0][:1], steps=1, lr=0.5, roles=("per_linear",), progress=False)
    shared = rotations(model, p, plan, data[0][:1], steps=1, lr=0.5, roles=("per_linear",), shared=True, progress=False)
    assert len(own.slots) == len(plan.online) == 14 and len(shared.slots) == 2
    r = own.plan.online[0].rotation
    assert (r.kind, r.block, r.signs) == ("matrix", 16, plan.online[0].rotation.signs)
    exact = without_formats(own.plan)
    ids = data[1][0]["input_ids"][:1]
    rt.assert_equivalent(model, p, None, rotfn.fold(p, exact), exact, ids, rtol=1e-4)


def test_progress_bar_shows_the_loss(llama, data, capsys):
    model, p = llama
    rotations(model, p, quarot_plan(model, rotfn.intq(4)), data[0][:1], steps=1, lr=0.5)
    assert "loss=" in capsys.readouterr().err


# ----- calibration -----------------------------------------------------------------------------
def test_calibration_windows_are_disjoint_and_shaped():
    train = calibration(byte_tokens, seq_len=32, batch_size=2, n_batches=3)
    held_out = calibration(byte_tokens, seq_len=32, batch_size=2, n_batches=2, skip=3)
    assert [b["input_ids"].shape for b in train] == [torch.Size([2, 32])] * 3
    assert all(b["attention_mask"].eq(1).all() for b in train + held_out)
    windows = {tuple(w.tolist()) for b in train + held_out for w in b["input_ids"]}
    assert len(windows) == 10
    text = rotfn.learn.calibration_text().split("\n\n")[0].strip().encode()
    assert bytes(train[0]["input_ids"][0].tolist()) == text[:32]


def test_calibration_uses_a_transformers_tokenizer():
    from rotfn._demo import minilm as demo

    try:
        _, tokenizer = demo.load_minilm()
    except demo.ModelUnavailable as err:
        pytest.skip(str(err))
    batches = calibration(tokenizer, seq_len=64, batch_size=4, n_batches=2)
    assert batches[0]["input_ids"].shape == (4, 64)
    assert tokenizer.cls_token_id not in batches[0]["input_ids"]
    wrapped = calibration(tokenizer, seq_len=64, batch_size=4, n_batches=2, special_tokens=True)[1]["input_ids"]
    assert wrapped.shape == (4, 64)
    assert wrapped[:, 0].eq(tokenizer.cls_token_id).all() and wrapped[:, -1].eq(tokenizer.sep_token_id).all()
    text = calibration(tokenizer, seq_len=62, batch_size=4, n_batches=2)[1]["input_ids"]   # the same windows, bare
    assert torch.equal(wrapped[:, 1:-1], text)
    with pytest.raises(ArgumentError, match="learn.calibration: argument 'seq_len'"):
        calibration(tokenizer, seq_len=2, batch_size=1, n_batches=1, special_tokens=True)


@pytest.mark.parametrize("kwargs, arg", [
    ({"seq_len": 1}, "seq_len"), ({"batch_size": 0}, "batch_size"), ({"n_batches": 1.5}, "n_batches"),
    ({"skip": -1}, "skip"), ({"n_batches": 10_000}, "n_batches"),
])
def test_calibration_bad_sizes(kwargs, arg):
    sizes = {"seq_len": 32, "batch_size": 2, "n_batches": 2} | kwargs
    with pytest.raises(ArgumentError, match=f"learn.calibration: argument '{arg}': expected"):
        calibration(byte_tokens, **sizes)


def test_calibration_bad_tokenizer():
    with pytest.raises(ArgumentError, match="learn.calibration: argument 'tokenizer'"):
        calibration(lambda s: s.split(), seq_len=8, batch_size=1, n_batches=1)
    with pytest.raises(ArgumentError, match="learn.calibration: argument 'tokenizer'.*special_tokens"):
        calibration(byte_tokens, seq_len=8, batch_size=1, n_batches=1, special_tokens=True)
    with pytest.raises(ArgumentError, match="learn.calibration: argument 'special_tokens'"):
        calibration(byte_tokens, seq_len=8, batch_size=1, n_batches=1, special_tokens=1)


# ----- weights held in pieces, folded on use --------------------------------------------------
def _tiny(family, **kw):
    cfg = rt.make_config(family, hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128, vocab=256, **kw)
    return rt.tiny_model(cfg, dtype=torch.float32, seed=1, outliers=8.0)


SHARDED = {
    "llama tied, biases": (dict(family="llama", tied=True, bias=True), rotfn.intq(4, group=16), ("R1", "R2")),
    "qwen3 nvfp4, R4 learned": (dict(family="qwen3"), rotfn.nvfp4(), ("R1", "R2", "R4")),
    "qwen3_moe, R4 at the experts": (dict(family="qwen3_moe"), rotfn.intq(4, group=16), ("R1", "R2")),
    "phi3 fused qkv": (dict(family="phi3"), rotfn.mxfp4(), ("R1", "R2")),
    "per_linear": (dict(family="llama"), rotfn.intq(4), ("per_linear",)),
}


@pytest.mark.parametrize("name", SHARDED)
def test_shard_folds_each_module_when_it_runs_and_learns_what_the_whole_fold_learns(name, monkeypatch):
    """shard=True: each module's weights are folded when it runs (never the whole fold) and again in the
    backward pass; the losses are the same bits and the rotations equal up to the order of gradient sums (a
    tied key's gradient arrives from two modules)."""
    kw, fmt, roles = SHARDED[name]
    model = _tiny(**kw)
    if roles == ("per_linear",):
        plan = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.hadamard(n, seed=1), weights=fmt, acts=fmt)
    else:
        plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16),
                                  r4=lambda n: rotfn.hadamard(n, seed=2), weights=fmt, acts=fmt)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(2)]
    learn = functools.partial(rotations, model, rotfn.params(model), plan, batches, steps=2, lr=0.5, roles=roles,
                              progress=False)
    whole = learn()

    def no_whole_fold(*args, **kwargs):
        raise AssertionError("shard=True ran the whole fold")

    monkeypatch.setattr(rotfn.transforms.FoldProgram, "run", no_whole_fold)
    sharded = learn(shard=True)
    assert sharded.losses == whole.losses
    for a, b in zip(sharded.plan.rotations, whole.plan.rotations, strict=True):
        torch.testing.assert_close(a.rotation.matrix(torch.float64), b.rotation.matrix(torch.float64), rtol=0,
                                   atol=1e-13)


def test_shard_keeps_no_gathered_or_folded_weight_past_its_module(llama, data, monkeypatch):
    """When the loss is computed (the whole forward done, the backward not begun) no weight that a module
    folded is alive: the autograd graph holds only activations and the rotations (the gathered pieces of two
    ranks: tests/test_distributed_learn.py)."""
    model, p = llama
    plan = quarot_plan(model, rotfn.intq(4))
    refs, values = [], rotfn.transforms.FoldProgram.values

    def recorded(*args, **kwargs):
        out = values(*args, **kwargs)
        refs.extend((k, weakref.ref(t)) for k, t in out.items() if t.ndim >= 2)
        return out

    def loss(outputs, batch):
        alive = [k for k, r in refs if r() is not None]
        assert refs and not alive, f"{len(alive)} of {len(refs)} folded weights alive after the forward: {alive}"
        return outputs.logits.float().square().mean()

    monkeypatch.setattr(rotfn.transforms.FoldProgram, "values", recorded)
    rotations(model, p, plan, data[0][:1], steps=1, lr=0.5, loss=loss, shard=True, progress=False)
    assert len(refs) == 2 * (len(plan.quantized) + 2)  # every linear, the embedding and the head: forward, backward


def test_shard_with_a_fidelity_loss_and_another_device(llama, data):
    """The float references of a fidelity loss run on gathered weights too; device= moves the learning."""
    model, p = llama
    plan = quarot_plan(model, rotfn.intq(4))
    learn = functools.partial(rotations, model, p, plan, data[0][:2], steps=2, lr=0.5, loss="fidelity",
                              progress=False)
    whole, sharded = learn(), learn(shard=True, device="cpu")
    assert sharded.losses == whole.losses


# ----- bad inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, arg", [
    ({"roles": ("R7",)}, ArgumentError, "roles"),
    ({"roles": ("R3",)}, ArgumentError, "roles"),
    ({"roles": "R1"}, ArgumentError, "roles"),
    ({"roles": ()}, ArgumentError, "roles"),
    ({"roles": ("per_linear",)}, ArgumentError, "roles"),
    ({"steps": 0}, ArgumentError, "steps"),
    ({"steps": 2.5}, ArgumentError, "steps"),
    ({"steps": True}, ArgumentError, "steps"),
    ({"lr": 0}, ArgumentError, "lr"),
    ({"lr": -1.0}, ArgumentError, "lr"),
    ({"lr": float("nan")}, ArgumentError, "lr"),
    ({"lr": float("inf")}, ArgumentError, "lr"),
    ({"momentum": 1.0}, ArgumentError, "momentum"),
    ({"shared": "yes"}, ArgumentError, "shared"),
    ({"shard": 1}, ArgumentError, "shard"),
    ({"device": "nowhere"}, ArgumentError, "device"),
    ({"device": 3.5}, ArgumentError, "device"),
    ({"weights": "int4"}, ArgumentError, "weights"),
    ({"data": []}, ArgumentError, "data"),
    ({"data": torch.zeros(2, 8, dtype=torch.long)}, ArgumentError, "data"),
    ({"data": [[1, 2]]}, DTypeError, r"data\[0\]"),
    ({"data": [{}]}, DTypeError, r"data\[0\]"),
    ({"loss": "kl"}, ArgumentError, "loss"),
    ({"loss": lambda out, batch: out.logits}, ArgumentError, "loss"),
    ({"plan": "quarot"}, PlanError, "plan"),
])
def test_bad_inputs_raise_typed_errors(llama, data, kwargs, error, arg):
    model, p = llama
    args = {"model": model, "params": p, "plan": quarot_plan(model, rotfn.intq(4)), "data": data[0][:1], "steps": 1,
            "lr": 0.5, "progress": False} | kwargs
    with pytest.raises(error, match=f"learn.rotations: argument '{arg}'.*got"):
        rotations(**args)


def test_bad_params_and_plans(llama, data):
    model, p = llama
    plan = quarot_plan(model, rotfn.intq(4))
    with pytest.raises(FoldError, match="learn.rotations: argument 'params'.*fix"):
        rotations(model, rotfn.fold(p, plan), plan, data[0][:1], steps=1, lr=0.5)
    with pytest.raises(SelectionError, match="learn.rotations: argument 'params'"):
        rotations(model, {k: v for k, v in p.items() if k != "lm_head.weight"}, plan, data[0][:1], steps=1, lr=0.5)
    other = rt.tiny_model(rt.make_config("llama", hidden=32, heads=2, kv_heads=1, vocab=256), dtype=torch.float32)
    with pytest.raises(PlanError, match="learn.rotations: argument 'plan'"):
        rotations(other, rotfn.params(other), plan, data[0][:1], steps=1, lr=0.5)
    online_qk = rotfn.plans.Online("model.layers.0.self_attn", "qk", rotfn.hadamard(16), None, "R4")
    qk = dataclasses.replace(plan, online=(online_qk,))
    with pytest.raises(ArgumentError, match="learn.rotations: argument 'roles'.*'qk'"):
        rotations(model, p, qk, data[0][:1], steps=1, lr=0.5, roles=("R4",))


def test_evaluate_bad_inputs(llama, data):
    model, p = llama
    with pytest.raises(ArgumentError, match="learn.evaluate: argument 'model'"):
        evaluate("llama", p, None, data[1])
    with pytest.raises(DTypeError, match="learn.evaluate: argument 'params'"):
        evaluate(model, list(p.values()), None, data[1])
    with pytest.raises(ArgumentError, match="learn.evaluate: argument 'data'"):
        evaluate(model, p, None, [])


def test_bad_loss_for_the_model():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    plan = rotfn.plans.per_linear(model, rotation=rotfn.hadamard(32), acts=rotfn.intq(4))
    with pytest.raises(ArgumentError, match="learn.rotations: argument 'loss'.*causal"):
        rotations(model, rotfn.params(model), plan, [torch.randn(2, 32)], steps=1, lr=0.5, roles=("per_linear",),
                  loss="next_token")
    with pytest.raises(ArgumentError, match="learn.fidelity: argument 'view'"):
        fidelity("embeddings")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU machine)")
def test_learns_on_the_gpu_through_the_kernels(llama, data):
    """The same W4A4 learning on CUDA: activations go through the Triton qdq (straight-through backward)."""
    model, p = llama
    model = copy.deepcopy(model).to("cuda")
    p = {k: v.to("cuda") for k, v in p.items()}
    move = lambda batches: [{k: v.to("cuda") for k, v in b.items()} for b in batches]  # noqa: E731
    train, held_out = move(data[0]), move(data[1])
    plan = quarot_plan(model, rotfn.mxfp4())
    with rotfn.dispatch.trace() as ran:
        result = rotations(model, p, plan, train, steps=20, lr=1.0, loss="fidelity", progress=False)
    assert any(b == "triton" for _, b in ran), ran[:5]
    assert max(result.orthogonality) <= 1e-6
    hadamard = evaluate(model, p, plan, held_out, loss="fidelity")
    assert evaluate(model, p, result.plan, held_out, loss="fidelity") < 0.95 * hadamard


def test_learning_folds_tied_embeddings_as_fold_does(data):
    """Tied embeddings: learning runs rotfn.fold's program with the plan's ties. Its first loss (Q = I) is
    evaluate's through rotfn.fold, and a plan that changes the tied keys differently without untying them is
    refused as fold refuses it, before any model runs."""
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=1, intermediate=128, vocab=256, tied=True)
    model = rt.tiny_model(cfg, dtype=torch.float64, seed=3)
    p = rotfn.params(model)
    batch = data[0][:1]
    plan = quarot_plan(model, rotfn.intq(4))
    assert plan.tied and set(plan.untied) == set(plan.tied[0])
    res = rotations(model, p, plan, batch, steps=1, lr=0.5, roles=("R1",), progress=False)
    assert res.losses[0] == pytest.approx(evaluate(model, p, plan, batch), rel=1e-12)
    kept = dataclasses.replace(plan, untied=())  # embedding and lm_head get different changes, still tied
    pattern = r"argument 'plan': expected a plan that changes the tied keys .* identically or unties them"
    with pytest.raises(PlanError, match="fold: " + pattern):
        rotfn.fold(p, kept)
    with pytest.raises(PlanError, match="learn.rotations: " + pattern):
        rotations(model, p, kept, batch, steps=1, lr=0.5, roles=("R1",), progress=False)
