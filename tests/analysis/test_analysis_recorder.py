"""Online recording: exact distances, the random projection, and the Gram matrix, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stabwatch.analysis import _stats
from stabwatch.analysis._recorder import SubsampledFourierProjection, TrajectoryRecorder


class ArrayView:
    """A ReplicaView over a ``[N, P]`` array split into tensors of the given sizes."""

    def __init__(self, x: np.ndarray, numels: list[int], dtype=torch.float32) -> None:
        self.x = torch.tensor(x, dtype=dtype)
        self.bounds = np.cumsum([0, *numels])

    @property
    def n_replicas(self) -> int:
        return self.x.shape[0]

    def columns(self, j, start, stop):
        return self.x[:, self.bounds[j] : self.bounds[j + 1]][:, start:stop]

    def grad_norms(self):
        return np.full(self.n_replicas, np.nan)

    def renormalize(self, alphas):
        raise AssertionError("not used")


def _trajectory(seed: int, t: int, n: int, p: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(p)
    drift = np.cumsum(0.5 * rng.standard_normal((t, 1, p)), axis=0)
    return (base + drift + 1e-3 * rng.standard_normal((t, n, p))).astype(np.float32)


def _record_all(x: np.ndarray, numels: list[int], **kw) -> TrajectoryRecorder:
    rec = TrajectoryRecorder(
        numels,
        x.shape[1],
        projection_dim=kw.pop("projection_dim", 64),
        max_exact_bytes=kw.pop("max_exact_bytes", 2**30),
        seed=0,
        store_dtype=torch.float32,
    )
    for k, xt in enumerate(x):
        rec.record(ArrayView(xt, numels), float(k))
    return rec


def test_distances_norms_and_steps_are_exact():
    numels = [7, 1, 12]  # includes a one-element tensor
    x = _trajectory(0, 4, 5, sum(numels))
    rec = _record_all(x, numels)
    xd = x.astype(np.float64)
    for k in range(4):
        want = np.linalg.norm(xd[k][:, None, :] - xd[k][None, :, :], axis=-1) ** 2
        np.testing.assert_allclose(rec.pair_sq[k], want, rtol=1e-12, atol=0)
        np.testing.assert_allclose(rec.norm_sq[k], np.sum(xd[k] ** 2, axis=1), rtol=1e-12)
    for k in range(3):
        np.testing.assert_allclose(rec.step_sq[k], np.sum((xd[k + 1] - xd[k]) ** 2, axis=1), rtol=1e-12)
    assert rec.times == [0.0, 1.0, 2.0, 3.0]


def test_tiny_differences_of_large_weights_do_not_cancel():
    """|x_i - x_j| = 1e-4 on weights of size 1e3: a Gram-matrix shortcut in float32 would return 0."""
    p = 50
    base = np.full(p, 1000.0, dtype=np.float32)
    x = np.stack([base, base.copy()])
    x[1, 0] = np.nextafter(np.float32(1000.0), np.float32(2000.0))  # one ulp apart
    rec = _record_all(x[None], [p])
    ulp = float(np.float32(x[1, 0]) - np.float32(1000.0))
    assert rec.pair_sq[0][0, 1] == pytest.approx(ulp**2, rel=1e-12)


def test_exact_gram_matches_numpy_centred_gram():
    numels = [10, 5]
    x = _trajectory(1, 3, 4, 15)
    rec = _record_all(x, numels)
    assert rec.method == "exact"
    pts = x.reshape(12, 15).astype(np.float64)
    pts -= pts.mean(axis=0)
    np.testing.assert_allclose(rec.gram(), pts @ pts.T, rtol=1e-10, atol=1e-12)


def test_projection_with_k_at_least_p_is_an_isometry():
    proj = SubsampledFourierProjection(dim=37, k=100, seed=3)
    assert proj.k == 37
    rng = np.random.default_rng(0)
    a, b = (torch.tensor(rng.standard_normal(37)) for _ in range(2))
    pa, pb = proj(a), proj(b)
    assert float(pa @ pb) == pytest.approx(float(a @ b), rel=1e-10)
    assert float(pa @ pa) == pytest.approx(float(a @ a), rel=1e-10)


@pytest.mark.parametrize("dim", [4000, 4001])  # even and odd lengths (Nyquist row or not)
def test_projection_preserves_norms_in_expectation(dim):
    rng = np.random.default_rng(1)
    vectors = [
        torch.tensor(rng.standard_normal(dim)),  # dense
        torch.tensor(np.eye(dim)[17]),  # one spike: the sign flips + Fourier spread it out
        torch.tensor(np.r_[np.ones(dim // 2), np.zeros(dim - dim // 2)]),  # block
    ]
    for v in vectors:
        ratios = [
            float(SubsampledFourierProjection(dim, 512, seed=s)(v).square().sum() / v.square().sum()) for s in range(40)
        ]
        assert np.mean(ratios) == pytest.approx(1.0, abs=0.05)
        assert np.max(np.abs(np.array(ratios) - 1.0)) < 0.35


def test_projected_gram_approximates_the_exact_spectrum():
    numels = [3000]
    x = _trajectory(2, 4, 5, 3000)
    exact = _record_all(x, numels)
    proj = _record_all(x, numels, max_exact_bytes=0, projection_dim=1024)
    assert proj.method == "projection(k=1024)"
    ve, _ = _stats.centered_gram_spectrum(exact.gram())
    vp, _ = _stats.centered_gram_spectrum(proj.gram())
    # k = 1024 for an r = 20 point cloud: eigenvalues within ~sqrt(r/k) (measured <= 16% over seeds),
    # the participation ratio within a few percent (measured <= 2%).
    assert _stats.participation_ratio(vp) == pytest.approx(_stats.participation_ratio(ve), rel=0.05)
    np.testing.assert_allclose(vp[:3], ve[:3], rtol=0.25)
    # distances are exact in both modes
    np.testing.assert_array_equal(np.stack(proj.pair_sq), np.stack(exact.pair_sq))


def test_switching_to_the_projection_midway_equals_projecting_from_the_start():
    numels = [40, 20]
    x = _trajectory(3, 5, 3, 60)
    per_checkpoint = 3 * 60 * 4
    switched = _record_all(x, numels, max_exact_bytes=2 * per_checkpoint, projection_dim=16)
    always = _record_all(x, numels, max_exact_bytes=0, projection_dim=16)
    assert switched.mode == always.mode == "sketch"
    np.testing.assert_allclose(switched.gram(), always.gram(), rtol=1e-12, atol=1e-12)
