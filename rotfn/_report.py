"""report: per-layer quantization error of a plan's formats, with and without the plan's rotations.

For every ``nn.Linear`` the plan quantizes, :func:`report` measures the
signal-to-quantization-noise ratio ``SQNR = 10 log10(sum x^2 / sum (x - qdq(x))^2)``
in dB (higher is better) of

* the weight ``W`` under the plan's weight format: ``W`` as it is ("none") and
  ``W'`` as :func:`rotfn.fold` leaves it without qdq ("rotated": ``W @ R``, ``R.T @ W``,
  norm scales fused), and
* the linear's input ``x`` under the plan's activation format: ``x`` in the original
  model ("none") and ``x'`` as it reaches the linear in the rotated, unquantized model
  ("rotated": after the folded rotations and the online ``x @ R``).

A rotation is orthogonal, so ``|x' - qdq(x')| = |x'R^T - qdq(x')R^T|``: the two columns
measure the same error in two bases and can be compared directly. Rotation spreads
outlier channels over a whole group (a gain), but it can also mix an outlier back into
groups that small-group formats such as NVFP4 had isolated (a loss).

With ``gptq=True`` it also measures the error the rounding of ``W'`` makes in the linear's
*output* ``x' W'^T`` on those inputs, for round to nearest and for :func:`rotfn.gptq`:
``10 log10(tr(W' H W'^T) / tr((W' - Q) H (W' - Q)^T))`` with ``H = X'^T X' / N``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import statistics
from collections.abc import Callable, Mapping

import torch
from torch import nn

from rotfn import calibration
from rotfn._table import format_table, html_table
from rotfn.errors import ArgumentError, FoldError, MissingDependencyError, PlanError, RotfnError, message
from rotfn.functional import dequantize, qdq
from rotfn.metrics import energy_ratio_db, sqnr_db
from rotfn.model import Site, call_as
from rotfn.plans import Plan, check_keys, check_plan, describe, fold, folded_with, require_plan
from rotfn.specs import Format
from rotfn.transforms import check_params

__all__ = ["report", "Report", "LayerReport", "HURT_DB"]

#: A layer counts as hurt by rotation when its SQNR drops by more than this (dB): smaller changes are sampling noise.
HURT_DB = 0.1


def _energies(x: torch.Tensor, fmt: Format) -> tuple[float, float]:
    """``(sum x^2, sum (x - qdq(x, fmt))^2)`` in float64."""
    x64 = x.detach().double()
    return x64.square().sum().item(), (x64 - qdq(x.detach(), fmt).double()).square().sum().item()


def _output_energies(w: torch.Tensor, h: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
    """``(tr(W H W^T), tr((W - Q) H (W - Q)^T))`` in float64: the energies of ``x @ W.T`` and of its error."""
    w64 = w.detach().double()
    e = w64 - q.double()
    return ((w64 @ h) * w64).sum().item(), ((e @ h) * e).sum().item()


def _gain(plain: float | None, rotated: float | None) -> float | None:
    if plain is None or rotated is None or math.isinf(plain) or math.isinf(rotated):
        return None
    return rotated - plain


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One quantized linear: SQNR (dB) of its weight and of its input, without and with the plan's rotations.

    Attributes:
        layer: the linear's module name.
        in_features: its input size.
        weight_plain, weight_rotated: SQNR of ``qdq(W, weights)`` / ``qdq(W', weights)``, or None when the
            plan does not quantize this weight.
        act_plain, act_rotated: SQNR of ``qdq(x, acts)`` / ``qdq(x', acts)`` over every call of the linear on
            the inputs, or None when the plan does not quantize this input.
        out_rtn, out_gptq: SQNR of the output ``x' W'^T`` with ``W'`` rounded to ``weights`` by round to nearest
            (``qdq(W', weights)``) / by :func:`rotfn.gptq` fitted on the same inputs, or None when the report
            was made without ``gptq=True``, the plan does not quantize this weight or the linear did not run.
    """

    layer: str
    in_features: int
    weight_plain: float | None
    weight_rotated: float | None
    act_plain: float | None
    act_rotated: float | None
    out_rtn: float | None = None
    out_gptq: float | None = None

    @property
    def weight_gain(self) -> float | None:
        """``weight_rotated - weight_plain`` in dB (positive: rotation helps), or None."""
        return _gain(self.weight_plain, self.weight_rotated)

    @property
    def act_gain(self) -> float | None:
        """``act_rotated - act_plain`` in dB (positive: rotation helps), or None."""
        return _gain(self.act_plain, self.act_rotated)

    @property
    def gptq_gain(self) -> float | None:
        """``out_gptq - out_rtn`` in dB (positive: GPTQ helps, in-sample), or None."""
        return _gain(self.out_rtn, self.out_gptq)

    def to_dict(self) -> dict:
        """The row as a plain dict, gains included."""
        return {**dataclasses.asdict(self), "weight_gain": self.weight_gain, "act_gain": self.act_gain,
                "gptq_gain": self.gptq_gain}


def _cell(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def _optional(fn: str, module: str, pip: str):
    """``import module``, or a :class:`MissingDependencyError` that names the ``pip install`` bringing it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(message(fn, module, f"{module} installed (an optional dependency of rotfn)",
                                             f"ImportError: {err}", f"pip install {pip}")) from err


_COLUMNS = {"weight": (("W none", "weight_plain"), ("W rot", "weight_rotated"), ("W gain", "weight_gain")),
            "act": (("x none", "act_plain"), ("x rot", "act_rotated"), ("x gain", "act_gain"))}
_LABELS = {"weight": "weights", "act": "acts"}
_GPTQ_COLUMNS = (("y RTN", "out_rtn"), ("y GPTQ", "out_gptq"), ("GPTQ gain", "gptq_gain"))


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`rotfn.report` measured: one :class:`LayerReport` per quantized linear, in model order.

    ``print(report)`` shows an aligned table and a summary; :meth:`to_dict` gives plain data.

    Attributes:
        rows: the per-layer measurements.
        weights: the plan's weight format, or None.
        acts: the plan's activation format, or None.
        plan: ``repr`` of the plan measured.
        notes: facts about the measurement (sites not covered, layers that did not run).
    """

    rows: tuple[LayerReport, ...]
    weights: Format | None
    acts: Format | None
    plan: str
    notes: tuple[str, ...] = ()

    def summary(self) -> dict:
        """Median gains (dB), the layers where rotation lowers the SQNR, and the median gain of GPTQ over round to nearest.

        Returns:
            ``{"layers", "median_weight_gain", "median_act_gain", "weight_hurt", "act_hurt", "median_gptq_gain"}``;
            a median is None when nothing was measured (``median_gptq_gain`` without ``gptq=True``);
            ``*_hurt`` list the layers whose gain is below ``-HURT_DB``.
        """
        out: dict = {"layers": len(self.rows)}
        for side in ("weight", "act"):
            gains = [(r.layer, g) for r in self.rows if (g := getattr(r, f"{side}_gain")) is not None]
            out[f"median_{side}_gain"] = statistics.median(g for _, g in gains) if gains else None
            out[f"{side}_hurt"] = [name for name, g in gains if g < -HURT_DB]
        gptq_gains = [g for r in self.rows if (g := r.gptq_gain) is not None]
        out["median_gptq_gain"] = statistics.median(gptq_gains) if gptq_gains else None
        return out

    def summary_line(self) -> str:
        """The summary in one line, e.g. ``"12 layers; median gain from rotation: weights +0.41 dB, acts +1.93 dB; ..."``.

        With GPTQ measured it ends with ``"GPTQ over round to nearest: median output gain +2.10 dB (in-sample)"``.
        """
        s = self.summary()
        parts = [f"{s['layers']} layers; median gain from rotation: {self._gains(s)}"]
        for side, label in _LABELS.items():
            hurt = s[f"{side}_hurt"]
            if hurt:
                shown = ", ".join(hurt[:3]) + (f", ... ({len(hurt)} in all)" if len(hurt) > 3 else "")
                parts.append(f"rotation hurts {label} (< -{HURT_DB} dB) on {len(hurt)}: {shown}")
        if not s["weight_hurt"] and not s["act_hurt"]:
            parts.append(f"rotation hurts no layer by more than {HURT_DB} dB")
        if s["median_gptq_gain"] is not None:
            parts.append(f"GPTQ over round to nearest: median output gain {_cell(s['median_gptq_gain'], True)} dB "
                         "(in-sample)")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        """Plain data: formats as their ``to_dict``, rows as dicts, the summary and the notes."""
        return {
            "weights": None if self.weights is None else self.weights.to_dict(),
            "acts": None if self.acts is None else self.acts.to_dict(),
            "plan": self.plan,
            "rows": [r.to_dict() for r in self.rows],
            "summary": self.summary(),
            "notes": list(self.notes),
        }

    def _sides(self) -> tuple[str, ...]:
        """The sides ("weight", "act") some row measured: a plan without an activation format has no act columns."""
        return tuple(side for side in _COLUMNS if any(getattr(r, f"{side}_plain") is not None for r in self.rows))

    def _gains(self, s: dict) -> str:
        """``"weights +0.41 dB, acts +1.93 dB"``: the median gain of each side measured."""
        return ", ".join(f"{_LABELS[side]} {_cell(s[f'median_{side}_gain'], True)} dB" for side in self._sides()) or "-"

    def _table(self) -> tuple[list[str], list[list[object]], list[str]]:
        """The table's header, cells and title lines, shared by the text and the HTML views."""
        columns = [column for side in self._sides() for column in _COLUMNS[side]]
        formats = ", ".join(f"{_LABELS[side]} {fmt!r}" for side, fmt in (("weight", self.weights), ("act", self.acts))
                            if fmt is not None)
        title = [f"SQNR in dB (higher is better): {formats}; plan {self.plan}"]
        if any(r.out_rtn is not None for r in self.rows):
            columns += _GPTQ_COLUMNS
            title.append("y: the output x' W'^T with W' rounded to nearest / by GPTQ fitted on these inputs (in-sample)")
        header = ["layer", "in", *(name for name, _ in columns)]
        cells = [[r.layer, r.in_features, *(_cell(getattr(r, field), field.endswith("gain")) for _, field in columns)]
                 for r in self.rows]
        return header, cells, title

    def __str__(self) -> str:
        header, cells, title = self._table()
        lines = [*title, format_table(header, cells), self.summary_line()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        s = self.summary()
        return (f"Report({s['layers']} layers, weights={self.weights!r}, acts={self.acts!r}, median gain: "
                f"{self._gains(s)})")

    def _repr_html_(self) -> str:
        """The table as HTML, for Jupyter: one row per layer, the summary and the notes under it."""
        header, cells, title = self._table()
        return html_table(header, cells, caption="; ".join(title),
                          footer=[self.summary_line(), *(f"note: {n}" for n in self.notes)])

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame``: one row per layer, the columns of :meth:`LayerReport.to_dict`.

        Missing values (a side the plan does not quantize) are NaN.

        Returns:
            A ``pandas.DataFrame`` indexed by layer name.

        Raises:
            MissingDependencyError: pandas is not installed (``pip install pandas``).

        Example:
            >>> import torch, rotfn
            >>> m = torch.nn.Sequential(torch.nn.Linear(64, 8)).eval()
            >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(64, seed=0), weights=rotfn.mxfp4())
            >>> df = rotfn.report(m, rotfn.params(m), plan, torch.randn(4, 64)).to_pandas()
            >>> list(df.index), bool(df["act_plain"].isna().all())
            (['0'], True)
        """
        pandas = _optional("Report.to_pandas", "pandas", "pandas")
        frame = pandas.DataFrame([r.to_dict() for r in self.rows],
                                 columns=[f.name for f in dataclasses.fields(LayerReport)]
                                 + ["weight_gain", "act_gain", "gptq_gain"])
        return frame.set_index("layer").astype({c: float for c in frame.columns if c not in ("layer", "in_features")})

    def plot(self, *, title: str | None = None, label: Callable[[str], str] | None = None):
        """Three panels per layer: weight SQNR and input SQNR, without and with rotation, and the gains (dB).

        The figure is a plain ``matplotlib.figure.Figure`` (not registered with pyplot, so nothing global
        changes); in Jupyter it shows as the cell's output, elsewhere save it with ``fig.savefig(path)``.

        Args:
            title: the figure's title; default the formats and the plan.
            label: maps a layer name to its tick label (e.g. a short form); default the name itself.

        Returns:
            The ``matplotlib.figure.Figure``; its ``axes`` are the three panels.

        Raises:
            MissingDependencyError: matplotlib is not installed (``pip install matplotlib``).
            ArgumentError: ``title`` not a str or None, ``label`` not callable.

        Example:
            >>> import torch, rotfn
            >>> m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).eval()
            >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(32, seed=0), weights=rotfn.mxfp4(),
            ...                               acts=rotfn.mxfp4(), where="1")
            >>> fig = rotfn.report(m, rotfn.params(m), plan, torch.randn(4, 64)).plot(title="one layer")
            >>> len(fig.axes), fig.axes[2].get_ylabel()
            (3, 'gain (dB)')
        """
        fn = "Report.plot"
        if title is not None and not isinstance(title, str):
            raise ArgumentError(message(fn, "title", "a str or None", type(title).__name__, "pass title='...'"))
        if label is not None and not callable(label):
            raise ArgumentError(message(fn, "label", "a function layer name -> tick label, or None",
                                        type(label).__name__, "pass e.g. label=lambda name: name.split('.')[-1]"))
        figure = _optional(fn, "matplotlib.figure", "matplotlib")
        idx = range(len(self.rows))
        fig = figure.Figure(figsize=(max(8, 0.32 * len(self.rows) + 3), 8.5))
        axes = fig.subplots(3, 1, sharex=True)
        for ax, side, what in ((axes[0], "weight", f"weights {self.weights!r}"),
                               (axes[1], "act", f"activations {self.acts!r}")):
            plain = [getattr(r, f"{side}_plain") for r in self.rows]
            rotated = [getattr(r, f"{side}_rotated") for r in self.rows]
            if all(v is None for v in plain):
                ax.text(0.5, 0.5, f"{side}s not quantized by this plan", transform=ax.transAxes, ha="center")
            else:
                ax.plot(idx, [math.nan if v is None else v for v in plain], "o-", color="C0", label="no rotation",
                        markersize=4)
                ax.plot(idx, [math.nan if v is None else v for v in rotated], "s-", color="C1", label="rotated",
                        markersize=4)
                ax.legend(loc="lower right", fontsize=8)
            ax.set(ylabel="SQNR (dB)", title=what)
            ax.grid(alpha=0.3)
        width, bars = 0.4, False
        for k, side in enumerate(("weight", "act")):
            gains = [getattr(r, f"{side}_gain") for r in self.rows]
            if any(g is not None for g in gains):
                axes[2].bar([i + (k - 0.5) * width for i in idx], [0 if g is None else g for g in gains], width,
                            color=f"C{k + 2}", label=f"{side} gain")
                bars = True
        axes[2].axhline(0, color="k", linewidth=0.8)
        axes[2].set(ylabel="gain (dB)", title="rotated - no rotation (positive: rotation helps)")
        if bars:
            axes[2].legend(fontsize=8)
        axes[2].grid(alpha=0.3)
        axes[2].set_xticks(list(idx), [(label or str)(r.layer) for r in self.rows], rotation=90, fontsize=7)
        fig.suptitle(title if title is not None else f"weights {self.weights!r}, acts {self.acts!r}")
        fig.tight_layout()
        return fig


# ----- measuring ---------------------------------------------------------------------
def _out_in(plan: Plan, key: str, params) -> torch.Tensor:
    """The weight ``key`` as ``[out, in]``: a ``Conv1D``'s (stored ``[in, out]``) transposed, quantized along ``in``."""
    return params[key].mT if key in plan.transposed else params[key]


def _linear_name(key: str) -> str:
    return key.removesuffix("weight").removesuffix(".")


class _Inputs:
    """A site function that adds up one linear's inputs over a run: their energies under ``fmt``, and ``X^T X``.

    Passed to :func:`rotfn.model.call_with` (as ``call_as``), it runs after the plan's online functions at the same
    input, so it sees ``x @ R`` as the linear does. It returns None (the input is kept).

    Attributes:
        fmt: the activation format whose ``(sum x^2, sum (x - qdq(x))^2)`` is added to ``signal`` and ``noise``,
            or None.
        hessian: whether to add ``x^T x`` of the ``[rows, in]`` input rows to ``xtx`` (``[in, in]`` float64).
        calls: how many times the linear ran.
    """

    def __init__(self, fmt: Format | None, hessian: bool):
        self.fmt, self.hessian = fmt, hessian
        self.signal = self.noise = 0.0
        self.calls = self.rows = 0
        self.xtx: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:
        self.calls += 1
        if self.fmt is not None:
            signal, noise = _energies(x, self.fmt)
            self.signal += signal
            self.noise += noise
        if self.hessian:
            rows = x.detach().reshape(-1, x.shape[-1]).double()
            self.xtx = rows.T @ rows if self.xtx is None else self.xtx.addmm_(rows.T, rows)
            self.rows += rows.shape[0]


def _run(model: nn.Module, params, plan: Plan | None, inputs, recorders: Mapping[str, _Inputs]) -> None:
    sites = {Site(name): record for name, record in recorders.items()}
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            call_as("report", model, params, plan, sites, kwargs=inputs)
        else:
            call_as("report", model, params, plan, sites, inputs if isinstance(inputs, tuple) else (inputs,))


def _check_inputs(fn: str, inputs) -> None:
    ok = isinstance(inputs, (torch.Tensor, tuple)) or (
        isinstance(inputs, Mapping) and all(isinstance(k, str) for k in inputs))
    if not ok:
        raise ArgumentError(message(fn, "inputs", "a tensor (the first argument), a tuple of positional arguments or "
                                    "a dict of keyword arguments", type(inputs).__name__,
                                    "pass e.g. tokenizer(texts, return_tensors='pt') or input_ids"))
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, tuple) else (inputs,)
    empty = [tuple(v.shape) for v in values if isinstance(v, torch.Tensor) and v.numel() == 0]
    if empty:  # e.g. the empty tokenizer transformers 5 loads from a checkpoint saved without tokenizer files
        raise ArgumentError(message(fn, "inputs", "at least one token (non-empty tensors)",
                                    f"a tensor of shape {empty[0]}",
                                    "a tokenizer that returns no ids has no vocabulary (the directory has no "
                                    "tokenizer files): load the model's own tokenizer, or pass random ids, "
                                    "torch.randint(0, model.config.vocab_size, (1, 32))"))


def report(model: nn.Module, params: Mapping[str, torch.Tensor], plan: Plan, inputs, *, gptq: bool = False) -> Report:
    r"""Measure, per quantized linear, the SQNR of the plan's weight and activation formats with and without its rotations.

    Runs the model twice through :func:`rotfn.call` on ``inputs``: with ``params`` and no
    plan, and with ``params`` folded by the plan's rotations alone (no qdq) and its online
    rotations. Linear inputs are recorded at their :class:`rotfn.model.Site` for each run and quantized with
    the plan's activation format; weights are quantized with its weight format before and
    after the fold. Both runs compute the same function, so the "rotated" columns say what
    the plan's rotations do to the quantization error of the same activations.

    With ``gptq=True`` the rotated run also collects, for every quantized weight ``W'`` (folded,
    ``[out, in]``), the Hessian of its linear's unquantized inputs ``X'`` (``[N, in]``, every call's rows),
    and measures the SQNR of the linear's output ``X' W'^T`` when ``W'`` is rounded to the plan's
    weight format ``Q``, by round to nearest (``Q = qdq(W')``) and by :func:`rotfn.gptq` with its
    default settings (``Q = gptq(W', H)``):

    .. math:: H = X'^\top X' / N, \qquad
              \mathrm{SQNR} = 10 \log_{10} \frac{\operatorname{tr}(W' H W'^\top)}
              {\operatorname{tr}\big((W' - Q)\, H\, (W' - Q)^\top\big)}.

    GPTQ is fitted and measured on the same inputs (in-sample), so its column is an upper bound on
    what GPTQ calibrated on other data gives on these; with fewer input rows ``N`` than ``in``,
    ``H`` is singular and GPTQ can move its error into the null space of these very inputs, so
    the bound is loose (give more input rows than in-features). Each Hessian is ``[in, in]`` float64 and all
    of them are held during the rotated run: ``8 * sum(in^2)`` bytes over the quantized linears
    (about 2.5 GB per decoder layer of an 8B Llama); measure a large model on a ``where=`` subset.

    Args:
        model: the ``nn.Module`` the plan was built for, in eval mode (no dropout); not modified.
        params: ``rotfn.params(model)`` (unfolded); not modified.
        plan: a :class:`rotfn.plans.Plan` with a weight format, an activation format or both.
        inputs: a tensor ``model(inputs)``, a tuple ``model(*inputs)`` or a dict ``model(**inputs)``.
        gptq: also measure the output SQNR of each quantized weight rounded to nearest and by GPTQ
            (``LayerReport.out_rtn`` / ``out_gptq``, three more columns in the table).

    Returns:
        A frozen :class:`Report` (``print`` it, or read ``rows`` / ``to_dict()``).

    Raises:
        ArgumentError: model not an ``nn.Module`` or in training mode; inputs of the wrong type, empty (no
            token: e.g. from an empty tokenizer) or rejected by the model; ``gptq`` not a bool.
            DTypeError / SelectionError: params not
            ``rotfn.params(model)``.
        PlanError: plan not a Plan, built for another model, or quantizing no linear.
        FoldError: params already folded.
        ShapeError: with ``gptq=True``, what :func:`rotfn.gptq` raises (in-features not divisible by the
            format's group).

    Example:
        >>> import torch, rotfn
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
        >>> fmt = rotfn.mxfp4()
        >>> plan = rotfn.plans.per_linear(m, rotation=lambda n: rotfn.hadamard(n, seed=0), weights=fmt, acts=fmt)
        >>> r = rotfn.report(m, rotfn.params(m), plan, torch.randn(16, 64))
        >>> [row.layer for row in r.rows], r.rows[0].act_plain > 10, r.rows[0].out_gptq
        (['0', '2'], True, None)
        >>> g = rotfn.report(m, rotfn.params(m), plan, torch.randn(64, 64), gptq=True)
        >>> all(row.out_gptq >= row.out_rtn for row in g.rows)
        True
    """
    fn = "report"
    info = describe(model, fn=fn)
    if model.training:
        raise ArgumentError(message(fn, "model", "a model in eval mode (dropout off, so both runs see the same "
                                    "activations)", "a model in training mode", "call model.eval() first"))
    check_params(fn, params)
    require_plan(fn, plan)
    check_plan(fn, info, plan)
    prior = folded_with(params)
    if prior is not None:
        raise FoldError(message(fn, "params", "unfolded params (report folds the plan's rotations itself)",
                                f"params folded with {prior!r}", "pass rotfn.params(model)"))
    check_keys(fn, info, params)
    _check_inputs(fn, inputs)
    if not isinstance(gptq, bool):
        raise ArgumentError(message(fn, "gptq", "True or False", repr(gptq),
                                    "pass gptq=True for the output SQNR of round to nearest and GPTQ"))

    linears = dict(info.linears)
    act_sites = {o.site: o.fmt for o in plan.online if o.kind == "linear" and o.fmt is not None and o.site in linears}
    weight_keys = {_linear_name(k): k for k in plan.quantized if _linear_name(k) in linears and k.endswith("weight")}
    if not act_sites and not weight_keys:
        raise PlanError(message(fn, "plan", "a plan that quantizes linears (weights= or acts= a format)",
                                repr(plan), "build it with e.g. rotfn.plans.per_linear(model, rotation=..., "
                                "weights=rotfn.mxfp4(), acts=rotfn.mxfp4())"))
    notes = []
    other = sorted({o.site for o in plan.online if o.fmt is not None and o.site not in act_sites}
                   | {k for k in plan.quantized if _linear_name(k) not in weight_keys})
    if other:
        notes.append(f"quantized sites that are not nn.Linear are not reported: {other[:4]}")
    if gptq and not weight_keys:
        notes.append("gptq=True, but the plan quantizes no linear's weight: no output SQNR")

    rotations = plan.without_formats()
    rotated_params = fold(params, rotations) if rotations.needs_fold else params
    gptq_sites = set(weight_keys) if gptq else set()
    plain = {name: _Inputs(fmt, hessian=False) for name, fmt in act_sites.items()}
    rotated = {name: _Inputs(act_sites.get(name), hessian=name in gptq_sites)
               for name in act_sites.keys() | gptq_sites}
    try:
        _run(model, params, None, inputs, plain)
    except RotfnError:
        raise
    except Exception as err:  # the model rejected the inputs: say so in rotfn's terms
        raise ArgumentError(message(fn, "inputs", f"inputs {info.cls} accepts",
                                    f"{type(err).__name__}: {str(err)[:200]}",
                                    "pass what model(...) takes, as a tensor, tuple or dict")) from err
    _run(model, rotated_params, rotations, inputs, rotated)

    idle = [name for name, _ in info.linears if name in rotated and rotated[name].calls == 0]
    if idle:
        notes.append(f"linears that did not run on these inputs (no SQNR measured on their inputs): {idle[:4]}")
    rows = []
    for name, n in info.linears:
        if name not in act_sites and name not in weight_keys:
            continue
        w_plain = w_rot = a_plain = a_rot = out_rtn = out_gptq = None
        if name in weight_keys:
            key = weight_keys[name]
            w_plain = sqnr_db(w := _out_in(plan, key, params), qdq(w, plan.weights))
            w_rot = sqnr_db(w := _out_in(plan, key, rotated_params), qdq(w, plan.weights))
        if name in act_sites and plain[name].calls:
            a_plain = energy_ratio_db(plain[name].signal, plain[name].noise)
            a_rot = energy_ratio_db(rotated[name].signal, rotated[name].noise)
        if name in gptq_sites and rotated[name].rows:
            w, h = _out_in(plan, weight_keys[name], rotated_params), rotated[name].xtx / rotated[name].rows
            out_rtn = energy_ratio_db(*_output_energies(w, h, qdq(w, plan.weights)))
            rounded = dequantize(calibration.gptq(w, h, plan.weights), w.dtype)
            out_gptq = energy_ratio_db(*_output_energies(w, h, rounded))
        rows.append(LayerReport(name, n, w_plain, w_rot, a_plain, a_rot, out_rtn, out_gptq))
    acts = plan.acts if plan.acts is not None else next(iter(act_sites.values()), None)
    return Report(tuple(rows), plan.weights if weight_keys else None, acts, repr(plan), tuple(notes))
