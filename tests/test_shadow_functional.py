"""stabwatch.functional.lyapunov: the shadow's pure math against torch.linalg / numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stabwatch.functional.lyapunov import (
    clamp_min_,
    difference_norms,
    global_norm,
    min_relative_eps,
    random_direction,
    rescale_difference_,
    scaled_difference,
    tangent_lyapunov,
    truncated_mean,
)


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(4, 3, generator=g),
        torch.randn(7, generator=g, dtype=torch.float64),
        torch.randn(2, 2, 2, generator=g),
    ]


def test_min_relative_eps_is_hundred_machine_eps():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert min_relative_eps(dtype) == pytest.approx(100 * torch.finfo(dtype).eps, rel=1e-12)
    assert 1e-5 < min_relative_eps(torch.float32) < 1e-4  # measured: float32 needs ε ≥ 1e-5


def test_global_norm_matches_concatenated_norm_with_mixed_dtypes():
    ts = _tensors()
    ref = torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in ts]))
    got = global_norm(ts)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
    assert float(global_norm([])) == 0.0


def test_difference_norms_per_tensor():
    a, b = _tensors(0), _tensors(1)
    got = difference_norms(a, b)
    ref = torch.tensor([float(torch.linalg.vector_norm((x - y).double())) for x, y in zip(a, b)])
    torch.testing.assert_close(got, ref.double(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="2 real"):
        difference_norms(a, b[:2])


@pytest.mark.parametrize("as_tensor", [False, True])
def test_rescale_difference_in_place(as_tensor):
    shadow, real = _tensors(0), _tensors(1)
    expected = [r.double() + 0.37 * (s.double() - r.double()) for s, r in zip(shadow, real)]
    c = torch.tensor(0.37, dtype=torch.float64) if as_tensor else 0.37
    ids = [id(s) for s in shadow]
    rescale_difference_(shadow, real, c)
    assert [id(s) for s in shadow] == ids  # in place
    for s, e in zip(shadow, expected):
        torch.testing.assert_close(s.double(), e, rtol=1e-6, atol=1e-6)
    # the rescaled difference has the requested size
    ratio = difference_norms(shadow, real) / difference_norms(_tensors(0), real)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.37), rtol=1e-5, atol=0)


def test_random_direction_norm_shapes_and_own_generator():
    like = _tensors()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    d1 = random_direction(like, torch.Generator().manual_seed(3), norm=2.5)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG did not move
    d2 = random_direction(like, torch.Generator().manual_seed(3), norm=torch.tensor(2.5))
    for a, b, t in zip(d1, d2, like):
        assert a.shape == t.shape and a.dtype == t.dtype and torch.equal(a, b)
    assert float(global_norm(d1)) == pytest.approx(2.5, rel=1e-6)
    d3 = random_direction(like, torch.Generator().manual_seed(4), norm=2.5)
    assert not torch.equal(d1[0], d3[0])


def _nonnormal(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    while True:
        a = rng.standard_normal((n, n)) / math.sqrt(n)
        ev = np.linalg.eigvals(a)
        top = np.sort(np.abs(ev))[::-1]
        # a real, well-separated top eigenvalue makes the finite-time estimate converge geometrically
        if abs(ev[np.argmax(np.abs(ev))].imag) < 1e-12 and top[1] / top[0] < 0.8:
            return a


@pytest.mark.parametrize("renorm", [1, 5])
def test_tangent_lyapunov_linear_map_equals_log_spectral_radius(renorm):
    a = _nonnormal(6, seed=renorm)
    ref = math.log(max(abs(np.linalg.eigvals(a))))
    A = torch.tensor(a)
    v0 = [torch.ones(6, dtype=torch.float64)]
    est = tangent_lyapunov(
        lambda x: (A @ x,), [torch.zeros(6, dtype=torch.float64)], v0, 200, transient=60, renorm=renorm
    )
    assert est.steps == 140
    assert est.lyapunov == pytest.approx(ref, abs=1e-9)
    assert est.log_growth == pytest.approx(ref * 140, abs=1e-7)
    assert len(est.local) == (200 // renorm if 60 % renorm == 0 else 200 // renorm + 1)


def test_tangent_lyapunov_cycle_of_maps_equals_product():
    rng = np.random.default_rng(2)  # a seed whose cycle product has a real, separated top eigenvalue
    mats = [np.eye(4) + 0.4 * rng.standard_normal((4, 4)) for _ in range(3)]
    prod = mats[2] @ mats[1] @ mats[0]
    ev = np.linalg.eigvals(prod)
    assert abs(ev[np.argmax(np.abs(ev))].imag) < 1e-12
    ref = math.log(max(abs(ev))) / 3
    ts = [torch.tensor(m) for m in mats]
    est = tangent_lyapunov(
        lambda x, m: (m @ x,),
        [torch.zeros(4, dtype=torch.float64)],
        [torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)],
        300,
        transient=150,
        step_args=lambda t: (ts[t % 3],),
    )
    assert est.lyapunov == pytest.approx(ref, abs=1e-9)


def test_tangent_lyapunov_rejects_bad_arguments():
    A = torch.eye(2, dtype=torch.float64)
    s, v = [torch.zeros(2, dtype=torch.float64)], [torch.ones(2, dtype=torch.float64)]
    with pytest.raises(ValueError, match="transient"):
        tangent_lyapunov(lambda x: (A @ x,), s, v, 10, transient=10)
    with pytest.raises(ValueError, match="zero"):
        tangent_lyapunov(lambda x: (A @ x,), s, [torch.zeros(2, dtype=torch.float64)], 10)
    with pytest.raises(ValueError, match="direction tensors"):
        tangent_lyapunov(lambda x: (A @ x,), s, v + v, 10)


def _mser_reference(x: np.ndarray, max_cut: int) -> tuple[float, int]:
    """MSER by its definition, one truncation point at a time."""
    stats = [np.sum((x[d:] - x[d:].mean()) ** 2) / (len(x) - d) ** 2 for d in range(max_cut + 1)]
    d = int(np.argmin(stats))
    return float(x[d:].mean()), d


@pytest.mark.parametrize("seed", range(6))
def test_truncated_mean_is_mser(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    # a decaying transient on top of noise, the shape of a shadow's log growth while it aligns
    x = 0.05 + 0.3 * rng.standard_normal(n) * 0.1 - 0.5 * np.exp(-np.arange(n) / 3.0)
    mean, cut = truncated_mean(torch.tensor(x, dtype=torch.float32))
    ref_mean, ref_cut = _mser_reference(x.astype(np.float32).astype(np.float64), n // 2)
    assert int(cut) == ref_cut
    assert float(mean) == pytest.approx(ref_mean, abs=1e-12)
    assert mean.dtype == torch.float64 and cut.dim() == 0
    # max_cut bounds the transient; 0 is the plain mean
    mean0, cut0 = truncated_mean(torch.tensor(x), max_cut=0)
    assert int(cut0) == 0 and float(mean0) == pytest.approx(x.mean(), abs=1e-12)


def test_truncated_mean_cuts_a_trend_and_keeps_a_stationary_series():
    rng = np.random.default_rng(0)
    stationary = torch.tensor(rng.standard_normal(20))
    _, cut = truncated_mean(stationary)
    assert int(cut) <= 10
    trend = torch.tensor(np.r_[np.linspace(-1.0, 0.0, 6), np.zeros(14)])
    mean, cut = truncated_mean(trend)
    assert int(cut) >= 5 and float(mean) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(Exception, match="non-empty 1-D"):
        truncated_mean(torch.zeros(0))


def test_scaled_difference_is_new_tensors():
    shadow, real = _tensors(1), _tensors(2)
    before = [t.clone() for t in shadow]
    out = scaled_difference(shadow, real, torch.tensor(0.25, dtype=torch.float64))
    for o, s, r, b in zip(out, shadow, real, before):
        assert o.dtype == s.dtype and torch.equal(s, b)  # inputs untouched
        torch.testing.assert_close(o, (s - r) * 0.25)
    assert scaled_difference([], [], 2.0) == []


def test_clamp_min_in_place():
    ts = [torch.tensor([-1.0, 0.5]), torch.tensor([[-2.0]], dtype=torch.float64)]
    objects = list(ts)
    clamp_min_(ts, 0.0)
    assert [t is o for t, o in zip(ts, objects)] == [True, True]
    assert ts[0].tolist() == [0.0, 0.5] and ts[1].tolist() == [[0.0]]
    clamp_min_([])  # nothing to do


def test_private_foreach_ops_match_per_tensor_math():
    """The shadow's only private torch names: the fused ``torch._foreach_*`` kernels (no public multi-tensor
    API exists). Pinned here, with the call forms the shadow uses, so a torch that renames or changes them
    fails this test rather than the estimates."""
    names = ["_foreach_norm", "_foreach_sub", "_foreach_sub_", "_foreach_mul_", "_foreach_add_", "_foreach_clamp_min_"]
    missing = [n for n in names if not callable(getattr(torch, n, None))]
    assert missing == [], f"torch {torch.__version__} lacks {missing}: stabwatch.functional.lyapunov needs a fallback"
    a, b = _tensors(0), _tensors(1)
    for got, t in zip(torch._foreach_norm(a, 2.0), a):
        assert torch.equal(got, torch.linalg.vector_norm(t))
    for got, x, y in zip(torch._foreach_sub(a, b), a, b):
        assert torch.equal(got, x - y)
    c = torch.tensor(0.37, dtype=torch.float64)  # a 0-d device scalar, as rescale_difference_ passes it
    for dtype in (torch.float32, torch.float64):
        sh = [t.clone() for t in a if t.dtype == dtype]
        re = [t for t in b if t.dtype == dtype]
        ref = [(x - y) * c.to(dtype) + y for x, y in zip(sh, re)]
        torch._foreach_sub_(sh, re)
        torch._foreach_mul_(sh, c.to(dtype))
        torch._foreach_add_(sh, re)
        for got, want in zip(sh, ref):
            assert torch.equal(got, want)
    clamped = [t.clone() for t in a]
    torch._foreach_clamp_min_(clamped, 0.0)
    for got, t in zip(clamped, a):
        assert torch.equal(got, t.clamp_min(0.0))
