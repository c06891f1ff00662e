"""`stabwatch.functional.gradients` against float64 concatenated-norm references."""

from __future__ import annotations

import math

import pytest
import torch

from stabwatch import functional as F
from stabwatch.functional.gradients import group_norms


def test_gradient_norm_matches_concatenated_norm():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(7, 3, generator=g), torch.randn(5, generator=g), torch.randn(2, 3, 4, generator=g)]
    total, per = F.gradient_norm(ts)
    ref = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in ts]))
    assert torch.allclose(total, ref, rtol=1e-6)
    assert torch.allclose(per, torch.stack([torch.linalg.vector_norm(t) for t in ts]), rtol=1e-6)


def test_gradient_norm_propagates_nonfinite():
    total, per = F.gradient_norm([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert math.isnan(float(total)) and math.isfinite(float(per[0]))


def test_update_ratio_matches_definition():
    g = torch.Generator().manual_seed(1)
    before = [torch.randn(4, 4, generator=g), torch.randn(4, generator=g)]
    after = [b + 1e-3 * torch.randn(b.shape, generator=g) for b in before]
    num = torch.linalg.vector_norm(torch.cat([(a - b).reshape(-1) for a, b in zip(after, before, strict=True)]))
    den = torch.linalg.vector_norm(torch.cat([b.reshape(-1) for b in before]))
    assert torch.allclose(F.update_ratio(before, after), num / den, rtol=1e-5)


def test_squared_norms_dot_and_fallback_paths_agree_with_float64():
    g = torch.Generator().manual_seed(1)
    ts = [
        torch.randn(64, 33, generator=g),  # contiguous float32: BLAS dot
        torch.randn(33, 64, generator=g).T,  # non-contiguous: fused norm
        torch.randn(17, generator=g).double(),
        torch.randn(9, generator=g).half(),
    ]
    sq = F.squared_norms(ts)
    ref = torch.stack([t.double().square().sum() for t in ts])
    assert sq.dtype == torch.float64 and torch.allclose(sq, ref, rtol=1e-3)
    assert torch.allclose(sq[:3], ref[:3], rtol=1e-6)


def test_group_norms_match_per_group_concatenated_norms():
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(5, 3, generator=g), torch.randn(3, generator=g), torch.randn(7, generator=g)]
    group = torch.tensor([1, 1, 0])
    got = group_norms(F.squared_norms(ts), group, 3)  # group 2 has no member: 0; squares are float32 sums
    ref = [
        torch.linalg.vector_norm(
            torch.cat([t.double().reshape(-1) for t, k in zip(ts, group.tolist(), strict=True) if k == i])
        )
        for i in (0, 1)
    ]
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert torch.allclose(got[:2], torch.stack(ref), rtol=1e-6) and float(got[2]) == 0.0
    both = group_norms(torch.stack([F.squared_norms(ts), 4 * F.squared_norms(ts)]), group, 3)  # rows kept apart
    assert both.shape == (2, 3) and torch.allclose(both[1], 2 * both[0], rtol=1e-12)


def test_relative_update_is_defined_for_zero_weights():
    d = torch.tensor([0.5, 0.5, 0.0, 0.0, float("nan"), float("inf")], dtype=torch.float64)
    w = torch.tensor([2.0, 0.0, 0.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    got = F.relative_update(d, w).tolist()
    # ||d|| / ||w||; from zero: ||d|| / ||theta_after|| = ||d|| / ||d|| = 1, and 0 when nothing moved
    assert got[:4] == [0.25, 1.0, 0.0, 0.0]
    assert math.isnan(got[4]) and math.isnan(got[5])  # a non-finite update is never hidden


def test_update_ratio_of_weights_that_start_at_zero():
    """A LoRA-style pair: A random, B zero. The ratio over both is the ordinary one; over B alone 1."""
    g = torch.Generator().manual_seed(2)
    a0, b0 = torch.randn(4, 8, generator=g), torch.zeros(8, 4)
    a1, b1 = a0 + 1e-2 * torch.randn(4, 8, generator=g), 1e-3 * torch.randn(8, 4, generator=g)
    both = float(F.update_ratio([a0, b0], [a1, b1]))
    want = math.sqrt(float((a1 - a0).double().square().sum() + b1.double().square().sum())) / float(a0.double().norm())
    assert both == pytest.approx(want, rel=1e-6)
    assert float(F.update_ratio([b0], [b1])) == 1.0
    assert float(F.update_ratio([b0], [b0.clone()])) == 0.0
