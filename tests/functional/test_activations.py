"""`stabwatch.functional.activations` against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stabwatch import functional as F


def test_activation_statistics_against_numpy():
    g = torch.Generator().manual_seed(6)
    x = torch.relu(torch.randn(32, 10, generator=g))
    x[:, 3] = 0.0
    x[:, 7] = 0.0
    mean, std, dead, sat = F.activation_statistics(x, "relu").tolist()
    xn = x.numpy()
    assert mean == pytest.approx(xn.mean(), rel=1e-5)
    assert std == pytest.approx(xn.std(ddof=1), rel=1e-5)
    assert dead == pytest.approx(np.mean((xn <= 0).all(axis=0)))
    assert math.isnan(sat)
    t = torch.tanh(3 * torch.randn(64, 20, generator=g))
    _, _, dead_t, sat_t = F.activation_statistics(t, "tanh").tolist()
    assert sat_t == pytest.approx(np.mean(np.abs(t.numpy()) > 0.99)) and math.isnan(dead_t)
    s = torch.sigmoid(4 * torch.randn(64, 20, generator=g))
    sat_s = F.activation_statistics(s, "sigmoid")[3].item()
    sn = s.numpy()
    assert sat_s == pytest.approx(np.mean((sn > 0.99) | (sn < 0.01)))
