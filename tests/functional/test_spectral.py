"""`stabwatch.functional.spectral` against ``torch.linalg`` / numpy references and analytic spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stabwatch import functional as F
from stabwatch.functional.spectral import as_matrix, batched_spectral_norm, condition_number


@pytest.mark.parametrize("shape", [(40, 7), (7, 40), (30, 30), (16, 3, 3, 3), (200, 5)])
def test_singular_values_exact(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    ref = torch.linalg.svdvals(a.reshape(shape[0], -1).double()).float()
    assert torch.allclose(F.singular_values(a), ref, rtol=1e-4, atol=1e-5)


def _matrix_with_spectrum(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def test_randomized_top_k_within_1e3_on_decaying_spectrum():
    s = [10.0 * 0.9**i for i in range(300)]
    a = _matrix_with_spectrum(600, 400, s).float()
    top, _ = F.randomized_singular_values(a, 3, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.svdvals(a.double())[:3].float()
    assert abs(float(top[0]) - float(exact[0])) / float(exact[0]) < 1e-3
    assert torch.allclose(top, exact, rtol=1e-2)


def test_randomized_top1_on_a_real_gradient_and_warm_start_improves():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(300, 512), torch.nn.Tanh(), torch.nn.Linear(512, 300))
    x = torch.randn(256, 300)
    net(x).pow(2).mean().backward()
    grad = net[0].weight.grad
    exact = float(torch.linalg.svdvals(grad.double())[0])
    gen = torch.Generator().manual_seed(3)
    top, basis = F.randomized_singular_values(grad, 1, generator=gen)
    assert abs(float(top[0]) - exact) / exact < 1e-3
    top2, _ = F.randomized_singular_values(grad, 1, generator=gen, init=basis, n_iter=1)
    assert abs(float(top2[0]) - exact) / exact <= abs(float(top[0]) - exact) / exact + 1e-7


def test_randomized_does_not_touch_global_rng():
    a = torch.randn(50, 40)
    state = torch.get_rng_state()
    F.randomized_singular_values(a, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_condition_number_uses_numerical_rank():
    # rank-3 matrix 50x20: numpy's matrix_rank agrees; kappa = s1/s3
    a = _matrix_with_spectrum(50, 20, [5.0, 2.0, 0.5]).float()
    s = F.singular_values(a)
    s_min, rank, kappa = condition_number(s, (50, 20))
    assert int(rank) == np.linalg.matrix_rank(a.numpy()) == 3
    assert float(s_min) == pytest.approx(0.5, rel=1e-4)
    assert float(kappa) == pytest.approx(10.0, rel=1e-4)
    s0, r0, k0 = condition_number(F.singular_values(torch.zeros(4, 3)), (4, 3))
    assert float(r0) == 0 and math.isinf(float(k0)) and float(s0) == 0


def test_spectral_norm_power_iteration_matches_matrix_2_norm_and_warm_starts():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 32, generator=g)
    ref = float(torch.linalg.matrix_norm(w.double(), ord=2))
    sigma, u = F.spectral_norm(w, n_iter=200, generator=g)
    assert float(sigma) == pytest.approx(ref, rel=1e-4)
    # warm start: a slightly changed matrix needs only a couple of iterations
    w2 = w + 1e-3 * torch.randn(64, 32, generator=g)
    sigma2, _ = F.spectral_norm(w2, u, n_iter=2)
    assert float(sigma2) == pytest.approx(float(torch.linalg.matrix_norm(w2.double(), ord=2)), rel=1e-3)


def test_spectral_radius_known_eigenvalues():
    # block-diagonal rotation-scalings: eigenvalues r_k * exp(+-i theta_k), plus a real one
    blocks = [(0.7, 0.3), (1.3, 2.0), (0.2, 1.0)]
    w = torch.zeros(7, 7, dtype=torch.float64)
    for k, (r, th) in enumerate(blocks):
        c, s = r * math.cos(th), r * math.sin(th)
        w[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    w[6, 6] = -0.9
    q = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).Q
    m = q @ w @ q.T  # similar matrix, same eigenvalues, not normal-looking
    assert float(F.spectral_radius(m)) == pytest.approx(1.3, rel=1e-9)
    assert float(F.spectral_radius(m.float())) == pytest.approx(1.3, rel=1e-5)
    with pytest.raises(ValueError, match="square"):
        F.spectral_radius(torch.ones(3, 4))


def test_as_matrix_flattens_conv_kernels():
    assert as_matrix(torch.zeros(8, 3, 5, 5)).shape == (8, 75)
    with pytest.raises(ValueError, match="shape"):
        as_matrix(torch.zeros(4))


def test_spectral_functions_return_nan_for_non_finite_input_instead_of_crashing():
    # MKL's eigvals aborts the process on a NaN matrix; svd raises. stabwatch must do neither.
    bad = torch.full((6, 6), float("nan"))
    assert math.isnan(float(F.spectral_radius(bad)))
    assert torch.isnan(F.singular_values(bad)).all()
    inf = torch.ones(300, 300)
    inf[3, 4] = float("inf")
    top, _ = F.randomized_singular_values(inf, 2, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(top).all()
    good = torch.eye(3) * 2
    assert float(F.spectral_radius(good)) == 2.0 and F.singular_values(good).tolist() == [2.0, 2.0, 2.0]


def test_batched_exact_spectra_match_float64_svd_down_to_the_rank_tolerance():
    g = torch.Generator().manual_seed(2)
    for m, n, r in ((128, 2048, 64), (32, 144, 32), (10, 512, 10)):
        a = (torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)) * 1e-3
        s = F.batched_singular_values(torch.stack([a, 2 * a]))
        ref = torch.linalg.svdvals(a.double())
        keep = ref > ref[0] * max(m, n) * torch.finfo(torch.float32).eps
        assert torch.allclose(s[0, : len(ref)][keep].double(), ref[keep], rtol=1e-5)
        assert torch.allclose(s[1, : len(ref)][keep].double(), 2 * ref[keep], rtol=1e-5)
        s_min, rank, _ = condition_number(s[0], (m, n))
        assert int(rank) == r == int(np.linalg.matrix_rank(a.numpy()))  # numpy's float32 rule
        assert float(s_min) == pytest.approx(float(ref[r - 1]), rel=1e-5)


def test_block_krylov_on_rank_deficient_and_tiny_matrices():
    # a basis wider than the rank (or than the matrix) must not inflate the Ritz values
    a = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1]))
    top, _ = F.randomized_singular_values(a, 3, oversample=1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(top, torch.tensor([5.0, 3.0, 1.0]), rtol=1e-5)
    g = torch.Generator().manual_seed(3)
    for rank in (1, 2, 3, 20):
        low = torch.randn(300, rank, generator=g) @ torch.randn(rank, 200, generator=g)
        top, _ = F.randomized_singular_values(low, 3, generator=g)
        ref = torch.linalg.svdvals(low.double())[:3]
        assert torch.allclose(top.double(), ref, rtol=1e-4, atol=1e-5 * float(ref[0]))


def test_block_krylov_batch_equals_one_at_a_time_and_flags_nonfinite_members():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 120, 90, generator=g)
    a[1, 5, 7] = float("nan")
    omega = torch.randn(3, 90, 6, generator=g)
    s, basis, finite = F.block_krylov_singular_values(a, omega, 4)
    assert finite.tolist() == [True, False, True] and torch.isnan(s[1]).all()
    for i in (0, 2):
        one, _, _ = F.block_krylov_singular_values(a[i], omega[i], 4)
        assert torch.allclose(s[i], one, rtol=1e-5)
        assert torch.allclose(s[i, 0].double(), torch.linalg.svdvals(a[i].double())[0], rtol=1e-3)  # flat spectrum
    assert basis.shape == (3, 90, 6)


def test_batched_spectral_norm_matches_each_matrix_2_norm():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3, 20, 12, generator=g)
    sigma, u = batched_spectral_norm(w, n_iter=300, generator=g)
    ref = torch.linalg.matrix_norm(w.double(), ord=2)
    assert sigma.shape == (3,) and u.shape == (3, 20)
    assert torch.allclose(sigma.double(), ref, rtol=1e-4)
    for i in range(3):  # a batch of one gives the same as the batch member, from the same start
        one, _ = batched_spectral_norm(w[i : i + 1], u[i : i + 1], n_iter=2)
        assert torch.allclose(one[0], sigma[i], rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectrum_summary_of_a_batch_matches_numpy_rank_and_condition(dtype):
    # rank-3 gradients (a batch of 3 samples) and one full-rank matrix, as one batch
    g = torch.Generator().manual_seed(4)
    low = [torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)]
    mats = torch.stack([*low * 2, torch.randn(20, 12, generator=g, dtype=torch.float64)]).to(dtype)
    top, s_min, rank, kappa = F.spectrum_summary(mats, 4)
    assert top.shape == (3, 4) and s_min.shape == rank.shape == kappa.shape == (3,)
    eps = np.finfo(np.float32 if dtype == torch.float32 else np.float64).eps
    for i, a in enumerate(mats.double().numpy()):
        s = np.linalg.svd(a, compute_uv=False)
        nonzero = s[s > s[0] * max(a.shape) * eps]
        assert rank[i].item() == len(nonzero) == np.linalg.matrix_rank(a, tol=s[0] * max(a.shape) * eps)
        np.testing.assert_allclose(top[i, : len(nonzero)].double().numpy(), s[:4][: len(nonzero)], rtol=1e-5)
        assert s_min[i].item() == pytest.approx(nonzero[-1], rel=1e-4)
        assert kappa[i].item() == pytest.approx(s[0] / nonzero[-1], rel=1e-4)
    one = F.spectrum_summary(mats[2], 4)  # a single matrix: the same numbers, no batch dim
    assert one.top.shape == (4,) and torch.equal(one.rank, rank[2])
    torch.testing.assert_close(one.kappa, kappa[2])


def test_group_matrices_batches_same_shape_dtype_and_device_in_first_seen_order():
    a, b, c = torch.ones(4, 3), torch.ones(2, 2, 3, 1), torch.full((4, 3), 2.0)
    half, dbl = torch.ones(4, 3, dtype=torch.float16), torch.ones(4, 3, dtype=torch.float64)
    groups = F.group_matrices([a, b, c, half, dbl])
    assert [idx for idx, _ in groups] == [[0, 2, 3], [1], [4]]  # half is cast to float32: joins a and c
    stack = groups[0][1]
    assert stack.shape == (3, 4, 3) and stack.dtype == torch.float32 and stack[1].eq(2.0).all()
    assert groups[1][1].shape == (1, 2, 6)  # a conv kernel [out, in, k, 1] as [out, in*k]
    assert groups[2][1].dtype == torch.float64
    assert F.group_matrices([]) == []


def _condition_number_in_torch(s, shape):
    """`condition_number`'s tensor operations, written out: what it computes off the CPU."""
    tol = s[..., :1] * max(shape) * torch.finfo(s.dtype).eps
    nonzero = s > tol
    rank = nonzero.sum(-1)
    s_min = torch.where(nonzero, s, torch.full_like(s, float("inf"))).min(-1).values
    s_min = torch.where(rank > 0, s_min, torch.zeros_like(s_min))
    kappa = torch.where(rank > 0, s[..., 0] / s_min, torch.full_like(s_min, float("inf")))
    return s_min, rank.to(s.dtype), kappa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_condition_number_on_the_cpu_is_bit_identical_to_the_tensor_operations(dtype):
    # the CPU computes it with numpy on the spectrum's memory: same IEEE operations, same precision
    g = torch.Generator().manual_seed(5)
    for m, n in ((32, 20), (4, 32), (64, 64), (100, 7)):
        a = torch.randn(5, m, n, generator=g, dtype=dtype)
        a[1] = 0  # rank 0: s_min 0, kappa inf
        a[2] = torch.randn(m, 1, generator=g, dtype=dtype) @ torch.randn(1, n, generator=g, dtype=dtype)  # rank 1
        a[3, 0, 0] = float("nan")  # NaN spectrum
        s = F.batched_singular_values(a)
        for spectrum in (s, s[0], s[2], s[3]):
            for got, want in zip(condition_number(spectrum, (m, n)), _condition_number_in_torch(spectrum, (m, n))):
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0))
    assert condition_number(torch.tensor([0.0, 0.0]), (2, 2))[2].item() == math.inf
    with pytest.raises(AssertionError):  # the comparison can fail: a wrong tolerance changes the rank
        s = torch.tensor([1.0, 25 * torch.finfo(dtype).eps], dtype=dtype)  # rank 1 for 40x40, 2 for 4x4
        torch.testing.assert_close(condition_number(s, (40, 40))[1], _condition_number_in_torch(s, (4, 4))[1])


def test_batched_singular_values_skips_the_nan_mask_without_changing_a_value():
    # a batch with a NaN member takes the masked path; the same matrices without it the CPU's fast path
    g = torch.Generator().manual_seed(6)
    for m, n in ((32, 20), (10, 256), (64, 64)):
        a = torch.randn(3, m, n, generator=g)
        fast = F.batched_singular_values(a)
        masked = F.batched_singular_values(torch.cat([a, torch.full((1, m, n), float("nan"))]))
        assert torch.equal(fast, masked[:3]) and torch.isnan(masked[3]).all()
        ref = torch.linalg.svdvals(a.double())
        torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.max()))


@pytest.mark.parametrize(("m", "n", "r"), [(32, 20, 3), (4, 32, 4), (784, 10, 6), (12, 40, 12), (64, 48, 5)])
def test_small_and_gram_routes_match_a_float64_svd_down_to_the_rank_tolerance(m, n, r):
    # small matrices take float64 svdvals on the CPU, larger ones the float64 Gram route: both to 1e-6
    g = torch.Generator().manual_seed(7)
    a = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) * 1e-2
    s = F.batched_singular_values(a[None])[0]
    ref = np.linalg.svd(a.double().numpy(), compute_uv=False)
    keep = ref > ref[0] * max(m, n) * np.finfo(np.float32).eps
    assert keep.sum() == r
    np.testing.assert_allclose(s[:r].double().numpy(), ref[keep], rtol=1e-6)
    assert (s[r:].double().numpy() <= ref[0] * max(m, n) * np.finfo(np.float32).eps).all()
