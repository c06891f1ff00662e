"""Shadow against exact Lyapunov exponents of training maps that are known in closed form.

* full-batch gradient descent on least squares: θ ↦ (I − ηH)θ + ηc, so λ = log max_i |1 − η·h_i|;
* heavy-ball momentum: the state (θ, buffer) moves by a 2n×2n block matrix, λ = log ρ(block);
* mini-batch SGD over a fixed cycle of K batches: λ = (1/K)·log ρ(M_K···M_1);
* a tanh MLP at the edge of stability: the tangent (Hessian-vector-product) estimate of the same map.

References are computed independently with numpy / torch.linalg eigenvalues (or forward-mode JVPs).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import stabwatch as sw
from stabwatch.functional.lyapunov import tangent_lyapunov

N_FEAT, N_ROWS = 6, 64
SPECTRUM = [0.2, 1.0, 2.0, 3.0, 4.0, 5.0]  # eigenvalues of H = (2/N)·XᵀX


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(threads)


def _design(spectrum=SPECTRUM, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """X with H = (2/N)·XᵀX having the given eigenvalues (random eigenvectors), and targets y."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(N_ROWS, N_FEAT, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(N_FEAT, N_FEAT, generator=g, dtype=torch.float64))
    s = torch.tensor(spectrum, dtype=torch.float64).sqrt()
    x = math.sqrt(N_ROWS / 2) * u @ torch.diag(s) @ v.T
    return x, torch.randn(N_ROWS, 1, generator=g, dtype=torch.float64)


def _hessian(x: torch.Tensor) -> np.ndarray:
    return (2.0 / x.shape[0] * x.T @ x).numpy()


def _mse(model: nn.Module, batch) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _train_with_shadow(
    batches, lr, steps, *, momentum=0.0, dtype=torch.float64, eps=1e-3, transient=100, renorm=1, continuous=False
):
    torch.manual_seed(0)
    model = nn.Linear(N_FEAT, 1, bias=False).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    shadow = sw.Shadow(
        loss_fn=_mse, every=steps, window=steps, eps=eps, transient=transient, renorm=renorm, continuous=continuous
    )
    records = []
    with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
        for t in range(steps):
            batch = tuple(b.to(dtype) for b in batches[t % len(batches)])
            opt.zero_grad()
            loss = _mse(model, batch)
            loss.backward()
            opt.step()
            records.append(mon.step(loss=loss, batch=batch))
    return shadow, records


def _top(eigenvalues: np.ndarray) -> complex:
    return complex(eigenvalues[np.argmax(np.abs(eigenvalues))])


@pytest.mark.parametrize(
    ("lr", "sign"),
    [(0.1, -1), (0.42, +1)],  # 0.42 > 2/h_max = 0.4: the top mode flips sign and grows, |1 − 0.42·5| = 1.1
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_least_squares_gradient_descent(lr, sign, dtype):
    x, y = _design()
    h = np.linalg.eigvalsh(_hessian(x))
    exact = math.log(np.max(np.abs(1.0 - lr * h)))
    assert np.sign(exact) == sign
    shadow, records = _train_with_shadow([(x, y)], lr, 400, dtype=dtype)
    (est,) = shadow.estimates
    assert (est.start, est.stop, est.steps) == (0, 399, 300)
    assert est.lyapunov == records[-1].lyapunov
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    assert est.lyapunov == pytest.approx(exact, abs=tol)
    # after the transient every renormalisation interval shows the same exponent (the map is linear)
    local = [r.lyapunov_local for r in records[150:]]
    assert np.max(np.abs(np.array(local) - exact)) < (1e-6 if dtype == torch.float64 else 2e-2)


@pytest.mark.parametrize(
    ("lr", "momentum", "window"),
    [
        (0.1, 0.5, 400),  # contracting, real top eigenvalue
        (0.65, 0.5, 300),  # η·h_max > 2(1 + μ): a real eigenvalue below −1, chaotic
        pytest.param(0.1, 0.9, 2500, marks=pytest.mark.slow),  # complex top pair: O(1/T) oscillation
    ],
)
def test_heavy_ball_momentum_block_map(lr, momentum, window):
    x, y = _design()
    hess = _hessian(x)
    eye = np.eye(N_FEAT)
    # torch SGD: b' = μb + g, θ' = θ − η·b'  with g = Hθ − c  ⇒  d(θ', b') = A·d(θ, b)
    block = np.block([[eye - lr * hess, -lr * momentum * eye], [hess, momentum * eye]])
    top = _top(np.linalg.eigvals(block))
    exact = math.log(abs(top))
    shadow, _ = _train_with_shadow([(x, y)], lr, window, momentum=momentum, transient=100)
    tol = 1e-3 if abs(top.imag) > 1e-9 else 1e-8
    assert shadow.estimates[0].lyapunov == pytest.approx(exact, abs=tol)


def test_heavy_ball_needs_the_momentum_difference_renormalised_too():
    """Renormalising only θ (leaving the momentum difference alone) measures something else."""
    x, y = _design()
    hess = _hessian(x)
    eye = np.eye(N_FEAT)
    lr, momentum = 0.1, 0.5
    block = np.block([[eye - lr * hess, -lr * momentum * eye], [hess, momentum * eye]])
    exact = math.log(max(abs(np.linalg.eigvals(block))))
    shadow, _ = _train_with_shadow([(x, y)], lr, 300, momentum=momentum, transient=100)
    assert shadow.estimates[0].lyapunov == pytest.approx(exact, abs=1e-8)

    from stabwatch.collectors import shadow as shadow_module

    original = shadow_module.Shadow._state_pairs
    shadow_module.Shadow._state_pairs = lambda self, w: ([], [], [])  # fault: parameters only
    try:
        broken, _ = _train_with_shadow([(x, y)], lr, 300, momentum=momentum, transient=100)
    finally:
        shadow_module.Shadow._state_pairs = original
    assert abs(broken.estimates[0].lyapunov - exact) > 1e-3


@pytest.mark.parametrize("lr", [0.2, 0.62])
def test_minibatch_sgd_cycle_equals_product_of_maps(lr):
    x, y = _design()
    k = 4
    batches = [(x[i::k], y[i::k]) for i in range(k)]
    prod = np.eye(N_FEAT)
    for xb, _ in batches:
        prod = (np.eye(N_FEAT) - lr * _hessian(xb)) @ prod
    top = _top(np.linalg.eigvals(prod))
    assert abs(top.imag) < 1e-12  # a real top eigenvalue: the estimate converges geometrically
    exact = math.log(abs(top)) / k
    # window and transient are whole cycles, so the average covers whole products
    shadow, _ = _train_with_shadow(batches, lr, 400, transient=100)
    assert shadow.estimates[0].lyapunov == pytest.approx(exact, abs=1e-8)
    if lr > 0.5:
        assert exact > 0  # past the stability edge of at least one batch's map


def test_continuous_mode_on_least_squares():
    x, y = _design()
    h = np.linalg.eigvalsh(_hessian(x))
    exact = math.log(np.max(np.abs(1.0 - 0.3 * h)))
    shadow, records = _train_with_shadow([(x, y)], 0.3, 300, transient=50, continuous=True)
    assert shadow.estimates == []  # one shadow, never closed
    assert records[-1].lyapunov == pytest.approx(exact, abs=1e-8)
    assert all(r.lyapunov is None for r in records[:50]) and all(r.lyapunov is not None for r in records[50:])


@pytest.mark.parametrize("renorm", [5, None])
def test_renormalisation_period_does_not_change_a_linear_map(renorm):
    """For a linear map the growth factor does not depend on the difference's size: any period works."""
    x, y = _design()
    h = np.linalg.eigvalsh(_hessian(x))
    exact = math.log(np.max(np.abs(1.0 - 0.1 * h)))
    shadow, _ = _train_with_shadow([(x, y)], 0.1, 300, transient=100, renorm=renorm)
    assert shadow.estimates[0].lyapunov == pytest.approx(exact, abs=1e-8)


@pytest.mark.slow
def test_tanh_mlp_at_edge_of_stability_matches_tangent_estimate():
    """Full-batch GD on a tanh MLP whose sharpness hovers at 2/η: shadow vs Hessian-vector products."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.sin(x @ torch.randn(4, 1, generator=g, dtype=torch.float64))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    lr, window, transient = 0.5, 300, 100
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(1000):  # progressive sharpening up to the edge of stability
        opt.zero_grad()
        _mse(model, (x, y)).backward()
        opt.step()
    names = [n for n, _ in model.named_parameters()]
    theta0 = [p.detach().clone() for p in model.parameters()]

    def loss_of(*params):
        return _mse(lambda inp: functional_call(model, dict(zip(names, params)), (inp,)), (x, y))

    flat = torch.cat([p.reshape(-1) for p in theta0])
    shapes = [p.shape for p in theta0]

    def loss_flat(v):
        parts, i = [], 0
        for s in shapes:
            parts.append(v[i : i + math.prod(s)].reshape(s))
            i += math.prod(s)
        return loss_of(*parts)

    sharpness = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_flat, flat)).max())
    assert abs(sharpness * lr / 2 - 1) < 0.15  # at the edge: η·h_max ≈ 2

    def gd_step(*params):
        grads = grad(loss_of, argnums=tuple(range(len(params))))(*params)
        return tuple(p - lr * gp for p, gp in zip(params, grads))

    shadow = sw.Shadow(loss_fn=_mse, every=window, window=window, eps=1e-6, transient=transient)
    with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
        start = shadow.lyapunov_vector()
        assert start is not None
        for _ in range(window):
            opt.zero_grad()
            loss = _mse(model, (x, y))
            loss.backward()
            opt.step()
            mon.step(loss=loss, batch=(x, y))
    # the same initial direction: near-neutral directions make the finite-time value depend on it
    ref = tangent_lyapunov(gd_step, theta0, [start[n] for n in names], window, transient=transient)
    assert abs(ref.lyapunov) < 0.01
    assert shadow.estimates[0].lyapunov == pytest.approx(ref.lyapunov, abs=1e-6)
