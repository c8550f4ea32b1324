"""rotfn.model: one interception mechanism, thread-safe call, nothing left on the model or in the registries."""

import ast
import copy
import pathlib
import threading

import pytest
import torch

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, FoldError, PlanError, SelectionError
from rotfn.model import Site, call_with, intercept, online

pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _state(model):
    """What a call must leave as it was: every hook dict, module attributes and ids, configs, registries."""
    from transformers import AttentionInterface
    from transformers.integrations.moe import ExpertsInterface
    from transformers.masking_utils import AttentionMaskInterface

    hooks = {name: {k: dict(v) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)}
             for name, m in model.named_modules()}
    attrs = {name: {k: id(v) for k, v in vars(m).items()} for name, m in model.named_modules()}
    configs = {id(m.config): dict(vars(m.config)) for m in model.modules() if hasattr(m, "config")}
    registries = [dict(r._global_mapping) for r in (AttentionInterface, AttentionMaskInterface, ExpertsInterface)]
    return hooks, attrs, configs, registries, {k: v for k, v in model.state_dict(keep_vars=True).items()}


def _llama(attn="sdpa"):
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, attn_implementation=attn)
    return rt.tiny_model(cfg, dtype=torch.float32, seed=1), cfg


def _moe():
    cfg = rt.make_config("qwen3_moe", hidden=32, heads=4, kv_heads=2, layers=1, experts=4, expert_intermediate=32)
    return rt.tiny_model(cfg, dtype=torch.float32, seed=2), cfg


def _r3r4_plan(model, cfg):
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    return rotfn.plans.quarot(model, r1=rotfn.hadamard(d, seed=0), r3=rotfn.hadamard(hd, seed=2),
                              r4=rotfn.hadamard(cfg.intermediate_size if cfg.model_type == "llama" else 32, seed=3),
                              acts=rotfn.mxfp4())


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_two_threads_call_one_model_each_getting_its_single_threaded_bits(family):
    model, cfg = _llama() if family == "llama" else _moe()
    p = rotfn.params(model)
    plan = _r3r4_plan(model, cfg)
    assert {o.kind for o in plan.online} >= ({"qk", "linear"} if family == "llama" else {"qk", "experts_down"})
    folded = rotfn.fold(p, plan)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    jobs = {"planned": (folded, plan), "plain": (p, None)}
    with torch.no_grad():
        alone = {name: rotfn.call(model, params, pl, ids).logits for name, (params, pl) in jobs.items()}
    assert not torch.equal(alone["planned"], alone["plain"])  # a plan that changes the bits, or the test proves nothing
    start, mismatches, errors = threading.Barrier(2), [], []

    def work(name):
        params, pl = jobs[name]
        start.wait()
        try:
            with torch.no_grad():
                for i in range(25):
                    if not torch.equal(rotfn.call(model, params, pl, ids).logits, alone[name]):
                        mismatches.append((name, i))
        except Exception as err:  # noqa: BLE001  (reported below, with the thread's name)
            errors.append((name, err))

    state = _state(model)
    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches, (errors, mismatches[:5])
    assert _state(model) == state


def test_call_and_intercept_leave_no_hooks_configs_or_registry_changes_even_on_errors():
    model, cfg = _llama()
    p = rotfn.params(model)
    plan = _r3r4_plan(model, cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    rotfn.call(model, rotfn.fold(p, plan), plan, ids)  # first call: registers rotfn's names once
    state = _state(model)
    rotfn.call(model, rotfn.fold(p, plan), plan, ids)
    assert _state(model) == state
    with pytest.raises(FoldError):  # raised before the model runs
        rotfn.call(model, p, plan, ids)
    assert _state(model) == state

    def boom(x):
        raise RuntimeError("inside the model")

    with pytest.raises(RuntimeError, match="inside the model"):  # raised while the model runs
        call_with(model, rotfn.fold(p, plan), plan, {Site("model.layers.1.mlp.down_proj"): boom}, ids)
    assert _state(model) == state
    for interrupt in (KeyboardInterrupt, ValueError):
        with pytest.raises(interrupt), intercept(model, online(plan)) as m:
            m(ids)
            raise interrupt()
        assert _state(model) == state
    with torch.no_grad():
        with intercept(model, online(plan)) as m:
            inside = m(ids).logits
        assert not torch.equal(inside, model(ids).logits)
        rt.assert_bits_equal(m(ids).logits, model(ids).logits)  # after the block the clone is the model again


def test_the_per_call_clone_leaves_the_garbage_collector_as_it_found_it():
    """The clone pauses Python's cyclic collector while it allocates (a full collection per few calls of a large
    model cost more than the clone): on or off before a call, the same after it, also when the call fails."""
    import gc

    model, cfg = _llama()
    p = rotfn.params(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    assert gc.isenabled()
    rotfn.call(model, p, None, ids)
    assert gc.isenabled()
    gc.disable()
    try:
        rotfn.call(model, p, None, ids)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(rotfn.errors.SelectionError):
        rotfn.call(model, {k: v for k, v in list(p.items())[1:]}, None, ids)
    assert gc.isenabled()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_registered_attention_outside_an_interception_is_the_standard_one(attn):
    model, cfg = _llama(attn)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    rotfn.call(model, rotfn.params(model), rotfn.plans.quarot(model, r1=None, r3=rotfn.hadamard(16)), ids)
    other = copy.deepcopy(model)
    other.config._attn_implementation = rotfn.model.ATTENTION_NAMES[attn]  # another caller picks rotfn's name
    with torch.no_grad():
        rt.assert_bits_equal(other(ids).logits, model(ids).logits)


def test_registered_experts_outside_an_interception_is_the_standard_one():
    model, cfg = _moe()
    ids = torch.arange(cfg.vocab_size).reshape(4, -1)
    rotfn.call(model, rotfn.fold(rotfn.params(model), plan := _r3r4_plan(model, cfg)), plan, ids)
    model.config._experts_implementation = "eager"
    other = copy.deepcopy(model)
    other.config._experts_implementation = rotfn.model.EXPERTS_NAME
    with torch.no_grad():
        rt.assert_bits_equal(other(ids).logits, model(ids).logits)


def test_sites_record_and_replace_inputs_outputs_and_attention_tensors():
    model, cfg = _llama()
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    attn, down = "model.layers.0.self_attn", "model.layers.0.mlp.down_proj"
    seen = {}

    def rec(name):
        return lambda x: seen.setdefault(name, x)

    sites = {Site(attn, p): rec(p) for p in ("query", "key", "value")}
    sites |= {Site(down): rec("down_in"), Site(down, "output"): rec("down_out")}
    with torch.no_grad(), intercept(model, sites) as m:
        out = m(ids).logits
    rt.assert_bits_equal(out, model(ids).logits)  # recording changes nothing
    hd = cfg.hidden_size // cfg.num_attention_heads
    assert seen["query"].shape == (2, cfg.num_attention_heads, 6, hd)
    assert seen["key"].shape == seen["value"].shape == (2, cfg.num_key_value_heads, 6, hd)
    torch.testing.assert_close(seen["down_out"], model.model.layers[0].mlp.down_proj(seen["down_in"]), rtol=0, atol=0)
    # several maps apply in order at one site; a None result keeps the tensor
    order = []
    with torch.no_grad(), intercept(model, {Site(down): lambda x: order.append("a")},
                                    {Site(down): lambda x: 0 * x}, {Site(down): lambda x: order.append(x.abs().max())}) as m:
        m(ids)
    assert order[0] == "a" and order[1] == 0


def test_call_with_records_what_the_layer_sees_under_the_plan():
    model, cfg = _llama()
    p = rotfn.params(model)
    plan = _r3r4_plan(model, cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    down = "model.layers.0.mlp.down_proj"
    plain, planned = [], []
    with torch.no_grad():
        call_with(model, p, None, {Site(down): plain.append}, ids)
        call_with(model, rotfn.fold(p, plan), plan, {Site(down): planned.append}, ids)
    o = next(o for o in plan.online if o.site == down)
    rt.assert_bits_equal(rotfn.qdq(planned[0], o.fmt), planned[0], name="down_proj input is quantized")
    assert not torch.equal(planned[0], plain[0])


def test_online_compiles_each_entry_kind_to_its_sites():
    model, cfg = _moe()
    plan = _r3r4_plan(model, cfg)
    sites = online(plan)
    kinds = {"linear": {"input"}, "qk": {"query", "key"}, "experts_in": {"experts_in"},
             "experts_down": {"experts_down"}}
    assert set(sites) == {Site(o.site, point) for o in plan.online for point in kinds[o.kind]}
    x = torch.randn(3, 32)
    f = sites[Site("model.layers.0.mlp.experts", "experts_down")]
    o = next(o for o in plan.online if o.kind == "experts_down")
    rt.assert_bits_equal(f(x), rotfn.qdq(rotfn.rotate(x, o.rotation), o.fmt))
    assert online(None) == {}


def test_bad_sites_are_typed_errors():
    model, cfg = _llama()
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ArgumentError, match="point"):
        Site("model.layers.0", "inputs")
    with pytest.raises(ArgumentError, match="sites"), intercept(model, {"model.layers.0": abs}):
        pass
    with pytest.raises(SelectionError, match="close modules"), intercept(model, {Site("model.layer.0.mlp"): abs}):
        pass
    with pytest.raises(PlanError, match="transformers config"), intercept(model, {Site("model.layers.0.mlp.down_proj", "query"): abs}):
        pass
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(PlanError, match="did not run"), intercept(model, {Site("model.layers.0.self_attn", "query"): abs}):
        plain(torch.ones(1, 4))  # the block never ran the attention: a routed site that never ran is an error
    flex = copy.deepcopy(model)
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(PlanError, match="'sdpa' or 'eager'"):
        rotfn.call(flex, rotfn.params(flex), rotfn.plans.quarot(flex, r1=None, r3=rotfn.hadamard(16)), ids)


def test_apply_is_gone_and_plans_do_not_import_the_bridge():
    assert not (ROOT / "rotfn" / "apply.py").exists() and not hasattr(rotfn, "apply")
    for path in (ROOT / "rotfn" / "plans").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("rotfn.model") for n in names), f"{path.name} imports rotfn.model"
    for module in (rotfn.model, rotfn.plans, rotfn):
        assert "check_plan" not in module.__all__ and "check_keys" not in module.__all__


def test_fold_and_call_check_ties_with_one_check():
    """Tied keys that stay tied must hold one value; fold and call say so in the same words, naming themselves,
    and both give the keys one tensor when the values agree. (Tied keys of different dtypes or shapes fold into
    different programs: fold refuses them when it compiles the plan.)"""
    cfg = rt.make_config("llama", hidden=32, layers=1, tied=True)
    model = rt.tiny_model(cfg)
    p = rotfn.params(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    plan = rotfn.plans.per_linear(model, rotation=rt.RotationFactory("signed", 1))  # keeps the tie
    head, emb = "lm_head.weight", "model.embed_tokens.weight"
    for fn, run, t in [("fold", lambda q: rotfn.fold(q, plan), p[head] + 1),
                       ("call", lambda q: rotfn.call(model, q, None, ids), p[head] + 1),
                       ("call", lambda q: rotfn.call(model, q, None, ids), p[head].float())]:
        with pytest.raises(PlanError, match=rf"{fn}: argument 'params': expected one value under the tied keys "
                                            rf"\['{emb}', '{head}'\], got different tensors; fix: give tied keys"):
            run({**p, head: t})
    same = {**p, head: p[head].clone()}
    folded = rotfn.fold(same, plan)
    assert folded[head] is folded[emb]
    torch.testing.assert_close(rotfn.call(model, same, None, ids).logits, rotfn.call(model, p, None, ids).logits,
                               rtol=0, atol=0)


def test_errors_from_the_bridge_name_the_function_the_user_called():
    """call_with, report, calibrate and learn run models through one bridge; an error found there (here: an R3 plan
    on flex attention, which rotfn cannot intercept) names the public function that was called, not ``call``."""
    model, cfg = _llama()
    model.config._attn_implementation = "flex_attention"
    p = rotfn.params(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    fmt = rotfn.intq(8)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=0), r3=rotfn.hadamard(16), weights=fmt, acts=fmt)
    loss = lambda out, batch: out.logits.square().mean()  # noqa: E731 - a custom loss runs no float model first
    calls = {
        "call_with": lambda: call_with(model, rotfn.fold(p, plan), plan, {}, ids),
        "report": lambda: rotfn.report(model, p, plan, ids),
        "calibrate": lambda: rotfn.calibrate(model, p, plan, [ids]),
        "learn.rotations": lambda: rotfn.learn.rotations(model, p, plan, [ids], steps=1, lr=0.1, roles=("R1",),
                                                         loss=loss, progress=False),
        "learn.evaluate": lambda: rotfn.learn.evaluate(model, p, plan, [ids], loss=loss),
    }
    for fn, run in calls.items():
        with pytest.raises(PlanError, match=rf"^{fn}: argument 'model': expected attention implementation 'sdpa' or 'eager'"):
            run()


def test_describe_lists_every_tensor_under_each_name_and_each_module_once():
    """A module held under two names: its tensors under both (a tie), the module itself once, by its first name."""
    shared = torch.nn.Linear(4, 4)

    class Net(torch.nn.Sequential):
        def get_output_embeddings(self):
            return shared

    net = Net(torch.nn.Linear(4, 4), shared, torch.nn.ReLU(), shared, torch.nn.Linear(4, 2))
    net.register_buffer("scale", torch.ones(4))
    info = rotfn.plans.describe(net)
    assert list(info.shapes) == ["scale", "0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias",
                                 "4.weight", "4.bias"]
    assert info.tied == (("1.weight", "3.weight"), ("1.bias", "3.bias"))
    assert info.linears == (("0", 4), ("1", 4), ("4", 4)) and info.output_embedding == "1"
    assert info.signature == rotfn.plans.signature(info.shapes.items())
