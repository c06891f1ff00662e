"""Top singular triples of input Jacobians (stabwatch.functional.jacobian) against Jacobians formed
explicitly with torch.autograd.functional.jacobian, one sample at a time, and torch.linalg.svd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabwatch.errors import ConfigError, InputError
from stabwatch.functional.jacobian import (
    exact_top_singular,
    input_jacobian,
    lanczos_top_singular,
    power_top_singular,
    top_singular_of,
)


def _mlp(d_in: int = 5, width: int = 12, d_out: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, d_out)
    ).double()


def _reference(f, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample Jacobians by autograd, their SVD: (J [B, m, d], sigma [B, k], top right vector [B, d])."""
    jacs = torch.stack([torch.autograd.functional.jacobian(lambda z: f(z.unsqueeze(0))[0], xi) for xi in x])
    jacs = jacs.reshape(x.shape[0], -1, x[0].numel())
    _, s, vh = torch.linalg.svd(jacs)
    return jacs, s, vh[:, 0]


def _same_direction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|cos| between rows (directions are defined up to sign)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return (a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1))


def test_input_jacobian_equals_autograd_jacobian():
    f = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    ref, _, _ = _reference(f, x)
    torch.testing.assert_close(input_jacobian(f, x), ref, rtol=1e-12, atol=1e-12)


def test_input_jacobian_of_multi_dim_inputs_and_tuples():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten()).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    ref, _, _ = _reference(conv, x)
    torch.testing.assert_close(input_jacobian(conv, x), ref)
    both = input_jacobian(lambda z: (conv(z), conv(z).sum(1, keepdim=True)), x)
    torch.testing.assert_close(both[0], ref)
    torch.testing.assert_close(both[1], ref.sum(1, keepdim=True))


def test_exact_top_singular_matches_svd_of_formed_jacobian():
    f = _mlp()
    x = torch.randn(8, 5, dtype=torch.float64)
    _, s, v = _reference(f, x)
    top = exact_top_singular(f, x)
    torch.testing.assert_close(top.sigma, s[:, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(top.spectrum, s, rtol=1e-10, atol=1e-14)
    assert bool((_same_direction(top.right, v) > 1 - 1e-12).all())
    # sign convention: the largest-magnitude component is positive
    idx = top.right.abs().argmax(1)
    assert bool((top.right.gather(1, idx[:, None]) > 0).all())
    torch.testing.assert_close(top.right.norm(dim=1), torch.ones(8, dtype=torch.float64))
    assert top.backend == "exact" and top.iterations == 0 and bool(top.converged.all())


@pytest.mark.parametrize("iterate", [power_top_singular, lanczos_top_singular])
@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_iterative_paths_match_exact_svd_to_their_tolerance(iterate, backend: str):
    f = _mlp(d_in=20, width=32, d_out=6)
    x = torch.randn(10, 20, dtype=torch.float64)
    _, s, v = _reference(f, x)
    tol, dtol = 1e-10, 1e-7
    top = iterate(
        f, x, tol=tol, direction_tol=dtol, max_iter=3000, generator=torch.Generator().manual_seed(3), backend=backend
    )
    assert top.backend == backend
    assert bool(top.converged.all()) and bool((top.error <= tol).all()) and bool((top.residual <= dtol).all())
    assert 2 < top.iterations < 3000
    # the log error is within the stated tolerance; the residual r bounds the angle: sin ≲ r·σ²/gap
    assert float((top.sigma.log() - s[:, 0].log()).abs().max()) <= tol
    gap = (s[:, 0] ** 2 - s[:, 1] ** 2) / s[:, 0] ** 2
    sin = (1 - _same_direction(top.right, v) ** 2).clamp_min(0).sqrt()
    assert bool((sin <= 2 * dtol / gap).all()), (sin, gap)


@pytest.mark.parametrize("iterate", [power_top_singular, lanczos_top_singular])
def test_float32_model_reaches_the_stated_tolerance(iterate):
    f = _mlp(d_in=20, width=32, d_out=6).float()
    x = torch.randn(10, 20)
    _, s, _ = _reference(f.double(), x.double())
    tol = 1e-4
    top = iterate(f.float(), x, tol=tol)
    assert bool(top.converged.all())
    assert float((top.sigma.log() - s[:, 0].log()).abs().max()) <= tol


def test_lanczos_needs_far_fewer_iterations_than_power_when_the_top_is_close():
    """σ = (1, 0.99, 0.5, …): power iteration converges like 0.98^k, Lanczos like exp(−2k·√0.02)."""
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    sv = torch.cat([torch.tensor([1.0, 0.99]), torch.linspace(0.5, 0.1, 28)]).double()
    mat = q1 @ torch.diag(sv) @ q2.T
    f = lambda z: z @ mat.T  # noqa: E731
    x = torch.zeros(4, 30, dtype=torch.float64)
    lz = lanczos_top_singular(f, x, tol=1e-8)
    pw = power_top_singular(f, x, tol=1e-8, max_iter=5000)
    torch.testing.assert_close(lz.sigma, torch.ones(4, dtype=torch.float64), rtol=1e-8, atol=0)
    torch.testing.assert_close(pw.sigma, torch.ones(4, dtype=torch.float64), rtol=1e-7, atol=0)
    assert lz.iterations <= 30 and pw.iterations > 5 * lz.iterations


def test_power_reports_non_convergence():
    f = _mlp(d_in=20, width=32, d_out=6)
    x = torch.randn(4, 20, dtype=torch.float64)
    for iterate in (power_top_singular, lanczos_top_singular):
        top = iterate(f, x, tol=1e-14, max_iter=2)
        assert top.iterations == 2 and not bool(top.converged.all()) and bool((top.error > 1e-14).any())


class _Square(torch.autograd.Function):
    """An old-style autograd.Function (no setup_context, no jvp): torch.func cannot use it."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_auto_backend_falls_back_to_reverse_mode():
    lin = nn.Linear(3, 3).double()
    f = lambda z: _Square.apply(lin(z))  # noqa: E731
    x = torch.randn(5, 3, dtype=torch.float64)
    _, s, _ = _reference(f, x)
    for iterate in (power_top_singular, lanczos_top_singular):
        top = iterate(f, x, tol=1e-12, max_iter=500)
        assert top.backend == "autograd"
        torch.testing.assert_close(top.sigma, s[:, 0], rtol=1e-9, atol=0)
    with pytest.raises(InputError, match="backend='autograd'"):
        power_top_singular(f, x, backend="func")


def test_zero_jacobian_gives_zero_and_no_nan():
    f = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).double()
    with torch.no_grad():
        f[0].weight.fill_(1.0)
        f[0].bias.zero_()
    x = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # row 0: every ReLU off
    for iterate in (power_top_singular, lanczos_top_singular):
        top = iterate(f, x, tol=1e-10)
        assert float(top.sigma[0]) == 0.0 and bool(top.converged.all())
        assert abs(float(top.sigma[1]) - 12**0.5) < 1e-9  # J = ones(4, 3)
        assert not bool(top.right.isnan().any())


def test_parameters_untouched_and_global_rng_unused():
    f = _mlp()
    before = [p.detach().clone() for p in f.parameters()]
    x = torch.randn(4, 5, dtype=torch.float64)
    state = torch.get_rng_state()
    power_top_singular(f, x)
    lanczos_top_singular(f, x)
    exact_top_singular(f, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(before, f.parameters(), strict=True))
    assert all(p.grad is None for p in f.parameters())


def test_bad_inputs_are_refused_with_the_shapes():
    f = _mlp()
    with pytest.raises(InputError, match=r"batch dimension.*\(5,\)"):
        power_top_singular(f, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(InputError, match="floating point"):
        exact_top_singular(f, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(InputError, match="keep the batch dimension"):
        power_top_singular(lambda z: z.sum(0), torch.zeros(3, 5))
    with pytest.raises(InputError, match="v0"):
        power_top_singular(f, torch.zeros(3, 5, dtype=torch.float64), v0=torch.ones(3, 4))
    with pytest.raises(ConfigError, match="tol"):
        power_top_singular(f, torch.zeros(3, 5, dtype=torch.float64), tol=0)
    with pytest.raises(ConfigError, match="backend"):
        power_top_singular(f, torch.zeros(3, 5, dtype=torch.float64), backend="jax")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"\[2, m, 5\]"):
        top_singular_of(torch.zeros(2, 3, 4), torch.zeros(2, 5))
