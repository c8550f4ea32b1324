"""rotfn.calibrate and rotfn.learn.rotations on two gloo ranks (spawned processes) against one process.

Each spawned run batches several checks, since starting ranks costs seconds.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
from ranks import run

import rotfn
import rotfn.testing as rt
from rotfn import distributed
from rotfn.errors import ArgumentError

pytest.importorskip("transformers")

FMT = rotfn.intq(4, group=16)


def _setup(n_batches=3, family="llama"):
    cfg = rt.make_config(family, hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128, vocab=256)
    model = rt.tiny_model(cfg, dtype=torch.float32, seed=1, outliers=8.0)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=1), r2=rotfn.hadamard(16), weights=FMT,
                              acts=FMT if family == "llama" else None, r3=None, r4=None)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (2, 16), generator=gen) for _ in range(n_batches)]
    return model, rotfn.params(model), plan, batches


def _calibrations():
    """Calibrations of three batches (2 + 1 over two ranks), one pass and sequential, and of one batch
    (rank 1's share empty), and of a Qwen3-MoE (GPTQ per expert, each expert's tokens counted over the ranks): the
    rounded codes, the folded weights, the Hessians, tokens, amax and the unrouted experts."""
    out = {}
    for name, data, sequential, family in (("one pass", None, False, "llama"), ("sequential", None, True, "llama"),
                                           ("one batch", 1, False, "llama"), ("moe", None, True, "qwen3_moe")):
        model, p, plan, batches = _setup(family=family)
        data = batches[:data]
        calib = rotfn.calibrate(model, p, plan, data, sequential=sequential, keep_hessians=True, progress=False)
        folded = rotfn.fold(p, plan, weights_by=calib)
        out[name] = dict(codes={k: (q.codes, q.scales) for k, q in calib.weights.items()},
                         folded={k: folded[k] for k in plan.quantized}, hessians=dict(calib.hessians),
                         tokens=calib.tokens, amax=dict(calib.input_amax), unrouted=dict(calib.unrouted))
    return out


def test_calibrate_on_two_ranks_equals_one_process_with_all_batches():
    ranks = run(_calibrations)
    assert all(r.error is None for r in ranks), ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: the MoE's float32 forward differs in the last bits between counts
    try:
        one = _calibrations()
    finally:
        torch.set_num_threads(threads)
    for name, want in one.items():
        for r in ranks:
            got = r.value[name]
            assert got["tokens"] == want["tokens"] and got["unrouted"] == want["unrouted"], name
            assert got["hessians"].keys() == want["hessians"].keys()
            for k, h in want["hessians"].items():
                # the same float64 sums in another order
                torch.testing.assert_close(got["hessians"][k], h, rtol=1e-13, atol=1e-13 * h.abs().max().item())
            for k, (codes, scales) in want["codes"].items():
                assert torch.equal(got["codes"][k][0], codes) and torch.equal(got["codes"][k][1], scales), (name, k)
            for k, w in want["folded"].items():
                assert torch.equal(got["folded"][k], w), (name, k)
            for k, a in want["amax"].items():
                assert torch.equal(got["amax"][k], a), (name, k)
        for k, h in ranks[0].value[name]["hessians"].items():  # every rank holds the same bits
            assert torch.equal(h, ranks[1].value[name]["hessians"][k])


def _learned_matrices(result):
    return [w.rotation.matrix(torch.float64) for w in result.plan.rotations]


def _learn(steps_and_accumulate):
    """Learned R1 / R2: the rotation matrices and losses for each (steps, accumulate)."""
    model, p, plan, batches = _setup()
    out = {}
    for steps, accumulate in steps_and_accumulate:
        res = rotfn.learn.rotations(model, p, plan, batches, steps=steps, lr=0.5, accumulate=accumulate,
                                    progress=False)
        out[steps, accumulate] = dict(matrices=_learned_matrices(res), losses=res.losses, ortho=res.orthogonality)
    return out


def test_learn_on_two_ranks_equals_one_process_accumulating_their_batches():
    # 3 batches: the steps of 2 and 4 batches wrap around the cycling list at different places
    ranks = run(_learn, [(3, 1), (2, 2)])
    assert all(r.error is None for r in ranks), ranks
    one = _learn([(3, 2), (2, 4)])
    for (steps, k), (_, k1) in (((3, 1), (3, 2)), ((2, 2), (2, 4))):
        want = one[steps, k1]
        for r in ranks:
            got = r.value[steps, k]
            assert len(got["losses"]) == steps
            for a, b in zip(got["matrices"], want["matrices"], strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-6, atol=0)
        for a, b in zip(ranks[0].value[steps, k]["matrices"], ranks[1].value[steps, k]["matrices"], strict=True):
            assert torch.equal(a, b)
        assert ranks[0].value[steps, k]["losses"] == ranks[1].value[steps, k]["losses"]


def _learn_sharded(shard):
    """Learned R1 / R2 (next-token and fidelity losses) and the elements this rank holds (with shard=True)."""
    model, p, plan, batches = _setup()
    held, piece = [], distributed.piece
    distributed.piece = lambda t: held.append(piece(t)) or held[-1]
    try:
        out = {}
        for loss in (None, "fidelity"):
            res = rotfn.learn.rotations(model, p, plan, batches, steps=2, lr=0.5, loss=loss, progress=False,
                                        shard=shard, accumulate=1 if shard else 2)
            out[loss] = dict(matrices=_learned_matrices(res), losses=res.losses)
    finally:
        distributed.piece = piece
    matrices = sum(t.numel() for k, t in p.items() if t.ndim >= 2)
    if shard:  # after the forward (at the loss) no gathered weight is alive
        gathered, concat = [], distributed.concat
        def recorded(fn, t):
            whole = concat(fn, t)
            gathered.append(weakref.ref(whole))
            return whole

        distributed.concat = recorded

        def loss(outputs, batch):
            out["alive"] = (len(gathered), sum(r() is not None for r in gathered))
            return outputs.logits.float().square().mean()

        try:
            rotfn.learn.rotations(model, p, plan, batches[:1], steps=1, lr=0.5, loss=loss, progress=False, shard=True)
        finally:
            distributed.concat = concat
    return out, sum(t.numel() for t in held) / 2, matrices  # held / 2: two runs


def test_shard_on_two_ranks_holds_half_the_weights_and_learns_what_one_process_learns():
    ranks = run(_learn_sharded, True)
    assert all(r.error is None for r in ranks), ranks
    one, _, _ = _learn_sharded(False)
    for r in ranks:
        got, held, matrices = r.value
        assert got.pop("alive")[1] == 0 and r.value[0] is got
        assert matrices / 2 <= held < matrices / 2 + 4096  # each rank half of every module's tensors (and biases)
        for loss, want in one.items():
            torch.testing.assert_close(torch.tensor(got[loss]["losses"]), torch.tensor(want["losses"]), rtol=1e-6,
                                       atol=0)
            for a, b in zip(got[loss]["matrices"], want["matrices"], strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for loss in one:
        for a, b in zip(ranks[0].value[0][loss]["matrices"], ranks[1].value[0][loss]["matrices"], strict=True):
            assert torch.equal(a, b)


def test_accumulate_one_is_the_default_and_k_averages_k_batches():
    model, p, plan, (b0, b1) = _setup(n_batches=2)
    kw = dict(lr=0.5, progress=False)

    def learn(data, **more):
        res = rotfn.learn.rotations(model, p, plan, data, **kw, **more)
        return res.losses, _learned_matrices(res)

    def equal(x, y):
        return x[0] == y[0] and all(torch.equal(a, b) for a, b in zip(x[1], y[1], strict=True))

    assert equal(learn([b0, b1], steps=2), learn([b0, b1], steps=2, accumulate=1))
    # the mean of k equal gradients is that gradient, bit for bit
    assert equal(learn([b0, b0], steps=2, accumulate=2), learn([b0], steps=2))
    (mean,), _ = learn([b0, b1], steps=1, accumulate=2)
    ((first,), _), ((second,), _) = learn([b0], steps=1), learn([b1], steps=1)
    assert mean == pytest.approx((first + second) / 2, rel=1e-12)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ArgumentError, match="accumulate"):
            rotfn.learn.rotations(model, p, plan, [b0], steps=1, accumulate=bad, **kw)


def _fails_on_rank_one(step):
    """A loss that raises on rank 1 at ``step`` (a rank's local work failing mid-learning)."""
    calls = []

    def loss(outputs, batch):
        calls.append(1)
        if distributed.world()[0] == 1 and len(calls) > step:
            raise ArgumentError("loss: broken on purpose")
        return outputs.logits.float().pow(2).mean()

    return loss


def _failures():
    """Learning whose loss fails on rank 1 at its second step; calibration whose batch 1 (rank 1's) is bad,
    and calibration of params that differ on rank 1."""
    model, p, plan, batches = _setup()
    out = {}
    try:
        rotfn.learn.rotations(model, p, plan, batches, steps=3, lr=0.5, loss=_fails_on_rank_one(1), progress=False)
    except Exception as e:
        out["learn"] = (type(e).__name__, isinstance(e, rotfn.errors.DistributedError), str(e))
    bad = [batches[0], torch.full((2, 16), 10_000), batches[2]]  # ids past the vocabulary
    for sequential in (False, True):
        try:
            rotfn.calibrate(model, p, plan, bad, sequential=sequential, progress=False)
        except Exception as e:
            out["calibrate", sequential] = (type(e).__name__, isinstance(e, rotfn.errors.DistributedError), str(e))
    other = dict(p)
    if distributed.world()[0] == 1:
        other["model.layers.0.mlp.up_proj.weight"] = other["model.layers.0.mlp.up_proj.weight"] * 2
    try:
        rotfn.calibrate(model, other, plan, batches, progress=False)
    except Exception as e:
        out["params"] = str(e)
    return out


def test_a_rank_failing_in_its_work_makes_every_rank_raise():
    r0, r1 = run(_failures)
    assert r0.error is None and r1.error is None, (r0, r1)
    for key in ("learn", ("calibrate", False), ("calibrate", True)):
        name0, distributed0, text0 = r0.value[key]
        name1, distributed1, text1 = r1.value[key]
        assert distributed0 and "rank 1 of 2 failed" in text0, (key, r0.value[key])
        assert not distributed1, (key, r1.value[key])
    assert "broken on purpose" in r1.value["learn"][2]
    for r in (r0, r1):  # params that differ between the ranks: found before any work
        assert r.value["params"].startswith("calibrate: argument 'params': expected the same values on every rank")


def test_the_howto_script_runs_under_torchrun(tmp_path):
    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "howto" / "distributed.md").read_text()
    section = page[page.index("## Learn and calibrate from user code"):]
    script = tmp_path / "learn_and_calibrate.py"
    script.write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    assert "torchrun --nproc-per-node 2 learn_and_calibrate.py" in section
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("2 ranks: loss") == 1, proc.stdout  # rank 0 prints and writes
    assert "14 weights by GPTQ" in proc.stdout and "1024 tokens" in proc.stdout
    params, plan = rotfn.load(tmp_path / "llama-learned-gptq.safetensors")
    assert params.plan == plan and any("learned R1, R2" in n for n in plan.notes)


def test_torchrun_runs_rotfn_learn_sharded_on_two_ranks(tmp_path):
    """``torchrun --nproc-per-node 2 -m rotfn learn --shard``: the rotations of the same run without --shard, one
    summary and one plan file, from rank 0."""
    src = tmp_path / "src"
    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128, vocab=128)
    rt.tiny_model(cfg, dtype=torch.bfloat16, seed=2).save_pretrained(src)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    plans = {}
    for name, more in (("whole", []), ("sharded", ["--shard"])):
        out = tmp_path / f"{name}.safetensors"
        done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "rotfn", "learn", str(src),
                               "--r2", "hadamard", "--weights", "int4", "--acts", "int4", "--steps", "2",
                               "--seq-len", "16", "--batch-size", "1", "--batches", "2", "--quiet", "--out", str(out),
                               *more], capture_output=True, text=True, timeout=600, env=env, check=False)
        assert done.returncode == 0, done.stderr
        assert sum(line.startswith("learned R1, R2") for line in done.stdout.splitlines()) == 1, done.stdout
        plans[name] = rotfn.load(out)[1]
    for a, b in zip(plans["sharded"].rotations, plans["whole"].rotations, strict=True):
        torch.testing.assert_close(a.rotation.matrix(torch.float64), b.rotation.matrix(torch.float64), rtol=0,
                                   atol=1e-10)
