"""`AnalysisResults.save_report`: ``metrics.json`` plus an HTML or Markdown report with three plots."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stabwatch.analysis._config import VisualizationConfig
from stabwatch.analysis._log import analysis_logger
from stabwatch.analysis._plots import plot_convergence, plot_lyapunov, plot_trajectories
from stabwatch.errors import ConfigError
from stabwatch.numeric import fmt
from stabwatch.plotting import new_figure, require_matplotlib

if TYPE_CHECKING:
    from stabwatch.analysis._results import AnalysisResults

__all__: list[str] = []

logger = analysis_logger()

_PLOTS = (
    ("trajectories", plot_trajectories, (8.0, 6.5), "Replica paths on the first two principal components."),
    ("convergence", plot_convergence, (8.0, 5.0), "Spread of the replicas over training (log scale)."),
    ("lyapunov", plot_lyapunov, (8.0, 5.0), "Local exponents per interval with confidence intervals."),
)


def _summary_rows(r: AnalysisResults) -> list[tuple[str, str, str]]:
    low, high = r.lyapunov_ci
    ci = f" [{fmt(low)}, {fmt(high)}]" if math.isfinite(low) and math.isfinite(high) else ""
    verdict = (
        "replicas came together: training is reproducible"
        if r.behavior == "convergent"
        else "replicas drifted apart: the result depends on the initial weights"
    )
    if ci and low <= 0.0 <= high:
        verdict += " (interval contains 0: not significant)"
    return [
        ("Convergence ratio s(T)/s(0)", f"{fmt(r.convergence_ratio)}x", verdict),
        ("Lyapunov exponent (1/epoch)", fmt(r.lyapunov) + ci, f"{r.ci_level:.0%} jackknife interval"),
        ("Behaviour", r.behavior, "renormalised (Benettin)" if r.renormalized else "raw spread"),
        ("Effective dimensionality", fmt(r.effective_dimensionality, 3), f"PCA: {r.pca_method}"),
        ("Replicas / checkpoints / parameters", f"{r.n_trajectories} / {r.n_checkpoints} / {r.n_parameters:,}", ""),
    ]


def _local_rows(r: AnalysisResults) -> list[tuple[str, str, str]]:
    rows = []
    t = r.checkpoint_times
    w = r.lyapunov_window
    for k, lam in enumerate(r.local_lyapunov):
        low, high = r.local_lyapunov_ci[k]
        ci = f"[{fmt(low)}, {fmt(high)}]" if math.isfinite(low) and math.isfinite(high) else "n/a"
        rows.append((f"{fmt(t[k], 6)} → {fmt(t[k + w], 6)}", fmt(lam), ci))
    return rows


_MIME = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf"}


def _figure_bytes(fig: Any, fmt: str, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return buf.getvalue()


def _render_plots(r: AnalysisResults, out: Path, embed: bool, config: VisualizationConfig) -> dict[str, str]:
    """Each plot: a data URI when embedded (SVG if ``config.figure_format`` is svg, else PNG), else the
    name of the file written next to the report (in ``config.figure_format``); at ``config.figure_dpi``."""
    refs: dict[str, str] = {}
    for name, plot, size, _ in _PLOTS:
        fig, ax = new_figure(size, "the stability report")
        plot(r, ax=ax, config=config)
        fig.tight_layout()
        if embed:
            fmt_ = "svg" if config.figure_format == "svg" else "png"
            data = base64.b64encode(_figure_bytes(fig, fmt_, config.figure_dpi)).decode("ascii")
            refs[name] = f"data:{_MIME[fmt_]};base64,{data}"
        else:
            file = f"{name}.{config.figure_format}"
            (out / file).write_bytes(_figure_bytes(fig, config.figure_format, config.figure_dpi))
            refs[name] = file
    return refs


def _markdown(r: AnalysisResults, images: dict[str, str]) -> str:
    lines = ["# Training stability report (stabwatch)", "", "| Metric | Value | Reading |", "|:--|--:|:--|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _summary_rows(r)]
    if r.diagnostics:
        lines += ["", "## Diagnostics", ""] + [f"- {d}" for d in r.diagnostics]
    lines += ["", "## Local exponents", "", "| Interval | λ | Interval estimate |", "|:--|--:|:--|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _local_rows(r)]
    lines += ["", "## Plots", ""]
    for name, _, _, caption in _PLOTS:
        lines += [f"![{name}]({images[name]})", "", f"*{caption}*", ""]
    lines += [
        "## How to read this",
        "",
        "The spread is the RMS distance between replicas in the full weight space. A negative exponent",
        "means small differences in the initial weights shrink during training; a positive one means they",
        "grow, and the final model depends on the initialisation. Metrics are in `metrics.json`.",
        "",
    ]
    return "\n".join(lines)


def _html(r: AnalysisResults, images: dict[str, str]) -> str:
    def table(head: tuple[str, str, str], rows: list[tuple[str, str, str]]) -> str:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"

    colour = "#2e7d32" if r.behavior == "convergent" else "#c62828"
    diag = ""
    if r.diagnostics:
        items = "".join(f"<li>{html.escape(d)}</li>" for d in r.diagnostics)
        diag = f"<h2>Diagnostics</h2><ul class='diag'>{items}</ul>"
    figures = "".join(
        f"<figure><img src='{html.escape(images[name])}' alt='{name}'><figcaption>{html.escape(caption)}"
        "</figcaption></figure>"
        for name, _, _, caption in _PLOTS
    )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}"
        f".badge{{background:{colour};color:#fff;padding:2px 10px;border-radius:10px}}"
        "img{max-width:100%}.diag li{color:#8a4b00}figcaption{color:#555;font-size:90%}"
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Training stability report</title><style>{style}</style></head><body>"
        f"<h1>Training stability report <span class='badge'>{html.escape(r.behavior)}</span></h1>"
        + table(("Metric", "Value", "Reading"), _summary_rows(r))
        + diag
        + "<h2>Local exponents</h2>"
        + table(("Interval", "λ", "Interval estimate"), _local_rows(r))
        + f"<h2>Plots</h2>{figures}"
        + "<p>Spread: RMS distance between replicas in the full weight space. Numbers: "
        "<code>metrics.json</code>. Generated by stabwatch.</p></body></html>"
    )


def save_report(
    r: AnalysisResults,
    output_dir: Any,
    *,
    embed_images: bool = True,
    fmt: str = "html",
    config: VisualizationConfig | None = None,
) -> Path:
    """Write ``metrics.json``, the plots and ``report.html`` / ``report.md``; return the report path."""
    kind = {"html": "html", "markdown": "markdown", "md": "markdown"}.get(str(fmt).lower())
    if kind is None:
        raise ConfigError(f"save_report: format must be 'html' or 'markdown', got {fmt!r}")
    out = Path(output_dir)
    if out.suffix.lower() in {".json", ".html", ".htm", ".md", ".txt", ".png"}:
        raise ConfigError(
            f"save_report: output_dir {str(output_dir)!r} looks like a file (extension {out.suffix!r}); "
            "give a directory, e.g. 'stability_report/'"
        )
    require_matplotlib("the stability report")
    out.mkdir(parents=True, exist_ok=True)
    images = _render_plots(r, out, embed_images, config if config is not None else VisualizationConfig())
    r.to_json(out / "metrics.json")
    report = out / ("report.html" if kind == "html" else "report.md")
    text = _html(r, images) if kind == "html" else _markdown(r, images)
    report.write_text(text, encoding="utf-8")
    logger.info("stability report written to %s", report)
    return report
