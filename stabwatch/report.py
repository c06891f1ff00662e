"""``stabwatch report`` and ``stabwatch diagnose``: reading runs back from JSONL.

* `write_report` / ``stabwatch report RUN.jsonl [RUN2.jsonl ...] -o report.html`` — one self-contained
  HTML page comparing runs. It opens with one coloured verdict line per run (healthy / warnings /
  unstable, the first critical step, the most likely cause, the alert counts of
  `stabwatch.diagnosis.analyse`), then a summary table and the plots: the loss, the global gradient norm,
  a per-layer gradient-norm heat map per run (layers × steps, log10; all runs on one colour scale; layers
  in natural order, ``1, 3, 11``, labelled ``path · type`` when `Run.layer_types` is known; exactly-zero
  (dead), non-finite and missing cells each in a colour of their own), singular values, spectral radii,
  the Lyapunov exponent, the update ratio, and an alert timeline (one row per run and rule, a bar to the
  recovery). Every plot spans the same steps with its axes at the same place on the page; legends sit
  outside the data; an alert is marked, in its run's colour, on the plot of the metric that fired; a
  value ≤ 0 on a log axis is marked on the axis floor, not dropped; a section without data says which
  option records it. Then the alert tables (each alert with the step it recovered at) and each run's
  diagnosis. Plots are PNGs drawn by matplotlib through `stabwatch.plotting` (bare figures on the Agg
  canvas: no pyplot, the user's backend and rcParams untouched; imported only when a report is made:
  ``pip install stabwatch[plot]``) and embedded as base64 ``data:`` URIs, so the file has no outside
  references. Every piece of text from the runs is HTML-escaped, and ``$`` is escaped in figures (a module
  name is never read as math).
* ``stabwatch diagnose RUN.jsonl`` — `stabwatch.diagnosis.diagnose` on a run file.

Both take ``--rerun-rules`` to evaluate the default alert rules on the records afresh (for runs recorded
with alerts off, or to see what today's rules make of an old run).
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import logging
import math
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabwatch.errors import StabwatchError
from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics
from stabwatch.numeric import fmt
from stabwatch.plotting import figure_data_uri, new_figure, require_matplotlib

__all__ = ["Run", "add_parser", "describe_layers", "load_run", "natural_sorted", "render_report", "write_report"]

log = logging.getLogger("stabwatch")

_SEVERITY_COLOR = {Severity.CRITICAL: "#c62828", Severity.WARNING: "#ef6c00", Severity.INFO: "#1565c0"}
_MAX_COLUMNS = 1500  # heat-map columns; longer runs are binned
_MAX_ALERT_ROWS = 300


@dataclass
class Run:
    """One run read back: its display name, records and alerts, and optionally ``layer_types``
    (``{module path: "Linear 64→128"}``, e.g. from `describe_layers`) to label its layers in the report."""

    name: str
    records: list[StabilityMetrics]
    alerts: list[Alert] = field(default_factory=list)
    path: str = ""
    layer_types: dict[str, str] = field(default_factory=dict)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """Steps and values of a record field (records without it left out)."""
        steps, values = [], []
        for r in self.records:
            v = getattr(r, metric)
            if v is not None:
                steps.append(r.step)
                values.append(float(v))
        return steps, values

    def layer_series(self, metric: str) -> dict[str, tuple[list[int], list[float]]]:
        """``{layer: (steps, values)}`` of a per-layer field, layers in order of first appearance."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for r in self.records:
            for layer, vals in r.layers.items():
                if metric in vals:
                    steps, values = out.setdefault(layer, ([], []))
                    steps.append(r.step)
                    values.append(float(vals[metric]))
        return out


def load_run(path: str | Path, name: str | None = None, rerun_rules: bool = False) -> Run:
    """Read a JSONL run file written by `stabwatch.sinks.JsonlSink`.

    Args:
        path: the file.
        name: display name (default: the file name without ``.jsonl``).
        rerun_rules: evaluate the default alert rules on the records and use those alerts instead of
            the stored ones.

    Raises:
        StabwatchError: the file is missing, empty or not a stabwatch run (with the line number).
    """
    from stabwatch.sinks.jsonl import read_jsonl

    p = Path(path)
    if not p.is_file():
        raise StabwatchError(f"{str(p)!r}: no such run file (expected a JSONL file written by JsonlSink)")
    try:
        records = list(read_jsonl(p))
    except UnicodeDecodeError as exc:
        raise StabwatchError(f"{str(p)!r} is not a text JSONL file ({exc.reason})") from exc
    if not records:
        raise StabwatchError(f"{str(p)!r} holds no records")
    records.sort(key=lambda r: r.step)
    if rerun_rules:
        from stabwatch.alerts import AlertEngine, default_rules

        engine = AlertEngine(default_rules(), log_alerts=False)
        for r in records:
            r.alerts = []
        alerts = []
        for r in records:
            fired = engine.evaluate(r)
            r.alerts = list(fired)
            alerts.extend(fired)
    else:
        alerts = [a for r in records for a in r.alerts]
    return Run(
        name=name or (p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name),
        records=records,
        alerts=alerts,
        path=str(p),
    )


# --- plotting ----------------------------------------------------------------------------------------
_WHAT = "stabwatch report"
_STYLES = ["-", "--", ":", "-."]
# run colours: none of them red/orange/blue-violet-ish enough to read as a severity colour
_RUN_COLORS = ["#1f77b4", "#7b3294", "#2ca02c", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22", "#e377c2"]
# heat-map cells that carry no value, each in a colour of its own (none of them in viridis)
_DEAD_COLOR, _NONFINITE_COLOR, _MISSING_COLOR = "#ff33cc", "#d62728", "#d9d9d9"
_SEV_MARKER = {Severity.CRITICAL: "v", Severity.WARNING: "v", Severity.INFO: "."}

# every figure has the same width and the same left/right margins, so the step axes of all plots line up
# on the page; legends and colour bars live in the right margin, outside the data
_FIG_W, _RIGHT_IN, _TOP_IN, _BOTTOM_IN = 11.4, 2.55, 0.45, 0.55
_LEGEND_WRAP = 34  # characters per legend line

# where the data of a section comes from, and how to turn it on (shown when a section has no data)
_ENABLE = {
    "loss": "pass the loss to the monitor: mon.step(loss=loss)",
    "grad_norm": 'the "grad" family, in every preset: Monitor(every={"grad": 1})',
    "layers": 'per-layer values of the "grad" family: Monitor(per_layer=True) (the default)',
    "singular": (
        'gradient singular values: Monitor(every={"grad_sv": N}); weight spectral norms: '
        'Monitor(every={"weight": N}) (both every 100 steps in the "default" preset, off in "cheap")'
    ),
    "spectral_radius": (
        "recurrent weights only (nn.RNN/LSTM/GRU, parameters named weight_hh or recurrent): "
        'Monitor(every={"weight": N}); '
        'every square weight: Monitor(collectors=[stabwatch.collectors.WeightCollector(every=N, radius="square")])'
    ),
    "lyapunov": "a shadow replica of training: Monitor(shadow=stabwatch.Shadow(loss_fn)) (see docs/shadow.md)",
    "update_ratio": 'pass the optimizer: Monitor(model, optimizer, every={"update": N})',
}


def _t(text: Any) -> str:
    """Text for matplotlib, shown as typed: every ``$`` escaped, so no name is read as math."""
    return str(text).replace("$", r"\$")


def _label(text: str) -> str:
    """A legend label: escaped (`_t`) and wrapped to fit the right margin."""
    return _t(textwrap.fill(text, _LEGEND_WRAP, subsequent_indent="  "))


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a module path with numbers compared as numbers: ``1 < 3 < 11 < 13``, ``a.2 < a.10``."""
    return tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in re.split(r"(\d+)", name) if p)


def natural_sorted(names: Iterable[str]) -> list[str]:
    """``names`` sorted with digit runs compared as numbers (``["1", "3", "11", "13"]``)."""
    return sorted(names, key=_natural_key)


def describe_layers(model: Any) -> dict[str, str]:
    """``{module path: "Linear 64→128"}`` for every module that holds parameters of its own, to label a
    report's layers with their type (`Run.layer_types`)."""
    from torch import nn

    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if not name or not any(True for _ in m.parameters(recurse=False)):
            continue
        kind = type(m).__name__
        if isinstance(m, nn.Linear):
            kind += f" {m.in_features}→{m.out_features}"
        elif isinstance(
            m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        ):
            k = "×".join(str(s) for s in m.kernel_size)
            kind += f" {m.in_channels}→{m.out_channels} k{k}"
        elif isinstance(m, nn.RNNBase):
            kind += f" {m.input_size}→{m.hidden_size}"
        elif isinstance(m, nn.Embedding):
            kind += f" {m.num_embeddings}×{m.embedding_dim}"
        out[name] = kind
    return out


def _layer_label(run: Run, layer: str) -> str:
    kind = run.layer_types.get(layer)
    if kind is None:  # e.g. "rnn.weight_hh_l0.h": the longest module path it starts with
        owners = [p for p in run.layer_types if layer.startswith(p + ".")]
        kind = run.layer_types[max(owners, key=len)] if owners else None
    return f"{layer} · {kind}" if kind else layer


@dataclass
class _Frame:
    """What every figure of one report shares: the step range and the left margin."""

    lo: float
    hi: float
    left_in: float

    @property
    def xlim(self) -> tuple[float, float]:
        pad = 0.5 + 0.01 * (self.hi - self.lo)
        return self.lo - pad, self.hi + pad


def _frame(runs: Sequence[Run]) -> _Frame:
    steps = [r.step for run in runs for r in run.records]
    labels = [_layer_label(run, layer) for run in runs for layer in run.layer_series("grad_norm")]
    labels += [f"{run.name} · {a.rule}" for run in runs for a in run.alerts]
    longest = max((len(s) for s in labels), default=0)
    return _Frame(min(steps), max(steps), min(3.6, max(0.9, 0.25 + 0.05 * longest)))


def _axes(frame: _Frame, height: float) -> tuple[Any, Any]:
    fig, ax = new_figure((_FIG_W, height), _WHAT)
    fig.subplots_adjust(
        left=frame.left_in / _FIG_W,
        right=1 - _RIGHT_IN / _FIG_W,
        bottom=_BOTTOM_IN / height,
        top=1 - _TOP_IN / height,
    )
    return fig, ax


def _finish(fig: Any, ax: Any, frame: _Frame, title: str, legend: bool = True) -> str:
    ax.set_xlim(*frame.xlim)
    ax.set_xlabel("step")
    ax.set_title(_t(title), fontsize=10)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return figure_data_uri(fig, tight=False)


def _finite(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    pairs = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _fired(run: Run, metrics: Sequence[str], per_layer: bool) -> list[Alert]:
    """The run's alerts (no recoveries) on one of ``metrics`` (or a value derived from it, such as
    ``grad_norm/layer-median``), global (``per_layer=False``) or per layer."""
    return [
        a
        for a in run.alerts
        if a.reason is not AlertReason.RECOVERED
        and a.metric.split("/")[0] in metrics
        and (a.layer is not None) == per_layer
    ]


def _mark_alerts(ax: Any, runs: Sequence[Run], metrics: Sequence[str], per_layer: bool = False) -> None:
    """The alerts on ``metrics``, in their run's colour: a line at the step and a marker on the top edge
    (filled ▼ critical, hollow ▽ warning, · info), one per run, step and severity, labelled with the run."""
    from matplotlib.transforms import blended_transform_factory

    top = blended_transform_factory(ax.transData, ax.transAxes)
    for i, run in enumerate(runs):
        color = _RUN_COLORS[i % len(_RUN_COLORS)]
        by_sev: dict[Severity, set[int]] = {}
        for a in _fired(run, metrics, per_layer):
            by_sev.setdefault(a.severity, set()).add(a.step)
        for sev in (Severity.CRITICAL, Severity.WARNING, Severity.INFO):
            steps = sorted(by_sev.get(sev, ()))
            if not steps:
                continue
            for s in steps:
                ax.axvline(s, color=color, alpha=0.45, lw=1, ls="-" if sev is Severity.CRITICAL else ":", zorder=0)
            ax.plot(
                steps,
                [1.0] * len(steps),
                _SEV_MARKER[sev],
                transform=top,
                clip_on=False,
                ms=8,
                color=color,
                mfc=color if sev is Severity.CRITICAL else "white",
                label=_label(f"{run.name}: {sev.value} alert"),
                zorder=5,
            )


def _line_plot(
    runs: Sequence[Run],
    frame: _Frame,
    metrics: Sequence[str],
    title: str,
    ylabel: str,
    *,
    hline: float | None = None,
    logy: bool | None = None,
) -> str | None:
    """One line per run and metric; alerts on ``metrics`` marked. On a log axis, values ≤ 0 cannot be drawn:
    they are marked on the axis floor (▲ at the bottom edge) and named in the legend, never dropped."""
    from matplotlib.transforms import blended_transform_factory

    series = [
        (i, j, run, metric, *_finite(*run.series(metric)))
        for i, run in enumerate(runs)
        for j, metric in enumerate(metrics)
    ]
    series = [s for s in series if s[4]]
    if not series:
        return None
    log = logy if logy is not None else all(v > 0 for s in series for v in s[5])
    fig, ax = _axes(frame, 3.4)
    floor = blended_transform_factory(ax.transData, ax.transAxes)
    for i, j, run, metric, steps, values in series:
        color = _RUN_COLORS[i % len(_RUN_COLORS)]
        label = run.name if len(metrics) == 1 else f"{run.name}: {metric}"
        if log:
            pos = [(s, v) for s, v in zip(steps, values) if v > 0]
            low = [s for s, v in zip(steps, values) if v <= 0]
            if low:
                what = "0" if all(v == 0 for v in values if v <= 0) else "≤ 0"
                ax.plot(
                    low,
                    [0.0] * len(low),
                    "^",
                    transform=floor,
                    clip_on=False,
                    ms=6,
                    color=color,
                    mfc="white",
                    label=_label(f"{label} = {what} (△ on the axis floor, {len(low)}×)"),
                    zorder=5,
                )
            steps, values = [p[0] for p in pos], [p[1] for p in pos]
        ax.plot(
            steps,
            values,
            _STYLES[j % len(_STYLES)],
            marker="." if len(steps) < 40 else None,
            ms=3,
            color=color,
            lw=1.1,
            label=_label(label),
        )
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    if log:
        ax.set_yscale("log")
    _mark_alerts(ax, runs, metrics)
    ax.set_ylabel(_t(ylabel))
    ax.grid(alpha=0.3)
    return _finish(fig, ax, frame, title)


def _layer_plot(runs: Sequence[Run], frame: _Frame, metric: str, title: str, hline: float | None) -> str | None:
    drawn = False
    fig, ax = _axes(frame, 3.4)
    for i, run in enumerate(runs):
        per_layer = run.layer_series(metric)
        for j, layer in enumerate(natural_sorted(per_layer)):
            steps, values = _finite(*per_layer[layer])
            if not steps:
                continue
            drawn = True
            ax.plot(
                steps,
                values,
                _STYLES[j % len(_STYLES)],
                marker=".",
                ms=3,
                color=_RUN_COLORS[i % len(_RUN_COLORS)],
                lw=1,
                label=_label(f"{run.name}: {_layer_label(run, layer)}"),
            )
    if not drawn:
        return None
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    _mark_alerts(ax, runs, [metric], per_layer=True)
    ax.grid(alpha=0.3)
    return _finish(fig, ax, frame, title)


@dataclass
class _Grid:
    """One run's per-layer gradient norms as drawn: ``log10`` values (NaN where a cell holds none) and
    what each empty cell is (``_DEAD``: exactly 0, ``_NONFINITE``, ``_MISSING``)."""

    layers: list[str]
    edges: Any  # column edges, in steps
    values: Any  # [layers, columns] log10 grad norm, NaN where not a positive finite value
    kind: Any  # [layers, columns] int: _VALUE, _DEAD, _NONFINITE, _MISSING


_VALUE, _DEAD, _NONFINITE, _MISSING = 0, 1, 2, 3


def _grid(run: Run) -> _Grid | None:
    import numpy as np

    per_layer = run.layer_series("grad_norm")
    if not per_layer:
        return None
    layers = natural_sorted(per_layer)
    steps = sorted({s for st, _ in per_layer.values() for s in st})
    col = {s: i for i, s in enumerate(steps)}
    values = np.full((len(layers), len(steps)), np.nan)
    kind = np.full((len(layers), len(steps)), _MISSING)
    for row, layer in enumerate(layers):
        for s, v in zip(*per_layer[layer]):
            c = col[s]
            if not math.isfinite(v):
                kind[row, c] = _NONFINITE
            elif v == 0:
                kind[row, c] = _DEAD
            elif v > 0:
                kind[row, c], values[row, c] = _VALUE, math.log10(v)
    at = np.asarray(steps, dtype=float)
    if len(at) == 1:
        edges = np.array([at[0] - 0.5, at[0] + 0.5])
    else:
        mid = (at[1:] + at[:-1]) / 2
        edges = np.concatenate([[at[0] - (mid[0] - at[0])], mid, [at[-1] + (at[-1] - mid[-1])]])
    if len(steps) > _MAX_COLUMNS:  # bin columns: the mean of the values; an empty bin keeps its worst kind
        cut = np.linspace(0, len(steps), _MAX_COLUMNS + 1).astype(int)
        binned_v = np.full((len(layers), _MAX_COLUMNS), np.nan)
        binned_k = np.full((len(layers), _MAX_COLUMNS), _MISSING)
        for b, (a, z) in enumerate(itertools.pairwise(cut)):
            block_v, block_k = values[:, a:z], kind[:, a:z]
            has = (block_k == _VALUE).any(axis=1)
            sums = np.where(block_k == _VALUE, block_v, 0.0).sum(axis=1)
            counts = (block_k == _VALUE).sum(axis=1)
            binned_v[has, b] = sums[has] / counts[has]
            binned_k[has, b] = _VALUE
            for k in (_MISSING, _DEAD, _NONFINITE):  # worst last: non-finite wins
                hit = ~has & (block_k == k).any(axis=1)
                binned_k[hit, b] = k
        values, kind, edges = binned_v, binned_k, edges[cut]
    return _Grid(layers, edges, values, kind)


def _heatmap(run: Run, grid: _Grid, frame: _Frame, clim: tuple[float, float] | None) -> str:
    import matplotlib
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(grid.layers)
    height = max(2.2, 0.95 + 0.26 * n)
    fig, ax = _axes(frame, height)
    y_edges = np.arange(n + 1) - 0.5
    # the cells without a value, each kind its own colour; the values drawn over them (shared scale)
    kinds = ListedColormap([_DEAD_COLOR, _NONFINITE_COLOR, _MISSING_COLOR])
    empty = np.ma.masked_where(grid.kind == _VALUE, grid.kind - 1)
    ax.pcolormesh(grid.edges, y_edges, empty, cmap=kinds, vmin=-0.5, vmax=2.5, shading="flat")
    vmin, vmax = clim if clim is not None else (None, None)
    mesh = ax.pcolormesh(
        grid.edges,
        y_edges,
        np.ma.masked_invalid(grid.values),
        cmap=matplotlib.colormaps["viridis"],
        vmin=vmin,
        vmax=vmax,
        shading="flat",
    )
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels([_t(_layer_label(run, layer)) for layer in grid.layers], fontsize=7)
    row = {layer: i for i, layer in enumerate(grid.layers)}
    handles: list[Any] = [
        Patch(color=_DEAD_COLOR, label="dead: exactly 0"),
        Patch(color=_NONFINITE_COLOR, label="non-finite"),
        Patch(color=_MISSING_COLOR, label="missing"),
    ]
    for sev in (Severity.CRITICAL, Severity.WARNING, Severity.INFO):
        pts = [(a.step, row[a.layer]) for a in _fired(run, ["grad_norm"], True) if a.severity is sev and a.layer in row]
        if pts:
            ax.scatter(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="v",
                s=46,
                c=_SEVERITY_COLOR[sev],
                edgecolors="black",
                linewidths=0.7,
                zorder=5,
            )
            handles.append(
                Line2D(
                    [], [], marker="v", ls="none", color=_SEVERITY_COLOR[sev], mec="black", label=f"{sev.value} alert"
                )
            )
    pos = ax.get_position()
    cax = fig.add_axes((pos.x1 + 0.12 / _FIG_W, pos.y0, 0.14 / _FIG_W, pos.height))
    fig.colorbar(mesh, cax=cax, label="log10 ‖g‖", extend="both")
    axes_w = _FIG_W - frame.left_in - _RIGHT_IN
    ax.legend(
        handles=handles,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1 + 0.95 / axes_w, 1.0),
        borderaxespad=0.0,
        title="cells / markers",
        title_fontsize=7,
    )
    return _finish(fig, ax, frame, f"{run.name}: gradient norm per layer (log10, one colour scale for all runs)", False)


def _heatmaps(runs: Sequence[Run], frame: _Frame) -> list[tuple[Run, str | None]]:
    """Every run's heat map on one colour scale: the min and max of all runs' values."""
    import numpy as np

    grids = [(run, _grid(run)) for run in runs]
    vals = [g.values[np.isfinite(g.values)] for _, g in grids if g is not None]
    every = np.concatenate(vals) if vals else np.array([])
    clim = None
    if every.size:  # 0.5th..99.5th percentile of all runs' values: one outlier does not flatten the rest
        lo, hi = (float(x) for x in np.percentile(every, [0.5, 99.5]))
        clim = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)
    return [(run, _heatmap(run, g, frame, clim) if g is not None else None) for run, g in grids]


def _episodes(run: Run) -> list[tuple[Alert, int | None]]:
    """Each alert (no recoveries) with the step of the recovery that closed it, if one did: the next
    recovery of the same rule and layer."""
    open_: dict[tuple[str, str | None], list[int]] = {}
    out: list[tuple[Alert, int | None]] = []
    for a in sorted(run.alerts, key=lambda a: a.step):
        key = (a.rule, a.layer)
        if a.reason is AlertReason.RECOVERED:
            for idx in open_.pop(key, []):
                out[idx] = (out[idx][0], a.step)
        else:
            open_.setdefault(key, []).append(len(out))
            out.append((a, None))
    return out


_MAX_TIMELINE_ROWS = 40


def _timeline(runs: Sequence[Run], frame: _Frame) -> str | None:
    """One row per run and rule: a marker at each alert (colour = severity), a bar to its recovery."""
    from matplotlib.lines import Line2D

    rows: list[tuple[int, str]] = []
    spans: dict[tuple[int, str], list[tuple[Alert, int | None]]] = {}
    for i, run in enumerate(runs):
        for a, end in _episodes(run):
            key = (i, a.rule)
            if key not in spans:
                rows.append(key)
            spans.setdefault(key, []).append((a, end))
    if not rows:
        return None
    rows = rows[:_MAX_TIMELINE_ROWS]
    fig, ax = _axes(frame, 0.95 + 0.3 * len(rows))
    seen: set[Severity] = set()
    for y, key in enumerate(rows):
        for a, end in spans[key]:
            c = _SEVERITY_COLOR[a.severity]
            seen.add(a.severity)
            if end is not None:
                ax.plot([a.step, end], [y, y], color=c, lw=5, alpha=0.3, solid_capstyle="butt")
            ax.plot([a.step], [y], _SEV_MARKER[a.severity] if a.severity is not Severity.INFO else "o", color=c, ms=6)
    ax.set_yticks(range(len(rows)))
    labels = ax.set_yticklabels([_t(f"{runs[i].name} · {rule}") for i, rule in rows], fontsize=7)
    for label, (i, _) in zip(labels, rows):
        label.set_color(_RUN_COLORS[i % len(_RUN_COLORS)])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(alpha=0.3, axis="x")
    handles = [
        Line2D(
            [],
            [],
            marker=_SEV_MARKER[s] if s is not Severity.INFO else "o",
            ls="none",
            color=_SEVERITY_COLOR[s],
            label=f"{s.value} alert",
        )
        for s in (Severity.CRITICAL, Severity.WARNING, Severity.INFO)
        if s in seen
    ]
    handles.append(Line2D([], [], color="grey", lw=5, alpha=0.3, label="until it recovered"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _finish(fig, ax, frame, "alerts over time, per run and rule (colour = severity)", False)


# --- HTML --------------------------------------------------------------------------------------------
_VERDICT_COLOR = {"healthy": "#2e7d32", "warnings": "#ef6c00", "unstable": "#c62828"}
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f4f4f4} .critical{color:#c62828;font-weight:600} .warning{color:#ef6c00} .info{color:#1565c0}
img.plot{max-width:100%;display:block;margin:.6em 0} pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:.8em}
.muted{color:#777;font-size:.85em} code{background:#f4f4f4;padding:0 3px}
ul.verdicts{list-style:none;padding:0;margin:.4em 0 1em} li.verdict{padding:7px 10px;margin:4px 0;border-left:6px solid;
background:#fafafa;font-size:1.02em} li.verdict .badge{font-weight:700;letter-spacing:.03em}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin:0 .35em 0 .1em;vertical-align:baseline}
""" + "".join(
    f"li.verdict.{v}{{border-color:{c}}} li.verdict.{v} .badge{{color:{c}}}\n" for v, c in _VERDICT_COLOR.items()
)

# counts the plots the browser actually decoded (used by the headless-browser test; harmless otherwise)
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-plots-loaded', ok + '/' + imgs.length);
  var s = document.getElementById('plot-status');
  if (s) s.textContent = ok + ' of ' + imgs.length + ' plots rendered';
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(uri: str | None, alt: str, enable: str | None = None) -> str:
    if uri is None:
        how = f" To record it: <code>{_e(enable)}</code>." if enable else ""
        return f'<p class="muted nodata">{_e(alt)}: no data in these runs.{how}</p>'
    return f'<img class="plot" alt="{_e(alt)}" src="{uri}">'


def _swatch(i: int) -> str:
    return f'<span class="swatch" style="background:{_RUN_COLORS[i % len(_RUN_COLORS)]}"></span>'


def _verdict_line(i: int, run: Run, d: Any) -> str:
    """One line: the verdict, the first step that made it, the most likely cause, the counts."""
    verdict = d.verdict
    parts: list[str] = []
    real = sorted((a for a in run.alerts if a.reason is not AlertReason.RECOVERED), key=lambda a: a.step)
    crit = next((a for a in real if a.severity is Severity.CRITICAL), None)
    bad = next((r.step for r in run.records if r.nonfinite), None)
    if bad is not None and (crit is None or bad <= crit.step):
        parts.append(f"non-finite values from step {bad}")
    elif crit is not None:
        parts.append(f"first critical step {crit.step} ({_e(crit.rule)})")
    elif verdict == "warnings" and real:
        first = next(a for a in real if a.severity is Severity.WARNING)
        parts.append(f"first warning at step {first.step} ({_e(first.rule)})")
    if d.causes:
        parts.append(f"most likely cause: {_e(d.causes[0].title)}")
    counts = ", ".join(f"{n} {sev}" for sev, n in d.counts.items() if n)
    parts.append(_e(counts) if counts else "no alerts")
    return (
        f'<li class="verdict {_e(verdict)}" data-run="{_e(run.name)}" data-verdict="{_e(verdict)}">'
        f'<span class="badge">{_e(verdict.upper())}</span> {_swatch(i)}<b>{_e(run.name)}</b> — '
        + " · ".join(parts)
        + "</li>"
    )


def _summary_table(runs: Sequence[Run], diagnoses: Sequence[Any]) -> str:
    rows = []
    for i, (run, d) in enumerate(zip(runs, diagnoses)):
        _, losses = _finite(*run.series("loss"))
        _, grads = _finite(*run.series("grad_norm"))
        rows.append(
            "<tr>"
            f"<td>{_swatch(i)}{_e(run.name)}</td><td>{_e(run.path)}</td>"
            f"<td>{run.records[0].step}–{run.records[-1].step}</td><td>{len(run.records)}</td>"
            f"<td>{fmt(losses[-1]) if losses else '–'}</td>"
            f"<td>{fmt(max(grads)) if grads else '–'}</td>"
            f"<td class='critical'>{d.counts['critical']}</td><td class='warning'>{d.counts['warning']}</td>"
            f"<td class='info'>{d.counts['info']}</td><td>{_e(d.verdict)}</td>"
            "</tr>"
        )
    head = (
        "<tr><th>run</th><th>file</th><th>steps</th><th>records</th><th>last loss</th><th>max grad norm</th>"
        "<th>critical</th><th>warning</th><th>info</th><th>verdict</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _alert_table(run: Run) -> str:
    """The run's alerts, each with the step it recovered at (a recovery is not a row of its own, so the
    rows match the counts above)."""
    episodes = _episodes(run)
    if not episodes:
        return f"<p>{_e(run.name)}: no alerts.</p>"
    rows = []
    for a, end in episodes[:_MAX_ALERT_ROWS]:
        rows.append(
            f"<tr><td>{a.step}</td><td class='{_e(a.severity.value)}'>{_e(a.severity.value)}</td>"
            f"<td>{_e(a.rule)}</td><td>{_e(_layer_label(run, a.layer)) if a.layer else ''}</td>"
            f"<td>{end if end is not None else '–'}</td><td>{_e(a.message)}</td></tr>"
        )
    more = len(episodes) - _MAX_ALERT_ROWS
    tail = f"<p class='muted'>... and {more} more.</p>" if more > 0 else ""
    head = "<tr><th>step</th><th>severity</th><th>rule</th><th>layer</th><th>recovered at</th><th>message</th></tr>"
    return f"<h3>{_e(run.name)}</h3><table>{head}{''.join(rows)}</table>{tail}"


def render_report(runs: Sequence[Run], title: str = "stabwatch report") -> str:
    """The HTML page comparing ``runs`` (see the module docstring).

    Raises:
        StabwatchError: no runs, something that is not a `Run`, or matplotlib missing (names the extra).
    """
    if isinstance(runs, Run):
        runs = [runs]
    if not runs:
        raise StabwatchError("render_report: give at least one run")
    bad = next((i for i, r in enumerate(runs) if not isinstance(r, Run)), None)
    if bad is not None:
        raise StabwatchError(
            f"render_report: runs[{bad}] must be a stabwatch.report.Run (from load_run), got {type(runs[bad]).__name__}"
        )
    empty = next((r.name for r in runs if not r.records), None)
    if empty is not None:
        raise StabwatchError(f"render_report: run {empty!r} has no records")
    require_matplotlib(_WHAT)
    from stabwatch.diagnosis import analyse

    diagnoses = [analyse(run.records, run.alerts) for run in runs]
    frame = _frame(runs)
    heatmaps = _heatmaps(runs, frame)
    layers_hint = _ENABLE["layers"]
    sections = [
        ("Loss", _img(_line_plot(runs, frame, ["loss"], "loss", "loss"), "loss", _ENABLE["loss"])),
        (
            "Gradient norm",
            _img(
                _line_plot(runs, frame, ["grad_norm"], "global gradient norm", "‖g‖"),
                "global gradient norm",
                _ENABLE["grad_norm"],
            ),
        ),
        (
            "Gradient norm per layer",
            "".join(_img(uri, f"{run.name}: gradient norm per layer", layers_hint) for run, uri in heatmaps),
        ),
        (
            "Singular values",
            _img(
                _line_plot(
                    runs,
                    frame,
                    ["grad_max_sv", "grad_min_sv", "spectral_norm"],
                    "gradient singular values (max, min non-zero) and largest weight spectral norm",
                    "σ",
                    logy=True,
                ),
                "singular values",
                _ENABLE["singular"],
            ),
        ),
        (
            "Spectral radii",
            _img(
                _layer_plot(
                    runs,
                    frame,
                    "spectral_radius",
                    "spectral radius of recurrent (or square) weights (ρ = 1 dashed)",
                    1.0,
                ),
                "spectral radii",
                _ENABLE["spectral_radius"],
            ),
        ),
        (
            "Lyapunov exponent",
            _img(
                _line_plot(
                    runs,
                    frame,
                    ["lyapunov", "lyapunov_local"],
                    "Lyapunov exponent of training (shadow replica; > 0: chaotic)",
                    "λ",
                    hline=0.0,
                    logy=False,
                ),
                "Lyapunov exponent",
                _ENABLE["lyapunov"],
            ),
        ),
        (
            "Update ratio",
            _img(
                _line_plot(
                    runs,
                    frame,
                    ["update_ratio"],
                    "update-to-weight ratio (1e-3 dashed)",
                    "‖Δθ‖/‖θ‖",
                    hline=1e-3,
                    logy=True,
                ),
                "update ratio",
                _ENABLE["update_ratio"],
            ),
        ),
        ("Alerts over time", _img(_timeline(runs, frame), "alert timeline")),
    ]
    body = [
        f"<h1>{_e(title)}</h1>",
        "<ul class='verdicts'>"
        + "".join(_verdict_line(i, r, d) for i, (r, d) in enumerate(zip(runs, diagnoses)))
        + "</ul>",
        f"<p class='muted' id='plot-status'>{len(runs)} run(s)</p>",
        "<h2>Runs</h2>",
        _summary_table(runs, diagnoses),
    ]
    for heading, content in sections:
        body.append(f"<h2>{_e(heading)}</h2>{content}")
    body.append("<h2>Alerts</h2>")
    body.extend(_alert_table(run) for run in runs)
    body.append("<h2>Diagnosis</h2>")
    for run, d in zip(runs, diagnoses):
        body.append(f"<h3>{_e(run.name)}</h3><pre>{_e(d.to_text())}</pre>")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def _names(paths: Sequence[str | Path]) -> list[str]:
    names = [Path(p).name[: -len(".jsonl")] if str(p).endswith(".jsonl") else Path(p).name for p in paths]
    if len(set(names)) < len(names):  # disambiguate with the parent folder
        names = [f"{Path(p).parent.name}/{n}" for p, n in zip(paths, names)]
    if len(set(names)) < len(names):
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    return names


def write_report(
    paths: Sequence[str | Path],
    out: str | Path = "stabwatch_report.html",
    title: str | None = None,
    rerun_rules: bool = False,
) -> Path:
    """Read run files and write the HTML report.

    Args:
        paths: JSONL run files.
        out: the HTML file to write.
        title: page title (default: "stabwatch report: <runs>").
        rerun_rules: re-evaluate the default alert rules on the records.

    Returns:
        The path written.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise StabwatchError("stabwatch report: give at least one RUN.jsonl")
    runs = [load_run(p, n, rerun_rules) for p, n in zip(paths, _names(paths))]
    page = render_report(runs, title or f"stabwatch report: {', '.join(r.name for r in runs)}")
    target = Path(out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise StabwatchError(f"stabwatch report: cannot write {str(target)!r} ({exc.strerror})") from exc
    return target


# --- CLI ---------------------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    """Register ``stabwatch report`` and ``stabwatch diagnose``."""
    p = sub.add_parser("report", help="self-contained HTML report comparing JSONL runs")
    p.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="run files written by JsonlSink")
    p.add_argument("-o", "--out", default="stabwatch_report.html", help="HTML file to write")
    p.add_argument("--title", default=None)
    p.add_argument("--rerun-rules", action="store_true", help="evaluate the default alert rules afresh")
    p.set_defaults(func=_report_main)

    d = sub.add_parser("diagnose", help="trends, alerts, likely causes and what to try, for JSONL runs")
    d.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="run files written by JsonlSink")
    d.add_argument("--rerun-rules", action="store_true", help="evaluate the default alert rules afresh")
    d.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    d.set_defaults(func=_diagnose_main)


def _report_main(args: argparse.Namespace) -> int:
    path = write_report(args.runs, args.out, args.title, args.rerun_rules)  # errors: stabwatch.cli prints them
    print(f"stabwatch report: wrote {path}")
    return 0


def _diagnose_main(args: argparse.Namespace) -> int:
    from stabwatch.diagnosis import analyse, to_dict

    out = []
    for path, name in zip(args.runs, _names(args.runs)):
        run = load_run(path, name, args.rerun_rules)  # a StabwatchError: stabwatch.cli prints it, exit 2
        d = analyse(run.records, run.alerts)
        if args.json:
            out.append({"run": run.name, "path": run.path, **to_dict(d)})
        else:
            if len(args.runs) > 1:
                print(f"== {run.name} ({run.path})")
            print(d.to_text())
            print()
    if args.json:
        print(json.dumps(out, indent=2, allow_nan=False))
    return 0
