"""`AnalysisResults` and `TrajectoryMetrics`: what an analysis returns, and how it is saved."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from stabwatch.analysis._config import VisualizationConfig
from stabwatch.analysis._stats import growth_rates
from stabwatch.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["AnalysisResults", "TrajectoryMetrics"]

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode(value: Any) -> Any:
    """JSON-safe copy: arrays to lists, non-finite floats to "NaN" / "Infinity" / "-Infinity"."""
    if isinstance(value, np.ndarray):
        return _encode(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _decode(value: Any) -> Any:
    """Inverse of `_encode` for numbers (strings of non-finite values back to floats)."""
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def _array(value: Any, ndim: int) -> NDArray[np.float64]:
    if value is None:
        return np.zeros((0,) * ndim)
    arr = np.asarray(_decode(value), dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0,) * ndim)
    return arr


@dataclass
class TrajectoryMetrics:
    """Per-replica summary (same fields as deep-lyapunov's).

    Attributes:
        trajectory_id: replica index (0 is the unperturbed copy).
        final_loss: last loss the training reported for this replica (None if unknown).
        final_accuracy: last accuracy reported (``"accuracy"`` or ``"test_acc"`` key), if any.
        path_length: ``sum_k |x(t_{k+1}) - x(t_k)|`` in the full weight space.
        velocity_mean: mean of ``|x(t_{k+1}) - x(t_k)| / (t_{k+1} - t_k)`` (per epoch).
        velocity_std: population standard deviation of the same.
    """

    trajectory_id: int
    final_loss: float | None = None
    final_accuracy: float | None = None
    path_length: float = 0.0
    velocity_mean: float = 0.0
    velocity_std: float = 0.0


@dataclass(eq=False, repr=False)
class AnalysisResults:
    r"""Results of a perturbation-trajectory analysis.

    The first eleven fields are deep-lyapunov's, in its order; the rest are stabwatch's. Every
    spread-based number comes from the same spread ``s(t)``, the RMS distance over replica pairs in
    the full weight space (see `stabwatch.analysis`), at ``T`` checkpoints ``t_0 < ... < t_{T-1}``, so
    ``convergence_ratio = s(t_{T-1})/s(t_0)`` and ``lyapunov = log(convergence_ratio) / (t_{T-1} - t_0)``
    always agree (divided by the elapsed epochs, ``T - 1`` with a checkpoint per epoch, not by ``T``).

    Attributes:
        convergence_ratio: ``s(t_{T-1}) / s(t_0)``; < 1 means the replicas came together.
        lyapunov: ``log(s(t_{T-1})/s(t_0)) / (t_{T-1} - t_0)`` per epoch (per `record_checkpoint` call in
            manual mode). With renormalisation, the Benettin estimate.
        behavior: ``"convergent"`` if ``convergence_ratio < 1`` else ``"divergent"``.
        spread_evolution: ``s(t_k)``, shape ``[T]``.
        pca_trajectories: principal-component coordinates of every replica at every checkpoint,
            ``[T, N, c]``.
        pca_explained_variance: fraction of the cloud's variance on each component, ``[c]``.
        effective_dimensionality: participation ratio of the whole PCA spectrum of the cloud.
        trajectory_metrics: one `TrajectoryMetrics` per replica.
        n_trajectories, n_checkpoints, n_parameters: ``N``, ``T``, ``P``.
        checkpoint_times: ``t_k`` in epochs (or calls), ``[T]``.
        local_lyapunov: ``(log s(t_{k+w}) - log s(t_k)) / (t_{k+w} - t_k)``, ``[T-w]``, over sliding
            windows of ``w`` = `MetricsConfig.lyapunov_window` intervals (default 1: one per interval).
        local_lyapunov_ci: jackknife confidence interval of each local exponent, ``[T-w, 2]``.
        lyapunov_ci: jackknife confidence interval of `lyapunov` (NaN with fewer than 3 replicas).
        ci_level: coverage of the intervals.
        pairwise_distances: measured distance of every replica pair at every checkpoint,
            ``[T, N, N]`` (before renormalisation).
        renormalized: whether Benettin renormalisation was used.
        pca_method: ``"exact"`` or ``"projection(k=...)"`` (see `AnalyzerConfig.max_exact_bytes`).
        gradient_norms: ``[T, N]`` global gradient norms when ``track_gradients`` was on.
        diagnostics: warnings raised during the analysis (resolution, saturation, data order).
        visualization_config: the `VisualizationConfig` the plots and `save_report` use when they are not
            given one (the analyzer's ``visualization_config=``; None: the defaults).
    """

    convergence_ratio: float
    lyapunov: float
    behavior: Literal["convergent", "divergent"]
    spread_evolution: NDArray[np.float64]
    pca_trajectories: NDArray[np.float64]
    pca_explained_variance: NDArray[np.float64]
    effective_dimensionality: float
    trajectory_metrics: list[TrajectoryMetrics] = field(default_factory=list)
    n_trajectories: int = 0
    n_checkpoints: int = 0
    n_parameters: int = 0
    checkpoint_times: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    local_lyapunov: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    local_lyapunov_ci: NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 2)))
    lyapunov_ci: tuple[float, float] = (math.nan, math.nan)
    ci_level: float = 0.95
    pairwise_distances: NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 0, 0)))
    renormalized: bool = False
    pca_method: str = "exact"
    gradient_norms: NDArray[np.float64] | None = None
    diagnostics: list[str] = field(default_factory=list)
    visualization_config: VisualizationConfig | None = None

    def __post_init__(self) -> None:
        self.spread_evolution = np.asarray(self.spread_evolution, dtype=np.float64).reshape(-1)
        self.pca_trajectories = np.asarray(self.pca_trajectories, dtype=np.float64)
        self.pca_explained_variance = np.asarray(self.pca_explained_variance, dtype=np.float64).reshape(-1)
        n_t = self.spread_evolution.shape[0]
        times = np.asarray(self.checkpoint_times, dtype=np.float64).reshape(-1)
        self.checkpoint_times = times if times.shape[0] == n_t else np.arange(n_t, dtype=np.float64)
        local = np.asarray(self.local_lyapunov, dtype=np.float64).reshape(-1)
        if n_t >= 2 and not 1 <= local.shape[0] <= n_t - 1:
            _, local = growth_rates(self.spread_evolution, self.checkpoint_times)
        self.local_lyapunov = local
        ci = np.asarray(self.local_lyapunov_ci, dtype=np.float64)
        if ci.shape != (self.local_lyapunov.shape[0], 2):
            ci = np.full((self.local_lyapunov.shape[0], 2), np.nan)
        self.local_lyapunov_ci = ci
        low, high = self.lyapunov_ci
        self.lyapunov_ci = (float(low), float(high))
        self.pairwise_distances = np.asarray(self.pairwise_distances, dtype=np.float64)
        if self.gradient_norms is not None:
            self.gradient_norms = np.asarray(self.gradient_norms, dtype=np.float64)
        if not self.n_checkpoints:
            self.n_checkpoints = n_t

    @property
    def lyapunov_window(self) -> int:
        """``w``: how many checkpoint intervals each of `local_lyapunov` spans (``T - len(local_lyapunov)``)."""
        return max(1, self.spread_evolution.shape[0] - self.local_lyapunov.shape[0])

    def __repr__(self) -> str:
        low, high = self.lyapunov_ci
        return (
            f"AnalysisResults(behavior={self.behavior!r}, convergence_ratio={self.convergence_ratio:.4g}, "
            f"lyapunov={self.lyapunov:.4g} [{low:.4g}, {high:.4g}], "
            f"effective_dimensionality={self.effective_dimensionality:.3g}, N={self.n_trajectories}, "
            f"T={self.n_checkpoints}, P={self.n_parameters}, pca={self.pca_method}, "
            f"diagnostics={len(self.diagnostics)})"
        )

    # ------------------------------------------------------------------ plots and report

    def _viz(self, config: VisualizationConfig | None) -> VisualizationConfig:
        if config is not None:
            if not isinstance(config, VisualizationConfig):
                raise ConfigError(f"config must be a VisualizationConfig, got {type(config).__name__}")
            return config
        return self.visualization_config if self.visualization_config is not None else VisualizationConfig()

    def plot_trajectories(
        self,
        ax: Axes | None = None,
        components: tuple[int, int] = (0, 1),
        *,
        config: VisualizationConfig | None = None,
        **kwargs: Any,
    ) -> Figure:
        """Replica paths on two principal components (circles: start, squares: end).

        Needs matplotlib (``pip install stabwatch[plot]``). Returns the figure; pass ``ax`` to draw
        into an existing one. ``config`` (default `visualization_config`): the colormap of the replicas.
        Other keywords go to ``ax.plot``.
        """
        from stabwatch.analysis._plots import plot_trajectories

        return plot_trajectories(self, ax=ax, components=components, config=self._viz(config), **kwargs)

    def plot_convergence(
        self, ax: Axes | None = None, *, config: VisualizationConfig | None = None, **kwargs: Any
    ) -> Figure:
        """Spread ``s(t)`` over training on a log axis (the slope is the local exponent)."""
        from stabwatch.analysis._plots import plot_convergence

        return plot_convergence(self, ax=ax, config=self._viz(config), **kwargs)

    def plot_lyapunov(
        self, ax: Axes | None = None, *, config: VisualizationConfig | None = None, **kwargs: Any
    ) -> Figure:
        """Local exponents (one per window of `lyapunov_window` intervals) and the global one; with
        ``config.show_confidence_bands`` (default) their jackknife intervals as error bars and a band."""
        from stabwatch.analysis._plots import plot_lyapunov

        return plot_lyapunov(self, ax=ax, config=self._viz(config), **kwargs)

    def save_report(
        self,
        output_dir: str | Path,
        embed_images: bool = True,
        format: Literal["html", "markdown"] = "html",
        *,
        config: VisualizationConfig | None = None,
    ) -> Path:
        """Write ``metrics.json`` and ``report.html`` (or ``report.md``) into ``output_dir``.

        Args:
            output_dir: a directory (created if needed); a path with a file extension is refused.
            embed_images: embed the three plots as base64 PNG; False writes ``trajectories.png``,
                ``convergence.png`` and ``lyapunov.png`` next to the report.
            format: ``"html"`` or ``"markdown"`` (``"md"`` accepted).
            config: `VisualizationConfig` (default `visualization_config`): the plots' colormap and
                confidence bands, ``figure_dpi`` of the images, and ``figure_format`` of the image files
                written with ``embed_images=False`` (embedded images are SVG when the format is
                ``"svg"``, else PNG: a PDF cannot be shown inline).

        Returns:
            The path of the report file.
        """
        from stabwatch.analysis._report import save_report

        return save_report(self, output_dir, embed_images=embed_images, fmt=format, config=self._viz(config))

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Everything, as plain JSON values; round-trips with `from_dict`.

        Valid strict JSON for every number of trajectories (``json.dumps(d, allow_nan=False)``): a
        number that is not finite (the jackknife interval with ``N = 2``, which has no pairs left
        to resample; a diverged loss) is the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``,
        exactly as in `to_json`, so ``to_dict() == json.loads(to_json())``.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "trajectory_metrics":
                value = [asdict(tm) for tm in value]
            elif f.name == "visualization_config":
                value = None if value is None else asdict(value)
            elif isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, (tuple, list)):
                value = list(value)
            out[f.name] = value
        encoded: dict[str, Any] = _encode(out)
        return encoded

    def to_json(self, path: str | Path | None = None) -> str:
        """Strict JSON (non-finite numbers as ``"NaN"``/``"Infinity"``/``"-Infinity"`` strings).

        Args:
            path: file to write, if given.

        Returns:
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisResults:
        """Rebuild results from `to_dict` / `to_json` output, or from a deep-lyapunov dict.

        Fields deep-lyapunov did not save get their defaults; local exponents are recomputed from
        the spread when absent, so every plot works on the rebuilt object.
        """
        d = _decode(dict(data))
        known = {f.name for f in fields(TrajectoryMetrics)}
        tms = [
            TrajectoryMetrics(**{k: v for k, v in tm.items() if k in known}) for tm in d.get("trajectory_metrics", [])
        ]
        grads = d.get("gradient_norms")
        viz = d.get("visualization_config")
        ci = d.get("lyapunov_ci") or [math.nan, math.nan]
        return cls(
            convergence_ratio=float(d["convergence_ratio"]),
            lyapunov=float(d["lyapunov"]),
            behavior=d["behavior"],
            spread_evolution=_array(d.get("spread_evolution"), 1),
            pca_trajectories=_array(d.get("pca_trajectories"), 3),
            pca_explained_variance=_array(d.get("pca_explained_variance"), 1),
            effective_dimensionality=float(d.get("effective_dimensionality", math.nan)),
            trajectory_metrics=tms,
            n_trajectories=int(d.get("n_trajectories", 0)),
            n_checkpoints=int(d.get("n_checkpoints", 0)),
            n_parameters=int(d.get("n_parameters", 0)),
            checkpoint_times=_array(d.get("checkpoint_times"), 1),
            local_lyapunov=_array(d.get("local_lyapunov"), 1),
            local_lyapunov_ci=_array(d.get("local_lyapunov_ci"), 2),
            lyapunov_ci=(float(ci[0]), float(ci[1])),
            ci_level=float(d.get("ci_level", 0.95)),
            pairwise_distances=_array(d.get("pairwise_distances"), 3),
            renormalized=bool(d.get("renormalized", False)),
            pca_method=str(d.get("pca_method", "unknown")),
            gradient_norms=None if grads is None else _array(grads, 2),
            diagnostics=[str(x) for x in d.get("diagnostics", [])],
            visualization_config=None if viz is None else VisualizationConfig(**viz),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> AnalysisResults:
        """Read a file written by `to_json` (or deep-lyapunov's ``metrics.json``)."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
