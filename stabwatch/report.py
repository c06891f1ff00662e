"""``stabwatch report`` and ``stabwatch diagnose``: reading runs back from JSONL.

* `write_report` / ``stabwatch report RUN.jsonl [RUN2.jsonl ...] -o report.html`` — one self-contained
  HTML page comparing runs: a summary table, the loss and the global gradient norm (alerts marked on
  the step axis), a per-layer gradient-norm heat map per run (layers × steps, log10 colour scale),
  singular values, spectral radii, the Lyapunov exponent, the update ratio, an alert timeline, the
  alert tables and each run's diagnosis. Plots are PNGs drawn by matplotlib through `stabwatch.plotting`
  (bare figures on the Agg canvas: no pyplot, the user's backend and rcParams untouched; imported only
  when a report is made: ``pip install stabwatch[plot]``) and embedded as base64 ``data:`` URIs, so the
  file has no outside references. Every piece of text from the runs is HTML-escaped.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabwatch.errors import StabwatchError
from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics
from stabwatch.numeric import fmt
from stabwatch.plotting import figure_data_uri, new_figure, require_matplotlib

__all__ = ["Run", "add_parser", "load_run", "render_report", "write_report"]

log = logging.getLogger("stabwatch")

_SEVERITY_COLOR = {Severity.CRITICAL: "#c62828", Severity.WARNING: "#ef6c00", Severity.INFO: "#1565c0"}
_MAX_COLUMNS = 1500  # heat-map columns; longer runs are binned
_MAX_ALERT_ROWS = 300


@dataclass
class Run:
    """One run read back: its display name, records and alerts."""

    name: str
    records: list[StabilityMetrics]
    alerts: list[Alert] = field(default_factory=list)
    path: str = ""

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


def _colors() -> list[str]:
    import matplotlib

    return list(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"])


def _finite(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    pairs = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _mark_alerts(ax: Any, runs: Sequence[Run]) -> None:
    """Vertical lines at the steps of warning/critical alerts (one per step and severity)."""
    seen: set[tuple[int, Severity]] = set()
    for run in runs:
        for a in run.alerts:
            if a.severity is Severity.INFO or a.reason is AlertReason.RECOVERED:
                continue
            if (a.step, a.severity) in seen:
                continue
            seen.add((a.step, a.severity))
            ax.axvline(a.step, color=_SEVERITY_COLOR[a.severity], alpha=0.35, lw=1, zorder=0)


def _line_plot(
    runs: Sequence[Run],
    metrics: Sequence[str],
    title: str,
    ylabel: str,
    *,
    marks: bool = False,
    hline: float | None = None,
    logy: bool | None = None,
) -> str | None:
    fig, ax = new_figure((9, 3.4), _WHAT)
    colors = _colors()
    any_data, positive = False, True
    for i, run in enumerate(runs):
        for j, metric in enumerate(metrics):
            steps, values = _finite(*run.series(metric))
            if not steps:
                continue
            any_data = True
            positive = positive and all(v > 0 for v in values)
            label = run.name if len(metrics) == 1 else f"{run.name}: {metric}"
            ax.plot(steps, values, _STYLES[j % len(_STYLES)], color=colors[i % len(colors)], lw=1.1, label=label)
    if not any_data:
        return None
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    if logy if logy is not None else positive:
        ax.set_yscale("log")
    if marks:
        _mark_alerts(ax, runs)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return figure_data_uri(fig)


def _layer_plot(runs: Sequence[Run], metric: str, title: str, hline: float | None) -> str | None:
    fig, ax = new_figure((9, 3.4), _WHAT)
    colors = _colors()
    any_data = False
    for i, run in enumerate(runs):
        for j, (layer, (steps, values)) in enumerate(run.layer_series(metric).items()):
            steps, values = _finite(steps, values)
            if not steps:
                continue
            any_data = True
            ax.plot(
                steps,
                values,
                _STYLES[j % len(_STYLES)],
                marker=".",
                ms=3,
                color=colors[i % len(colors)],
                lw=1,
                label=f"{run.name}: {layer}",
            )
    if not any_data:
        return None
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    return figure_data_uri(fig)


def _heatmap(run: Run) -> str | None:
    import matplotlib
    import numpy as np

    per_layer = run.layer_series("grad_norm")
    if not per_layer:
        return None
    steps = sorted({s for st, _ in per_layer.values() for s in st})
    col = {s: i for i, s in enumerate(steps)}
    grid = np.full((len(per_layer), len(steps)), np.nan)
    for row, (st, vals) in enumerate(per_layer.values()):
        for s, v in zip(st, vals):
            grid[row, col[s]] = math.log10(v) if v > 0 and math.isfinite(v) else np.nan
    if len(steps) > _MAX_COLUMNS:  # bin columns, keeping NaN where a bin is all-missing
        edges = np.linspace(0, len(steps), _MAX_COLUMNS + 1).astype(int)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                grid = np.stack([np.nanmean(grid[:, a:b], axis=1) for a, b in itertools.pairwise(edges)], axis=1)
    layers = list(per_layer)
    fig, ax = new_figure((9, 0.9 + 0.28 * len(layers)), _WHAT)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")
    img = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(f"{run.name}: gradient norm per layer (log10; grey = missing or non-finite)")
    fig.colorbar(img, ax=ax, label="log10 grad norm", pad=0.01)
    return figure_data_uri(fig)


def _timeline(runs: Sequence[Run]) -> str | None:
    if not any(run.alerts for run in runs):
        return None
    fig, ax = new_figure((9, 0.9 + 0.5 * len(runs)), _WHAT)
    for i, run in enumerate(runs):
        for sev in (Severity.INFO, Severity.WARNING, Severity.CRITICAL):
            pts = [a.step for a in run.alerts if a.severity is sev]
            if pts:
                ax.scatter(
                    pts,
                    [i] * len(pts),
                    color=_SEVERITY_COLOR[sev],
                    s=22,
                    marker="|" if sev is Severity.INFO else "o",
                    label=sev.value
                    if i == 0 or not any(a.severity is sev for r in runs[:i] for a in r.alerts)
                    else None,
                )
    ax.set_yticks(range(len(runs)))
    ax.set_yticklabels([r.name for r in runs], fontsize=8)
    ax.set_ylim(-0.6, len(runs) - 0.4)
    ax.set_xlabel("step")
    ax.set_title("alerts over time (colour = severity)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure_data_uri(fig)


# --- HTML --------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f4f4f4} .critical{color:#c62828;font-weight:600} .warning{color:#ef6c00} .info{color:#1565c0}
img.plot{max-width:100%;display:block;margin:.6em 0} pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:.8em}
.muted{color:#777;font-size:.85em}
"""

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


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<p class="muted">{_e(alt)}: no data in these runs.</p>'
    return f'<img class="plot" alt="{_e(alt)}" src="{uri}">'


def _summary_table(runs: Sequence[Run]) -> str:
    from stabwatch.diagnosis import analyse

    rows = []
    for run in runs:
        d = analyse(run.records, run.alerts)
        _, losses = _finite(*run.series("loss"))
        _, grads = _finite(*run.series("grad_norm"))
        rows.append(
            "<tr>"
            f"<td>{_e(run.name)}</td><td>{_e(run.path)}</td>"
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
    if not run.alerts:
        return f"<p>{_e(run.name)}: no alerts.</p>"
    rows = []
    for a in run.alerts[:_MAX_ALERT_ROWS]:
        rows.append(
            f"<tr><td>{a.step}</td><td class='{_e(a.severity.value)}'>{_e(a.severity.value)}</td>"
            f"<td>{_e(a.rule)}</td><td>{_e(a.reason.value)}</td><td>{_e(a.layer or '')}</td>"
            f"<td>{_e(a.message)}</td></tr>"
        )
    more = len(run.alerts) - _MAX_ALERT_ROWS
    tail = f"<p class='muted'>... and {more} more.</p>" if more > 0 else ""
    head = "<tr><th>step</th><th>severity</th><th>rule</th><th>reason</th><th>layer</th><th>message</th></tr>"
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
    require_matplotlib(_WHAT)
    from stabwatch.diagnosis import diagnose

    sections = [
        (
            "Loss",
            _img(
                _line_plot(runs, ["loss"], "loss (alerts: red = critical, orange = warning)", "loss", marks=True),
                "loss",
            ),
        ),
        (
            "Gradient norm",
            _img(
                _line_plot(runs, ["grad_norm"], "global gradient norm", "‖g‖", marks=True),
                "global gradient norm",
            ),
        ),
        (
            "Gradient norm per layer",
            "".join(_img(_heatmap(run), f"{run.name}: gradient norm per layer") for run in runs),
        ),
        (
            "Singular values",
            _img(
                _line_plot(
                    runs,
                    ["grad_max_sv", "grad_min_sv", "spectral_norm"],
                    "gradient singular values (max, min non-zero) and largest weight spectral norm",
                    "σ",
                    logy=True,
                ),
                "singular values",
            ),
        ),
        (
            "Spectral radii",
            _img(
                _layer_plot(runs, "spectral_radius", "spectral radius of recurrent weights (ρ = 1 dashed)", 1.0),
                "spectral radii",
            ),
        ),
        (
            "Lyapunov exponent",
            _img(
                _line_plot(
                    runs,
                    ["lyapunov", "lyapunov_local"],
                    "Lyapunov exponent of training (shadow replica; > 0: chaotic)",
                    "λ",
                    hline=0.0,
                    logy=False,
                ),
                "Lyapunov exponent",
            ),
        ),
        (
            "Update ratio",
            _img(
                _line_plot(
                    runs,
                    ["update_ratio"],
                    "update-to-weight ratio (1e-3 dashed)",
                    "‖Δθ‖/‖θ‖",
                    hline=1e-3,
                    logy=True,
                ),
                "update ratio",
            ),
        ),
        ("Alerts over time", _img(_timeline(runs), "alert timeline")),
    ]
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p class='muted' id='plot-status'>{len(runs)} run(s)</p>",
        "<h2>Runs</h2>",
        _summary_table(runs),
    ]
    for heading, content in sections:
        body.append(f"<h2>{_e(heading)}</h2>{content}")
    body.append("<h2>Alerts</h2>")
    body.extend(_alert_table(run) for run in runs)
    body.append("<h2>Diagnosis</h2>")
    for run in runs:
        body.append(f"<h3>{_e(run.name)}</h3><pre>{_e(diagnose(run.records, run.alerts))}</pre>")
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
