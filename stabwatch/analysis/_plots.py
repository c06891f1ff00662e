"""Plots of `AnalysisResults` (matplotlib, imported lazily: ``pip install stabwatch[plot]``).

New figures use the Agg canvas directly (`stabwatch.plotting.new_figure`: no pyplot, no GUI, nothing
global touched) unless the caller has already imported ``matplotlib.pyplot``, in which case they are
made with ``plt.subplots`` so that ``plt.show()`` / ``plt.savefig()`` work as they did with
deep-lyapunov. Passing ``ax=`` draws into the caller's axes.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from stabwatch import plotting
from stabwatch.numeric import fmt
from stabwatch.plotting import require_matplotlib

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from stabwatch.analysis._config import VisualizationConfig
    from stabwatch.analysis._results import AnalysisResults

__all__: list[str] = []

_GREEN = "#2e7d32"
_RED = "#c62828"


def new_figure(figsize: tuple[float, float], use_pyplot: bool | None = None) -> tuple[Figure, Axes]:
    """A figure with one axes: pyplot-managed if pyplot is in use, else a bare Agg figure."""
    if use_pyplot is None:
        use_pyplot = "matplotlib.pyplot" in sys.modules
    if use_pyplot:
        require_matplotlib()
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return plotting.new_figure(figsize)


def _target(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        require_matplotlib()
        return ax.get_figure(), ax  # type: ignore[return-value]
    return new_figure(figsize)


def plot_trajectories(
    results: AnalysisResults,
    ax: Axes | None = None,
    components: tuple[int, int] = (0, 1),
    config: VisualizationConfig | None = None,
    **kwargs: Any,
) -> Figure:
    """Each replica's path on two principal components of the trajectory cloud (``config.colormap``)."""
    fig, ax = _target(ax, (8.0, 6.5))
    pca = results.pca_trajectories
    if pca.ndim != 3 or pca.size == 0:
        ax.text(0.5, 0.5, "no PCA trajectories recorded", ha="center", va="center", transform=ax.transAxes)
        return fig
    n_t, n_rep, n_comp = pca.shape
    c1, c2 = components
    import matplotlib

    cmap = config.colormap if config is not None else "viridis"
    colors = matplotlib.colormaps[cmap](np.linspace(0.0, 0.9, n_rep))
    var = results.pca_explained_variance
    for i in range(n_rep):
        x = pca[:, i, c1] if c1 < n_comp else results.checkpoint_times
        y = pca[:, i, c2] if c2 < n_comp else np.zeros(n_t)
        label = f"replica {i}" + (" (unperturbed)" if i == 0 else "")
        ax.plot(x, y, color=colors[i], alpha=0.8, linewidth=1.5, label=label, **kwargs)
        ax.scatter([x[0]], [y[0]], color=colors[i], marker="o", s=70, edgecolors="black", zorder=5)
        ax.scatter([x[-1]], [y[-1]], color=colors[i], marker="s", s=70, edgecolors="black", zorder=5)

    def axis_label(c: int) -> str:
        if c >= n_comp:
            return "checkpoint time" if c == c1 else "(no component)"
        share = f" ({var[c]:.1%} of variance)" if c < var.shape[0] else ""
        return f"PC{c + 1}{share}"

    ax.set_xlabel(axis_label(c1))
    ax.set_ylabel(axis_label(c2))
    ax.set_title(
        f"Replica trajectories, PCA of the weight cloud ({results.pca_method})\n"
        f"spread ratio {fmt(results.convergence_ratio, 3)}x, "
        f"effective dim. {fmt(results.effective_dimensionality, 3)}"
    )
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, alpha=0.3)
    return fig


def plot_convergence(
    results: AnalysisResults, ax: Axes | None = None, config: VisualizationConfig | None = None, **kwargs: Any
) -> Figure:
    """Spread ``s(t)`` on a log axis, with the initial spread for reference."""
    fig, ax = _target(ax, (8.0, 5.0))
    t = results.checkpoint_times
    s = results.spread_evolution
    color = _GREEN if results.behavior == "convergent" else _RED
    positive = s > 0
    ax.plot(t[positive], s[positive], color=color, linewidth=2, marker="o", markersize=4, **kwargs)
    if s.size and s[0] > 0:
        ax.axhline(s[0], color="gray", linestyle="--", alpha=0.7, label="initial spread")
    if positive.any():
        ax.set_yscale("log")
    ax.set_xlabel("epoch" if not results.renormalized else "epoch (renormalised, accumulated growth)")
    ax.set_ylabel("spread s(t): RMS pairwise distance, full weight space")
    ax.set_title(
        f"Spread of the replicas ({results.behavior}): ratio {fmt(results.convergence_ratio, 3)}x, "
        f"λ = {fmt(results.lyapunov)}/epoch"
    )
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3, which="both")
    return fig


def plot_lyapunov(
    results: AnalysisResults, ax: Axes | None = None, config: VisualizationConfig | None = None, **kwargs: Any
) -> Figure:
    """Bars of the local exponents (one per window) and the global line; their confidence intervals
    unless ``config.show_confidence_bands`` is False."""
    fig, ax = _target(ax, (8.0, 5.0))
    local = results.local_lyapunov
    if local.size == 0:
        ax.text(0.5, 0.5, "fewer than two checkpoints", ha="center", va="center", transform=ax.transAxes)
        return fig
    t = results.checkpoint_times
    w = results.lyapunov_window
    mids = 0.5 * (t[w:] + t[:-w])
    widths = 0.8 * (np.diff(t) if w == 1 else np.full(local.shape[0], np.min(np.diff(t))))
    colors = [_GREEN if v < 0 else _RED for v in local]
    ci = results.local_lyapunov_ci
    bands = config.show_confidence_bands if config is not None else True
    has_ci = bands and ci.shape == (local.shape[0], 2) and bool(np.isfinite(ci).all())
    yerr = np.abs(np.stack([local - ci[:, 0], ci[:, 1] - local])) if has_ci else None
    ax.bar(mids, local, width=widths, color=colors, alpha=0.75, yerr=yerr, capsize=3, **kwargs)
    ax.axhline(0.0, color="black", linewidth=1)
    low, high = results.lyapunov_ci
    label = f"global λ = {fmt(results.lyapunov)}"
    if bands and np.isfinite([low, high]).all():
        label += f" [{fmt(low, 3)}, {fmt(high, 3)}]"
        ax.axhspan(low, high, color="tab:blue", alpha=0.12)
    ax.axhline(results.lyapunov, color="tab:blue", linestyle="--", linewidth=2, label=label)
    ax.set_xlabel("epoch (interval midpoint)" if w == 1 else f"epoch (midpoint of {w}-interval windows)")
    ax.set_ylabel("local exponent (1/epoch)")
    ax.set_title(
        f"Local Lyapunov exponents, {results.ci_level:.0%} jackknife intervals" if bands else "Local Lyapunov exponents"
    )
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    return fig
