"""`stabwatch.functional.activations` against numpy (float64 references of the same values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stabwatch import functional as F


def _batch_std(x: np.ndarray) -> float:
    """Root mean square over units of each unit's sample std over the batch (dim 0), in float64."""
    units = x.astype(np.float64).reshape(x.shape[0], -1)
    return float(np.sqrt(np.mean(units.std(axis=0, ddof=1) ** 2)))


def test_activation_statistics_against_numpy():
    g = torch.Generator().manual_seed(6)
    x = torch.relu(torch.randn(32, 10, generator=g))
    x[:, 3] = 0.0
    x[:, 7] = 0.0
    mean, std, dead, sat, batch_std = F.activation_statistics(x, "relu").tolist()
    xn = x.numpy()
    assert mean == pytest.approx(xn.mean(), rel=1e-5)
    assert std == pytest.approx(xn.std(ddof=1), rel=1e-5)
    assert dead == pytest.approx(np.mean((xn <= 0).all(axis=0)))
    assert batch_std == pytest.approx(_batch_std(xn), rel=1e-5)
    assert math.isnan(sat)
    t = torch.tanh(3 * torch.randn(64, 20, generator=g))
    _, _, dead_t, sat_t, _ = F.activation_statistics(t, "tanh").tolist()
    assert sat_t == pytest.approx(np.mean(np.abs(t.numpy()) > 0.99)) and math.isnan(dead_t)
    s = torch.sigmoid(4 * torch.randn(64, 20, generator=g))
    sat_s = F.activation_statistics(s, "sigmoid")[3].item()
    sn = s.numpy()
    assert sat_s == pytest.approx(np.mean((sn > 0.99) | (sn < 0.01)))


@pytest.mark.parametrize("shape", [(16, 3, 5, 5), (7,), (4, 6, 2)])
def test_units_are_all_dims_but_the_batch(shape):
    g = torch.Generator().manual_seed(1)
    x = 2.0 + torch.randn(shape, generator=g)
    mean, std, _, _, batch_std = F.activation_statistics(x).tolist()
    xn = x.numpy().astype(np.float64)
    assert mean == pytest.approx(xn.mean(), rel=1e-6)
    assert std == pytest.approx(xn.std(ddof=1), rel=1e-5)
    # a 1-D tensor is B samples of one unit
    assert batch_std == pytest.approx(_batch_std(xn if xn.ndim > 1 else xn[:, None]), rel=1e-5)


def test_a_collapsed_batch_has_no_spread_across_the_batch_but_a_pooled_std():
    """Every sample the same varied vector: the pooled std is that vector's spread, the batch std 0."""
    v = torch.randn(256, generator=torch.Generator().manual_seed(0))
    x = v.expand(64, 256).contiguous()
    _, std, _, _, batch_std = F.activation_statistics(x, "smooth").tolist()
    assert std == pytest.approx(x.numpy().astype(np.float64).std(ddof=1), rel=1e-5)
    assert std > 0.5
    # the unit means are float32: 0 up to their rounding, ~1e-7 of the values' size
    assert batch_std < 1e-6


def test_small_spread_at_a_large_mean_is_exact_in_float32():
    """Mean 0.99, spread 1e-4: sum(x^2) - N*mean^2 in float32 gave 1.2e-4 or 0 here."""
    g = torch.Generator().manual_seed(2)
    for rows in (512, 4096):
        x = (0.99 + 1e-4 * torch.randn(rows, 64, generator=g, dtype=torch.float64)).float()
        _, std, _, _, batch_std = F.activation_statistics(x, "sigmoid").tolist()
        xn = x.numpy().astype(np.float64)  # the float32 values, in float64
        assert std == pytest.approx(xn.std(ddof=1), rel=1e-3)
        assert batch_std == pytest.approx(_batch_std(xn), rel=1e-3)


def test_one_sample_has_no_batch_spread():
    x = torch.tensor([[1.0, 2.0, 4.0]])
    mean, std, _, _, batch_std = F.activation_statistics(x).tolist()
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(float(np.std([1, 2, 4], ddof=1)))
    assert math.isnan(batch_std)
    assert F.activation_statistics(torch.tensor(3.0)).tolist()[:2] == [3.0, 0.0]


def test_half_precision_is_read_in_float32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 40, generator=g).to(torch.bfloat16)
    out = F.activation_statistics(x)
    assert out.dtype == torch.float32
    xn = x.float().numpy().astype(np.float64)
    assert out[1].item() == pytest.approx(xn.std(ddof=1), rel=1e-5)
    assert out[4].item() == pytest.approx(_batch_std(xn), rel=1e-5)
