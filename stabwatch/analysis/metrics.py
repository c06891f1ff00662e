r"""The metric functions of ``deep_lyapunov.metrics``, with stabwatch's definitions.

Change ``from deep_lyapunov.metrics import ...`` to ``from stabwatch.analysis.metrics import ...``; the
names and positional arguments are deep-lyapunov's. The numbers are those `StabilityAnalyzer` reports:

* spread ``s(t) = sqrt(mean_{i<j} ||theta_i(t) - theta_j(t)||^2)`` over all parameters (no PCA);
* convergence ratio ``s(t_{T-1}) / s(t_0)`` (last checkpoint over first);
* Lyapunov exponent ``log(s(t_{T-1})/s(t_0)) / (t_{T-1} - t_0)`` (``T`` checkpoints; the divisor is the
  elapsed time, ``n_epochs``, i.e. ``T - 1`` intervals one epoch apart) and local exponents
  ``log(s_{k+w}/s_k) / (t_{k+w} - t_k)``;
* participation ratio ``(sum lambda)^2 / sum lambda^2`` of the covariance spectrum, computed from the
  ``n x n`` Gram matrix of the centred points (exact, no ``P x P`` matrix: ``O(n^2 P)`` time to build
  it, ``O(n^3)`` to decompose it).

``trajectories`` is an array ``[n_checkpoints, n_trajectories, n_params]`` (numpy or torch). Where a
value differs from deep-lyapunov's, ``docs/migrate-deep-lyapunov.md`` says why.

Example:
    >>> import numpy as np
    >>> from stabwatch.analysis.metrics import compute_convergence_ratio, compute_lyapunov_exponent
    >>> traj = np.zeros((3, 2, 4)); traj[:, 1, 0] = [1.0, 2.0, 4.0]  # replica 1 drifts away
    >>> compute_convergence_ratio(traj)
    4.0
    >>> round(compute_lyapunov_exponent(np.array([1.0, 2.0, 4.0]), n_epochs=2), 6)  # log(4) / 2
    0.693147
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from stabwatch.analysis._config import MetricsConfig
from stabwatch.analysis._log import analysis_logger
from stabwatch.analysis._stats import centered_gram_spectrum, pair_indices, participation_ratio, pca_scores
from stabwatch.errors import InputError

__all__ = [
    "compute_convergence_ratio",
    "compute_effective_dimensionality",
    "compute_local_lyapunov",
    "compute_lyapunov_exponent",
    "compute_participation_ratio",
    "compute_spread_evolution",
    "project_to_pca",
]

logger = analysis_logger()

FloatArray = NDArray[np.float64]


def _as_array(value: Any, ndim: int, name: str) -> FloatArray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


def _trajectories(trajectories: Any) -> FloatArray:
    arr = _as_array(trajectories, 3, "trajectories [n_checkpoints, n_trajectories, n_params]")
    if arr.shape[0] < 1 or arr.shape[2] < 1:
        raise InputError(f"trajectories needs at least one checkpoint and one parameter, got shape {arr.shape}")
    return arr


def compute_spread_evolution(
    trajectories: Any, n_components: int = 3, *, config: MetricsConfig | None = None
) -> FloatArray:
    r"""Spread of the replicas at every checkpoint, in the full weight space.

    .. math:: s(t) = \sqrt{\operatorname{mean}_{i<j} \lVert\theta_i(t) - \theta_j(t)\rVert^2}

    (the median instead of the mean with ``config.use_robust_estimators``).

    Args:
        trajectories: ``[T, N, P]``.
        n_components: accepted for deep-lyapunov's signature and ignored: no projection is made.
        config: `MetricsConfig`; only ``use_robust_estimators`` is read.

    Returns:
        ``s``, shape ``[T]`` (zeros when ``N < 2``).
    """
    traj = _trajectories(trajectories)
    n_t, n, _ = traj.shape
    if n < 2:
        return np.zeros(n_t)
    iu, ju = pair_indices(n)
    diff = traj[:, iu, :] - traj[:, ju, :]
    d2 = np.einsum("tmp,tmp->tm", diff, diff)
    robust = config is not None and config.use_robust_estimators
    reduced = np.median(d2, axis=1) if robust else np.mean(d2, axis=1)
    return np.sqrt(reduced)


def compute_convergence_ratio(
    trajectories: Any, n_components: int = 3, *, config: MetricsConfig | None = None
) -> float:
    """``s(t_{T-1}) / s(t_0)`` (last over first) with ``s`` from `compute_spread_evolution` (1.0 for a single replica).

    Args:
        trajectories: ``[T, N, P]``.
        n_components: accepted for deep-lyapunov's signature and ignored.
        config: `MetricsConfig` (``use_robust_estimators``).

    Returns:
        The ratio: ``inf`` when the replicas start identical and end apart, NaN when they are identical
        throughout (deep-lyapunov returned 1.0 for the latter).
    """
    s = compute_spread_evolution(trajectories, n_components, config=config)
    if _trajectories(trajectories).shape[1] < 2:
        return 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(s[-1]) / np.float64(s[0]))


def compute_lyapunov_exponent(
    spread_evolution: Any, n_epochs: float, *, times: Any = None, config: MetricsConfig | None = None
) -> float:
    r"""Global exponent ``log(s_last / s_first) / n_epochs``.

    Args:
        spread_evolution: ``s(t_k)``, shape ``[T]``.
        n_epochs: the time the spread covers, in epochs (``<= 0``: use ``times`` if given, else
            ``T - 1`` checkpoints one epoch apart).
        times: optional checkpoint times ``[T]``; with ``n_epochs <= 0`` the elapsed time is
            ``times[-1] - times[0]``.
        config: `MetricsConfig`; fewer than ``min_trajectory_length`` points logs a warning.

    Returns:
        ``lambda`` in nats per epoch; ``-inf`` when the final spread is 0 (the replicas merged),
        NaN with fewer than two points or a zero initial spread (deep-lyapunov returned 0.0).
    """
    s = _as_array(spread_evolution, 1, "spread_evolution")
    if config is not None and s.shape[0] < config.min_trajectory_length:
        logger.warning(
            "only %d spread values, fewer than min_trajectory_length=%d", s.shape[0], config.min_trajectory_length
        )
    if s.shape[0] < 2:
        return math.nan
    elapsed = float(n_epochs)
    if elapsed <= 0 and times is not None:
        t = _as_array(times, 1, "times")
        elapsed = float(t[-1] - t[0])
    if elapsed <= 0:
        elapsed = float(s.shape[0] - 1)
    if s[0] <= 0 or not math.isfinite(s[0]):
        return math.nan
    with np.errstate(divide="ignore"):
        return float((np.log(s[-1]) - np.log(s[0])) / elapsed)


def compute_local_lyapunov(
    spread_evolution: Any, times: Any = None, window: int | None = None, *, config: MetricsConfig | None = None
) -> FloatArray:
    r"""Local exponents over sliding windows of ``w`` checkpoint intervals.

    .. math:: \lambda_k = \frac{\log s(t_{k+w}) - \log s(t_k)}{t_{k+w} - t_k}, \quad k = 0..T-1-w

    Args:
        spread_evolution: ``s(t_k)``, shape ``[T]``.
        times: checkpoint times ``[T]`` (default ``0, 1, ..., T-1``: one epoch apart).
        window: ``w`` (default ``config.lyapunov_window``, else 1; clipped to ``T - 1``).
        config: `MetricsConfig`.

    Returns:
        ``[T - w]`` exponents per epoch (empty with fewer than two points). A zero spread gives
        ``-inf``/NaN instead of deep-lyapunov's clamp at ``1e-10``.
    """
    s = _as_array(spread_evolution, 1, "spread_evolution")
    n_t = s.shape[0]
    if n_t < 2:
        return np.zeros(0)
    t = np.arange(n_t, dtype=np.float64) if times is None else _as_array(times, 1, "times")
    if t.shape != s.shape:
        raise InputError(f"times has shape {t.shape}, spread_evolution {s.shape}")
    w = window if window is not None else (config.lyapunov_window if config is not None else 1)
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise InputError(f"window must be a positive int, got {w!r}")
    w = min(w, n_t - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s = np.log(s)
        return np.asarray((log_s[w:] - log_s[:-w]) / (t[w:] - t[:-w]), dtype=np.float64)


def _centred_spectrum(points: FloatArray) -> tuple[FloatArray, FloatArray]:
    centred = points - points.mean(axis=0, keepdims=True)
    return centered_gram_spectrum(centred @ centred.T)


def project_to_pca(trajectories: Any, n_components: int = 10) -> tuple[FloatArray, FloatArray]:
    """Coordinates of every checkpoint of every replica on the principal components of the whole cloud.

    Args:
        trajectories: ``[T, N, P]``.
        n_components: components kept (at most ``T * N``).

    Returns:
        ``(projected [T, N, c], explained_variance_ratio [c])``. Each component's sign is fixed so that
        its largest-magnitude coordinate is positive (sklearn's PCA may flip signs).
    """
    traj = _trajectories(trajectories)
    n_t, n, p = traj.shape
    vals, vecs = _centred_spectrum(traj.reshape(n_t * n, p))
    scores, ratio = pca_scores(vals, vecs, min(int(n_components), p, n_t * n))
    return scores.reshape(n_t, n, -1), ratio


def compute_participation_ratio(data: Any) -> float:
    r"""Effective number of dimensions of a point cloud ``[n_samples, n_features]``.

    .. math:: PR = \frac{(\sum_i \lambda_i)^2}{\sum_i \lambda_i^2}

    with ``lambda_i`` the covariance eigenvalues, taken from the ``n x n`` centred Gram matrix: exact for
    any number of features ``P``, ``O(n^2 P + n^3)`` time, memory ``O(n P)`` for the centred copy plus
    ``O(n^2)`` (never ``P x P``).

    Returns:
        PR in ``[1, min(n - 1, n_features)]``; 1.0 for fewer than two samples; NaN for a cloud with no
        variance (deep-lyapunov returned 1.0).
    """
    x = _as_array(data, 2, "data [n_samples, n_features]")
    if x.shape[0] < 2 or x.shape[1] < 1:
        return 1.0
    vals, _ = _centred_spectrum(x)
    return participation_ratio(vals)


def compute_effective_dimensionality(trajectories: Any, window_size: int | None = None) -> FloatArray:
    """Participation ratio of the trajectory cloud: the whole run, or sliding windows of checkpoints.

    Args:
        trajectories: ``[T, N, P]``.
        window_size: ``None`` (default): one value for all ``T * N`` points, as
            `AnalysisResults.effective_dimensionality`. An int ``W``: one value per window of ``W``
            checkpoints, windows starting every ``max(1, W // 2)`` checkpoints (the whole run when
            ``W >= T``).

    Returns:
        Array of participation ratios (one element without ``window_size``).
    """
    traj = _trajectories(trajectories)
    n_t, n, p = traj.shape
    if window_size is None or window_size >= n_t:
        return np.array([compute_participation_ratio(traj.reshape(n_t * n, p))])
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise InputError(f"window_size must be a positive int, got {window_size!r}")
    step = max(1, window_size // 2)
    starts = range(0, n_t - window_size + 1, step)
    return np.array([compute_participation_ratio(traj[a : a + window_size].reshape(-1, p)) for a in starts])
