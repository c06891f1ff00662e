"""Pure math of the perturbation-trajectory analysis (numpy only, no torch, no state).

Notation: ``N`` replicas, ``T`` checkpoints at times ``t_0 < ... < t_{T-1}`` (epochs or
`record_checkpoint` calls), ``d_m(t)`` the distance of replica pair ``m`` in the full weight space.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from scipy import stats

__all__: list[str] = []

FloatArray = NDArray[np.float64]


def pair_indices(n: int) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Indices ``(i, j)``, ``i < j``, of the ``n(n-1)/2`` replica pairs in row-major order."""
    iu, ju = np.triu_indices(n, k=1)
    return iu, ju


def pair_membership(n: int) -> NDArray[np.bool_]:
    """``M[u, m]`` is True when replica ``u`` belongs to pair ``m`` (shape ``[n, n(n-1)/2]``)."""
    iu, ju = pair_indices(n)
    units = np.arange(n)[:, None]
    return (iu[None, :] == units) | (ju[None, :] == units)


def rms_spread(d2: FloatArray) -> FloatArray:
    r"""Spread of the replica cloud at every checkpoint.

    .. math:: s(t) = \sqrt{\tfrac{1}{M}\textstyle\sum_m d_m(t)^2}

    With all ``M = N(N-1)/2`` pairs this is ``sqrt(2N/(N-1))`` times the RMS distance to the centroid
    (``sum_{i<j} |x_i - x_j|^2 = N sum_i |x_i - xbar|^2``), so ratios of it are ratios of the
    cloud's standard deviation in the full weight space.

    Args:
        d2: squared distances, shape ``[T, M]``.

    Returns:
        ``s``, shape ``[T]``.
    """
    return np.sqrt(np.mean(np.asarray(d2, dtype=np.float64), axis=1))


def median_spread(d2: FloatArray) -> FloatArray:
    r"""Robust spread ``s(t) = sqrt(median_m d2[t, m])``: a single runaway replica does not set it.

    Args:
        d2: squared distances, shape ``[T, M]``.

    Returns:
        ``s``, shape ``[T]``.
    """
    return np.sqrt(np.median(np.asarray(d2, dtype=np.float64), axis=1))


def growth_rates(spread: FloatArray, times: FloatArray, window: int = 1) -> tuple[float, FloatArray]:
    r"""Global and local Lyapunov exponents of a spread curve.

    .. math::
        \lambda = \frac{\log s(t_{T-1}) - \log s(t_0)}{t_{T-1} - t_0}, \qquad
        \lambda_k = \frac{\log s(t_{k+w}) - \log s(t_k)}{t_{k+w} - t_k}

    With ``w = 1`` the global exponent is the time-weighted mean of the local ones. A spread of exactly
    0 gives ``-inf`` (the replicas merged), never a silent 0.

    Args:
        spread: ``s(t_k)``, shape ``[T]``, ``T >= 2``.
        times: ``t_k``, strictly increasing, shape ``[T]``.
        window: ``w``, the checkpoint intervals one local exponent spans (clipped to ``[1, T - 1]``).

    Returns:
        ``(lambda, local)`` with ``local`` of shape ``[T-w]``.
    """
    s = np.asarray(spread, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    w = max(1, min(int(window), s.shape[0] - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s = np.log(s)
        local = (log_s[w:] - log_s[:-w]) / (t[w:] - t[:-w])
        lam = float((log_s[-1] - log_s[0]) / (t[-1] - t[0]))
    return lam, local


def jackknife_intervals(
    d2: FloatArray,
    membership: NDArray[np.bool_],
    times: FloatArray,
    level: float = 0.95,
    reducer: Callable[[FloatArray], FloatArray] = rms_spread,
    window: int = 1,
) -> tuple[tuple[float, float], FloatArray]:
    r"""Confidence intervals of the global and local exponents, delete-one-unit jackknife.

    A *unit* is an independent source of variation: a replica (deleting it removes its ``N-1``
    pairs) or, with renormalisation, one perturbation. With ``theta`` the estimate from all units
    and ``theta_(u)`` the estimate without unit ``u`` (``U`` units):

    .. math::
        \widehat{se}^2 = \frac{U-1}{U}\sum_u \big(\theta_{(u)} - \bar\theta_{(\cdot)}\big)^2, \qquad
        \theta \pm t_{U-1,\,(1+level)/2}\;\widehat{se}

    Pairs that share a replica are correlated, so a t-interval over pairs would be too narrow; the
    jackknife over units accounts for it. Intervals are NaN when fewer than two units can be deleted
    while leaving at least one pair, or when a deleted estimate is not finite.

    Args:
        d2: squared distances, ``[T, M]``.
        membership: ``[U, M]``, True where unit ``u`` takes part in pair ``m``.
        times: ``[T]``.
        level: coverage, e.g. 0.95.
        reducer: squared distances ``[T, M]`` to the spread ``[T]`` (`rms_spread` or `median_spread`).
        window: ``w`` of the local exponents (see `growth_rates`).

    Returns:
        ``((low, high), local)`` where ``local`` is ``[T-w, 2]``.
    """
    d2 = np.asarray(d2, dtype=np.float64)
    n_times = d2.shape[0]
    w = max(1, min(int(window), n_times - 1))
    nan_local = np.full((n_times - w, 2), np.nan)
    units = membership.shape[0]
    if units < 2:
        return (math.nan, math.nan), nan_local
    full_lam, full_local = growth_rates(reducer(d2), times, w)
    lams = np.empty(units)
    locals_ = np.empty((units, n_times - w))
    for u in range(units):
        keep = ~membership[u]
        if not keep.any():
            return (math.nan, math.nan), nan_local
        lams[u], locals_[u] = growth_rates(reducer(d2[:, keep]), times, w)
    quantile = float(stats.t.ppf(0.5 + level / 2.0, units - 1))

    def interval(center: FloatArray, deleted: FloatArray) -> NDArray[np.float64]:
        with np.errstate(invalid="ignore"):
            dev = deleted - deleted.mean(axis=0)
            se = np.sqrt((units - 1) / units * np.sum(dev * dev, axis=0))
            out = np.stack([center - quantile * se, center + quantile * se], axis=-1)
        bad = ~np.isfinite(out).all(axis=-1)
        out[bad] = np.nan
        return out

    glob = interval(np.asarray(full_lam), lams)
    return (float(glob[0]), float(glob[1])), interval(full_local, locals_)


def centered_gram_spectrum(gram: FloatArray) -> tuple[FloatArray, FloatArray]:
    r"""Eigen-decomposition of the doubly centred Gram matrix of a point cloud.

    For points ``x_1..x_n`` with Gram ``G = X X^T``, the centred Gram is ``H G H`` with
    ``H = I - 11^T/n``. Its non-zero eigenvalues are those of the scatter matrix
    ``(X - xbar)^T (X - xbar)`` (``P x P``), so the PCA of any number of parameters needs no ``P x P``
    matrix: the caller builds ``G`` in ``O(n^2 P)``, this decomposition costs ``O(n^3)``.

    Args:
        gram: ``[n, n]`` Gram matrix (centred or not).

    Returns:
        ``(eigenvalues, eigenvectors)`` sorted by decreasing eigenvalue; negative round-off is
        clipped to 0.
    """
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    h = np.eye(n) - 1.0 / n
    gc = h @ g @ h
    gc = 0.5 * (gc + gc.T)
    vals, vecs = np.linalg.eigh(gc)
    order = np.argsort(vals)[::-1]
    return np.clip(vals[order], 0.0, None), vecs[:, order]


def participation_ratio(eigenvalues: FloatArray) -> float:
    r"""Effective dimensionality of a spectrum.

    .. math:: PR = \frac{(\sum_i \lambda_i)^2}{\sum_i \lambda_i^2}

    1 when all variance lies along one direction, ``k`` when it is spread evenly over ``k``.
    NaN for a cloud without any variance.
    """
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    denom = float(np.sum(lam * lam))
    if denom <= 0.0:
        return math.nan
    return float(np.sum(lam) ** 2 / denom)


def pca_scores(eigenvalues: FloatArray, eigenvectors: FloatArray, n_components: int) -> tuple[FloatArray, FloatArray]:
    r"""Principal-component coordinates of the points from the centred Gram spectrum.

    With ``H G H = U diag(lambda) U^T``, the coordinates of point ``a`` on component ``c`` are
    ``U[a, c] sqrt(lambda_c)`` (the same as projecting the centred points on the ``c``-th right
    singular vector). Each component's sign is chosen so that its largest-magnitude coordinate is
    positive, which makes the output deterministic.

    Returns:
        ``(scores [n, c], explained_variance_ratio [c])`` with ``c = min(n_components, n)``.
    """
    c = min(int(n_components), eigenvectors.shape[1])
    lam = eigenvalues[:c]
    scores = eigenvectors[:, :c] * np.sqrt(lam)[None, :]
    if scores.size:
        pivot = np.argmax(np.abs(scores), axis=0)
        signs = np.sign(scores[pivot, np.arange(c)])
        signs[signs == 0] = 1.0
        scores = scores * signs[None, :]
    total = float(np.sum(eigenvalues))
    ratio = lam / total if total > 0 else np.zeros_like(lam)
    return scores, ratio


def path_statistics(step_sq: FloatArray, times: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    r"""Path length and speed of each replica between checkpoints.

    .. math::
        L_i = \sum_k |x_i(t_{k+1}) - x_i(t_k)|, \qquad
        v_{i,k} = |x_i(t_{k+1}) - x_i(t_k)| / (t_{k+1} - t_k)

    Args:
        step_sq: squared displacements, ``[T-1, N]``.
        times: ``[T]``.

    Returns:
        ``(path_length [N], speed_mean [N], speed_std [N])`` (population std).
    """
    steps = np.sqrt(np.asarray(step_sq, dtype=np.float64))
    if steps.shape[0] == 0:
        zeros = np.zeros(steps.shape[1])
        return zeros, zeros, zeros
    speed = steps / np.diff(np.asarray(times, dtype=np.float64))[:, None]
    return steps.sum(axis=0), speed.mean(axis=0), speed.std(axis=0)
