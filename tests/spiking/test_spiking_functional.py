"""`stabwatch.functional.spiking` against independent numpy computations on the same spikes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stabwatch.functional.spiking import (
    firing_rates,
    firing_statistics,
    layer_firing_statistics,
    layer_membrane_statistics,
    membrane_moments,
    membrane_statistics,
    pooled_membrane_statistics,
    sample_dims,
    spike_counts,
)


def _spikes(shape: tuple[int, ...], p: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p).float()


def _ref_rates(s: np.ndarray, time_dim: int | None) -> np.ndarray:
    """Per-neuron rate by explicit loops over the sample dims (the definition, not a vectorised copy)."""
    if time_dim == 1:
        s = np.swapaxes(s, 0, 1)
    if time_dim is None:
        s = s[None]
    total = np.zeros(s.shape[2:], dtype=np.float64)
    for t in range(s.shape[0]):
        for b in range(s.shape[1]):
            total += s[t, b]
    return total / (s.shape[0] * s.shape[1])


def _ref_firing(rates: np.ndarray, dead: float = 0.01, sat: float = 0.9) -> list[float]:
    r = rates.reshape(-1).astype(np.float64)
    std = float(np.std(r, ddof=1)) if r.size > 1 else 0.0
    return [float(r.mean()), std, float(np.mean(r < dead)), float(np.mean(r > sat))]


@pytest.mark.parametrize(
    ("shape", "time_dim"),
    [((6, 20), None), ((7, 5, 12), 0), ((5, 7, 12), 1), ((4, 6, 3, 4, 4), 0), ((6, 3, 5, 5), None)],
)
def test_rates_and_counts_match_definition(shape, time_dim):
    s = _spikes(shape, seed=len(shape))
    counts, n = spike_counts(s, time_dim)
    expected_n = shape[0] * (shape[1] if time_dim is not None else 1)
    assert n == expected_n
    ref = _ref_rates(s.numpy(), time_dim)
    assert counts.shape == ref.shape  # one neuron per position of the per-sample feature shape
    np.testing.assert_allclose((counts / n).numpy(), ref, rtol=0, atol=1e-7)
    np.testing.assert_allclose(firing_rates(s, time_dim).numpy(), ref, rtol=0, atol=1e-7)


def test_bool_int_and_graded_spikes():
    s = _spikes((4, 9), seed=3)
    ref = _ref_rates(s.numpy(), None)
    np.testing.assert_allclose(firing_rates(s.bool()).numpy(), ref, atol=1e-7)
    np.testing.assert_allclose(firing_rates(s.to(torch.int64)).numpy(), ref, atol=1e-7)
    np.testing.assert_allclose(firing_rates(0.5 * s).numpy(), 0.5 * ref, atol=1e-7)  # graded spikes count by value


def test_firing_statistics_match_numpy_and_threshold_edges():
    rates = torch.tensor([0.0, 0.005, 0.01, 0.5, 0.9, 0.95, 1.0], dtype=torch.float64)
    got = firing_statistics(rates).tolist()
    np.testing.assert_allclose(got, _ref_firing(rates.numpy()), rtol=1e-12)
    # strict inequalities: 0.01 is not dead, 0.9 is not saturated
    assert got[2] == pytest.approx(2 / 7) and got[3] == pytest.approx(2 / 7)
    got = firing_statistics(rates, dead_threshold=0.02, saturated_threshold=0.5).tolist()
    np.testing.assert_allclose(got, _ref_firing(rates.numpy(), 0.02, 0.5), rtol=1e-12)
    assert firing_statistics(torch.tensor([0.3])).tolist() == pytest.approx([0.3, 0.0, 0.0, 0.0])
    assert all(np.isnan(firing_statistics(torch.zeros(0)).tolist()))


def test_layer_firing_statistics_equal_per_layer_and_pooled_reference():
    layers = [_spikes((30, 17), 0.2, seed=1), _spikes((12, 3, 4, 4), 0.6, seed=2), torch.zeros(8, 5)]
    dims = [None, 0, None]
    counts, samples = zip(*(spike_counts(s, d) for s, d in zip(layers, dims, strict=True)), strict=True)
    per, pooled = layer_firing_statistics(list(counts), list(samples))
    refs = [_ref_rates(s.numpy(), d) for s, d in zip(layers, dims, strict=True)]
    assert per.shape[0] == len(refs) == 3
    for row, ref in zip(per.tolist(), refs, strict=True):
        np.testing.assert_allclose(row, _ref_firing(ref), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        pooled.tolist(), _ref_firing(np.concatenate([r.reshape(-1) for r in refs])), rtol=1e-10, atol=1e-12
    )
    assert per[2].tolist() == [0.0, 0.0, 1.0, 0.0]  # a silent layer: all neurons dead
    with pytest.raises(ValueError, match="one sample count per layer"):
        layer_firing_statistics(list(counts), [1])


def test_membrane_statistics_match_numpy():
    g = torch.Generator().manual_seed(4)
    v = torch.randn(25, 8, 30, generator=g) * 0.7 + 0.2
    theta = torch.linspace(0.5, 1.5, 30)  # per-neuron threshold
    mean, std, gap = membrane_statistics(v, theta).tolist()
    vn = v.double().numpy()
    assert mean == pytest.approx(vn.mean(), rel=1e-6)
    assert std == pytest.approx(vn.std(ddof=1), rel=1e-6)
    assert gap == pytest.approx((theta.double().numpy() - vn).mean(), rel=1e-6)
    mean, std, gap = membrane_statistics(v, 1.0).tolist()
    assert gap == pytest.approx((1.0 - vn).mean(), rel=1e-6)
    assert np.isnan(membrane_statistics(v)[2].item())  # no threshold, no distance


def test_membrane_moments_accumulate_to_pooled_statistics():
    g = torch.Generator().manual_seed(5)
    parts = [torch.randn(8, 10, generator=g) + 3.0 for _ in range(25)]
    rows, n = [], 0
    for p in parts:
        m, th, k = membrane_moments(p, torch.tensor(1.0))
        rows.append(torch.cat([m.double(), torch.as_tensor(th, dtype=torch.float64).reshape(1)]))
        n += k
    stats = layer_membrane_statistics(torch.stack(rows).sum(0), torch.tensor(float(n))).tolist()
    allv = torch.cat([p.reshape(-1) for p in parts]).double().numpy()
    np.testing.assert_allclose(stats, [allv.mean(), allv.std(ddof=1), (1.0 - allv).mean()], rtol=1e-6)


def test_membrane_threshold_must_broadcast():
    with pytest.raises(ValueError, match=r"threshold of shape \(7,\) does not broadcast to the membrane \(4, 5\)"):
        membrane_moments(torch.zeros(4, 5), torch.ones(7))
    with pytest.raises(ValueError, match="does not broadcast"):
        membrane_moments(torch.zeros(5), torch.ones(4, 5))  # would grow the membrane


def test_sample_dims_errors():
    assert sample_dims(4, 1) == (0, 1)
    with pytest.raises(ValueError, match="time_dim must be None, 0"):
        sample_dims(3, 2)
    with pytest.raises(ValueError, match=r"needs a tensor \[T, B, ...\]"):
        sample_dims(1, 0)
    with pytest.raises(ValueError, match="needs a batch dim"):
        spike_counts(torch.tensor(1.0))


def test_pooled_membrane_statistics_against_numpy_on_the_concatenated_values():
    g = torch.Generator().manual_seed(9)
    layers = [
        torch.randn(4, 10, generator=g) * 0.5 - 0.2,
        torch.randn(3, 6, generator=g) + 1.0,
        torch.randn(50, generator=g),
    ]
    thresholds = [1.0, torch.linspace(0.5, 1.5, 6), None]  # a float, a per-neuron tensor, none
    rows, counts = [], []
    for v, th in zip(layers, thresholds, strict=True):
        moments, th_sum, n = membrane_moments(v, th)
        th_t = torch.tensor(float("nan") if th_sum is None else float(th_sum), dtype=torch.float64)
        rows.append(torch.cat([moments.double(), th_t.reshape(1)]))
        counts.append(float(n))
    per, pooled = pooled_membrane_statistics(torch.stack(rows), torch.tensor(counts))
    allv = np.concatenate([v.double().reshape(-1).numpy() for v in layers])
    np.testing.assert_allclose(pooled[:2].numpy(), [allv.mean(), allv.std(ddof=1)], rtol=1e-6)
    gaps = [
        np.broadcast_to(
            np.asarray(th if not isinstance(th, torch.Tensor) else th.numpy(), dtype=np.float64), v.shape
        ).reshape(-1)
        - v.double().reshape(-1).numpy()
        for v, th in zip(layers[:2], thresholds[:2], strict=True)
    ]
    assert pooled[2].item() == pytest.approx(np.concatenate(gaps).mean(), rel=1e-6)  # layers with a threshold
    for i, v in enumerate(layers):
        want = membrane_statistics(v, thresholds[i])
        torch.testing.assert_close(per[i, :2], want[:2])
    # an explicit mask overrides "has a threshold": with none, the pooled gap is NaN
    _, none = pooled_membrane_statistics(torch.stack(rows), torch.tensor(counts), torch.zeros(3, dtype=torch.bool))
    assert torch.isnan(none[2]) and torch.equal(none[:2], pooled[:2])
