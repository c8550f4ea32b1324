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
                                  ["demo", "--help"], ["learn", "--help"], ["calibrate", "--help"]])
def test_help_exits_0_with_examples(argv, capsys):
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert "usage: rotfn" in out and "example" in out


def test_version_is_the_package_version():
    import importlib.metadata

    done = subprocess.run([sys.executable, "-m", "rotfn", "--version"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and done.stdout == f"rotfn {rotfn.__version__}\n"
    assert rotfn.__version__ == importlib.metadata.version("rotfn")


@pytest.fixture(scope="module")
def bad_files(src, tmp_path_factory):
    """A safetensors file without rotfn metadata, a rotfn file and a checkpoint shard cut short (as a failed copy
    leaves them), a text too short to calibrate on."""
    import shutil

    import safetensors.torch

    directory = tmp_path_factory.mktemp("bad")
    shutil.copytree(src, directory / "cut-ckpt")
    shard = directory / "cut-ckpt" / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-50])
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(directory / "plain.safetensors"))
    m = torch.nn.Linear(32, 4)
    plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(32, seed=2))
    rotfn.save(str(directory / "whole.safetensors"), rotfn.params(m), plan)
    data = (directory / "whole.safetensors").read_bytes()
    (directory / "cut.safetensors").write_bytes(data[:len(data) - 100])
    (directory / "text.txt").write_text("too short")
    moe = tiny_model(make_config("qwen3_moe", hidden=64, heads=4, kv_heads=2, layers=1, intermediate=64),
                     dtype=torch.bfloat16)
    moe.save_pretrained(directory / "moe")
    moe_plan = rotfn.plans.quarot(moe, r1=rotfn.hadamard(64, seed=0), weights=rotfn.nvfp4("pow2"),
                                  acts=rotfn.nvfp4("pow2"))  # activations at the fused experts: no export
    rotfn.calibration.save(directory / "moe-acts.safetensors", rotfn.calibrate(
        moe, rotfn.params(moe), moe_plan, [torch.randint(0, 64, (1, 8))], progress=False))
    small = torch.nn.Sequential(torch.nn.Linear(32, 4))
    linear_plan = rotfn.plans.per_linear(small, rotation=None, weights=rotfn.intq(4, group=16))
    rotfn.calibration.save(directory / "calibration.safetensors", rotfn.calibrate(
        small, rotfn.params(small), linear_plan, [torch.randn(64, 32)], progress=False))
    transformers = pytest.importorskip("transformers")  # GPT-2: Conv1D linears, no quarot adapter
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0,
                                                         eos_token_id=0)).save_pretrained(directory / "gpt2")
    return str(directory), len(data)


#: Bad command lines: (argv, exit code, the start of the one line on stderr). ``{src}``: a checkpoint,
#: ``{tmp}``: an empty directory, ``{bad}``: the files of ``bad_files``.
BAD_COMMAND_LINES = [
    ([], EXIT_USAGE, "rotfn: a command is required"),
    (["frobnicate"], EXIT_USAGE, "rotfn: COMMAND: invalid choice: 'frobnicate'"),
    (["--bogus"], EXIT_USAGE, "rotfn: unrecognized arguments: --bogus"),
    (["fold"], EXIT_USAGE, "rotfn fold: the following arguments are required: SRC, DST"),
    (["fold", "a", "b", "--r1", "householder"], EXIT_USAGE, "rotfn fold: --r1: invalid choice: 'householder'"),
    (["fold", "a", "b", "--block", "0"], EXIT_USAGE, "rotfn fold: --block: expected a positive int, got '0'"),
    (["fold", "a", "b", "--block", "x"], EXIT_USAGE, "rotfn fold: --block: expected a positive int, got 'x'"),
    (["fold", "a", "b", "--seed", "-1"], EXIT_USAGE, "rotfn fold: --seed: expected an int >= 0, got '-1'"),
    (["fold", "a", "b", "--bogus"], EXIT_USAGE, "rotfn fold: unrecognized arguments: --bogus"),
    (["fold", "a", "b", "--plan", "per_linear", "--r2", "hadamard"], EXIT_USAGE,
     "rotfn fold: --r2/--r3/--r4 are quarot's; per_linear takes its rotation from --r1"),
    (["fold", "a", "b", "--r1", "none"], EXIT_USAGE, "rotfn fold: nothing to fold"),
    (["fold", "a", "b", "--plan", "no-such-plan"], EXIT_USAGE,
     "rotfn fold: --plan: expected quarot, per_linear or a plan file"),
    (["fold", "{src}", "{tmp}/o", "--plan", "{bad}/whole.safetensors", "--seed", "3"], EXIT_USAGE,
     "rotfn fold: --seed: the plan file"),
    (["fold", "{src}", "{tmp}/o", "--plan", "{bad}/whole.safetensors", "--acts", "int4"], EXIT_USAGE,
     "rotfn fold: --acts: the plan file"),
    (["fold", "a", "b", "--acts", "nvfp4", "--export", "compressed-tensors"], EXIT_USAGE,
     "rotfn fold: --acts nvfp4: --export compressed-tensors serves activations whose scales the engine computes as it "
     "runs (mxfp4, int8, fp8); static scales come from a calibration: rotfn calibrate SRC --out FILE --export "
     "compressed-tensors with these options, then rotfn fold SRC DST --calibration FILE --export compressed-tensors"),
    (["fold", "{tmp}/missing", "{tmp}/o"], EXIT_FAILED, "rotfn fold: SRC: expected an existing Hugging Face"),
    (["fold", "{src}", "{src}"], EXIT_FAILED, "rotfn fold: DST: expected a directory other than SRC"),
    (["fold", "{src}", "{tmp}/o", "--max-shard-size", "5XB"], EXIT_USAGE, "rotfn fold: --max-shard-size: expected a size such as 5GB"),
    (["fold", "{src}", "{tmp}/o", "--plan", "{bad}/plain.safetensors"], EXIT_FAILED,
     "rotfn fold: --plan: expected a plan file (rotfn learn --out FILE, or rotfn.save with a plan), got "
     "'{bad}/plain.safetensors', a safetensors file without a rotfn plan (a checkpoint's weights?); fix: pass --plan "
     "quarot or --plan per_linear"),
    (["fold", "{src}", "{tmp}/o", "--plan", "{src}/config.json"], EXIT_FAILED,
     "rotfn fold: --plan: expected a plan file (rotfn learn --out FILE, or rotfn.save with a plan), got "
     "'{src}/config.json', which is not a safetensors file; fix: pass --plan quarot or --plan per_linear"),
    (["fold", "{src}", "{tmp}/o", "--plan", "{bad}/whole.safetensors"], EXIT_FAILED,
     "rotfn fold: --plan: expected a plan for SRC's model (LlamaForCausalLM, signature "),
    (["fold", "{bad}/gpt2", "{tmp}/o"], EXIT_FAILED, "rotfn fold: --plan: expected a model of a family quarot has an "
     "adapter for (llama, mistral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe), got GPT2LMHeadModel (model_type 'gpt2'); "
     "fix: rerun with --plan per_linear"),
    (["learn", "{bad}/gpt2", "--out", "{tmp}/p", "--weights", "int4"], EXIT_FAILED,
     "rotfn learn: --plan: expected a model of a family quarot has an adapter for"),
    (["inspect", "{src}/config.json"], EXIT_FAILED, "rotfn inspect: FILE_OR_DIR: expected a rotfn or safetensors file "
     "or a checkpoint directory, got '{src}/config.json', which is not a safetensors file; fix: pass the checkpoint "
     "directory instead: rotfn inspect {src}"),
    (["fold", "{src}", "{tmp}/o", "--plan", "{bad}/cut.safetensors"], EXIT_FAILED,
     "rotfn fold: --plan: expected {bad}/cut.safetensors: a complete safetensors file, got the file is truncated or "
     "not a safetensors file (header says {size} bytes, file has {cut})"),
    (["inspect"], EXIT_USAGE, "rotfn inspect: the following arguments are required: FILE_OR_DIR"),
    (["inspect", "{tmp}/missing"], EXIT_FAILED, "rotfn inspect: FILE_OR_DIR: expected a rotfn or safetensors file"),
    (["inspect", "{tmp}"], EXIT_FAILED, "rotfn inspect: FILE_OR_DIR: expected a Hugging Face checkpoint directory"),
    (["inspect", "{bad}/cut.safetensors"], EXIT_FAILED,
     "rotfn inspect: FILE_OR_DIR: expected {bad}/cut.safetensors: a complete safetensors file, got the file is "
     "truncated or not a safetensors file (header says {size} bytes, file has {cut})"),
    (["report", "d", "--tokens", "2.5"], EXIT_USAGE, "rotfn report: --tokens: expected a positive int, got '2.5'"),
    (["report", "d", "--format", "fp3"], EXIT_USAGE, "rotfn report: --format: invalid choice: 'fp3'"),
    (["report", "{tmp}"], EXIT_FAILED, "rotfn report: DIR: expected a Hugging Face checkpoint directory"),
    (["learn", "{src}"], EXIT_USAGE, "rotfn learn: the following arguments are required: --out"),
    (["learn", "{src}", "--out", "p", "--steps", "0"], EXIT_USAGE, "rotfn learn: --steps: expected a positive int"),
    (["learn", "{src}", "--out", "p", "--lr", "-1"], EXIT_USAGE, "rotfn learn: --lr: expected a number > 0, got '-1'"),
    (["learn", "{src}", "--out", "p"], EXIT_USAGE, "rotfn learn: nothing to learn against: give --weights"),
    (["learn", "{tmp}", "--out", "p", "--weights", "int4"], EXIT_FAILED, "rotfn learn: DIR: expected a Hugging Face"),
    (["learn", "{src}", "--out", "p", "--weights", "int4", "--text", "{tmp}/missing.txt"], EXIT_FAILED,
     "rotfn learn: --text: expected a readable UTF-8 text file"),
    (["learn", "{src}", "--out", "p", "--weights", "int4", "--text", "{bad}/text.txt"], EXIT_FAILED,
     "rotfn learn: --batches: expected at most 0 batches"),
    (["demo", "--rows", "0"], EXIT_USAGE, "rotfn demo: --rows: expected a positive int, got '0'"),
    (["fold", "{bad}/cut-ckpt", "{tmp}/o"], EXIT_FAILED, "rotfn fold: SRC: expected "
     "{bad}/cut-ckpt/model-00002-of-00004.safetensors: a complete safetensors file, got the file is truncated"),
    (["learn", "{src}", "--out", "{tmp}/no/such/dir/p", "--weights", "int4"], EXIT_FAILED,
     "rotfn learn: --out: expected a file path in an existing directory"),
    (["calibrate", "{src}"], EXIT_USAGE, "rotfn calibrate: the following arguments are required: --out"),
    (["calibrate", "{src}", "--out", "c"], EXIT_USAGE, "rotfn calibrate: nothing to round: give --weights"),
    (["calibrate", "{src}", "--out", "c", "--weights", "int4", "--acts", "int4", "--export", "compressed-tensors"],
     EXIT_USAGE, "rotfn calibrate: --acts int4: --export compressed-tensors serves activations quantized with scales "
     "the engine computes (mxfp4, int8, fp8) or static ones from this calibration (nvfp4)"),
    (["calibrate", "{src}", "--out", "c", "--weights", "int4", "--damp", "0"], EXIT_USAGE,
     "rotfn calibrate: --damp: expected a number > 0, got '0'"),
    (["calibrate", "{src}", "--out", "{tmp}/no/such/dir/c", "--weights", "int4"], EXIT_FAILED,
     "rotfn calibrate: --out: expected a file path in an existing directory"),
    (["calibrate", "{tmp}", "--out", "c", "--weights", "int4"], EXIT_FAILED,
     "rotfn calibrate: DIR: expected a Hugging Face"),
    (["fold", "{src}", "{tmp}/o", "--calibration", "{bad}/calibration.safetensors", "--r1", "hadamard"], EXIT_USAGE,
     "rotfn fold: --r1: the calibration file {bad}/calibration.safetensors holds the plan it was made for; drop them"),
    (["fold", "{src}", "{tmp}/o", "--calibration", "{bad}/calibration.safetensors"], EXIT_FAILED,
     "rotfn fold: --calibration: expected a plan for SRC's model (LlamaForCausalLM, signature "),
    (["fold", "{src}", "{tmp}/o", "--calibration", "{src}/config.json"], EXIT_FAILED,
     "rotfn fold: --calibration: expected a calibration file (rotfn calibrate --out FILE, or "
     "rotfn.calibration.save), got '{src}/config.json', which is not a safetensors file"),
    (["fold", "{src}", "{tmp}/o", "--calibration", "{bad}/whole.safetensors"], EXIT_FAILED,
     "rotfn fold: --calibration: expected {bad}/whole.safetensors: a calibration file (written by "
     "rotfn.calibration.save or rotfn calibrate), got a params file without a calibration section; fix: read it "
     "with rotfn.load"),
    (["fold", "{src}", "{tmp}/o", "--calibration", "{bad}/cut.safetensors"], EXIT_FAILED,
     "rotfn fold: --calibration: expected {bad}/cut.safetensors: a complete safetensors file, got the file is "
     "truncated"),
    (["calibrate", "{bad}/moe", "--weights", "nvfp4", "--acts", "nvfp4", "--export", "compressed-tensors", "--out",
      "{tmp}/c"], EXIT_FAILED, "rotfn calibrate: --plan: expected a plan whose online side is at linear inputs"),
    (["fold", "{bad}/moe", "{tmp}/o", "--calibration", "{bad}/moe-acts.safetensors", "--export", "compressed-tensors"],
     EXIT_FAILED, "rotfn fold: --calibration: expected a plan whose online side is at linear inputs"),
]


def _filled(argv, src, tmp, bad_files):
    bad, size = bad_files
    return [a.format(src=src, tmp=tmp, bad=bad, size=size, cut=size - 100) for a in argv]


@pytest.mark.parametrize("argv, code, start", BAD_COMMAND_LINES)
def test_bad_command_lines_fail_with_one_line_in_the_command_line_s_words(argv, code, start, src, tmp_path, bad_files,
                                                                           capsys):
    """``main`` is what the executable runs; a few of these rows go through it as well (below)."""
    assert main(_filled(argv, src, str(tmp_path), bad_files)) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(_filled([start], src, str(tmp_path), bad_files)[0]), captured.err
    assert "argument '" not in lines[0] and "rotfn: rotfn" not in lines[0] and captured.out == ""


def test_bad_command_lines_through_the_executable(src, tmp_path, bad_files):
    rows = [BAD_COMMAND_LINES[i] for i in (4, 15, 21, 23, 24, 28, 35)]
    runs = [subprocess.Popen([sys.executable, "-m", "rotfn", *_filled(argv, src, str(tmp_path), bad_files)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv, _, _ in rows]
    for (argv, code, start), run in zip(rows, runs, strict=True):
        out, err = run.communicate(timeout=300)
        assert run.returncode == code and "Traceback" not in err, (argv, err)
        assert err.splitlines() == [err.strip()] and err.startswith(_filled([start], src, str(tmp_path), bad_files)[0])


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
    captured = capsys.readouterr()
    assert "online transforms (per_linear x14) are not in the weights" in captured.err  # each input, online
    assert " tensors written in 1 shard, " in captured.out  # the default shard size: one shard, said in the singular
    transformers = pytest.importorskip("transformers")
    with pytest.raises(AttributeError, match="rotfn-load_hf-only"):  # a model class refuses it too
        transformers.LlamaForCausalLM.from_pretrained(dst)
    assert main(["inspect", dst]) == EXIT_OK  # the real model type and dtype, and why transformers refuses it
    out = capsys.readouterr().out
    assert "model_type=llama" in out and "dtype=bfloat16" in out and "rotfn-load_hf-only" not in out
    assert "  model.safetensors: 21 tensors, " in out and "tensors: 21 in 1 file, " in out
    assert "rotfn only: plain transformers refuses this directory" in out


def test_fold_with_acts_runs_as_the_in_memory_plan(src, tmp_path, capsys):
    """--acts quantizes linear inputs online: rotfn.load_hf + rotfn.call of the folded directory compute what
    rotfn.call of the same plan computes in memory, bit for bit."""
    transformers = pytest.importorskip("transformers")
    dst = str(tmp_path / "out")
    assert main(["fold", src, dst, "--plan", "per_linear", "--weights", "mxfp4", "--acts", "mxfp4", "--quiet"]) == EXIT_OK
    assert "acts=mxfp4(" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="auto").eval()
    plan = rotfn.plans.per_linear(model, rotation=lambda n: rotfn.hadamard(n, seed=0), weights=rotfn.mxfp4(),
                                  acts=rotfn.mxfp4())
    model2, params2, plan2 = rotfn.load_hf(dst)
    assert plan2 == plan and plan2.acts == rotfn.mxfp4()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = rotfn.call(model, rotfn.fold(rotfn.params(model), plan), plan, ids).logits
        torch.testing.assert_close(rotfn.call(model2, params2, plan2, ids).logits, expected, rtol=0, atol=0)


def test_fold_export_with_acts_writes_the_activation_scheme(src, tmp_path, capsys):
    import json

    dst = tmp_path / "out"
    assert main(["fold", src, str(dst), "--r4", "hadamard", "--weights", "int4", "--acts", "fp8", "--export",
                 "compressed-tensors", "--quiet"]) == EXIT_OK
    groups = json.loads((dst / "config.json").read_text())["quantization_config"]["config_groups"]
    acts = {(g["input_activations"]["type"], g["input_activations"]["strategy"], g["input_activations"]["dynamic"])
            for g in groups.values()}
    assert acts == {("float", "token", True)}, groups


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


_SLOW_SHARDS = '''
import time

import rotfn.io._shard as shard

_close = shard.ShardWriter.close


def close(self):  # test hook: every shard takes 0.5 s more, so a SIGINT lands in the middle of the fold
    time.sleep(0.5)
    _close(self)


shard.ShardWriter.close = close
'''


def _interrupted_fold(argv, dst, hooks) -> subprocess.CompletedProcess:
    """Run ``rotfn fold`` with slow shards (a ``sitecustomize`` on PYTHONPATH), SIGINT it once a shard is done."""
    import signal
    import time

    (hooks / "sitecustomize.py").write_text(_SLOW_SHARDS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), *sys.path])}
    run = subprocess.Popen([sys.executable, "-m", "rotfn", "fold", *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        progress = rotfn.io.read_progress(dst) if os.path.isdir(dst) else None
        if progress is not None and progress.tensors_done:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    return subprocess.CompletedProcess(run.args, run.returncode, out, err)


def test_ctrl_c_then_the_same_command_resumes_and_another_is_refused(src, tmp_path, capsys):
    dst = str(tmp_path / "out")
    argv = [src, dst, "--r2", "hadamard", "--max-shard-size", "20KB", "--quiet"]
    done = _interrupted_fold(argv, dst, tmp_path)
    assert done.returncode == 130, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    progress = rotfn.io.read_progress(dst)
    assert 0 < progress.tensors_done < progress.tensors == 21
    assert lines[0] == (f"rotfn fold: interrupted; {progress.tensors_done} of 21 tensors done; "
                        "rerun the same command to resume")

    assert main(["inspect", dst]) == EXIT_OK  # what is done and what is missing, the plan, the command to resume
    out = capsys.readouterr().out
    done_shards = sum(d for _, _, d in progress.shards)
    assert f"tensors: {progress.tensors_done} of 21 done; shards: {done_shards} of {len(progress.shards)} done" in out
    assert "model-00001-of-00012.safetensors: done" in out and "model-00012-of-00012.safetensors: pending" in out
    assert str(progress.plan) in out and "R2" in out
    assert f"resume: rotfn fold {' '.join(argv)}" in out

    before = sorted(os.listdir(dst))
    assert main(["fold", *argv, "--seed", "1"]) == EXIT_FAILED  # another plan: refused, nothing deleted
    err = capsys.readouterr().err
    assert err.startswith("rotfn fold: DST: expected the job of the interrupted fold") and "the plan differs" in err
    assert f"rerun `rotfn fold {' '.join(argv)}` to resume it, or pass --overwrite to start over" in err
    assert sorted(os.listdir(dst)) == before

    rerun = subprocess.run([sys.executable, "-m", "rotfn", "fold", *argv], capture_output=True, text=True, timeout=300,
                           check=False)
    assert rerun.returncode == 0 and "kept from an interrupted run" in rerun.stdout, rerun.stderr
    clean = str(tmp_path / "clean")
    assert main(["fold", src, clean, *argv[2:]]) == EXIT_OK
    assert sorted(os.listdir(dst)) == sorted(os.listdir(clean))
    for name in os.listdir(clean):
        with open(os.path.join(dst, name), "rb") as a, open(os.path.join(clean, name), "rb") as b:
            assert a.read() == b.read(), name


@pytest.mark.parametrize("command", ["inspect", "report", "learn", "demo"])
def test_ctrl_c_in_any_command_is_one_line_and_130(command, src, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(rotfn.cli, f"_run_{command}", interrupted)
    argv = {"inspect": [src], "report": [src], "learn": [src, "--out", "p"], "demo": []}[command]
    assert main([command, *argv]) == 130
    assert capsys.readouterr().err == f"rotfn {command}: interrupted\n"


def test_inspect_a_plain_safetensors_shard_lists_its_tensors(src, capsys):
    shard = os.path.join(src, "model-00001-of-00004.safetensors")
    assert main(["inspect", shard]) == EXIT_OK
    out = capsys.readouterr().out
    entries, _, _ = rotfn.io.read_header(shard)
    assert out.startswith(f"safetensors file {shard} (not a rotfn file): {len(entries)} tensors, ")
    for e in entries:
        assert any(line.split()[:3] == [e.name, "bfloat16", str(list(e.shape)).replace(" ", "")]
                   for line in out.replace(", ", ",").splitlines()), e.name


def test_learn_then_fold_its_plan(src, tmp_path):
    plan_file = str(tmp_path / "learned.safetensors")
    learn = subprocess.run([sys.executable, "-m", "rotfn", "learn", src, "--plan", "per_linear", "--r1", "hadamard",
                            "--block", "32", "--weights", "int4", "--acts", "int4", "--steps", "2", "--seq-len", "16",
                            "--batch-size", "1", "--batches", "1", "--out", plan_file],
                           capture_output=True, text=True, timeout=300, check=False)
    assert learn.returncode == 0, learn.stderr
    summary = learn.stdout.splitlines()
    assert len(summary) == 1 and summary[0].startswith("learned per_linear (14 matrices) in 2 steps, lr 0.5: "
                                                        "next-token cross-entropy on the calibration batches ")
    assert f"wrote {plan_file}" in summary[0] and "learn.rotations: 100%" in learn.stderr  # the progress bar
    _, plan = rotfn.load(plan_file)
    assert plan.method == "per_linear" and "learned per_linear" in plan.notes[-1]
    assert plan.online[0].rotation.kind == "matrix"

    dst = str(tmp_path / "folded")
    fold = subprocess.run([sys.executable, "-m", "rotfn", "fold", src, dst, "--plan", plan_file, "--quiet"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert fold.returncode == 0, fold.stderr
    assert rotfn.io.read_rotfn_json(dst) == plan


def _stored(directory) -> dict:
    import safetensors.torch

    return {k: t for name in sorted(os.listdir(directory)) if name.endswith(".safetensors")
            for k, t in safetensors.torch.load_file(os.path.join(directory, name)).items()}


def test_calibrate_then_fold_and_export_with_its_gptq_weights(src, tmp_path):
    """rotfn calibrate writes the GPTQ calibration of the plan --export builds (NVFP4 weights and activations, static
    input scales); rotfn fold --calibration writes exactly what the Python recipe writes with that calibration:
    the in-memory export of fold(params, plan, weights_by=calibration), and, without --export, its folded weights."""
    import transformers

    cal = str(tmp_path / "cal.safetensors")
    plan_options = ["--r1", "hadamard", "--r2", "hadamard", "--r4", "hadamard", "--weights", "nvfp4", "--acts", "nvfp4"]
    run = subprocess.run([sys.executable, "-m", "rotfn", "calibrate", src, *plan_options, "--export",
                          "compressed-tensors", "--sequential", "--seq-len", "16", "--batch-size", "2", "--batches",
                          "2", "--out", cal], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout == (f"calibrated 14 weights by GPTQ on 64 tokens; wrote {cal} (fold it: rotfn fold {src} DST "
                          f"--calibration {cal} --export compressed-tensors)\n")
    calibration = rotfn.calibration.load(cal)
    plan = calibration.plan
    assert plan.weights == rotfn.nvfp4("pow2") and calibration.settings["sequential"]
    exported, folded = str(tmp_path / "exported"), str(tmp_path / "folded")
    for dst, extra in ((exported, ["--export", "compressed-tensors"]), (folded, [])):
        run = subprocess.run([sys.executable, "-m", "rotfn", "fold", src, dst, "--calibration", cal, "--quiet", *extra],
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="auto").eval()
    params = rotfn.params(model)
    want = rotfn.fold(params, plan, weights_by=calibration)
    rotfn.export_compressed(model, want, plan, tmp_path / "memory", calibration=calibration)
    memory, streamed = _stored(tmp_path / "memory"), _stored(exported)
    assert sorted(memory) == sorted(streamed) and any(k.endswith("input_global_scale") for k in streamed)
    for key, t in memory.items():
        assert torch.equal(t.view(torch.uint8), streamed[key].view(torch.uint8)), key
    stored, rtn = _stored(folded), rotfn.fold(params, plan)
    for key in plan.quantized:
        assert torch.equal(stored[key], want[key]) and not torch.equal(stored[key], rtn[key]), key
    assert main(["inspect", cal]) == EXIT_OK


def test_calibrate_says_which_experts_no_token_reached(bad_files, tmp_path, capsys):
    """A MoE calibrated on two tokens: most experts see none; the summary says how many went to nearest, the file
    lists them."""
    out = str(tmp_path / "u.safetensors")
    argv = ["calibrate", os.path.join(bad_files[0], "moe"), "--r1", "hadamard", "--weights", "int4", "--seq-len", "2",
            "--batch-size", "1", "--batches", "1", "--out", out, "--quiet"]
    assert main(argv) == EXIT_OK
    unrouted = rotfn.calibration.load(out).unrouted
    count = sum(len(e) for e in unrouted.values())
    assert count and f"({count} experts no calibration token reached: to nearest" in capsys.readouterr().out


def test_learn_on_a_checkpoint_without_tokenizer_files_uses_bytes(no_tokenizer, tmp_path):
    """transformers 5's empty tokenizer encodes nothing: learn takes the text's bytes as ids (as for no tokenizer)."""
    out = tmp_path / "learned.safetensors"
    done = subprocess.run([sys.executable, "-m", "rotfn", "learn", no_tokenizer, "--r1", "hadamard", "--weights", "int4",
                           "--steps", "1", "--seq-len", "16", "--batch-size", "1", "--batches", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "bytes (mod 128) as ids: DIR has no tokenizer" in done.stderr and out.exists()


_STALL_TORCH = '''
import sys
import time


class StallTorch:  # test hook: `import torch` says so on stderr and waits, so a SIGINT lands while rotfn loads
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            print("test hook: importing torch", file=sys.stderr, flush=True)
            time.sleep(300)


sys.meta_path.insert(0, StallTorch())
'''

#: What pip writes as the ``rotfn`` console script (``[project.scripts]``): it imports the package first.
_CONSOLE_SCRIPT = '''import re
import sys
from rotfn.cli import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
'''


def _interrupted_while_importing(argv, hooks) -> subprocess.CompletedProcess:
    """Run ``argv`` with a hook that stalls ``import torch``, SIGINT it once the hook says it is there."""
    import signal

    (hooks / "sitecustomize.py").write_text(_STALL_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), *sys.path])}
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    marker = run.stderr.readline()  # blocks until the hook prints (or the process ends: then the asserts say why)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    return subprocess.CompletedProcess(run.args, run.returncode, out, marker + err)


@pytest.mark.parametrize("entry", ["python -m rotfn", "console script"])
def test_ctrl_c_while_rotfn_imports_is_one_line_and_130(entry, src, tmp_path):
    script = tmp_path / "bin" / "rotfn"
    script.parent.mkdir()
    script.write_text(_CONSOLE_SCRIPT)
    command = [sys.executable, "-m", "rotfn"] if entry == "python -m rotfn" else [sys.executable, str(script)]
    done = _interrupted_while_importing([*command, "inspect", src], tmp_path)
    assert done.stderr.splitlines() == ["test hook: importing torch", "rotfn: interrupted"], done.stderr
    assert done.returncode == 130 and done.stdout == ""


def test_ctrl_c_while_a_program_imports_rotfn_stays_a_keyboard_interrupt(tmp_path):
    """Only the command turns the interrupt into an exit: a program importing rotfn sees its KeyboardInterrupt."""
    program = "try:\n    import rotfn\nexcept KeyboardInterrupt:\n    print('caught')\n"
    done = _interrupted_while_importing([sys.executable, "-c", program], tmp_path)
    assert done.returncode == 0 and done.stdout == "caught\n", done.stderr


@pytest.mark.parametrize("argv, code", [(["inspect", "{src}"], 141), (["demo", "--rows", "8"], 141),
                                        (["--help"], 0)])  # argparse itself ignores a failed write of its help
def test_a_closed_stdout_ends_the_command_quietly(argv, code, src):
    """``rotfn inspect DIR | head -1``: once the reader has gone, exit 141 (as for SIGPIPE) without a traceback or a
    message; here the pipe's read end is closed before the command starts, so every write finds it gone."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "rotfn", *(a.format(src=src) for a in argv)], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    finally:
        os.close(write)
    assert done.returncode == code and done.stderr == "", done.stderr


_CTRL_C_AT_EXIT = '''
import atexit
import os
import signal
import time


def ctrl_c():  # test hook: a Ctrl-C once the command has returned, while the interpreter exits
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)


atexit.register(ctrl_c)
'''


def test_ctrl_c_as_the_command_finishes_keeps_its_result(src, tmp_path):
    """The command is done: a Ctrl-C in the interpreter's exit neither prints a traceback nor changes the exit code."""
    (tmp_path / "sitecustomize.py").write_text(_CTRL_C_AT_EXIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "rotfn", "inspect", src], capture_output=True, text=True, timeout=300,
                          check=False, env=env)
    assert done.returncode == 0 and done.stderr == "" and "tensors: 21" in done.stdout, done.stderr
