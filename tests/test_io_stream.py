"""rotfn.fold_checkpoint: bit-identical to rotfn.fold, loadable by transformers, each shard read once, bounded memory,
interruptions that leave a clearly incomplete directory and resume."""

import json
import os
import shutil

import pytest
import safetensors.torch
import torch
import transformers

import rotfn
import rotfn.io._stream as stream
from rotfn.errors import ArgumentError, CheckpointError, FoldError, PlanError
from rotfn.io._checkpoint import inventory, skeleton
from rotfn.testing.models import make_config, tiny_model
from rotfn.transforms import Scale, compile_fold

os.environ["HF_HUB_OFFLINE"] = "1"


def _checkpoint(directory, *, tied=False, layers=2, hidden=64, vocab=256, intermediate=128, shard="40KB", seed=0):
    model = tiny_model(make_config("llama", hidden=hidden, heads=4, kv_heads=2, layers=layers, vocab=vocab,
                                   intermediate=intermediate, tied=tied), seed=seed, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=shard)
    return str(directory)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def tied_src(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("tied"), tied=True)


def _loaded(directory):
    """The model transformers loads from ``directory``, its params, and every tensor stored in its shards."""
    config = rotfn.io._checkpoint.read_config(directory)  # a directory with online transforms is rotfn-only
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, config=config, dtype="auto").eval()
    stored = {}
    for name in os.listdir(directory):
        if name.startswith("model") and name.endswith(".safetensors"):
            stored.update(safetensors.torch.load_file(os.path.join(directory, name)))
    return model, rotfn.params(model), stored


def _quarot(model):
    return rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=0), r2=rotfn.hadamard(16, seed=1))


PLANS = {
    "quarot R1+R2": _quarot,
    "quarot R1..R4 + mxfp4": lambda m: rotfn.plans.quarot(
        m, r1=rotfn.orthogonal(64, seed=0), r2=rotfn.hadamard(16, seed=1), r3=rotfn.hadamard(16),
        r4=rotfn.hadamard(128, seed=2), weights=rotfn.mxfp4()),
    "per_linear block + nvfp4 (tensor scale)": lambda m: rotfn.plans.per_linear(
        m, rotation=lambda n: rotfn.hadamard(n, block=32, seed=3), weights=rotfn.nvfp4()),
}


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("name", PLANS)
def test_every_tensor_is_bit_identical_to_fold(src, tmp_path, monkeypatch, name, precision):
    monkeypatch.setattr(stream, "MAP_BUDGET", 20_000)  # reopened maps
    build = PLANS[name]
    stats = rotfn.fold_checkpoint(src, build, tmp_path / "out", max_shard_size="60KB", progress=False,
                                  precision=precision, piece_elements=64 * 20)  # many pieces per tensor
    model, params, _ = _loaded(src)
    plan = build(model)
    folded = rotfn.fold(params, plan, precision=precision)
    _, _, stored = _loaded(tmp_path / "out")
    assert set(stored) == set(model.state_dict())
    for key, t in stored.items():
        assert t.dtype == folded[key].dtype == torch.bfloat16 and torch.equal(t, folded[key]), key
    assert stats.shards > 1 and stats.tensors == len(stored) and max(stats.opens.values()) > 1
    assert rotfn.io._hf.read_rotfn_json(tmp_path / "out") == plan


def test_transformers_loads_the_result_and_computes_what_call_computes(src, tmp_path):
    rotfn.fold_checkpoint(src, _quarot, tmp_path / "out", progress=False)
    model, params, _ = _loaded(src)
    plan = _quarot(model)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = rotfn.call(model, rotfn.fold(params, plan), plan, ids).logits
    reloaded, _, _ = _loaded(tmp_path / "out")
    assert not plan.online and torch.equal(reloaded(ids).logits, reference)
    assert not torch.equal(reference, model(ids).logits)  # the weights did change
    _, params2, plan2 = rotfn.load_hf(tmp_path / "out")  # the plan is recorded: known to be folded
    assert plan2 == plan and params2.plan == plan
    with pytest.raises(FoldError, match="already folded|folded with"):
        rotfn.fold_checkpoint(tmp_path / "out", _quarot, tmp_path / "again", progress=False)


def test_a_tied_embedding_is_untied_and_config_says_so(tied_src, tmp_path):
    stats = rotfn.fold_checkpoint(tied_src, _quarot, tmp_path / "out", progress=False)
    model, params, _ = _loaded(tied_src)
    assert model.config.tie_word_embeddings
    plan = _quarot(model)
    folded = rotfn.fold(params, plan)
    _, _, stored = _loaded(tmp_path / "out")
    assert torch.equal(stored["lm_head.weight"], folded["lm_head.weight"])
    assert torch.equal(stored["model.embed_tokens.weight"], folded["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert stats.reads["model.embed_tokens.weight"] == 2  # once as itself, once as the untied lm_head
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    reloaded, _, _ = _loaded(tmp_path / "out")
    assert torch.equal(reloaded(ids).logits, rotfn.call(model, folded, plan, ids).logits)


def test_each_shard_is_read_once_and_memory_stays_at_a_few_tensors(tmp_path, monkeypatch):
    # 8 layers, 75 MB of bf16 in 7 shards; the largest tensor (embedding, lm_head) is 4 MB. Large enough
    # that the bound below (half the checkpoint) stands well clear of the allocator's own noise (~10 MB)
    src = _checkpoint(tmp_path / "src", layers=8, hidden=512, vocab=4096, intermediate=2048, shard="12MB")
    monkeypatch.setattr(stream, "MAP_BUDGET", 1 << 20)

    def plan(m):
        return rotfn.plans.quarot(m, r1=rotfn.hadamard(512, seed=0), r2=rotfn.hadamard(128, seed=1))

    rotfn.fold_checkpoint(src, plan, tmp_path / "warm", progress=False, piece_elements=1 << 14)  # imports, arenas, pool
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    measured = _reset_peak_rss()
    stats = rotfn.fold_checkpoint(src, plan, tmp_path / "out", progress=False, piece_elements=1 << 14)
    peak = _peak_rss() if measured else None
    ckpt = inventory(src)
    per_file = {f: sum(e.nbytes for g, e in ckpt.tensors.values() if g == f) for f in ckpt.files}
    largest = max(e.nbytes for _, e in ckpt.tensors.values())
    assert len(ckpt.files) >= 4 and dict(stats.bytes_read) == per_file  # every byte of every shard read once
    assert set(stats.reads) == set(ckpt.tensors) and set(stats.reads.values()) == {1}
    assert stats.peak_held_bytes <= 3 * largest
    if peak is not None:  # Linux: the process's measured peak, over its size before the call
        assert peak - before < ckpt.nbytes / 2, (peak - before, ckpt.nbytes)


def _reset_peak_rss() -> bool:
    """Reset the process's VmHWM to its current resident size (Linux >= 4.0); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)


def test_an_interrupted_fold_is_marked_incomplete_and_a_rerun_finishes_it(src, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    rotfn.fold_checkpoint(src, _quarot, clean, max_shard_size="60KB", progress=False)
    real = stream.ShardWriter.close
    closes = []

    def full_disk_at_second_shard(self):  # every byte of shard 2 went out, its close fails
        closes.append(self)
        if len(closes) == 2:
            self.abort()
            raise OSError(28, "No space left on device")
        real(self)

    monkeypatch.setattr(stream.ShardWriter, "close", full_disk_at_second_shard)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space"):
        rotfn.fold_checkpoint(src, _quarot, out, max_shard_size="60KB", progress=False)
    assert sorted(os.listdir(out)) == [stream.MARKER, "model-00001-of-00004.safetensors"]  # no index, config, half shard
    with pytest.raises((OSError, ValueError), match="config.json"):  # not a checkpoint transformers would load
        transformers.AutoModelForCausalLM.from_pretrained(out)
    monkeypatch.setattr(stream.ShardWriter, "close", real)
    stats = rotfn.fold_checkpoint(src, _quarot, out, max_shard_size="60KB", progress=False)
    assert stats.shards_skipped == 1 and stats.shards == 4
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean))
    for name in os.listdir(clean):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_a_failed_read_waits_for_the_workers_before_the_shard_is_closed(src, tmp_path, monkeypatch):
    """Workers write into the shard's file; on an error none may still be writing once it is closed."""
    import time

    real_write, real_read = stream._fold_write, stream._Reader.read
    late, reads = [], [0]

    def slow_write(*args):
        time.sleep(0.05)
        try:
            return real_write(*args)
        except ValueError as err:  # "I/O operation on closed file": it wrote after the shard was closed
            late.append(err)
            raise

    def failing_read(self, name, rows=None):  # the second piece of a tensor: the first is with a worker
        reads[0] += rows is not None and rows.start > 0
        if reads[0] == 3:
            raise OSError(5, "Input/output error")
        return real_read(self, name, rows)

    monkeypatch.setattr(stream, "_fold_write", slow_write)
    monkeypatch.setattr(stream._Reader, "read", failing_read)
    with pytest.raises(OSError, match="Input/output"):
        rotfn.fold_checkpoint(src, _quarot, tmp_path / "out", max_shard_size="60KB", progress=False,
                              piece_elements=64 * 20)
    assert late == []
    assert stream.MARKER in os.listdir(tmp_path / "out")


def test_a_different_job_is_refused_on_an_incomplete_directory_unless_overwrite(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = stream._Fold.write_shard
    calls = []

    def interrupt_second_shard(self, path, group):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, path, group)

    monkeypatch.setattr(stream._Fold, "write_shard", interrupt_second_shard)
    with pytest.raises(KeyboardInterrupt):
        rotfn.fold_checkpoint(src, _quarot, out, max_shard_size="60KB", progress=False, command="rotfn fold a b")
    monkeypatch.undo()
    progress = rotfn.io.read_progress(out)
    assert [done for _, _, done in progress.shards] == [True, False, False, False]
    assert progress.tensors == 21 and 0 < progress.tensors_done < 21 and progress.command == "rotfn fold a b"
    assert progress.plan == str(_quarot(skeleton(src))) and progress.source == os.path.abspath(src)
    before = sorted(os.listdir(out))
    other = lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=5))
    with pytest.raises(CheckpointError, match=r"another job \(the plan differs\).*rerun `rotfn fold a b` to resume"):
        rotfn.fold_checkpoint(src, other, out, max_shard_size="60KB", progress=False)
    with pytest.raises(CheckpointError, match=r"the shard layout \(max_shard_size\) differs"):
        rotfn.fold_checkpoint(src, _quarot, out, max_shard_size="90KB", progress=False)
    assert sorted(os.listdir(out)) == before  # the interrupted fold's work is untouched
    stats = rotfn.fold_checkpoint(src, other, out, progress=False, overwrite=True)
    assert stats.shards_skipped == 0 and stream.MARKER not in os.listdir(out)
    assert rotfn.io._hf.read_rotfn_json(out) == other(skeleton(src))


def test_a_complete_checkpoint_is_replaced_only_with_overwrite(src, tmp_path):
    out = tmp_path / "out"
    rotfn.fold_checkpoint(src, _quarot, out, progress=False)
    other = lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=9))
    with pytest.raises(CheckpointError, match="overwrite=True"):
        rotfn.fold_checkpoint(src, other, out, progress=False)
    (out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    rotfn.fold_checkpoint(src, other, out, overwrite=True, progress=False)
    assert "model-00009-of-00009.safetensors" not in os.listdir(out)
    assert rotfn.io._hf.read_rotfn_json(out) == other(skeleton(src))


def test_keys_rotated_on_both_sides_fold_in_stages_and_a_norm_rides_with_the_first(src):
    """v_proj (norm, R1 input side, R2 output side per head) and o_proj (R1 output side, R2 input) are cut into stages,
    so no key of a QuaRot plan is folded whole; the bit-identity test above checks their bits."""
    meta = skeleton(src)
    plan = _quarot(meta)
    program = compile_fold(plan.transform(), rotfn.params(meta))
    v, o = "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    v_stages, o_stages = program.keys[v].stages, program.keys[o].stages
    norm = lambda stage: any(isinstance(op, Scale) for op in stage.ops)  # noqa: E731
    assert [st.axis for st in v_stages] == [0, 1] and [st.axis for st in o_stages] == [1, 0]
    assert v_stages[0].reads == ("model.layers.0.input_layernorm.weight",) and norm(v_stages[0])
    assert not norm(v_stages[1]) and not v_stages[1].reads and not norm(o_stages[0])
    whole = [k for k, kp in program.keys.items() if kp.ops and [st.axis for st in kp.stages] == [None]
             and len(kp.shape) == 2]
    assert whole == []


def test_the_skeleton_gives_the_plan_of_the_real_model(src):
    meta = skeleton(src)
    model, _, _ = _loaded(src)
    assert all(t.device.type == "meta" for t in rotfn.params(meta).values())
    assert _quarot(meta) == _quarot(model)


def test_bad_inputs_are_typed_errors_that_name_the_argument(src, tmp_path):
    with pytest.raises(CheckpointError, match="src_dir.*config.json"):
        rotfn.fold_checkpoint(tmp_path, _quarot, tmp_path / "out")
    with pytest.raises(ArgumentError, match="dst_dir.*other than src_dir"):
        rotfn.fold_checkpoint(src, _quarot, src)
    with pytest.raises(ArgumentError, match="workers"):
        rotfn.fold_checkpoint(src, _quarot, tmp_path / "out", workers=0)
    with pytest.raises(ArgumentError, match="precision.*float32.*float64.*'float16'"):
        rotfn.fold_checkpoint(src, _quarot, tmp_path / "out", precision="float16")
    with pytest.raises(ArgumentError, match="max_shard_size"):
        rotfn.fold_checkpoint(src, _quarot, tmp_path / "out", max_shard_size="lots")
    small = tiny_model(make_config("llama", hidden=32, layers=1, vocab=64), dtype=torch.bfloat16)
    with pytest.raises(PlanError, match="plan"):
        rotfn.fold_checkpoint(src, rotfn.plans.quarot(small, r1=rotfn.hadamard(32)), tmp_path / "out")
    with pytest.raises(PlanError, match="function model -> rotfn.Plan"):
        rotfn.fold_checkpoint(src, lambda m: None, tmp_path / "out")
    renamed = tmp_path / "renamed"
    shutil.copytree(src, renamed)
    index = json.loads((renamed / "model.safetensors.index.json").read_text())
    file = index["weight_map"].pop("model.norm.weight")
    tensors = safetensors.torch.load_file(renamed / file)
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
    safetensors.torch.save_file(tensors, renamed / file, metadata={"format": "pt"})
    index["weight_map"]["model.final_norm.weight"] = file
    (renamed / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing \['model.norm.weight'\].*unexpected \['model.final_norm.weight'\]"):
        rotfn.fold_checkpoint(renamed, _quarot, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_freed_blocks_are_kept_during_a_job_unless_the_environment_configures_malloc(monkeypatch):
    from rotfn.io._malloc import freed_blocks_kept

    glibc = rotfn.io._malloc._glibc() is not None
    with freed_blocks_kept() as outer, freed_blocks_kept() as inner:
        assert outer == inner == glibc
        assert torch.ones(1 << 23).sum().item() == 1 << 23  # a 32 MiB block from the heap
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    with freed_blocks_kept() as ok:
        assert ok is False


def test_without_pwrite_the_pieces_are_written_through_the_file_position(src, tmp_path, monkeypatch):
    """Workers write their pieces at their place with os.pwrite; where there is none (Windows), under a lock."""
    monkeypatch.delattr(os, "pwrite")
    rotfn.fold_checkpoint(src, _quarot, tmp_path / "out", max_shard_size="60KB", progress=False, piece_elements=64 * 20)
    model, params, _ = _loaded(src)
    folded = rotfn.fold(params, _quarot(model))
    _, _, stored = _loaded(tmp_path / "out")
    assert set(stored) == set(model.state_dict())
    assert all(torch.equal(t, folded[k]) for k, t in stored.items())


def test_process_settings_change_only_when_asked_and_are_restored(src, tmp_path, monkeypatch):
    """By default a fold changes no process-wide state; torch_threads / keep_freed_blocks apply for the call only."""
    import contextlib

    seen, kept = [], []
    real = stream._Fold.write_shard

    def spy(self, path, group):
        seen.append(torch.get_num_threads())
        return real(self, path, group)

    monkeypatch.setattr(stream._Fold, "write_shard", spy)
    monkeypatch.setattr(stream, "freed_blocks_kept", lambda: kept.append(1) or contextlib.nullcontext(True))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rotfn.fold_checkpoint(src, _quarot, tmp_path / "a", progress=False)
        assert set(seen) == {2} and kept == []
        seen.clear()
        rotfn.fold_checkpoint(src, _quarot, tmp_path / "b", progress=False, torch_threads=1, keep_freed_blocks=True)
        assert set(seen) == {1} and kept == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for arg, value in (("torch_threads", 0), ("piece_elements", 0), ("piece_elements", None), ("keep_freed_blocks", 1)):
        with pytest.raises(ArgumentError, match=arg):
            rotfn.fold_checkpoint(src, _quarot, tmp_path / "c", progress=False, **{arg: value})


def test_tied_keys_changed_differently_are_refused_by_both_folds_before_any_work(tied_src, tmp_path):
    """The one tie check lives in the fold program: rotfn.fold and fold_checkpoint refuse alike."""
    import dataclasses

    model, params, _ = _loaded(tied_src)
    kept_tied = dataclasses.replace(_quarot(model), untied=())  # lm_head takes the final norm, the embedding not
    with pytest.raises(PlanError, match="tied keys.*identically or unties them"):
        rotfn.fold(params, kept_tied)
    with pytest.raises(PlanError, match="tied keys.*identically or unties them"):
        rotfn.fold_checkpoint(tied_src, kept_tied, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_fold_with_online_transforms_is_refused_by_plain_transformers(src, tmp_path):
    """Weights that are right only with the plan's online R4: plain transformers refuses the directory (instead of
    running it silently wrong); rotfn.load_hf reads it; a fold without online transforms stays plain."""
    rotfn.fold_checkpoint(src, PLANS["quarot R1..R4 + mxfp4"], tmp_path / "r4", progress=False)
    with pytest.raises(ValueError, match="rotfn-load_hf-only"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r4")
    with pytest.raises(AttributeError, match="rotfn-load_hf-only"):  # a model class skips the model type check
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "r4")
    model, params, plan = rotfn.load_hf(tmp_path / "r4")
    assert plan.online and type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == next(_loaded(src)[0].parameters()).dtype
    rotfn.fold_checkpoint(src, _quarot, tmp_path / "r1", progress=False)
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r1")


def _files(directory) -> dict:
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            out.update(safetensors.torch.load_file(os.path.join(directory, name)))
    return out


def test_a_moe_checkpoint_folds_expert_by_expert_with_the_bits_of_the_fused_fold(tmp_path):
    """Qwen3-MoE: transformers fuses the checkpoint's per-expert tensors into 3-D params; the streaming fold folds
    each expert's tensor with the fused param's operations (R1 on both sides, R2, R4 on the experts' down
    projection, MXFP4) and writes exactly what export_hf writes for the in-memory fold."""
    cfg = make_config("qwen3_moe", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128)
    model = tiny_model(cfg, dtype=torch.bfloat16, seed=1, outliers=8.0)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")

    def build(m):
        return rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2), r3=None,
                                  r4=lambda n: rotfn.hadamard(n, seed=3), weights=rotfn.mxfp4())

    plan = build(model)
    with pytest.warns(rotfn.errors.CheckpointWarning):
        rotfn.export_hf(model, rotfn.fold(rotfn.params(model), plan), plan, tmp_path / "memory")
    stats = rotfn.fold_checkpoint(tmp_path / "src", build, tmp_path / "stream", max_shard_size="40KB", progress=False)
    memory, streamed = _files(tmp_path / "memory"), _files(tmp_path / "stream")
    assert stats.shards > 1 and sorted(memory) == sorted(streamed)
    assert any(".experts.3.gate_proj.weight" in k for k in streamed)
    for key, t in memory.items():
        assert torch.equal(t.view(torch.uint8), streamed[key].view(torch.uint8)), key
    loaded, params, recorded = rotfn.load_hf(tmp_path / "stream")
    assert recorded == plan
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = rotfn.call(loaded, params, recorded, ids).logits
        want = rotfn.call(model, rotfn.fold(rotfn.params(model), plan), plan, ids).logits
    assert torch.equal(got, want)


def _gptq(model, plan, **kw):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return rotfn.calibrate(model, rotfn.params(model), plan, [ids], progress=False, **kw)


def test_gptq_weights_stream_with_the_bits_of_the_in_memory_fold(src, tmp_path):
    """fold_checkpoint(..., calibration=) writes the weights a calibration rounded by GPTQ (each such tensor folded
    whole, the rest in pieces), bit for bit rotfn.fold(params, plan, weights_by=calibration); they are not the
    weights rounded to nearest. The calibration is part of the job: another one on the incomplete directory is
    refused; a calibration of other weights (another checkpoint of the model) is a PlanError."""
    model, params, _ = _loaded(src)

    def build(m):
        return rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=0), r2=rotfn.hadamard(16, seed=1),
                                  r4=rotfn.hadamard(128, seed=2), weights=rotfn.nvfp4())

    plan = build(model)
    calib = rotfn.calibration.load(_saved(tmp_path, _gptq(model, plan, sequential=True)))
    stats = rotfn.fold_checkpoint(src, build, tmp_path / "out", max_shard_size="60KB", progress=False,
                                  piece_elements=64 * 20, calibration=calib)
    want, rtn = rotfn.fold(params, plan, weights_by=calib), rotfn.fold(params, plan)
    _, _, stored = _loaded(tmp_path / "out")
    assert stats.shards > 1 and set(stored) == set(model.state_dict())
    for key, t in stored.items():
        assert torch.equal(t, want[key]), key
    assert sum(not torch.equal(want[k], rtn[k]) for k in plan.quantized) == len(plan.quantized)

    other = _gptq(model, plan, damp=0.5)
    real = stream.ShardWriter.close

    def fail(self):
        self.abort()
        raise OSError(28, "No space left on device")

    stream.ShardWriter.close = fail
    try:
        with pytest.raises(OSError):
            rotfn.fold_checkpoint(src, build, tmp_path / "part", max_shard_size="60KB", progress=False,
                                  calibration=calib)
    finally:
        stream.ShardWriter.close = real
    with pytest.raises(CheckpointError, match="another"):
        rotfn.fold_checkpoint(src, build, tmp_path / "part", max_shard_size="60KB", progress=False, calibration=other)
    with pytest.raises(PlanError, match=r"fold_checkpoint: argument 'calibration'.*a calibration of this plan"):
        rotfn.fold_checkpoint(src, _quarot, tmp_path / "no", progress=False, calibration=calib)
    other_src = _checkpoint(tmp_path / "other-src", seed=1)  # same model, other weights
    with pytest.raises(PlanError, match=r"a calibration of these params"):
        rotfn.fold_checkpoint(other_src, build, tmp_path / "other", progress=False, calibration=calib)


def _saved(tmp_path, calibration):
    path = tmp_path / "calibration.safetensors"
    rotfn.calibration.save(path, calibration)
    return path


def test_gptq_weights_of_a_moe_stream_and_its_experts_fold_per_expert(tmp_path):
    """Qwen3-MoE with a calibration: every linear and the fused experts take its GPTQ codes (one problem per expert;
    experts no token reached to nearest), the experts still written expert by expert from the checkpoint's
    per-expert tensors (the rounding checked on each fused param once): the export_hf of the in-memory fold, byte for
    byte."""
    cfg = make_config("qwen3_moe", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128)
    model = tiny_model(cfg, dtype=torch.bfloat16, seed=1, outliers=8.0)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")

    def build(m):
        return rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2), r3=None,
                                  r4=lambda n: rotfn.hadamard(n, seed=3), weights=rotfn.intq(4, group=32))

    plan = build(model)
    calib = _gptq(model, plan)
    experts = [k for k in plan.quantized if k.endswith(("gate_up_proj", "experts.down_proj"))]
    assert experts and calib.rtn == () and set(experts) <= set(calib.weights)
    with pytest.warns(rotfn.errors.CheckpointWarning):
        rotfn.export_hf(model, rotfn.fold(rotfn.params(model), plan, weights_by=calib), plan, tmp_path / "memory")
    rotfn.fold_checkpoint(tmp_path / "src", build, tmp_path / "stream", max_shard_size="40KB", progress=False,
                          calibration=calib)
    memory, streamed = _files(tmp_path / "memory"), _files(tmp_path / "stream")
    assert sorted(memory) == sorted(streamed) and any(".experts.3.gate_proj.weight" in k for k in streamed)
    for key, t in memory.items():
        assert torch.equal(t.view(torch.uint8), streamed[key].view(torch.uint8)), key
