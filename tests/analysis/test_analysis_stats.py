"""The pure math of `stabwatch.analysis._stats`, each against an independent computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from stabwatch.analysis import _stats


def _cloud(seed: int, t: int, n: int, p: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    drift = np.cumsum(rng.standard_normal((t, 1, p)), axis=0)
    return drift + 0.1 * rng.standard_normal((t, n, p)) * np.arange(1, t + 1)[:, None, None]


def test_rms_spread_is_scaled_centroid_std():
    x = _cloud(0, 4, 5, 30)
    iu, ju = _stats.pair_indices(5)
    d2 = np.array([[np.sum((xt[i] - xt[j]) ** 2) for i, j in zip(iu, ju, strict=True)] for xt in x])
    spread = _stats.rms_spread(d2)
    centroid_var = np.array([np.mean(np.sum((xt - xt.mean(0)) ** 2, axis=1)) for xt in x])
    np.testing.assert_allclose(spread**2, 2 * 5 / 4 * centroid_var, rtol=1e-12)


def test_growth_rates_by_hand():
    spread = np.array([1.0, 2.0, 2.0, 8.0])
    times = np.array([0.0, 1.0, 3.0, 4.0])
    lam, local = _stats.growth_rates(spread, times)
    assert lam == pytest.approx(math.log(8.0) / 4.0)
    np.testing.assert_allclose(local, [math.log(2.0), 0.0, math.log(4.0)])
    # the global exponent is the time-weighted mean of the local ones
    assert lam == pytest.approx(np.sum(local * np.diff(times)) / 4.0)


def test_growth_rates_of_merged_replicas_is_minus_inf():
    lam, local = _stats.growth_rates(np.array([1.0, 0.5, 0.0]), np.array([0.0, 1.0, 2.0]))
    assert lam == -math.inf
    assert local[-1] == -math.inf


def _brute_jackknife(d2, membership, times, level):
    """Independent re-implementation: explicit loops, scipy for the quantile."""
    units = membership.shape[0]

    def estimate(cols):
        s = np.sqrt(d2[:, cols].mean(axis=1))
        return np.log(s[-1] / s[0]) / (times[-1] - times[0]), np.diff(np.log(s)) / np.diff(times)

    full_g, full_l = estimate(list(range(d2.shape[1])))
    dels = [estimate([m for m in range(d2.shape[1]) if not membership[u, m]]) for u in range(units)]
    g = np.array([d[0] for d in dels])
    loc = np.array([d[1] for d in dels])
    q = sps.t.ppf((1 + level) / 2, units - 1)
    se_g = math.sqrt((units - 1) / units * sum((x - g.mean()) ** 2 for x in g))
    se_l = np.sqrt((units - 1) / units * ((loc - loc.mean(0)) ** 2).sum(0))
    return (full_g - q * se_g, full_g + q * se_g), np.stack([full_l - q * se_l, full_l + q * se_l], 1)


def test_jackknife_matches_brute_force_over_replicas():
    rng = np.random.default_rng(1)
    n, t = 6, 5
    iu, ju = _stats.pair_indices(n)
    d2 = rng.uniform(0.5, 2.0, size=(t, len(iu))) * np.exp(0.3 * np.arange(t))[:, None]
    membership = _stats.pair_membership(n)
    times = np.arange(t, dtype=float)
    got_g, got_l = _stats.jackknife_intervals(d2, membership, times, level=0.9)
    want_g, want_l = _brute_jackknife(d2, membership, times, 0.9)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-12)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-12)
    # membership: unit u is in exactly the n-1 pairs that contain it
    assert membership.sum(axis=1).tolist() == [n - 1] * n
    assert len(iu) == n * (n - 1) // 2
    for m, (i, j) in enumerate(zip(iu, ju, strict=True)):
        assert membership[i, m] and membership[j, m]


def test_jackknife_is_nan_when_it_cannot_delete():
    d2 = np.ones((3, 1))
    (low, high), local = _stats.jackknife_intervals(d2, _stats.pair_membership(2), np.arange(3.0))
    assert math.isnan(low) and math.isnan(high) and np.isnan(local).all()


def test_jackknife_interval_covers_when_units_are_iid():
    """Renormalised mode: units are independent perturbations; the 95% interval should cover ~95%."""
    rng = np.random.default_rng(2)
    true_rate, covered, trials = 0.3, 0, 400
    times = np.array([0.0, 1.0])
    for _ in range(trials):
        growth = np.exp(true_rate + 0.2 * rng.standard_normal(8))
        d2 = np.stack([np.ones(8), growth**2])
        (low, high), _ = _stats.jackknife_intervals(d2, np.eye(8, dtype=bool), times)
        # the estimand: log of the RMS growth, i.e. 0.5 log E[g^2] = rate + 0.2^2
        covered += low <= true_rate + 0.04 <= high
    assert 0.88 <= covered / trials <= 0.995


def test_participation_ratio_of_known_spectra():
    assert _stats.participation_ratio(np.array([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert _stats.participation_ratio(np.array([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert _stats.participation_ratio(np.array([3.0, 1.0])) == pytest.approx(16.0 / 10.0)
    assert math.isnan(_stats.participation_ratio(np.zeros(3)))


def test_centered_gram_spectrum_equals_covariance_spectrum():
    x = _cloud(3, 4, 3, 9).reshape(12, 9)
    vals, _ = _stats.centered_gram_spectrum(x @ x.T)
    cov_vals = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False) * (x.shape[0] - 1)))[::-1]
    np.testing.assert_allclose(vals[:9], cov_vals, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(vals[9:], 0.0, atol=1e-9)
    # deep-lyapunov's participation ratio (np.cov eigenvalues) is the same number
    assert _stats.participation_ratio(vals) == pytest.approx(_stats.participation_ratio(cov_vals), rel=1e-10)


def test_pca_scores_match_svd_up_to_sign():
    x = _cloud(4, 5, 4, 40).reshape(20, 40)
    vals, vecs = _stats.centered_gram_spectrum(x @ x.T)
    scores, ratio = _stats.pca_scores(vals, vecs, 3)
    xc = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    want = u[:, :3] * s[:3]
    for c in range(3):
        sign = np.sign(scores[:, c] @ want[:, c])
        np.testing.assert_allclose(scores[:, c], sign * want[:, c], rtol=1e-7, atol=1e-9)
        assert scores[np.argmax(np.abs(scores[:, c])), c] > 0
    np.testing.assert_allclose(ratio, s[:3] ** 2 / np.sum(s**2), rtol=1e-9)


def test_path_statistics_by_hand():
    x = np.array([[[0.0, 0.0]], [[3.0, 4.0]], [[3.0, 4.0]], [[6.0, 8.0]]])  # one replica
    step_sq = np.array([[np.sum((x[k + 1, 0] - x[k, 0]) ** 2)] for k in range(3)])
    times = np.array([0.0, 1.0, 2.0, 4.0])
    length, mean, std = _stats.path_statistics(step_sq, times)
    speeds = np.array([5.0, 0.0, 2.5])
    assert length[0] == pytest.approx(10.0)
    assert mean[0] == pytest.approx(speeds.mean())
    assert std[0] == pytest.approx(speeds.std())


@pytest.mark.parametrize("n", [2, 3, 5])
def test_pair_indices_cover_every_pair_once(n):
    iu, ju = _stats.pair_indices(n)
    assert sorted(zip(iu.tolist(), ju.tolist(), strict=True)) == list(itertools.combinations(range(n), 2))
