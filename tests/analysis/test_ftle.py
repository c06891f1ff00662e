"""Input-space FTLE (stabwatch.analysis.ftle) against exact results: orthogonal networks, products of
Gaussian matrices, Jacobians formed with autograd; layer selection, fields, uncertainty helpers, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from stabwatch.analysis import FTLEResult, ftle, ftle_field
from stabwatch.analysis.ftle import ftle_uncertainty, plot_ftle_field, sequential_layers
from stabwatch.errors import ConfigError, InputError


def _orthogonal_net(L: int, n: int, a: float, act: type[nn.Module] | None, seed: int = 0) -> nn.Sequential:
    """L layers with weights a·Q_l (Q_l orthogonal), zero biases."""
    g = torch.Generator().manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(L):
        lin = nn.Linear(n, n).double()
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        with torch.no_grad():
            lin.weight.copy_(a * q)
            lin.bias.zero_()
        mods.append(lin)
        if act is not None:
            mods.append(act())
    return nn.Sequential(*mods)


@pytest.mark.parametrize("method", ["exact", "power"])
@pytest.mark.parametrize("a", [0.6, 1.7])
def test_orthogonal_linear_net_has_log_a_at_every_input_and_layer(method: str, a: float):
    net = _orthogonal_net(L=5, n=6, a=a, act=None)
    x = torch.randn(7, 6, dtype=torch.float64) * 3
    res = ftle(net, x, method=method, tol=1e-10)
    assert res.layers == ["0", "1", "2", "3", "4"] and res.depths == [1, 2, 3, 4, 5]
    torch.testing.assert_close(res.exponents, torch.full((7, 5), math.log(a), dtype=torch.float64), rtol=0, atol=1e-12)
    assert res.exponents.dtype == torch.float64 and bool(res.converged.all())


@pytest.mark.parametrize("method", ["exact", "power"])
def test_orthogonal_tanh_net_at_zero_input_has_log_a(method: str):
    net = _orthogonal_net(L=6, n=5, a=1.3, act=nn.Tanh)
    res = ftle(net, torch.zeros(3, 5, dtype=torch.float64), method=method, tol=1e-10)
    assert res.layers == ["1", "3", "5", "7", "9", "11"] and res.depths == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(
        res.exponents, torch.full((3, 6), math.log(1.3), dtype=torch.float64), rtol=0, atol=1e-12
    )
    # away from 0, tanh' < 1 contracts: every exponent lies below log a
    res = ftle(net, torch.full((3, 5), 0.5, dtype=torch.float64), method=method, tol=1e-10)
    assert bool((res.exponents < math.log(1.3) - 1e-3).all())


def test_products_of_gaussian_matrices_approach_the_lyapunov_spectrum():
    """W_l i.i.d. N(0, σ²/N): (1/L)·log σ_i(J_L) → μ_i = ½[log(2σ²/N) + ψ((N−i+1)/2)] as L → ∞.

    E[log σ_i(J_L)] = L·μ_i + c_i + o(1), so the slope between depths L1 < L2 cancels the O(1) offset c_i
    (the finite-time bias of the top exponent). log σ_i(J_L) fluctuates with variance ≈ L·¼ψ'((N−i+1)/2),
    so with M networks per depth the slope's standard error is √((v_L1 + v_L2)/M)/(L2 − L1), estimated
    from the samples; we accept 4 standard errors (two-sided p ≈ 6e-5 for a correct implementation). A
    wrong normalisation (1/ℓ, log of σ², a transpose) moves the slope by far more than that (≥ 0.08).
    N = 2 and L2 = 32 keep σ_2/σ_1 ≈ e^{−22} within float64's resolution of the SVD.
    """
    from scipy.special import digamma

    n, s2, m, depths = 2, 1.5, 200, (8, 32)
    g = torch.Generator().manual_seed(1)
    logs = {}
    for L in depths:
        rows = []
        for _ in range(m):
            layers = []
            for _ in range(L):
                lin = nn.Linear(n, n, bias=False).double()
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(n, n, generator=g, dtype=torch.float64) * math.sqrt(s2 / n))
                layers.append(lin)
            res = ftle(nn.Sequential(*layers), torch.zeros(1, n, dtype=torch.float64), layers=[str(L - 1)])
            assert res.depths == [L] and res.spectra is not None
            torch.testing.assert_close(res.exponents[0, 0], torch.log(res.spectra[0][0, 0]) / L)
            rows.append(torch.log(res.spectra[0][0]))
        logs[L] = torch.stack(rows)  # [m, n]: log σ_i
    l1, l2 = depths
    slope = (logs[l2].mean(0) - logs[l1].mean(0)) / (l2 - l1)
    se = ((logs[l2].var(0) + logs[l1].var(0)) / m).sqrt() / (l2 - l1)
    theory = torch.tensor(
        [0.5 * (math.log(2 * s2 / n) + digamma((n - i + 1) / 2)) for i in range(1, n + 1)], dtype=torch.float64
    )
    assert bool(((slope - theory).abs() <= 4 * se).all()), (slope, theory, se)
    assert bool((se < 0.03).all())  # the test has the power to see an error of 0.1


def test_exact_and_power_agree_with_autograd_jacobians_per_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    exact = ftle(net, x)
    power = ftle(net, x, method="power", tol=1e-10, max_iter=3000)
    assert exact.method == "exact" and power.method == "power" and power.spectra is None
    for li, stop in enumerate([2, 4, 5]):
        prefix = net[:stop]
        for b in range(6):
            jac = torch.autograd.functional.jacobian(lambda z, p=prefix: p(z), x[b])
            sigma = torch.linalg.svdvals(jac)[0]
            lam = math.log(float(sigma)) / (li + 1)
            assert abs(float(exact.exponents[b, li]) - lam) < 1e-12
            assert abs(float(power.exponents[b, li]) - lam) < 1e-9
    cos = (exact.directions * power.directions).sum(-1).abs()
    assert bool((cos > 1 - 1e-6).all())


def test_sequential_layer_selection():
    assert sequential_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) == ["2", "3"]
    ln = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.GELU(), nn.Dropout(), nn.Linear(3, 3), nn.Tanh())
    assert sequential_layers(ln) == ["3", "5"]
    assert sequential_layers(nn.Sequential(nn.Tanh(), nn.ReLU())) == ["0", "1"]
    net = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    full = ftle(net, x)
    part = ftle(net, x, layers=["3", "2"])  # a pre-activation counts as its block's layer
    assert part.depths == [2, 2]
    torch.testing.assert_close(part.exponents[:, 0], full.exponents[:, 1])


def test_named_modules_and_callables_of_any_model():
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = seq

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    x = torch.randn(5, 3, dtype=torch.float64)
    ref = ftle(seq, x)
    for method in ("exact", "power"):
        named = ftle(Wrapped(), x, layers=["body.1", "body.3", "body.4"], depths=[1, 2, 3], method=method, tol=1e-10)
        assert named.layers == ["body.1", "body.3", "body.4"]
        torch.testing.assert_close(named.exponents, ref.exponents, rtol=0, atol=1e-9)
    out = ftle(Wrapped(), x)
    assert out.layers == ["output"] and out.depths == [1]
    torch.testing.assert_close(out.exponents[:, 0], 3 * ref.exponents[:, 2])
    fn = ftle(seq, x, layers=[lambda z: seq[:2](z), seq])
    assert fn.layers == ["fn0", "fn1"]
    torch.testing.assert_close(fn.exponents[:, 0], ref.exponents[:, 0])


def test_model_state_is_restored_and_untouched():
    net = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2), nn.BatchNorm1d(2)).double()
    net.train()
    net[1].eval()  # mixed flags come back as they were
    params = [p.detach().clone() for p in net.parameters()]
    buffers = [b.clone() for b in net.buffers()]
    x = torch.randn(4, 3, dtype=torch.float64)
    rng = torch.get_rng_state()
    ftle(net, x, method="power")
    ftle(net, x, method="exact")
    assert [m.training for m in net.modules()] == [True, True, False, True, True, True]
    assert all(torch.equal(a, b) for a, b in zip(params, net.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers(), strict=True))
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_ftle_field_matches_ftle_on_the_grid_and_plots(tmp_path: Path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    field = ftle_field(net, (-2, 2), (-1, 1), (7, 5), batch_size=8)
    assert field.exponents.shape == (5, 7) and field.directions.shape == (5, 7, 2) and field.layer == "4"
    point = torch.tensor([[float(field.xs[3]), float(field.ys[1])]])
    res = ftle(net, point)
    torch.testing.assert_close(field.exponents[1, 3], res.exponents[0, -1])
    torch.testing.assert_close(field.directions[1, 3], res.directions[0, -1])
    hidden = ftle_field(net, (-2, 2), (-1, 1), 4, layer="1")
    assert hidden.layer == "1" and hidden.depth == 1
    png = tmp_path / "field.png"
    plot_ftle_field(field, png, points=torch.randn(10, 2), labels=torch.arange(10) % 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="xlim"):
        ftle_field(net, (1, -1), (0, 1), 4)
    with pytest.raises(ConfigError, match="resolution"):
        ftle_field(net, (-1, 1), (0, 1), 1)
    with pytest.raises(InputError, match="no layer"):
        ftle_field(net, (-1, 1), (0, 1), 3, layer="9")


def test_ftle_uncertainty_against_direct_computation():
    from scipy.stats import spearmanr

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(60, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    u = ftle_uncertainty(net, x, y, bins=4)
    with torch.no_grad():
        p = torch.softmax(net(x), 1)
    torch.testing.assert_close(u.entropy, -(p * p.log()).sum(1))
    assert torch.equal(u.correct, p.argmax(1) == y)
    torch.testing.assert_close(u.exponents, ftle(net, x).exponents[:, -1])
    assert int(u.counts.sum()) == 60 and u.counts.tolist() == [15, 15, 15, 15]
    assert abs(float(u.error_rate @ u.counts.double()) / 60 - float((~u.correct).double().mean())) < 1e-12
    assert abs(u.corr_entropy - spearmanr(u.exponents.numpy(), u.entropy.numpy()).statistic) < 1e-12
    assert abs(u.corr_error - spearmanr(u.exponents.numpy(), (~u.correct).numpy()).statistic) < 1e-12
    binary = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    ub = ftle_uncertainty(binary, x, (x[:, 0] > 0).long(), bins=3)
    with torch.no_grad():
        z = binary(x)[:, 0]
    q = torch.sigmoid(z)
    torch.testing.assert_close(ub.entropy, -(q * q.log() + (1 - q) * (1 - q).log()))
    with pytest.raises(InputError, match="one label per input"):
        ftle_uncertainty(net, x, y[:5])


def test_result_type_and_bad_inputs():
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    res = ftle(net, torch.randn(2, 2))
    assert isinstance(res, FTLEResult)
    torch.testing.assert_close(res.layer("2"), res.exponents[:, 1])
    with pytest.raises(InputError, match=r"batch.*\(2,\)"):
        ftle(net, torch.randn(2))
    with pytest.raises(InputError, match="floating-point"):
        ftle(net, torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(InputError, match="not children"):
        ftle(net, torch.randn(2, 2), layers=["7"])
    with pytest.raises(InputError, match="no module 'head'"):
        ftle(nn.ModuleDict({"a": nn.Linear(2, 2)}), torch.randn(2, 2), layers=["head"])
    with pytest.raises(ConfigError, match="depths"):
        ftle(net, torch.randn(2, 2), depths=[1, 0])
    with pytest.raises(ConfigError, match="method"):
        ftle(net, torch.randn(2, 2), method="arnoldi")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="keep the batch dimension"):
        ftle(lambda z: z.sum(), torch.randn(2, 2))
    with pytest.raises(InputError, match="no layer"):
        res.layer("9")


@pytest.mark.slow
def test_example_ridges_sharpen_with_depth_and_fade_with_width(tmp_path: Path, one_thread):
    """examples/ftle_ridges.py --quick: the paper's two claims, as the ridge contrast it prints."""
    pytest.importorskip("matplotlib")
    import runpy

    main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "ftle_ridges.py"))["main"]
    contrast = main(quick=True, out_dir=tmp_path)
    assert contrast[(6, 8)] > contrast[(2, 8)] + 0.2  # deeper: sharper ridges
    assert contrast[(6, 128)] < contrast[(6, 8)] - 0.1  # wider: fainter ridges
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "ftle_L2_N128.png",
        "ftle_L2_N8.png",
        "ftle_L6_N128.png",
        "ftle_L6_N8.png",
    ]
