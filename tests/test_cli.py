"""The rotfn command: fold, inspect, report on tiny checkpoints; --help, usage errors (2) and failures (1)."""

import os
import subprocess
import sys

import pytest
import torch

import rotfn
from rotfn.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from rotfn.testing.models import make_config, tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    directory = tmp_path_factory.mktemp("src")
    model = tiny_model(make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, vocab=128, intermediate=128),
                       dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="60KB")
    return str(directory)


@pytest.mark.parametrize("argv", [["--help"], ["fold", "--help"], ["inspect", "--help"], ["report", "--help"],
                                  ["demo", "--help"]])
def test_help_exits_0_with_examples(argv, capsys):
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert "usage: rotfn" in out and "example" in out


@pytest.mark.parametrize("argv, text", [
    ([], "a command is required"),
    (["fold"], "required: SRC, DST"),
    (["fold", "a", "b", "--r1", "householder"], "invalid choice"),
    (["fold", "a", "b", "--block", "0"], "positive int"),
    (["fold", "a", "b", "--block", "x"], "expected a positive int, got 'x'"),
    (["fold", "a", "b", "--seed", "-1"], "expected an int >= 0, got '-1'"),
    (["report", "d", "--tokens", "2.5"], "expected a positive int, got '2.5'"),
    (["fold", "a", "b", "--plan", "per_linear", "--r2", "hadamard"], "per_linear takes its rotation from --r1"),
    (["fold", "a", "b", "--r1", "none"], "nothing to fold"),
    (["report", "d", "--format", "fp3"], "invalid choice"),
    (["inspect"], "required: FILE_OR_DIR"),
])
def test_usage_errors_exit_2_with_usage_on_stderr(argv, text, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "usage: rotfn" in err and text in err


def test_fold_then_inspect_shows_the_plan(src, tmp_path, capsys):
    dst = str(tmp_path / "out")
    argv = ["fold", src, dst, "--plan", "quarot", "--r1", "hadamard", "--r2", "hadamard", "--seed", "4", "--quiet",
            "--max-shard-size", "50KB"]
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert "tensors written" in out and "R1" in out and "R2" in out
    plan = rotfn.io._hf.read_rotfn_json(dst)
    assert plan.rotations[0].rotation in (rotfn.hadamard(64, seed=4), rotfn.hadamard(16, seed=5))
    assert {w.role for w in plan.rotations} == {"R1", "R2"}

    assert main(["inspect", dst]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Hugging Face checkpoint" in out and "model_type=llama" in out
    assert "model-00001-of-" in out and "bfloat16" in out and "tensors: 21 in" in out
    assert "plan (folded, rotfn.json)" in out and str(plan) in out
    assert main(["inspect", src]) == EXIT_OK
    assert "plan: none" in capsys.readouterr().out

    assert main(argv) == EXIT_FAILED  # a complete checkpoint is there
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == EXIT_OK


def test_per_linear_fold_with_weight_qdq(src, tmp_path, capsys):
    dst = str(tmp_path / "out")
    assert main(["fold", src, dst, "--plan", "per_linear", "--r1", "orthogonal", "--block", "32",
                 "--weights", "mxfp4", "--precision", "float32", "--quiet"]) == EXIT_OK
    plan = rotfn.io._hf.read_rotfn_json(dst)
    assert plan.method == "per_linear" and plan.weights == rotfn.mxfp4()
    assert plan.rotations[0].rotation == rotfn.orthogonal(64, seed=0, block=32)
    assert "online transforms" in capsys.readouterr().err  # per_linear rotates each input online


def test_inspect_a_rotfn_file(tmp_path, capsys):
    m = torch.nn.Linear(32, 4)
    plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(32, seed=2), acts=rotfn.mxfp4())
    path = str(tmp_path / "m.safetensors")
    rotfn.save(path, rotfn.fold(rotfn.params(m), plan), plan)
    assert main(["inspect", path]) == EXIT_OK
    out = capsys.readouterr().out
    assert "folded: True" in out and "params: 2 (tensor x2)" in out and str(plan) in out
    rotfn.save(path, {"w": rotfn.quantize(torch.randn(4, 64), rotfn.nvfp4()), "b": torch.zeros(4)})
    assert main(["inspect", path]) == EXIT_OK
    out = capsys.readouterr().out
    assert "QTensor nvfp4(global_scale='tensor') x1" in out and "plan: none" in out


def test_report_prints_the_table(src, capsys):
    assert main(["report", src, "--format", "mxfp4", "--block", "32", "--tokens", "8", "--random"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "random token ids (seed 0)" in out and "model.layers.1.mlp.down_proj" in out and "SQNR" in out
    assert "GPTQ" not in out


def test_report_gptq_through_the_executable(src):
    # 160 tokens: more rows than any linear's in-features (64, 128), so GPTQ's gain is not a null-space artefact
    done = subprocess.run([sys.executable, "-m", "rotfn", "report", src, "--format", "int4", "--tokens", "160",
                           "--random", "--gptq"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line.split() for line in lines if line.startswith("layer"))
    assert header[-6:] == ["y", "RTN", "y", "GPTQ", "GPTQ", "gain"]
    rows = [line.split() for line in lines if line.startswith("model.layers.")]
    assert len(rows) == 14 and all(float(row[-1]) >= 0 for row in rows), done.stdout
    assert "GPTQ over round to nearest: median output gain +" in done.stdout and "in-sample" in done.stdout
    assert "note:" not in done.stderr


def test_report_gptq_on_too_few_tokens_says_so(src, capsys):
    assert main(["report", src, "--format", "int4", "--tokens", "16", "--random", "--gptq"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "note: 16 tokens <= 128 in-features" in err and "--tokens 256" in err


@pytest.mark.parametrize("argv, text", [
    (["fold", "{missing}", "{tmp}/out"], "rotfn fold: fold_checkpoint: argument 'src_dir'"),
    (["inspect", "{missing}"], "rotfn inspect: inspect: argument 'path'"),
    (["inspect", "{tmp}/plain.safetensors"], "without rotfn metadata"),
    (["report", "{tmp}"], "rotfn report: report: argument 'dir'"),
])
def test_failures_exit_1_with_one_message(argv, text, tmp_path, capsys):
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    argv = [a.format(missing=str(tmp_path / "missing"), tmp=str(tmp_path)) for a in argv]
    assert main(argv) == EXIT_FAILED
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1


def test_report_refuses_a_folded_checkpoint(src, tmp_path, capsys):
    dst = str(tmp_path / "out")
    rotfn.fold_checkpoint(src, lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(64)), dst, progress=False)
    assert main(["report", dst]) == EXIT_FAILED
    assert "an unfolded checkpoint" in capsys.readouterr().err


def test_the_module_entry_point_runs_inspect(src):
    done = subprocess.run([sys.executable, "-m", "rotfn", "inspect", src], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and "tensors: 21" in done.stdout


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory):
    """A tiny Qwen2 saved from its config alone: no tokenizer files (transformers 5 then loads an empty tokenizer)."""
    directory = tmp_path_factory.mktemp("qwen2")
    tiny_model(make_config("qwen2", hidden=64, heads=4, kv_heads=2, layers=1, vocab=128, intermediate=128),
               dtype=torch.float32).save_pretrained(directory)
    assert not [f for f in os.listdir(directory) if "token" in f]
    return str(directory)


def test_report_on_a_checkpoint_without_tokenizer_files_runs_on_random_ids(no_tokenizer):
    done = subprocess.run([sys.executable, "-m", "rotfn", "report", no_tokenizer, "--tokens", "16"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "on 16 tokens of random token ids (seed 0)" in done.stdout and "model.layers.0.mlp.down_proj" in done.stdout
    assert "has no tokenizer that encodes text (no tokenizer files): random token ids instead; pass --random" \
        in done.stderr
    assert "reshape" not in done.stdout + done.stderr


def test_report_api_refuses_empty_inputs_by_name(no_tokenizer):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(no_tokenizer, local_files_only=True).eval()
    plan = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.hadamard(n, seed=0), acts=rotfn.mxfp4())
    empty = {"input_ids": torch.zeros(1, 0, dtype=torch.int64), "attention_mask": torch.zeros(1, 0, dtype=torch.int64)}
    for inputs in (empty, empty["input_ids"]):
        with pytest.raises(rotfn.errors.ArgumentError, match=r"report: argument 'inputs': expected at least one token"
                           r".*got a tensor of shape \(1, 0\).*torch\.randint"):
            rotfn.report(model, rotfn.params(model), plan, inputs)
    with pytest.raises(rotfn.errors.ArgumentError, match=r"learn.calibration: argument 'tokenizer'.*returned no ids"):
        rotfn.learn.calibration(lambda text: [], seq_len=8, batch_size=1, n_batches=1)
