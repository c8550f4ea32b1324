"""Notebook display: short reprs, escaped HTML tables, Report.to_pandas / Report.plot with their optional
dependencies present and missing, and the progress bar front end."""

import html
import sys

import matplotlib
import pytest
import torch

import rotfn
from rotfn._progress import progress_bar
from rotfn._table import html_table
from rotfn.errors import ArgumentError, MissingDependencyError, RotfnError

matplotlib.use("Agg")  # no display in tests; Report.plot never calls pyplot.show

NASTY = "<script>alert('x') & more</script>"
ROWS = (rotfn.LayerReport("layers.0.q_proj", 64, 10.0, 12.5, 20.0, 19.0),
        rotfn.LayerReport(NASTY, 32, None, None, 7.0, 9.0, 15.0, 16.0))
REPORT = rotfn.Report(ROWS, rotfn.mxfp4(), rotfn.nvfp4(), "Plan(quarot, ...)", notes=("a note with <b>",))


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()


def test_report_repr_is_one_short_line_with_the_summary():
    text = repr(REPORT)
    assert "\n" not in text and len(text) < 200
    assert text == ("Report(2 layers, weights=mxfp4(scale_rule='floor'), acts=nvfp4(global_scale='tensor'), "
                    "median gain: weights +2.50 dB, acts +0.50 dB)")
    assert "SQNR in dB" in str(REPORT)  # print(report) keeps the full table


def test_report_html_has_one_row_per_layer_and_escapes_every_text():
    page = REPORT._repr_html_()
    assert page.count("<tr>") == 1 + len(ROWS) and "<th>GPTQ gain</th>" in page
    assert NASTY not in page and "<b>" not in page and html.escape(NASTY) in page
    assert html.escape("note: a note with <b>") in page and html.escape(REPORT.summary_line()) in page
    assert "<td>+2.50</td>" in page and "<td>-</td>" in page


def test_html_table_escapes_header_cells_caption_and_footer():
    page = html_table(["<h>"], [["a&b"]], caption="<c>", footer=["<f>"])
    assert page == ("<table><caption>&lt;c&gt;</caption><thead><tr><th>&lt;h&gt;</th></tr></thead>"
                    "<tbody><tr><td>a&amp;b</td></tr></tbody></table><p>&lt;f&gt;</p>")


def test_report_to_pandas_one_row_per_layer_with_nan_for_missing_values():
    pytest.importorskip("pandas")
    df = REPORT.to_pandas()
    assert list(df.index) == [r.layer for r in ROWS]
    assert df.loc["layers.0.q_proj", "weight_gain"] == 2.5 and df["in_features"].tolist() == [64, 32]
    assert df.loc[NASTY, "weight_plain"] != df.loc[NASTY, "weight_plain"]  # NaN
    assert df.loc[NASTY, "gptq_gain"] == 1.0


@pytest.mark.parametrize(("call", "module", "pip"), [
    (lambda: REPORT.to_pandas(), "pandas", "pandas"),
    (lambda: REPORT.plot(), "matplotlib.figure", "matplotlib"),
], ids=["to_pandas", "plot"])
def test_a_missing_optional_dependency_is_a_typed_error_naming_pip_install(monkeypatch, call, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` sees when it is not installed
    with pytest.raises(MissingDependencyError, match=rf"argument '{module}': expected {module} installed.*"
                                                     rf"fix: pip install {pip}$") as info:
        call()
    assert isinstance(info.value, RotfnError) and isinstance(info.value, ImportError)


def test_report_plot_returns_a_figure_of_three_panels_without_touching_pyplot():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = REPORT.plot(title="two layers", label=lambda name: name[:6])
    assert plt.get_fignums() == before  # not registered with pyplot: nothing to close, no global state
    top, middle, bottom = fig.axes
    assert fig.get_suptitle() == "two layers" and bottom.get_ylabel() == "gain (dB)"
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["layers", "<scrip"]
    assert len(top.lines) == 2 and len(bottom.patches) == 4  # weight gains and act gains, one bar per layer each
    untouched = rotfn.Report(ROWS[1:], None, rotfn.nvfp4(), "Plan(...)").plot()
    assert "weights not quantized" in untouched.axes[0].texts[0].get_text()


@pytest.mark.parametrize("kwargs", [{"title": 3}, {"label": "short"}], ids=["title", "label"])
def test_report_plot_bad_arguments(kwargs):
    with pytest.raises(ArgumentError, match=r"Report.plot: argument '(title|label)'"):
        REPORT.plot(**kwargs)


def test_plan_and_folded_params_show_short_reprs_and_html_tables():
    m = _mlp()
    fmt = rotfn.mxfp4()
    plan = rotfn.plans.per_linear(m, rotation=lambda n: rotfn.hadamard(n, seed=0), weights=fmt, acts=fmt)
    page = plan._repr_html_()
    entries = len(plan.norms) + len(plan.rotations) + len(plan.online) + len(plan.quantized)
    assert page.count("<tr>") == 1 + entries == 1 + 6  # 2 weight rotations, 2 online, 2 weight qdq
    assert "<td>Rotation(hadamard, n=64, seed=0)</td>" in page and html.escape(repr(fmt)) in page
    folded = rotfn.fold(rotfn.params(m), plan)
    assert "\n" not in repr(folded) and repr(folded).startswith("FoldedParams(4 tensors, plan=Plan(")
    summary = folded._repr_html_()
    assert "<td>float32</td><td>yes</td><td>2</td><td>2304</td><td>9216</td>" in summary  # the two rounded weights
    assert "<td>float32</td><td>no</td><td>2</td><td>40</td><td>160</td>" in summary  # the biases


def test_spec_reprs_stay_constructor_forms():
    assert repr(rotfn.hadamard(64, seed=3)) == "Rotation(hadamard, n=64, seed=3)"
    assert repr(rotfn.intq(4, group=32)) == "intq(4, group=32)" and repr(rotfn.fp8("token")) == "fp8('token')"
    q = rotfn.quantize(torch.ones(2, 32), rotfn.mxfp4())
    assert repr(q).startswith("QTensor(mxfp4(scale_rule='floor'), shape=(2, 32)") and "\n" not in repr(q)


def test_learn_result_repr_is_short():
    plan = rotfn.plans.per_linear(_mlp(), rotation=rotfn.hadamard)
    result = rotfn.learn.LearnResult(plan, (2.0, 1.5, 1.25), (1e-15, 2e-15, 3e-15), ("per_linear 0",), "custom")
    assert repr(result) == ("LearnResult('custom', 3 steps, loss 2 -> 1.25, max |R R^T - I| 3.0e-15, "
                            f"1 learned matrices, plan={plan!r})")


def test_progress_bars_are_widgets_only_where_ipywidgets_imports(monkeypatch):
    from tqdm.auto import tqdm as auto
    from tqdm.std import tqdm as text

    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with progress_bar(range(2), disable=True) as bar:
        assert type(bar) is text
    monkeypatch.setattr("rotfn._progress._widgets_importable", lambda: True)
    with progress_bar(range(2), disable=True) as bar:
        assert type(bar) is auto  # outside Jupyter tqdm.auto is the text bar too: the choice is tqdm's then
