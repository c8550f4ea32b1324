"""rotfn.fold_checkpoint on two gloo ranks (spawned processes): byte for byte the one-process fold and export; a rank
that fails stops both and leaves the directory marked incomplete; the rerun resumes per rank; torchrun runs the CLI."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from ranks import run

import rotfn
import rotfn.io._stream as stream
from rotfn import distributed
from rotfn.testing.models import make_config, tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"

#: The fold's plan (NVFP4 global scales shared by q/k/v and gate/up: measured first, on every rank) and the export's
#: (with online R4, whose weights the export stores after the tensors).
FOLD = lambda m: rotfn.plans.per_linear(m, rotation=lambda n: rotfn.hadamard(n, block=32, seed=3),  # noqa: E731
                                        weights=rotfn.nvfp4())
EXPORT = lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16, seed=2),  # noqa: E731
                                      r4=rotfn.hadamard(128, seed=3), r3=None, weights=rotfn.mxfp4(),
                                      acts=rotfn.mxfp4("even"))
SHARD = "40KB"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    directory = tmp_path_factory.mktemp("src")
    model = tiny_model(make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, vocab=256, intermediate=128),
                       seed=0, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="60KB")
    return str(directory)


def _files(directory) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def _error(e: Exception) -> tuple[tuple[str, ...], str]:
    return tuple(c.__name__ for c in type(e).__mro__), str(e)


def _on_two_ranks(src: str, out: str):
    """On each rank: the fold, the export, a fold in which rank 1 fails at its second shard, and its rerun."""
    rank, _ = distributed.world()
    stats = rotfn.fold_checkpoint(src, FOLD, os.path.join(out, "fold"), max_shard_size=SHARD, progress=False)
    rotfn.fold_checkpoint(src, EXPORT, os.path.join(out, "export"), export="compressed-tensors", max_shard_size=SHARD,
                          progress=False)
    broken = os.path.join(out, "broken")
    write_shard, calls = stream._Fold.write_shard, []

    def fails_second(self, path, group):
        calls.append(path)
        if rank == 1 and len(calls) == 2:
            raise OSError("disk full on purpose")
        return write_shard(self, path, group)

    stream._Fold.write_shard = fails_second
    try:
        rotfn.fold_checkpoint(src, FOLD, broken, max_shard_size=SHARD, progress=False)
        failed = None
    except Exception as e:
        failed = _error(e)
    finally:
        stream._Fold.write_shard = write_shard
    distributed.all_reduce("test", [torch.zeros(1)])  # both ranks are out of the failed fold
    left, progress = sorted(os.listdir(broken)), rotfn.io.read_progress(broken)
    distributed.all_reduce("test", [torch.zeros(1)])  # rank 0 looked before the rerun writes
    resumed = rotfn.fold_checkpoint(src, FOLD, broken, max_shard_size=SHARD, progress=False)
    try:  # ranks given different plans: refused on every rank before anything is written
        rotfn.fold_checkpoint(src, lambda m: rotfn.plans.per_linear(m, rotation=lambda n: rotfn.hadamard(n, seed=rank)),
                              os.path.join(out, "differ"), progress=False)
        differ = None
    except Exception as e:
        differ = _error(e)
    return dict(stats=stats, failed=failed, left=left, progress=progress, resumed=resumed, differ=differ)


def test_two_ranks_write_the_one_process_bytes_fail_together_and_resume(src, tmp_path):
    one = tmp_path / "one"
    single = rotfn.fold_checkpoint(src, FOLD, one / "fold", max_shard_size=SHARD, progress=False)
    rotfn.fold_checkpoint(src, EXPORT, one / "export", export="compressed-tensors", max_shard_size=SHARD,
                          progress=False)
    r0, r1 = run(_on_two_ranks, src, str(tmp_path / "two"))
    assert r0.error is None and r1.error is None, (r0, r1)
    assert single.shards > 3
    for what in ("fold", "export"):
        assert _files(tmp_path / "two" / what) == _files(one / what), what
    assert _files(tmp_path / "two" / "broken") == _files(one / "fold")
    # each rank returns its own share; the shares are the whole
    a, b = r0.value["stats"], r1.value["stats"]
    assert a.shards == b.shards == single.shards and a.tensors and b.tensors
    assert a.tensors + b.tensors == single.tensors and a.bytes_written + b.bytes_written == single.bytes_written
    # the failed rank raised its own error, the other a DistributedError naming it
    assert r1.value["failed"] == (("OSError", "Exception", "BaseException", "object"), "disk full on purpose")
    assert "DistributedError" in r0.value["failed"][0] and "rank 1 of 2 failed" in r0.value["failed"][1]
    left, progress = r0.value["left"], r0.value["progress"]
    assert {"config.json", "rotfn.json", "model.safetensors.index.json"}.isdisjoint(left), left
    assert not [f for f in left if f.endswith(".tmp")] and {".rotfn-incomplete", ".rotfn-incomplete.rank1"} <= set(left)
    done = [name for name, _, finished in progress.shards if finished]
    assert done and len(done) < single.shards and set(done) == {f for f in left if f.endswith(".safetensors")}
    for r in (r0, r1):
        assert "DistributedError" in r.value["differ"][0] and "argument 'src_dir, plan and options'" in r.value["differ"][1]
    assert not (tmp_path / "two" / "differ").exists()
    # the rerun keeps what both ranks finished and writes the rest
    kept = r0.value["resumed"].shards_skipped + r1.value["resumed"].shards_skipped
    assert kept == len(done) and r1.value["resumed"].tensors > 0


#: An export whose NVFP4 activations take each linear's static global scale from a calibration.
CALIBRATED = lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64, seed=1), r4=rotfn.hadamard(128), r3=None,  # noqa: E731
                                          weights=rotfn.nvfp4(), acts=rotfn.nvfp4())


def _export_calibrated(src: str, out: str, calibs):
    """Each rank exports with ``calibs[0]`` into ``out/same``, then with its own ``calibs[rank]`` into ``out/differ``."""
    rank, _ = distributed.world()
    rotfn.fold_checkpoint(src, CALIBRATED, os.path.join(out, "same"), export="compressed-tensors",
                          calibration=calibs[0], max_shard_size=SHARD, progress=False)
    try:
        rotfn.fold_checkpoint(src, CALIBRATED, os.path.join(out, "differ"), export="compressed-tensors",
                              calibration=calibs[rank], progress=False)
    except Exception as e:
        return _error(e)
    return None


def test_two_ranks_export_one_calibrations_scales_and_refuse_two(src, tmp_path):
    """A calibration is part of the export's job: two ranks given the same one write the one-process bytes (its
    static input scales included); ranks given different ones are refused before anything is written."""
    model = rotfn.io.skeleton(src)
    model = type(model).from_pretrained(src, dtype=torch.bfloat16).eval()
    plan, p = CALIBRATED(model), rotfn.params(model)
    ids = [torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    calibs = [rotfn.calibrate(model, p, plan, [batch], progress=False) for batch in ids]
    rotfn.fold_checkpoint(src, CALIBRATED, tmp_path / "one", export="compressed-tensors", calibration=calibs[0],
                          max_shard_size=SHARD, progress=False)
    r0, r1 = run(_export_calibrated, src, str(tmp_path / "two"), calibs)
    assert r0.error is None and r1.error is None, (r0, r1)
    assert _files(tmp_path / "two" / "same") == _files(tmp_path / "one")
    from safetensors import safe_open
    names = [k for f in (tmp_path / "one").glob("*.safetensors") for k in safe_open(f, framework="pt").keys()]
    assert len([k for k in names if k.endswith("input_global_scale")]) == len(plan.quantized)
    for r in (r0, r1):
        assert "DistributedError" in r.value[0] and "argument 'src_dir, plan and options'" in r.value[1]
    assert not (tmp_path / "two" / "differ").exists()


def _dies_mid_fold(src: str, out: str):
    """Rank 1's process ends as it starts its second shard (killed, out of memory)."""
    write_shard, calls = stream._Fold.write_shard, []

    def dies_second(self, path, group):
        calls.append(path)
        if distributed.world()[0] == 1 and len(calls) == 2:
            os._exit(9)
        return write_shard(self, path, group)

    stream._Fold.write_shard = dies_second
    return rotfn.fold_checkpoint(src, FOLD, out, max_shard_size=SHARD, progress=False)


def test_a_rank_that_dies_stops_the_fold_and_one_process_resumes_it(src, tmp_path):
    r0, r1 = run(_dies_mid_fold, src, str(tmp_path / "two"), timeout=300)
    assert r1.error == (("ProcessDied",), "exit code 9") and r0.raised("DistributedError"), (r0, r1)
    assert not {"config.json", "model.safetensors.index.json"} & set(os.listdir(tmp_path / "two"))
    assert (tmp_path / "two" / ".rotfn-incomplete.rank1").exists()  # rank 1 finished its first shard
    done = rotfn.io.read_progress(tmp_path / "two").tensors_done
    resumed = rotfn.fold_checkpoint(src, FOLD, tmp_path / "two", max_shard_size=SHARD, progress=False)
    single = rotfn.fold_checkpoint(src, FOLD, tmp_path / "one", max_shard_size=SHARD, progress=False)
    assert 0 < resumed.shards_skipped < single.shards and resumed.tensors == single.tensors - done  # both ranks' kept
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_torchrun_runs_rotfn_fold_on_two_ranks(src, tmp_path):
    """``torchrun --nproc-per-node 2 -m rotfn fold``: the bytes of ``rotfn fold``; one summary, from rank 0."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    argv = ["fold", src, "DST", "--r1", "hadamard", "--r2", "hadamard", "--weights", "mxfp4", "--max-shard-size",
            SHARD, "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    alone = subprocess.run([sys.executable, "-m", "rotfn", *[str(tmp_path / "one") if a == "DST" else a for a in argv]],
                           capture_output=True, text=True, timeout=300, env=env)
    assert alone.returncode == 0, alone.stderr
    two = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "rotfn",
                          *[str(tmp_path / "two") if a == "DST" else a for a in argv]],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    summary = [line.rsplit(" in ", 1)[0] for line in two.stdout.splitlines() if line.startswith("folded ")]
    expected = [line.rsplit(" in ", 1)[0].replace(str(tmp_path / "one"), str(tmp_path / "two"))
                for line in alone.stdout.splitlines() if line.startswith("folded ")]
    assert len(expected) == 1 and summary == expected, two.stdout  # totals over both ranks, printed once


def test_the_recorded_resume_command_is_the_torchrun_line_under_torchrun(monkeypatch):
    """What an interrupted fold's marker (and rotfn inspect) says to rerun: the command as it was launched."""
    from rotfn.cli import _command_line, build_parser

    args = build_parser().parse_args(["fold", "src dir", "dst"])
    args.argv = ["fold", "src dir", "dst"]
    for env in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(env, raising=False)
    assert _command_line(args) == "rotfn fold 'src dir' dst"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _command_line(args) == "torchrun --nproc-per-node 2 -m rotfn fold 'src dir' dst"
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert _command_line(args) == "torchrun --nnodes 2 --nproc-per-node 8 -m rotfn fold 'src dir' dst"
