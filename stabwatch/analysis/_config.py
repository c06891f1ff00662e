"""`AnalyzerConfig`: every setting of a perturbation-trajectory analysis, validated once."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from stabwatch.errors import ConfigError

__all__ = ["AnalyzerConfig", "MetricsConfig", "VisualizationConfig"]

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class AnalyzerConfig:
    """Settings of a `StabilityAnalyzer` (the first eight match ``deep_lyapunov.AnalyzerConfig``).

    Attributes:
        perturbation_scale: size of the initial perturbation, relative to each tensor's spread: replica
            ``i`` starts at ``theta_i = theta + scale * sigma(W) * xi`` per trainable tensor ``W``, with
            ``xi ~ N(0, I)`` and ``sigma(W)`` the tensor's standard deviation (its RMS when it has one
            element or no spread, 0.01 when it is all zeros).
        n_trajectories: number of replicas ``N``, counting the unperturbed copy (replica 0).
        n_pca_components: number of principal components kept in `AnalysisResults.pca_trajectories`.
        track_gradients: also record each replica's global gradient norm at every checkpoint.
        record_interval: record every ``r``-th epoch (or `record_checkpoint` call). The initial and
            the final state are always recorded.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        seed: seed of the perturbations and of the data order / dropout noise shared by the replicas.
        verbose: show a progress bar over replicas and epochs.
        renormalize: Benettin renormalisation: after every checkpoint each perturbed replica is pulled
            back towards replica 0 to its initial distance, ``theta_i <- theta_0 + (d_i(0)/d_i(t))
            (theta_i - theta_0)``, and ``log(d_i(t)/d_i(0))`` is accumulated, so the exponent keeps
            measuring the linearised growth instead of saturating.
        same_data_order: feed every replica the same batches in the same order with the same dropout
            noise (the default). ``False`` gives each replica its own shuffling and noise, which then
            adds to the measured divergence.
        projection_dim: ``k``, the size of the random projection kept per checkpoint once the exact
            trajectories exceed `max_exact_bytes`.
        max_exact_bytes: memory allowed for keeping whole trajectories (exact PCA / effective
            dimensionality need all ``N*T*P`` positions). Past it, every checkpoint is kept as a
            ``k``-dimensional random projection: memory ``O(N*T*k)`` instead of ``O(N*T*P)``, and the
            PCA and effective dimensionality are approximate (``results.pca_method`` says which). ``0``
            always projects.

    Raises:
        ConfigError: (a `StabwatchError` and a `ValueError`) when a value is out of range or a keyword is
            not a setting; the message names the field and what is allowed.

    Example:
        >>> AnalyzerConfig(n_trajectories=3).perturbation_scale
        0.01
    """

    perturbation_scale: float = 0.01
    n_trajectories: int = 5
    n_pca_components: int = 10
    track_gradients: bool = False
    record_interval: int = 1
    device: str = "auto"
    seed: int = 42
    verbose: bool = True
    renormalize: bool = False
    same_data_order: bool = True
    projection_dim: int = 1024
    max_exact_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        scale = self.perturbation_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConfigError(f"perturbation_scale must be a finite positive number, got {scale!r}")
        if scale <= 0:
            raise ConfigError(f"perturbation_scale must be positive, got {scale!r} (try 0.01)")
        self._check_int("n_trajectories", 2, "at least 2 replicas are needed to measure a spread")
        self._check_int("n_pca_components", 1)
        self._check_int("record_interval", 1)
        self._check_int("projection_dim", 1)
        self._check_int("max_exact_bytes", 0, "0 always uses the random projection")
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        device = str(self.device)
        if not _DEVICE_RE.match(device):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        self.device = device
        for name in ("track_gradients", "verbose", "renormalize", "same_data_order"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def _check_int(self, name: str, minimum: int, hint: str = "") -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < minimum:
            extra = f" ({hint})" if hint else ""
            raise ConfigError(f"{name} must be at least {minimum}, got {value!r}{extra}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (for reports and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class UnknownSettingError(ConfigError, TypeError):
    """A keyword that is not a setting: a `ConfigError`, and the `TypeError` a dataclass raised for it (as
    deep-lyapunov's ``AnalyzerConfig`` does), so ``except TypeError`` keeps working."""


def _refuse_unknown_keywords(init: Any) -> Any:
    """Wrap the dataclass ``__init__`` so that a misspelt setting is a `ConfigError` listing the settings
    (not the bare ``TypeError`` Python raises for an unexpected keyword)."""
    names = [f.name for f in fields(AnalyzerConfig)]

    @functools.wraps(init)
    def __init__(self: AnalyzerConfig, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(names))
        if unknown or len(args) > len(names):
            given = f"unknown setting(s) {', '.join(unknown)}" if unknown else f"{len(args)} positional settings"
            raise UnknownSettingError(f"AnalyzerConfig: {given}; the settings are {', '.join(names)}")
        init(self, *args, **kwargs)

    return __init__


AnalyzerConfig.__init__ = _refuse_unknown_keywords(AnalyzerConfig.__init__)  # type: ignore[method-assign]


@dataclass
class MetricsConfig:
    """How the metrics are computed (the fields of ``deep_lyapunov.config.MetricsConfig``, here in effect).

    Pass it as ``StabilityAnalyzer(..., metrics_config=...)`` or to the functions of
    `stabwatch.analysis.metrics`. deep-lyapunov defined these fields but never read them, so its
    numbers were those of this class's defaults (which differ from its declared defaults where noted).

    Attributes:
        convergence_threshold: `AnalysisResults.behavior` is ``"convergent"`` when the convergence
            ratio is below this, else ``"divergent"``.
        lyapunov_window: ``w``, the number of checkpoint intervals one local exponent spans (sliding,
            step 1): in the analyzer's `AnalysisResults.local_lyapunov` and its confidence intervals,
            the report and plots drawn from them, `stabwatch.analysis.metrics.compute_local_lyapunov`
            and the Lyapunov plot of `stabwatch.analysis.visualization`. Clipped to ``T - 1``.
            Default 1 (declared 5 in deep-lyapunov, which used 1).
        min_trajectory_length: fewer recorded checkpoints than this adds a diagnostic (and an
            `AnalysisWarning`) saying the exponent rests on few points. Default 2 (declared 10 in
            deep-lyapunov, which did not check).
        use_robust_estimators: the spread ``s(t)`` is ``sqrt(median_{i<j} ||theta_i - theta_j||^2)``
            instead of the root mean square: one runaway replica no longer sets the exponent.
            Default False (declared True in deep-lyapunov, which used means).

    Example:
        >>> MetricsConfig(convergence_threshold=0.9).lyapunov_window
        1
    """

    convergence_threshold: float = 1.0
    lyapunov_window: int = 1
    min_trajectory_length: int = 2
    use_robust_estimators: bool = False

    def __post_init__(self) -> None:
        t = self.convergence_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"convergence_threshold must be a finite positive number, got {t!r}")
        for name in ("lyapunov_window", "min_trajectory_length"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an int of at least 1, got {value!r}")
        if not isinstance(self.use_robust_estimators, bool):
            raise ConfigError(f"use_robust_estimators must be True or False, got {self.use_robust_estimators!r}")


_FIGURE_FORMATS = ("png", "pdf", "svg")


@dataclass
class VisualizationConfig:
    """How figures look and are saved (the fields of ``deep_lyapunov.config.VisualizationConfig``, in effect).

    Pass it as ``config=`` to the functions of `stabwatch.analysis.visualization`.

    Attributes:
        figure_dpi: resolution of figures saved by ``create_analysis_dashboard(save_path=...)``.
        figure_format: ``"png"``, ``"pdf"`` or ``"svg"``: the format used when a ``save_path`` has no
            suffix.
        colormap: matplotlib colormap the replicas' colours are drawn from.
        show_confidence_bands: draw the jackknife confidence intervals on the Lyapunov plot.

    Example:
        >>> VisualizationConfig(figure_format="svg").figure_dpi
        150
    """

    figure_dpi: int = 150
    figure_format: str = "png"
    colormap: str = "viridis"
    show_confidence_bands: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.figure_dpi) or self.figure_dpi < 1:
            raise ConfigError(f"figure_dpi must be a positive int, got {self.figure_dpi!r}")
        if self.figure_format not in _FIGURE_FORMATS:
            raise ConfigError(f"figure_format must be one of {', '.join(_FIGURE_FORMATS)}, got {self.figure_format!r}")
        if not isinstance(self.colormap, str) or not self.colormap:
            raise ConfigError(f"colormap must be a matplotlib colormap name, got {self.colormap!r}")
        if not isinstance(self.show_confidence_bands, bool):
            raise ConfigError(f"show_confidence_bands must be True or False, got {self.show_confidence_bands!r}")
