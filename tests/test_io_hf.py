"""rotfn.export_hf / rotfn.load_hf: plain transformers loads exports exactly; sharding; rotfn.json for online transforms."""

import json
import os
import warnings

import pytest
import safetensors
import torch
from hypothesis import given, settings

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, CheckpointError, CheckpointWarning, FoldError, PlanError, SelectionError
from rotfn.io._hf import _shard_bytes, read_rotfn_json, write_rotfn_json

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _ids(cfg, seed=0):
    return torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))


def _logits(model, params, plan, ids):
    with torch.no_grad():
        return rotfn.call(model, params, plan, ids).logits


def _export_quietly(model, params, plan, directory, **kw):
    """Export where no online transforms remain: a CheckpointWarning would be a failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        rotfn.export_hf(model, params, plan, directory, **kw)


def _file_keys(directory):
    keys = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("model") and name.endswith(".safetensors"):
            with safetensors.safe_open(os.path.join(directory, name), framework="pt") as f:
                keys.update(dict.fromkeys(f.keys(), name))
    return keys


def _assert_plain_load_matches(directory, cfg, model, params, plan, *, seed=0, **from_pretrained):
    """Plain ``from_pretrained(directory)`` computes the logits of ``rotfn.call(model, params, plan)``.

    Bit for bit once its weights sit in freshly allocated memory: safetensors maps them at
    offsets that are only 8-byte aligned, and the CPU BLAS picks its summation order by
    alignment, so the mapped model itself agrees to a few ulps (checked too). MoE experts
    run with the original model's implementation (``from_pretrained`` would pick
    ``grouped_mm``, another summation order, where ``from_config`` picks ``batched_mm``).
    """
    same = {"attn_implementation": model.config._attn_implementation}
    if getattr(model.config, "_experts_implementation", None) is not None:
        same["experts_implementation"] = model.config._experts_implementation
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory, **same, **from_pretrained).eval()
    ids = _ids(cfg, seed)
    fresh = {k: v.clone() for k, v in [*reloaded.named_parameters(), *reloaded.named_buffers()]}  # ties once
    with torch.no_grad():
        expected = _logits(model, params, plan, ids)
        rt.assert_bits_equal(torch.func.functional_call(reloaded, fresh, (ids,)).logits, expected)
        mapped = reloaded(ids).logits
    tol = 64 * torch.finfo(expected.dtype).eps * float(expected.abs().max())
    torch.testing.assert_close(mapped, expected, rtol=0, atol=tol)
    return reloaded


def _folded_quarot(family, *, tied=False, dtype=torch.float32, online=False, **kw):
    cfg = rt.make_config(family, hidden=32, layers=2, tied=tied)
    model = rt.tiny_model(cfg, dtype=dtype, seed=1, exact_norms=False)
    extra = {"r3": rotfn.hadamard(8, seed=2), "r4": lambda n: rotfn.hadamard(n, seed=3), "acts": rotfn.mxfp4()} if online else {}
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=0), r2=rotfn.orthogonal(8, seed=1),
                              weights=rotfn.mxfp4(), **extra, **kw)
    return cfg, model, plan, rotfn.fold(rotfn.params(model), plan)


# ----- no online transforms: plain transformers is the model ----------------------------------------
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", rt.FAMILY_NAMES)
def test_plain_transformers_loads_the_export_and_gives_the_same_logits(tmp_path, family, tied):
    cfg, model, plan, folded = _folded_quarot(family, tied=tied)
    assert not plan.online and plan.quantized
    _export_quietly(model, folded, plan, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["architectures"] == [type(model).__name__]
    reloaded = _assert_plain_load_matches(tmp_path, cfg, model, folded, plan)
    assert type(reloaded) is type(model) and reloaded.dtype == torch.float32
    state = reloaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for k, v in state.items():
        rt.assert_bits_equal(v, folded[k], name=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_weights_are_written_in_the_model_dtype(tmp_path, dtype):
    cfg, model, plan, folded = _folded_quarot("qwen3", dtype=dtype)
    _export_quietly(model, folded, plan, tmp_path)
    with safetensors.safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}  # noqa: SIM118
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    reloaded = _assert_plain_load_matches(tmp_path, cfg, model, folded, plan, seed=3, dtype="auto")
    assert reloaded.dtype == dtype


def test_a_tie_the_plan_keeps_is_written_once_and_stays_tied(tmp_path):
    cfg = rt.make_config("llama", hidden=32, layers=2, tied=True)
    model = rt.tiny_model(cfg, dtype=torch.float32)
    plan = rotfn.plans.quarot(model, r1=None, r2=rotfn.hadamard(8, seed=1), weights=rotfn.intq(4, group=16))
    assert not plan.untied
    folded = rotfn.fold(rotfn.params(model), plan)
    _export_quietly(model, folded, plan, tmp_path)
    keys = _file_keys(tmp_path)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert json.loads((tmp_path / "config.json").read_text()).get("tie_word_embeddings", True) is True
    reloaded = _assert_plain_load_matches(tmp_path, cfg, model, folded, plan, seed=1)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_unfolded_params_export_without_a_plan(tmp_path):
    cfg = rt.make_config("mistral", hidden=32, layers=1, tied=True)
    model = rt.tiny_model(cfg, dtype=torch.float32)
    params = rotfn.params(model)
    _export_quietly(model, params, None, tmp_path)
    _assert_plain_load_matches(tmp_path, cfg, model, params, None, seed=2)


# ----- sharding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_a_small_max_shard_size_gives_several_shards_and_a_correct_index(tmp_path, family):
    cfg, model, plan, folded = _folded_quarot(family)
    limit = 6000
    _export_quietly(model, folded, plan, tmp_path, max_shard_size=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    keys = _file_keys(tmp_path)
    shards = sorted({name for name in keys.values()})
    assert len(shards) > 1 and "model.safetensors" not in os.listdir(tmp_path)
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert index["weight_map"] == keys
    sizes = {name: [] for name in shards}
    for name in shards:
        with safetensors.safe_open(tmp_path / name, framework="pt") as f:
            sizes[name] = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]  # noqa: SIM118
    assert all(sum(s) <= limit or len(s) == 1 for s in sizes.values())
    assert index["metadata"]["total_size"] == sum(map(sum, sizes.values()))
    _assert_plain_load_matches(tmp_path, cfg, model, folded, plan, seed=4)
    _export_quietly(model, folded, plan, tmp_path)  # one shard now: the old shards and index go
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize("text, expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                            ("1.5kb", 1500), (" 64 KiB ", 65536), ("100", 100), (4096, 4096)])
def test_max_shard_size_reads_hf_style_sizes(text, expected):
    assert _shard_bytes("export_hf", text) == expected


@pytest.mark.parametrize("bad", ["abc", "5XB", "", 0, -5, True, 1.5, None])
def test_bad_max_shard_size_is_an_argument_error(tmp_path, bad):
    _, model, plan, folded = _folded_quarot("llama")
    with pytest.raises(ArgumentError, match="export_hf: argument 'max_shard_size'"):
        rotfn.export_hf(model, folded, plan, tmp_path, max_shard_size=bad)
    assert os.listdir(tmp_path) == []


# ----- online transforms: rotfn.json and load_hf ------------------------------------------------------
def _assert_plain_transformers_refuses(directory, model_class):
    """Every plain way to load a rotfn-only directory fails with an error quoting what to use: the Auto classes (on
    the model type) and the model class itself, which only warns about a foreign model type (on the dtype), also when
    the caller names a dtype."""
    says = r"rotfn-load_hf-only: load it with rotfn\.load_hf\(dir\)"
    with pytest.raises(ValueError, match=says):
        transformers.AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(ValueError, match=says):
        transformers.AutoConfig.from_pretrained(directory)
    for kwargs in ({}, {"dtype": torch.float32}, {"dtype": "auto"}):
        with pytest.raises(AttributeError, match=says):
            model_class.from_pretrained(directory, **kwargs)
    with pytest.raises(AttributeError, match=says):
        model_class.config_class.from_pretrained(directory)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "qwen3_moe"])
def test_online_transforms_go_to_rotfn_json_and_load_hf_restores_exact_outputs(tmp_path, family):
    cfg, model, plan, folded = _folded_quarot(family, tied=True, online=True)
    with pytest.warns(CheckpointWarning, match=f"{len(plan.online)} online transforms .* rotfn.load_hf"):
        rotfn.export_hf(model, folded, plan, tmp_path)
    assert {"rotfn.json", "rotfn.safetensors", "model.safetensors", "config.json"} <= set(os.listdir(tmp_path))
    doc = json.loads((tmp_path / "rotfn.json").read_text())
    assert (doc["format"], doc["version"], len(doc["online"])) == ("rotfn-hf", 1, len(plan.online))
    assert {o["kind"] for o in doc["online"]} == {o.kind for o in plan.online}
    model2, params2, plan2 = rotfn.load_hf(tmp_path)
    assert plan2 == plan and isinstance(params2, rotfn.FoldedParams) and params2.plan == plan
    ids = _ids(cfg, 5)
    expected = _logits(model, folded, plan, ids)
    rt.assert_bits_equal(_logits(model2, params2, plan2, ids), expected)
    with torch.no_grad():  # the weights alone run the model without its online transforms...
        assert not torch.allclose(model2(ids).logits, expected, atol=1e-3)
    _assert_plain_transformers_refuses(tmp_path, type(model))  # ...so plain transformers refuses it, saying what to use
    assert next(model2.parameters()).dtype == next(model.parameters()).dtype  # load_hf reads the real dtype
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rotfn_model_type"] == cfg.model_type
    earlier = {**rotfn.io.unguard_config(config), "model_type": "rotfn-load_hf-only", "rotfn_model_type": cfg.model_type}
    (tmp_path / "config.json").write_text(json.dumps(earlier))
    assert rotfn.load_hf(tmp_path)[2] == plan  # a directory written with the earlier guard value still loads
    with pytest.raises(FoldError):
        rotfn.fold(params2, plan2)


def test_exporting_again_without_online_transforms_removes_rotfn_json(tmp_path):
    cfg, model, plan, folded = _folded_quarot("llama", online=True)
    with pytest.warns(CheckpointWarning):
        rotfn.export_hf(model, folded, plan, tmp_path)
    _, _, plan2, folded2 = _folded_quarot("llama")
    _export_quietly(model, folded2, plan2, tmp_path)
    assert "rotfn.json" not in os.listdir(tmp_path) and "rotfn.safetensors" not in os.listdir(tmp_path)
    model3, params3, plan3 = rotfn.load_hf(tmp_path)
    assert plan3 is None and not isinstance(params3, rotfn.FoldedParams)
    ids = _ids(cfg, 6)
    rt.assert_bits_equal(_logits(model3, params3, None, ids), _logits(model, folded2, plan2, ids))


def test_export_checks_its_arguments(tmp_path):
    _, model, plan, folded = _folded_quarot("llama")
    other = rotfn.plans.quarot(rt.tiny_model(rt.make_config("llama", hidden=64, layers=1)), r1=rotfn.hadamard(64))
    with pytest.raises(FoldError, match="export_hf"):
        rotfn.export_hf(model, rotfn.params(model), plan, tmp_path)
    with pytest.raises(FoldError, match="export_hf"):
        rotfn.export_hf(model, folded, None, tmp_path)
    with pytest.raises(PlanError, match="export_hf: argument 'plan'"):
        rotfn.export_hf(model, folded, other, tmp_path)
    with pytest.raises(PlanError, match="export_hf: argument 'plan'"):
        rotfn.export_hf(model, folded, plan.to_dict(), tmp_path)
    with pytest.raises(SelectionError, match="export_hf: argument 'params'"):
        rotfn.export_hf(model, {k: v for k, v in folded.items() if k != "model.norm.weight"}, plan, tmp_path)
    with pytest.raises(ArgumentError, match="export_hf: argument 'model'"):
        rotfn.export_hf(torch.nn.Linear(2, 2), {}, None, tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match="export_hf: argument 'dir'"):
        rotfn.export_hf(model, folded, plan, tmp_path / "file")
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("earlier", [False, True])
def test_an_interrupted_export_leaves_nothing_loadable_and_no_temporary_files(tmp_path, monkeypatch, earlier):
    _, model, plan, folded = _folded_quarot("llama")
    if earlier:  # an export of the same shape is there already: a mix of its files and new ones must not load
        _export_quietly(model, rotfn.params(model), None, tmp_path, max_shard_size=6000)
    calls = []
    save_file = safetensors.torch.save_file

    def fail_on_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        rotfn.export_hf(model, folded, plan, tmp_path, max_shard_size=6000)
    names = os.listdir(tmp_path)
    assert "config.json" not in names and not [n for n in names if n.endswith(".tmp")]
    with pytest.raises(CheckpointError, match="config.json"):
        rotfn.load_hf(tmp_path)
    with pytest.raises((OSError, ValueError)):  # transformers: no config / unrecognized model
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


# ----- rotfn.json helpers -----------------------------------------------------------------------------
@settings(max_examples=25)
@given(rotation=rt.rotations(max_n=32))
def test_rotfn_json_round_trips_every_rotation_kind(tmp_path_factory, rotation):
    directory = tmp_path_factory.mktemp("rj")
    plan = rotfn.plans.per_linear(torch.nn.Linear(rotation.n, 2), rotation=rotation)
    write_rotfn_json(directory, plan)
    assert read_rotfn_json(directory) == plan
    has_data = rotation.signs is not None or rotation.kind in ("orthogonal", "matrix")
    assert os.path.exists(directory / "rotfn.safetensors") == has_data
    write_rotfn_json(directory, rotfn.plans.per_linear(torch.nn.Linear(4, 2), rotation=rotfn.hadamard(4)))
    assert not os.path.exists(directory / "rotfn.safetensors")  # no rotation data now: the stale file goes


def _write_doc(directory, **changes):
    doc = json.loads((directory / "rotfn.json").read_text())
    (directory / "rotfn.json").write_text(json.dumps({**doc, **changes}))


BAD_ROTFN_JSON = {
    "not json": (lambda d: (d / "rotfn.json").write_text("{oops"), "JSON"),
    "foreign format": (lambda d: _write_doc(d, format="other"), "format 'rotfn-hf'"),
    "unknown version": (lambda d: _write_doc(d, version=7), "version 1"),
    "foreign tensors file": (lambda d: _write_doc(d, tensors="../x.safetensors"), "'tensors'"),
    "missing rotation data": (lambda d: os.remove(d / "rotfn.safetensors"), "no such file"),
    "truncated rotation data": (lambda d: (d / "rotfn.safetensors").write_bytes((d / "rotfn.safetensors").read_bytes()[:50]),
                                "damaged"),
    "malformed plan": (lambda d: _write_doc(d, plan={"version": 1}), "rotation_tensors|Plan.from_dict"),
}


@pytest.mark.parametrize("case", list(BAD_ROTFN_JSON))
def test_a_bad_rotfn_json_is_a_checkpoint_error(tmp_path, case):
    plan = rotfn.plans.per_linear(torch.nn.Linear(8, 2), rotation=rotfn.hadamard(8, seed=4))
    write_rotfn_json(tmp_path, plan)
    damage, match = BAD_ROTFN_JSON[case]
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=match) as err:
        read_rotfn_json(tmp_path)
    assert str(err.value).startswith("read_rotfn_json: argument 'dir'")


def test_rotfn_json_helpers_check_their_arguments(tmp_path):
    plan = rotfn.plans.per_linear(torch.nn.Linear(8, 2), rotation=rotfn.hadamard(8))
    assert read_rotfn_json(tmp_path) is None
    with pytest.raises(ArgumentError, match="write_rotfn_json: argument 'dir'"):
        write_rotfn_json(tmp_path / "missing", plan)
    with pytest.raises(PlanError, match="write_rotfn_json: argument 'plan'"):
        write_rotfn_json(tmp_path, plan.to_dict())
    with pytest.raises(ArgumentError, match="read_rotfn_json: argument 'dir'"):
        read_rotfn_json(tmp_path / "missing")


def test_load_hf_rejects_what_it_cannot_load(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        rotfn.load_hf(tmp_path)
    with pytest.raises(ArgumentError, match="load_hf: argument 'dir'"):
        rotfn.load_hf(tmp_path / "missing")
    _, model, plan, folded = _folded_quarot("llama")
    _export_quietly(model, folded, plan, tmp_path)
    write_rotfn_json(tmp_path, rotfn.plans.per_linear(torch.nn.Linear(8, 2), rotation=rotfn.hadamard(8)))
    with pytest.raises(CheckpointError, match="fits the model"):
        rotfn.load_hf(tmp_path)
