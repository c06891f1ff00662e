"""The plotting functions of ``deep_lyapunov.visualization``, drawing stabwatch's quantities.

Change ``from deep_lyapunov.visualization import ...`` to ``from stabwatch.analysis.visualization import
...``; names and positional arguments are deep-lyapunov's, and every function also takes
``config=VisualizationConfig(...)`` (colormap, confidence bands, dpi and format of saved figures).
matplotlib is imported when a function is called (``pip install stabwatch[plot]``). New figures use the
Agg canvas unless ``matplotlib.pyplot`` is already imported (then ``plt.show()`` works); ``ax=`` draws
into the caller's axes.

Example:
    >>> import numpy as np
    >>> from stabwatch.analysis.visualization import plot_spread_evolution
    >>> fig = plot_spread_evolution(np.array([1.0, 1.5, 2.25]), behavior="divergent", convergence_ratio=2.25)
    >>> fig.axes[0].get_yscale()
    'log'
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stabwatch.analysis._config import MetricsConfig, VisualizationConfig
from stabwatch.analysis.metrics import compute_local_lyapunov
from stabwatch.numeric import fmt
from stabwatch.plotting import require_matplotlib

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "create_analysis_dashboard",
    "plot_convergence_basin",
    "plot_lyapunov_evolution",
    "plot_spread_evolution",
    "plot_trajectories_2d",
    "plot_trajectories_3d",
]

_GREEN = "#2e7d32"
_RED = "#c62828"


def _figure(figsize: tuple[float, float]) -> Figure:
    require_matplotlib()
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=figsize)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as _Figure

    fig = _Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _axes(ax: Axes | None, figsize: tuple[float, float], projection: str | None = None) -> tuple[Figure, Axes]:
    if ax is not None:
        require_matplotlib()
        return ax.get_figure(), ax  # type: ignore[return-value]
    fig = _figure(figsize)
    return fig, fig.add_subplot(1, 1, 1, projection=projection)


def _colors(cmap: str, n: int, config: VisualizationConfig | None) -> Any:
    import matplotlib

    name = config.colormap if config is not None else cmap
    return matplotlib.colormaps[name](np.linspace(0.0, 0.9, max(n, 1)))


def _pc_label(c: int, variance: np.ndarray) -> str:
    share = f" ({variance[c]:.1%} of variance)" if c < variance.shape[0] else ""
    return f"PC{c + 1}{share}"


def plot_trajectories_2d(
    pca_trajectories: Any,
    pca_variance: Any,
    ax: Axes | None = None,
    components: tuple[int, int] = (0, 1),
    colormap: str = "viridis",
    alpha: float = 0.7,
    show_endpoints: bool = True,
    *,
    config: VisualizationConfig | None = None,
) -> Figure:
    """Each replica's path on two principal components (circles: start, squares: end).

    Args:
        pca_trajectories: ``[T, N, C]`` (`AnalysisResults.pca_trajectories`).
        pca_variance: explained variance ratio ``[C]``.
        ax: axes to draw into.
        components: the two components (0-based).
        colormap: replica colours (``config.colormap`` wins when ``config`` is given).
        alpha: line opacity.
        show_endpoints: mark the first and last checkpoint.
        config: `VisualizationConfig`.
    """
    pca = np.asarray(pca_trajectories, dtype=np.float64)
    var = np.asarray(pca_variance, dtype=np.float64)
    fig, ax = _axes(ax, (8.0, 6.5))
    c1, c2 = components
    if pca.ndim != 3 or max(c1, c2) >= pca.shape[2]:
        ax.text(0.5, 0.5, "not enough PCA components", ha="center", va="center", transform=ax.transAxes)
        return fig
    colors = _colors(colormap, pca.shape[1], config)
    for i in range(pca.shape[1]):
        x, y = pca[:, i, c1], pca[:, i, c2]
        ax.plot(x, y, color=colors[i], alpha=alpha, linewidth=1.5, label=f"replica {i}")
        if show_endpoints:
            ax.scatter([x[0]], [y[0]], color=colors[i], marker="o", s=60, edgecolors="black", zorder=5)
            ax.scatter([x[-1]], [y[-1]], color=colors[i], marker="s", s=60, edgecolors="black", zorder=5)
    ax.set_xlabel(_pc_label(c1, var))
    ax.set_ylabel(_pc_label(c2, var))
    ax.set_title("Replica trajectories on principal components")
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, alpha=0.3)
    return fig


def plot_trajectories_3d(
    pca_trajectories: Any,
    pca_variance: Any,
    ax: Axes | None = None,
    components: tuple[int, int, int] = (0, 1, 2),
    colormap: str = "viridis",
    alpha: float = 0.7,
    *,
    config: VisualizationConfig | None = None,
) -> Figure:
    """Each replica's path on three principal components (a 3-D axes; pass ``ax`` made with
    ``projection="3d"`` to draw into your own)."""
    pca = np.asarray(pca_trajectories, dtype=np.float64)
    var = np.asarray(pca_variance, dtype=np.float64)
    fig, ax = _axes(ax, (9.0, 7.0), projection="3d")
    c = components
    if pca.ndim != 3 or max(c) >= pca.shape[2]:
        ax.text2D(0.5, 0.5, "not enough PCA components", ha="center", va="center", transform=ax.transAxes)  # type: ignore[attr-defined]
        return fig
    colors = _colors(colormap, pca.shape[1], config)
    for i in range(pca.shape[1]):
        ax.plot(pca[:, i, c[0]], pca[:, i, c[1]], pca[:, i, c[2]], color=colors[i], alpha=alpha, label=f"replica {i}")
    ax.set_xlabel(_pc_label(c[0], var))
    ax.set_ylabel(_pc_label(c[1], var))
    ax.set_zlabel(_pc_label(c[2], var))  # type: ignore[attr-defined]
    ax.set_title("Replica trajectories (3 principal components)")
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_spread_evolution(
    spread: Any,
    ax: Axes | None = None,
    behavior: str = "unknown",
    convergence_ratio: float | None = None,
    *,
    times: Any = None,
    config: VisualizationConfig | None = None,
) -> Figure:
    """Spread ``s(t)`` on a log axis (its slope is the exponent), the initial spread dashed.

    Args:
        spread: ``[T]`` (`AnalysisResults.spread_evolution`).
        ax: axes to draw into.
        behavior: ``"convergent"`` (green), ``"divergent"`` (red) or anything else (blue).
        convergence_ratio: shown in the title when given.
        times: checkpoint times (default ``0..T-1``).
        config: `VisualizationConfig` (unused here; accepted for uniformity).
    """
    s = np.asarray(spread, dtype=np.float64)
    t = np.arange(s.shape[0], dtype=np.float64) if times is None else np.asarray(times, dtype=np.float64)
    fig, ax = _axes(ax, (8.0, 5.0))
    color = {"convergent": _GREEN, "divergent": _RED}.get(behavior, "tab:blue")
    positive = s > 0
    ax.plot(t[positive], s[positive], color=color, linewidth=2, marker="o", markersize=4, label="spread")
    if s.size and s[0] > 0:
        ax.axhline(s[0], color="gray", linestyle="--", alpha=0.7, label="initial spread")
    if positive.any():
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("spread s(t)")
    title = f"Spread of the replicas ({behavior})"
    if convergence_ratio is not None:
        title += f": ratio {fmt(convergence_ratio, 3)}x"
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3, which="both")
    return fig


def plot_lyapunov_evolution(
    spread: Any,
    global_lyapunov: float,
    ax: Axes | None = None,
    *,
    times: Any = None,
    ci: tuple[float, float] | None = None,
    metrics_config: MetricsConfig | None = None,
    config: VisualizationConfig | None = None,
) -> Figure:
    """Bars of the local exponents (`stabwatch.analysis.metrics.compute_local_lyapunov`, window
    ``metrics_config.lyapunov_window``) and the global exponent as a line.

    Args:
        spread: ``[T]``.
        global_lyapunov: the global exponent.
        ax: axes to draw into.
        times: checkpoint times (default ``0..T-1``).
        ci: the global exponent's confidence interval (`AnalysisResults.lyapunov_ci`), drawn as a band
            when ``config.show_confidence_bands`` (default True).
        metrics_config: `MetricsConfig` giving the window.
        config: `VisualizationConfig`.
    """
    s = np.asarray(spread, dtype=np.float64)
    t = np.arange(s.shape[0], dtype=np.float64) if times is None else np.asarray(times, dtype=np.float64)
    fig, ax = _axes(ax, (8.0, 5.0))
    local = compute_local_lyapunov(s, t, config=metrics_config)
    if local.size == 0:
        ax.text(0.5, 0.5, "fewer than two checkpoints", ha="center", va="center", transform=ax.transAxes)
        return fig
    w = s.shape[0] - local.shape[0]
    mids = 0.5 * (t[w:] + t[:-w])
    ax.bar(mids, local, width=0.8 * np.min(np.diff(t)), color=[_GREEN if v < 0 else _RED for v in local], alpha=0.75)
    ax.axhline(0.0, color="black", linewidth=1)
    ax.axhline(global_lyapunov, color="tab:blue", linestyle="--", linewidth=2, label=f"λ = {fmt(global_lyapunov)}")
    show = config.show_confidence_bands if config is not None else True
    if show and ci is not None and np.isfinite(ci).all():
        ax.axhspan(ci[0], ci[1], color="tab:blue", alpha=0.12, label="confidence interval")
    ax.set_xlabel("epoch (window midpoint)")
    ax.set_ylabel("local exponent (1/epoch)")
    ax.set_title(f"Local Lyapunov exponents (window of {w} interval{'s' if w > 1 else ''})")
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    return fig


def plot_convergence_basin(
    pca_trajectories: Any,
    pca_variance: Any,
    ax: Axes | None = None,
    components: tuple[int, int] = (0, 1),
    *,
    config: VisualizationConfig | None = None,
) -> Figure:
    """The replicas at the first and the last checkpoint, each cloud with a circle of its RMS radius
    around its centroid: a shrinking circle is a converging basin."""
    pca = np.asarray(pca_trajectories, dtype=np.float64)
    var = np.asarray(pca_variance, dtype=np.float64)
    fig, ax = _axes(ax, (7.0, 6.5))
    c1, c2 = components
    if pca.ndim != 3 or max(c1, c2) >= pca.shape[2]:
        ax.text(0.5, 0.5, "not enough PCA components", ha="center", va="center", transform=ax.transAxes)
        return fig
    from matplotlib.patches import Circle

    colors = _colors("viridis", 2, config)
    for k, (idx, name) in enumerate(((0, "start"), (-1, "end"))):
        pts = pca[idx][:, [c1, c2]]
        centre = pts.mean(axis=0)
        radius = float(np.sqrt(np.mean(np.sum((pts - centre) ** 2, axis=1))))
        ax.scatter(
            pts[:, 0], pts[:, 1], color=colors[k], s=50, edgecolors="black", label=f"{name} (r={fmt(radius, 3)})"
        )
        ax.add_patch(Circle((float(centre[0]), float(centre[1])), radius, fill=False, color=colors[k], linestyle="--"))
    ax.set_xlabel(_pc_label(c1, var))
    ax.set_ylabel(_pc_label(c2, var))
    ax.set_title("Replica clouds at the start and the end")
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    ax.autoscale_view()
    return fig


def create_analysis_dashboard(
    pca_trajectories: Any,
    pca_variance: Any,
    spread_evolution: Any,
    lyapunov: float,
    convergence_ratio: float,
    behavior: str,
    save_path: str | Path | None = None,
    *,
    config: VisualizationConfig | None = None,
) -> Figure:
    """Four panels: trajectories, basin, spread, local exponents; saved to ``save_path`` if given.

    The file is written with ``config.figure_dpi``, in ``config.figure_format`` when ``save_path`` has
    no suffix (else in the suffix's format).
    """
    cfg = config if config is not None else VisualizationConfig()
    fig = _figure((14.0, 11.0))
    axes = [fig.add_subplot(2, 2, k) for k in range(1, 5)]
    plot_trajectories_2d(pca_trajectories, pca_variance, ax=axes[0], config=cfg)
    plot_convergence_basin(pca_trajectories, pca_variance, ax=axes[1], config=cfg)
    plot_spread_evolution(spread_evolution, ax=axes[2], behavior=behavior, convergence_ratio=convergence_ratio)
    plot_lyapunov_evolution(spread_evolution, lyapunov, ax=axes[3], config=cfg)
    fig.suptitle(f"Stability analysis: {behavior}, ratio {fmt(convergence_ratio, 3)}x, λ = {fmt(lyapunov)}/epoch")
    if save_path is not None:
        path = Path(save_path)
        if not path.suffix:
            path = path.with_suffix("." + cfg.figure_format)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=cfg.figure_dpi, bbox_inches="tight")
    return fig
