"""rotfn.save / rotfn.load: exact round trips of rotations, formats, ties and folded params; every bad file; atomic writes."""

import json
import os
import tempfile

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, CheckpointError, CheckpointWarning, DTypeError, FoldError, PlanError
from rotfn.specs import rotation as rotation_module

FORMATS = [
    rotfn.mxfp4("floor"), rotfn.mxfp4("even"), rotfn.mxfp4("rceil"), rotfn.mxfp8(),
    rotfn.nvfp4(), rotfn.nvfp4(None), rotfn.nvfp4(0.01),
    *(rotfn.intq(bits, group=group, symmetric=sym) for bits in (4, 8) for group in (None, 32) for sym in (True, False)),
    rotfn.fp8("tensor"), rotfn.fp8("channel"), rotfn.fp8("token"),
]


def _round_trip(params, plan=None):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.safetensors")
        rotfn.save(path, params, plan)
        assert os.listdir(d) == ["ckpt.safetensors"]
        with safetensors.safe_open(path, framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return (*rotfn.load(path), stored)


def _plan_with(rotation):
    return rotfn.plans.per_linear(torch.nn.Linear(rotation.n, 3), rotation=rotation)


# ----- rotations -------------------------------------------------------------------------------
@settings(max_examples=40)
@given(rt.rotations(max_n=64))
def test_every_rotation_kind_round_trips_bit_identically(rotation):
    plan = _plan_with(rotation)
    _, loaded, stored = _round_trip({"w": torch.zeros(2)}, plan)
    assert loaded == plan
    again = loaded.rotations[0].rotation
    rt.assert_bits_equal(again.matrix(), rotation.matrix(), name=repr(rotation))
    signs = [t for k, t in stored.items() if k.endswith(".signs")]
    blocks = [t for k, t in stored.items() if k.endswith(".block")]
    if rotation.signs is not None:  # random signs are data in the file: an int8 tensor, not only the seed
        assert signs[0].dtype == torch.int8
        rt.assert_bits_equal(signs[0], rotation.sign_vector().to(torch.int8))
    assert len(signs) == (rotation.signs is not None)
    assert len(blocks) == (rotation.kind in ("orthogonal", "matrix"))
    assert all(t.dtype == torch.float64 and t.shape == (rotation.block_size, rotation.block_size) for t in blocks)


def test_signs_come_from_the_file_not_the_generator(monkeypatch):
    rotation = rotfn.hadamard(32, seed=7)
    plan = _plan_with(rotation)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        rotfn.save(path, {}, plan)
        monkeypatch.setattr(rotation_module, "_random_signs", lambda n, seed: bytes((n + 7) // 8))  # "a new generator"
        assert rotfn.hadamard(32, seed=7) != rotation
        _, loaded = rotfn.load(path)
    assert loaded == plan
    rt.assert_bits_equal(loaded.rotations[0].rotation.matrix(), rotation.matrix())


def test_a_changed_orthogonal_generator_falls_back_to_the_stored_matrix(monkeypatch):
    rotation = rotfn.orthogonal(16, seed=3, block=8).T
    plan = _plan_with(rotation)
    expected = rotation.matrix()
    original = rotation_module._block

    def other_generator(kind, b, factor, seed, data):
        block = original(kind, b, factor, seed, data)
        return -block if kind == "orthogonal" else block

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        rotfn.save(path, {}, plan)
        monkeypatch.setattr(rotation_module, "_block", other_generator)
        with pytest.warns(CheckpointWarning, match="stored matrix"):
            _, loaded = rotfn.load(path)
    again = loaded.rotations[0].rotation
    assert (again.kind, again.block, again.transposed) == ("matrix", 8, True)
    rt.assert_bits_equal(again.matrix(), expected)


# ----- formats and tensors -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
@settings(max_examples=6)
@given(x=rt.tensors(64, dtypes=(torch.float32, torch.bfloat16, torch.float16), max_lead_dims=1, max_rows=3))
def test_every_format_round_trips_as_an_equal_qtensor(fmt, x):
    q = rotfn.quantize(x, fmt)
    params, plan, stored = _round_trip({"q": q, "x": x})
    back = params["q"]
    assert plan is None and isinstance(back, rotfn.QTensor)
    assert (back.shape, back.dtype, back.format) == (q.shape, q.dtype, q.format)
    for part in ("codes", "scales", "global_scale", "zero_points"):
        a, b = getattr(back, part), getattr(q, part)
        assert (a is None) == (b is None), part
        if b is not None:
            rt.assert_bits_equal(a, b, name=part, nan_payload=True)
    rt.assert_bits_equal(rotfn.dequantize(back), rotfn.dequantize(q), nan_payload=True)
    rt.assert_bits_equal(params["x"], x, nan_payload=True)
    assert "q::codes" in stored and "q::scales" in stored


@settings(max_examples=20)
@given(seed=rt.seeds(), transpose=st.booleans())
def test_any_dtype_views_and_odd_shapes_round_trip(seed, transpose):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 5, generator=gen)
    params = {
        "f64": torch.randn(3, generator=gen, dtype=torch.float64),
        "bf16": base.to(torch.bfloat16),
        "e8m0": torch.randint(0, 255, (4, 2), generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu),
        "e4m3": base.to(torch.float8_e4m3fn),
        "int": torch.randint(-5, 5, (7,), generator=gen),
        "bool": base > 0,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "view": base.T if transpose else base[1:4, ::2],  # non-contiguous, shares storage with "base"
        "base": base,
    }
    snapshot = {k: rt.bits(v).clone() for k, v in params.items()}
    loaded, _, _ = _round_trip(params)
    assert list(loaded) == list(params)
    for k, v in params.items():
        rt.assert_bits_equal(loaded[k], v, name=k, nan_payload=True)
        rt.assert_bits_equal(rt.bits(v), snapshot[k], name=f"input {k}")  # nothing written into the inputs
    assert loaded["view"].untyped_storage().data_ptr() != loaded["base"].untyped_storage().data_ptr()


def test_tied_embeddings_come_back_as_one_tensor():
    model = rt.tiny_model(rt.make_config("llama", tied=True), dtype=torch.float32)
    params = rotfn.params(model)
    loaded, _, stored = _round_trip(params)
    assert loaded["lm_head.weight"] is loaded["model.embed_tokens.weight"]
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    for k, v in params.items():
        rt.assert_bits_equal(loaded[k], v, name=k)
    shared = {"a": params["lm_head.weight"], "b": params["lm_head.weight"][:, :8]}  # same storage, not a tie
    loaded, _, _ = _round_trip(shared)
    assert loaded["a"] is not loaded["b"] and torch.equal(loaded["b"], shared["b"])


# ----- folded params and call ------------------------------------------------------------------------------
@settings(max_examples=6)
@given(make=rt.rotation_factories(("signed", "orthogonal", "matrix")), tied=st.booleans(), seed=rt.seeds())
def test_folded_params_reload_to_bit_identical_calls(make, tied, seed):
    cfg = rt.make_config("llama", hidden=32, layers=2, tied=tied)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=seed % 1000)
    plan = rotfn.plans.quarot(model, r1=make(32), r2=make(8), r3=make(8), r4=make(64), acts=rotfn.mxfp4())
    assert plan.online and plan.needs_fold
    folded = rotfn.fold(rotfn.params(model), plan)
    snapshot = {k: rt.bits(v).clone() for k, v in folded.items()}
    loaded, loaded_plan, _ = _round_trip(folded, plan)
    assert loaded_plan == plan and isinstance(loaded, rotfn.FoldedParams) and loaded.plan == plan
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        rt.assert_bits_equal(rotfn.call(model, loaded, loaded_plan, ids).logits, rotfn.call(model, folded, plan, ids).logits)
    with pytest.raises(FoldError, match="already folded"):
        rotfn.fold(loaded, loaded_plan)
    for k, v in folded.items():
        rt.assert_bits_equal(rt.bits(v), snapshot[k], name=k)


def test_unfolded_params_with_a_plan_reload_unfolded():
    model = rt.tiny_model(rt.make_config("qwen3", tied=True), dtype=torch.float32)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=1), weights=rotfn.nvfp4())
    params = rotfn.params(model)
    loaded, loaded_plan, _ = _round_trip(params, plan)
    assert loaded_plan == plan and not isinstance(loaded, rotfn.FoldedParams)
    expected, got = rotfn.fold(params, plan), rotfn.fold(loaded, loaded_plan)
    for k in expected:
        rt.assert_bits_equal(got[k], expected[k], name=k)


def test_save_rejects_bad_arguments():
    model = torch.nn.Linear(8, 2)
    plan = rotfn.plans.per_linear(model, rotation=rotfn.hadamard(8, seed=0))
    other = rotfn.plans.per_linear(model, rotation=rotfn.hadamard(8, seed=1))
    folded = rotfn.fold(rotfn.params(model), plan)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        with pytest.raises(FoldError, match="save: argument 'plan'"):
            rotfn.save(path, folded, other)
        with pytest.raises(FoldError, match="params.plan"):
            rotfn.save(path, folded, None)
        with pytest.raises(DTypeError, match="save: argument 'params'"):
            rotfn.save(path, [("w", torch.ones(1))])
        with pytest.raises(DTypeError, match="list"):
            rotfn.save(path, {"w": [1.0]})
        with pytest.raises(PlanError, match="save: argument 'plan'"):
            rotfn.save(path, {}, plan.to_dict())
        with pytest.raises(ArgumentError, match="existing directory"):
            rotfn.save(os.path.join(d, "missing", "a.safetensors"), {})
        with pytest.raises(ArgumentError, match="directory"):
            rotfn.save(d, {})
        with pytest.raises(CheckpointError, match="clash"):
            rotfn.save(path, {"q": rotfn.quantize(torch.ones(1, 32), rotfn.mxfp4()), "q::codes": torch.ones(1)})
        assert os.listdir(d) == []


# ----- bad files -----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """A valid checkpoint with a plan with signs and a QTensor; returns (path, doc, tensors)."""
    model = rt.tiny_model(rt.make_config("llama", layers=1), dtype=torch.float32)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=0), r3=rotfn.hadamard(8, seed=2))
    params = dict(rotfn.fold(rotfn.params(model), plan))
    params["q"] = rotfn.quantize(torch.randn(2, 32), rotfn.mxfp4())
    path = tmp_path / "good.safetensors"
    rotfn.save(path, rotfn.plans.FoldedParams(params, plan), plan)
    with safetensors.safe_open(path, framework="pt") as f:
        doc = json.loads(f.metadata()["rotfn"])
    return path, doc, safetensors.torch.load_file(path)


def _rewrite(path, doc, tensors):
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "rotfn": json.dumps(doc)})


def _edit(doc, **changes):
    return {**doc, **changes}


def _set_signs_to_zero(doc, tensors):
    key = doc["rotation_tensors"][0]["signs"]
    return doc, {**tensors, key: torch.zeros_like(tensors[key])}


def _forget_signs(doc, tensors):
    key = doc["rotation_tensors"][0]["signs"]
    layout = {k: v for k, v in doc["tensors"].items() if k != key}
    refs = [{"signs": None, "block": None}, *doc["rotation_tensors"][1:]]
    return _edit(doc, tensors=layout, rotation_tensors=refs), {k: v for k, v in tensors.items() if k != key}


def _drop(doc, tensors, key):
    return doc, {k: v for k, v in tensors.items() if k != key}


BAD_EDITS = {
    "unknown version": (lambda doc, t: (_edit(doc, version=2), t), "version 1"),
    "unknown format": (lambda doc, t: (_edit(doc, format="other"), t), "format 'rotfn'"),
    "missing tensor": (lambda doc, t: _drop(doc, t, "model.norm.weight"), "missing \\['model.norm.weight'\\]"),
    "missing qtensor part": (lambda doc, t: _drop(doc, t, "q::scales"), "missing \\['q::scales'\\]"),
    "unlisted tensor": (lambda doc, t: (doc, {**t, "extra": torch.ones(1)}), "unlisted \\['extra'\\]"),
    "shape mismatch": (lambda doc, t: (doc, {**t, "model.norm.weight": torch.ones(31)}), "float32 \\[32\\], got float32 \\[31\\]"),
    "dtype mismatch": (lambda doc, t: (doc, {**t, "model.norm.weight": t["model.norm.weight"].double()}), "got float64"),
    "raw bytes of the wrong size": (lambda doc, t: (doc, {**t, "q::scales": t["q::scales"][:1]}), "uint8"),
    "bad dtype name": (lambda doc, t: (_edit(doc, tensors={**doc["tensors"], "q::codes": {"dtype": "os", "shape": [2, 16]}}), t),
                       "dtype name"),
    "unknown entry kind": (lambda doc, t: (_edit(doc, params=[{"name": "a", "kind": "pickle"}]), t), "kind"),
    "alias to nothing": (lambda doc, t: (_edit(doc, params=[{"name": "a", "kind": "alias", "of": "b"}]), t), "alias"),
    "malformed plan": (lambda doc, t: (_edit(doc, plan={**doc["plan"], "rotations": [{"key": "w"}]}), t), "Plan.from_dict"),
    "rotation table mismatch": (lambda doc, t: (_edit(doc, rotation_tensors=[]), t), "malformed"),
    "signs not +-1": (_set_signs_to_zero, "signs"),
    "signs not named": (_forget_signs, "stored signs"),
    "folded without a plan": (lambda doc, t: (_edit(doc, plan=None, rotation_tensors=[]), t), "folded"),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_bad_metadata_or_tensors_raise_checkpoint_error(saved, case):
    path, doc, tensors = saved
    edit, match = BAD_EDITS[case]
    _rewrite(path, *edit(doc, tensors))
    with pytest.raises(CheckpointError, match=match) as err:
        rotfn.load(path)
    assert str(err.value).startswith("load: argument 'path'") and isinstance(err.value, ValueError)


def test_a_plain_safetensors_file_is_not_a_rotfn_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="a rotfn checkpoint .*, got a safetensors file without it"):
        rotfn.load(path)
    safetensors.torch.save_file({"w": torch.ones(2)}, path, metadata={"rotfn": "{not json"})
    with pytest.raises(CheckpointError, match="JSON"):
        rotfn.load(path)


@settings(max_examples=25)
@given(fraction=st.floats(0.0, 0.999))
def test_truncated_files_raise_checkpoint_error(tmp_path_factory, fraction):
    path = tmp_path_factory.mktemp("cut") / "a.safetensors"
    rotfn.save(path, {"w": torch.randn(64, 8)}, _plan_with(rotfn.hadamard(8, seed=0)))
    data = path.read_bytes()
    path.write_bytes(data[: int(fraction * len(data))])
    with pytest.raises(CheckpointError, match="the file is truncated or not a safetensors file"):
        rotfn.load(path)


@pytest.mark.parametrize("where, match", [
    ("length", r"the file is truncated or not a safetensors file \(header says \d+ bytes, file has \d+\)"),
    ("header", r"a JSON header, got UnicodeDecodeError \('utf-8' codec can't decode byte 0xff"),
])
def test_corrupted_header_raises_checkpoint_error(saved, where, match):
    path = saved[0]
    data = bytearray(path.read_bytes())
    if where == "length":
        data[0:8] = (len(data) * 2).to_bytes(8, "little")
    else:
        data[9:40] = b"\xff" * 31
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=match):
        rotfn.load(path)


def test_load_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        rotfn.load(tmp_path / "missing.safetensors")
    with pytest.raises(ArgumentError, match="load: argument 'path'"):
        rotfn.load(3)


# ----- files of earlier versions ----------------------------------------------------------------------
def _v1_format(d):
    """A format dict as rotfn wrote it before format version 2 (the scale group under "block")."""
    return None if d is None else {**{"block" if k == "group" else k: v for k, v in d.items()}, "version": 1}


def _v1_plan(d):
    """A plan dict as rotfn wrote it before plan version 2 ("weight" entries, "rotations" table)."""
    names = {"rotations": "weight", "rotation_table": "rotations"}
    old = {names.get(k, k): v for k, v in d.items()}
    old["online"] = [{**o, "fmt": _v1_format(o["fmt"])} for o in d["online"]]
    return {**old, "version": 1, "weights": _v1_format(d["weights"]), "acts": _v1_format(d["acts"])}


def _v1_file(doc, tensors):
    """A saved file's metadata and tensors as rotfn wrote them before plan version 2 (dense blocks as "tile")."""
    def rename(key):
        return key.removesuffix(".block") + ".tile" if key.endswith(".block") else key

    refs = [{"signs": r["signs"], "tile": r["block"] and rename(r["block"])} for r in doc["rotation_tensors"]]
    params = [{**p, "format": _v1_format(p["format"])} if p["kind"] == "qtensor" else p for p in doc["params"]]
    old = {**doc, "plan": _v1_plan(doc["plan"]), "rotation_tensors": refs, "params": params,
           "tensors": {rename(k): v for k, v in doc["tensors"].items()}}
    return old, {rename(k): v for k, v in tensors.items()}


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
def test_format_dicts_of_version_1_still_load(fmt):
    d = fmt.to_dict()
    assert d["version"] == 2 and "block" not in d
    assert rotfn.format_from_dict(_v1_format(d)) == fmt


def test_plan_dicts_of_version_1_still_load():
    model = rt.tiny_model(rt.make_config("llama", layers=1), dtype=torch.float32)
    plan = rotfn.plans.quarot(model, r1=rotfn.orthogonal(32, seed=0, block=16), r3=rotfn.hadamard(8, seed=2),
                              weights=rotfn.intq(4, group=16), acts=rotfn.mxfp4())
    d = plan.to_dict()
    assert (d["version"], "weight" in d, len(d["rotations"])) == (2, False, len(plan.rotations))
    old = json.loads(json.dumps(_v1_plan(d)))
    assert "rotation_table" not in old and "weight" in old
    assert rotfn.Plan.from_dict(old) == plan


def test_a_file_saved_before_plan_version_2_still_loads(tmp_path):
    model = rt.tiny_model(rt.make_config("llama", layers=1), dtype=torch.float32)
    plan = rotfn.plans.quarot(model, r1=rotfn.orthogonal(32, seed=0), r3=rotfn.hadamard(8, seed=2),
                              weights=rotfn.intq(4, group=16), acts=rotfn.nvfp4())
    params = rotfn.plans.FoldedParams(
        {**rotfn.fold(rotfn.params(model), plan), "q": rotfn.quantize(torch.randn(2, 32), rotfn.mxfp4())}, plan)
    path = tmp_path / "new.safetensors"
    rotfn.save(path, params, plan)
    with safetensors.safe_open(path, framework="pt") as f:
        doc = json.loads(f.metadata()["rotfn"])
    assert any(k.endswith(".block") for k in doc["tensors"]) and "weight" not in doc["plan"]
    old = tmp_path / "old.safetensors"
    _rewrite(old, *_v1_file(doc, safetensors.torch.load_file(path)))
    new_params, new_plan = rotfn.load(path)
    old_params, old_plan = rotfn.load(old)
    assert old_plan == new_plan == plan and sorted(old_params) == sorted(new_params)
    for key, value in new_params.items():
        if isinstance(value, rotfn.QTensor):
            assert old_params[key].format == value.format
            value, again = rotfn.dequantize(value), rotfn.dequantize(old_params[key])
        else:
            again = old_params[key]
        rt.assert_bits_equal(again, value, name=key)


# ----- atomic writes ---------------------------------------------------------------------------------
def _half_then_fail(tensors, filename, metadata=None):
    blob = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(blob[: len(blob) // 2])
    raise OSError("disk full")


@pytest.mark.parametrize("step", ["write", "fsync", "replace"])
@pytest.mark.parametrize("old", [False, True])
def test_an_interrupted_save_leaves_the_old_file_or_nothing(tmp_path, monkeypatch, step, old):
    path = tmp_path / "a.safetensors"
    if old:
        rotfn.save(path, {"w": torch.zeros(3)})
    before = path.read_bytes() if old else None

    def fail(*args, **kwargs):
        raise OSError("disk full")

    target = {"write": (safetensors.torch, "save_file", _half_then_fail), "fsync": (os, "fsync", fail),
              "replace": (os, "replace", fail)}[step]
    with monkeypatch.context() as patch:
        patch.setattr(*target)
        with pytest.raises(OSError, match="disk full"):
            rotfn.save(path, {"w": torch.randn(64, 64)}, _plan_with(rotfn.hadamard(64, seed=0)))
    assert os.listdir(tmp_path) == (["a.safetensors"] if old else [])
    if old:
        assert path.read_bytes() == before
        params, plan = rotfn.load(path)
        assert plan is None and torch.equal(params["w"], torch.zeros(3))


def test_rule_formats_and_shared_scale_groups_round_trip():
    """rule= and Plan.shared_scales survive to_dict / from_dict; a plan dict without shared_scales (written before
    they existed) loads with none, and one naming an unquantized key is refused."""
    for fmt in (rotfn.fp8("token", rule="compressed-tensors"), rotfn.intq(8, rule="compressed-tensors")):
        assert rotfn.format_from_dict(fmt.to_dict()) == fmt and "rule='compressed-tensors'" in repr(fmt)
    model = rt.tiny_model(rt.make_config("llama", layers=1), dtype=torch.float32)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(32, seed=0), weights=rotfn.nvfp4("pow2"))
    assert len(plan.shared_scales) == 2 and rotfn.Plan.from_dict(plan.to_dict()) == plan
    old = {k: v for k, v in plan.to_dict().items() if k != "shared_scales"}
    assert rotfn.Plan.from_dict(old).shared_scales == ()
    bad = {**plan.to_dict(), "shared_scales": [["model.embed_tokens.weight", "lm_head.weight"]]}
    with pytest.raises(rotfn.errors.SpecError, match=r"shared_scales"):
        rotfn.Plan.from_dict(bad)
