"""`stabwatch.functional.hessian` against exact results: quadratics with known spectra, Hessians formed
explicitly with ``torch.func.hessian``, Adam's own update, and the divergence of SGD on a quadratic."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import functional_call

from stabwatch import functional as F
from stabwatch.errors import ConfigError, InputError

MODES = ["double_backward", "forward_over_reverse"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _quadratic(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """``H = Q diag(λ) Qᵀ`` with ``Q`` a random orthogonal matrix (float64)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64)).Q
    return (q * torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _split_params(n: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """A point in R^n held as two tensors of different shapes (the flattening is part of what is tested)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(n - 12, generator=g, dtype=dtype)
    b = torch.randn(3, 4, generator=g, dtype=dtype)
    return [a, b]


def _quadratic_loss(h: torch.Tensor):
    def loss(ps):
        w = torch.cat([p.reshape(-1) for p in ps])
        return 0.5 * w @ h.to(w.dtype) @ w

    return loss


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(40, 3, generator=g).to(dtype)
    y = torch.randn(40, 2, generator=g).to(dtype)
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone() for p in net.parameters()]

    def loss(ps):
        return ((functional_call(net, dict(zip(names, ps, strict=True)), (x,)) - y) ** 2).mean()

    return loss, params


@functools.cache
def _mlp_hessian() -> torch.Tensor:
    """The float64 MLP's Hessian, formed once (``torch.func.hessian`` takes seconds on a loaded runner)."""
    return _explicit_hessian(*_mlp())


def _explicit_hessian(loss, params) -> torch.Tensor:
    sizes = [p.numel() for p in params]

    def flat_loss(w):
        return loss([part.reshape(p.shape) for part, p in zip(torch.split(w, sizes), params, strict=True)])

    return torch.func.hessian(flat_loss)(torch.cat([p.reshape(-1) for p in params]))


# --------------------------------------------------------------------------------------------- HVPs
@pytest.mark.parametrize("mode", MODES)
def test_hvp_equals_the_explicit_hessian_times_v(mode):
    loss, params = _mlp()
    h = _mlp_hessian()
    g = torch.Generator().manual_seed(3)
    vs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    hv = F.hvp(loss, params, vs, mode=mode)
    assert [t.shape for t in hv] == [p.shape for p in params]
    ref = h @ torch.cat([v.reshape(-1) for v in vs])
    assert torch.allclose(torch.cat([t.reshape(-1) for t in hv]), ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------- quadratics
@pytest.mark.parametrize("mode", MODES)
def test_lanczos_on_a_quadratic_returns_the_top_eigenvalues_of_h(mode):
    spread = torch.linspace(-2.0, 2.0, 45, dtype=torch.float64).tolist()
    eigs = [10.0, 7.0, 5.0, *spread]  # n = 48
    h = _quadratic(eigs)
    res = F.hessian_top_eigenvalues(_quadratic_loss(h), _split_params(48), k=3, mode=mode, n_iter=40, tol=1e-10)
    assert res.values.dtype == torch.float64
    assert torch.allclose(res.values, torch.tensor([10.0, 7.0, 5.0], dtype=torch.float64), atol=1e-9)
    assert res.converged and res.n_hvp <= 40
    # the vectors are eigenvectors: ‖H y − λ y‖ small and unit norm
    assert torch.allclose(res.vectors.norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert ((res.vectors @ h - res.values[:, None] * res.vectors).norm(dim=1) < 1e-4).all()


def test_lanczos_reaches_the_top_eigenvalue_in_few_products():
    eigs = [10.0, 7.0, *torch.linspace(-2.0, 2.0, 198, dtype=torch.float64).tolist()]
    h = _quadratic(eigs, seed=1)
    res = F.hessian_top_eigenvalues(_quadratic_loss(h), _split_params(200), n_iter=20, tol=1e-12)
    assert res.n_hvp <= 20
    assert abs(float(res.values[0]) - 10.0) < 1e-6


def test_lanczos_finds_the_largest_algebraic_eigenvalue_power_the_largest_magnitude():
    h = _quadratic([-10.0, 3.0, 1.0, 0.5, 0.2, 0.1, *([0.0] * 14)], seed=2)
    loss, params = _quadratic_loss(h), _split_params(20)
    lanczos = F.hessian_top_eigenvalues(loss, params, n_iter=20, tol=1e-10)
    power = F.hessian_top_eigenvalues(loss, params, method="power", n_iter=200, tol=1e-10)
    assert abs(float(lanczos.values[0]) - 3.0) < 1e-8
    assert abs(float(power.values[0]) + 10.0) < 1e-8


def test_exhausted_krylov_space_is_exact_and_stops():
    h = _quadratic([4.0, 2.0, 1.0, *([0.5] * 17)], seed=3)  # 4 distinct eigenvalues: a 4-dim Krylov space
    res = F.hessian_top_eigenvalues(_quadratic_loss(h), _split_params(20), k=2, n_iter=20, tol=1e-14)
    assert torch.allclose(res.values, torch.tensor([4.0, 2.0], dtype=torch.float64), atol=1e-10)
    assert res.converged and res.n_hvp <= 5


def test_a_repeated_eigenvalue_needs_a_restart_and_is_found_twice():
    h = 2.0 * torch.eye(13, dtype=torch.float64)  # one distinct eigenvalue: every Krylov space is 1-dim
    params = [torch.randn(13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))]
    res = F.hessian_top_eigenvalues(_quadratic_loss(h), params, k=2, n_iter=5)
    assert torch.allclose(res.values, torch.tensor([2.0, 2.0], dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------------------------------ an MLP
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_mlp_top_k_matches_the_explicitly_formed_hessian(mode, method):
    loss, params = _mlp()
    exact = torch.linalg.eigvalsh(_mlp_hessian()).flip(0)
    if method == "lanczos":
        res = F.hessian_top_eigenvalues(loss, params, k=3, mode=mode, n_iter=40, tol=1e-10)
        assert torch.allclose(res.values, exact[:3], rtol=1e-8, atol=1e-10)
    else:
        assert exact[0] > -exact[-1]  # the top eigenvalue is also the largest in magnitude here
        res = F.hessian_top_eigenvalues(loss, params, k=1, method="power", mode=mode, n_iter=300, tol=1e-8)
        assert abs(float(res.values[0] - exact[0])) < 1e-6 * float(exact[0])


def test_float32_mlp_within_1e_4_relative_and_20_products():
    loss, params = _mlp(torch.float32)
    exact = torch.linalg.eigvalsh(_mlp_hessian()).flip(0)
    res = F.hessian_top_eigenvalues(loss, params, k=2, n_iter=20, tol=1e-6)
    assert res.vectors.dtype == torch.float32 and res.n_hvp <= 20
    assert torch.allclose(res.values, exact[:2], rtol=1e-4)


def test_warm_start_from_the_previous_eigenvector_converges_in_fewer_products():
    loss, params = _mlp()
    cold = F.hessian_top_eigenvalues(loss, params, n_iter=40, tol=1e-8)
    moved = [p + 1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9), dtype=p.dtype) for p in params]
    cold_moved = F.hessian_top_eigenvalues(loss, moved, n_iter=40, tol=1e-8)
    warm = F.hessian_top_eigenvalues(loss, moved, n_iter=40, tol=1e-8, v0=cold.vectors[0])
    assert warm.converged and cold_moved.converged
    assert warm.n_hvp < cold_moved.n_hvp
    assert abs(float(warm.values[0] - cold_moved.values[0])) < 1e-8


# -------------------------------------------------------------------------------- preconditioning
def test_preconditioned_matches_explicit_p_inverse_sqrt_h_p_inverse_sqrt():
    loss, params = _mlp()
    h = _mlp_hessian()
    g = torch.Generator().manual_seed(4)
    pre = [torch.rand(p.shape, generator=g, dtype=p.dtype) * 10 + 0.01 for p in params]
    d = torch.cat([t.reshape(-1) for t in pre])
    sym = h / d.sqrt()[:, None] / d.sqrt()[None, :]
    exact = torch.linalg.eigvalsh(sym).flip(0)
    # an independent check of the similarity: the eigenvalues of the non-symmetric P⁻¹H are the same
    nonsym = torch.linalg.eigvals(h / d[:, None]).real.sort(descending=True).values
    assert torch.allclose(exact[:3], nonsym[:3], rtol=1e-8)
    res = F.hessian_top_eigenvalues(loss, params, k=2, preconditioner=pre, n_iter=60, tol=1e-10)
    assert torch.allclose(res.values, exact[:2], rtol=1e-8)


def test_adam_preconditioner_is_what_adam_divides_by():
    torch.manual_seed(0)
    for amsgrad in (False, True):
        w = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
        opt = torch.optim.Adam([w], lr=0.01, betas=(0.8, 0.95), eps=1e-3, amsgrad=amsgrad)
        assert F.adam_preconditioner(opt, [w]) is None  # no second moment before the first step
        for _ in range(4):
            w.grad = torch.randn_like(w)
            opt.step()
        w.grad = torch.randn_like(w)
        before = w.detach().clone()
        state = opt.state[w]
        t = float(state["step"]) + 1
        m_hat = (0.8 * state["exp_avg"] + 0.2 * w.grad) / (1 - 0.8**t)
        opt.step()
        p = F.adam_preconditioner(opt, [w])[0]  # after the step: its v̂ is the one the step used
        assert torch.allclose(w.detach(), before - 0.01 * m_hat / p, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------- edge of stability
def _sgd_on_quadratic(h: torch.Tensor, lr: float, steps: int, **sgd) -> list[float]:
    w = torch.nn.Parameter(torch.ones(h.shape[0], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=lr, **sgd)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * w @ h @ w
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if losses[-1] > 1e6 * losses[0]:  # diverged (stop before it overflows)
            break
    return losses


@pytest.mark.parametrize(
    "sgd", [{}, {"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.3}, {"momentum": 0.9, "nesterov": True}]
)
def test_sgd_diverges_exactly_when_the_edge_of_stability_ratio_exceeds_1(sgd):
    h = _quadratic([20.0, 5.0, 1.0, 0.3], seed=6)
    lam = float(F.hessian_top_eigenvalues(_quadratic_loss(h), [torch.zeros(4, dtype=torch.float64)]).values[0])
    assert abs(lam - 20.0) < 1e-10
    lr_edge = 1.0 / F.edge_of_stability_ratio(lam, 1.0, **sgd)  # the step size at which the ratio is 1
    for factor, diverges in ((0.97, False), (1.03, True)):
        lr = factor * lr_edge
        assert abs(F.edge_of_stability_ratio(lam, lr, **sgd) - factor) < 1e-12
        losses = _sgd_on_quadratic(h, lr, 1500, **sgd)
        if diverges:
            assert losses[-1] > 1e3 * losses[0]
        else:
            assert losses[-1] < 1e-3 * losses[0]


def test_plain_sgd_ratio_is_eta_lambda_over_2():
    assert F.edge_of_stability_ratio(30.0, 0.05) == pytest.approx(0.75)


@pytest.mark.parametrize("beta1", [0.0, 0.9, 0.5])
def test_adam_ratio_is_the_threshold_of_adam_with_its_preconditioner_frozen(beta1):
    """Adam's recursion with P fixed (m ← β₁m + (1−β₁)g, θ ← θ − η P⁻¹m), run by hand from a real Adam state."""
    h = _quadratic([8.0, 3.0, 1.0, 0.2, 0.1], seed=7)
    w = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=0.01, betas=(beta1, 0.999))
    for _ in range(3):
        opt.zero_grad()
        (0.5 * w @ h @ w).backward()
        opt.step()
    pre = F.adam_preconditioner(opt, [w])
    lam_p = float(
        F.hessian_top_eigenvalues(_quadratic_loss(h), [w.detach()], preconditioner=pre, n_iter=5, tol=1e-12).values[0]
    )
    lr_edge = 1.0 / F.adam_edge_of_stability_ratio(lam_p, 1.0, beta1)
    for factor, diverges in ((0.97, False), (1.03, True)):
        lr = factor * lr_edge
        x = torch.ones(5, dtype=torch.float64)
        m = torch.zeros(5, dtype=torch.float64)
        start = float(x @ h @ x)
        for _ in range(3000):
            m = beta1 * m + (1 - beta1) * (h @ x)
            x = x - lr * m / pre[0]
            if float(x @ h @ x) > 1e6 * start:  # diverged (stop before it overflows)
                break
        end = float(x @ h @ x)
        assert (end > 1e3 * start) if diverges else (end < 1e-3 * start)


# ------------------------------------------------------------------------------ no side effects
def test_params_grad_and_global_rng_are_untouched():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(10, 3)
    names = [n for n, _ in net.named_parameters()]
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = [p.detach().clone() for p in net.parameters()]
    rng = torch.get_rng_state()

    def loss(ps):
        return functional_call(net, dict(zip(names, ps, strict=True)), (x,)).pow(2).mean()

    F.hessian_top_eigenvalues(loss, list(net.parameters()), k=2)
    F.hessian_top_eigenvalues(loss, list(net.parameters()), mode="forward_over_reverse")
    assert torch.equal(torch.get_rng_state(), rng)
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, torch.full_like(p, 0.25))


def test_a_non_finite_loss_gives_nan_not_an_error():
    h = _quadratic([1.0, 2.0, 3.0])
    res = F.hessian_top_eigenvalues(
        lambda ps: _quadratic_loss(h)(ps) * float("nan"), [torch.ones(3, dtype=torch.float64)]
    )
    assert torch.isnan(res.values).all() and not res.converged


# ----------------------------------------------------------------------------------------- errors
def test_bad_input_is_refused_with_a_clear_message():
    h = _quadratic([1.0, 2.0, 3.0])
    loss, params = _quadratic_loss(h), [torch.ones(3, dtype=torch.float64)]
    with pytest.raises(InputError, match="scalar"):
        F.hessian_top_eigenvalues(lambda ps: ps[0] * 2, params)
    with pytest.raises(InputError, match="does not depend"):
        F.hessian_top_eigenvalues(lambda ps: torch.tensor(1.0), params)
    with pytest.raises(InputError, match="does not depend"):
        w = torch.ones(3, requires_grad=True)
        F.hessian_top_eigenvalues(lambda ps: (w**2).sum(), params)
    with pytest.raises(InputError, match="empty"):
        F.hessian_top_eigenvalues(loss, [])
    with pytest.raises(InputError, match="floating"):
        F.hessian_top_eigenvalues(loss, [torch.ones(3, dtype=torch.long)])
    with pytest.raises(ConfigError, match="k must"):
        F.hessian_top_eigenvalues(loss, params, k=0)
    with pytest.raises(ConfigError, match="exceeds"):
        F.hessian_top_eigenvalues(loss, params, k=4)
    with pytest.raises(ConfigError, match="n_iter=1 < k=2"):
        F.hessian_top_eigenvalues(loss, params, k=2, n_iter=1)
    with pytest.raises(ConfigError, match="method"):
        F.hessian_top_eigenvalues(loss, params, method="arnoldi")
    with pytest.raises(ConfigError, match="mode"):
        F.hessian_top_eigenvalues(loss, params, mode="finite_differences")
    with pytest.raises(InputError, match="preconditioner"):
        F.hessian_top_eigenvalues(loss, params, preconditioner=[torch.ones(4)])
    with pytest.raises(InputError, match="> 0"):
        F.hessian_top_eigenvalues(loss, params, preconditioner=[torch.tensor([1.0, 0.0, 1.0])])
    with pytest.raises(InputError, match="v0"):
        F.hessian_top_eigenvalues(loss, params, v0=torch.ones(5))
    with pytest.raises(InputError, match="vectors must match"):
        F.hvp(loss, params, [torch.ones(2)])
    with pytest.raises(InputError, match="Adam-type"):
        F.adam_preconditioner(torch.optim.SGD(params, lr=0.1), params)
    with pytest.raises(ConfigError, match="momentum"):
        F.edge_of_stability_ratio(1.0, 0.1, momentum=1.5)


def test_the_mse_loss_forward_over_reverse_bug_gets_an_explanation():
    """pytorch/pytorch#123996: F.mse_loss(reduction='mean') fails under jvp(grad(...)); the message says what to do."""
    x, y = torch.randn(6, 2), torch.randn(6)

    def loss(ps):
        return torch.nn.functional.mse_loss(x @ ps[0], y)

    try:
        F.hessian_top_eigenvalues(loss, [torch.ones(2)], mode="forward_over_reverse")
    except InputError as exc:
        assert "double_backward" in str(exc)
    # the default mode has no such problem: H = 2 XᵀX / n
    exact = torch.linalg.eigvalsh(2 * x.T.double() @ x.double() / 6).max()
    res = F.hessian_top_eigenvalues(loss, [torch.ones(2)])
    assert abs(float(res.values[0]) - float(exact)) < 1e-4 * float(exact)
