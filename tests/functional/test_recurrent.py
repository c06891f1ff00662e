"""Pure recurrent cells and the QR Lyapunov loop, against torch's modules and exact results."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabwatch.errors import InputError
from stabwatch.functional.recurrent import (
    entropy_rate,
    kaplan_yorke_dimension,
    qr_lyapunov,
    recurrent_params,
    recurrent_step,
)

D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matrices: one torch thread (`tests/conftest.py::one_thread`)."""


def _flat(h: torch.Tensor) -> torch.Tensor:
    """``[L, B, N]`` -> ``[B, L*N]``."""
    return h.transpose(0, 1).reshape(h.shape[1], -1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.RNN(3, 5, num_layers=2),
        lambda: nn.RNN(3, 5, num_layers=2, nonlinearity="relu"),
        lambda: nn.GRU(3, 5, num_layers=2),
        lambda: nn.LSTM(3, 5, num_layers=2),
        lambda: nn.RNN(3, 5, bias=False),
    ],
)
def test_the_pure_step_reproduces_the_torch_module(make) -> None:
    torch.manual_seed(0)
    module = make().double()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(7, 4, 3, generator=g, dtype=D64)
    step = recurrent_step(recurrent_params(module))
    lstm = isinstance(module, nn.LSTM)
    state = torch.zeros(4, recurrent_params(module).state_dim, dtype=D64)
    for t in range(7):
        state = step(state, xs[t])
    out = module(xs)[1]
    expected = torch.cat([_flat(out[0]), _flat(out[1])], -1) if lstm else _flat(out)
    torch.testing.assert_close(state, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [nn.RNNCell, nn.GRUCell, nn.LSTMCell])
def test_cells_are_one_layer_stacks(cls) -> None:
    torch.manual_seed(0)
    cell = cls(3, 4).double()
    x = torch.randn(2, 3, dtype=D64)
    params = recurrent_params(cell)
    out = recurrent_step(params)(torch.zeros(2, params.state_dim, dtype=D64), x)
    ref = cell(x)
    ref = torch.cat(ref, -1) if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out, ref)


def _fixed_point_exponents(module: nn.Module, steps: int = 800, warmup: int = 300) -> torch.Tensor:
    params = recurrent_params(module)
    n = params.state_dim
    frame = torch.randn(1, n, n, generator=torch.Generator().manual_seed(3), dtype=D64)
    out = qr_lyapunov(
        recurrent_step(params),
        torch.zeros(1, n, dtype=D64),
        torch.zeros(steps, 1, params.input_size, dtype=D64),
        frame,
        warmup=warmup,
    )
    return (out.log_r / out.steps)[0]


def _log_moduli(jac: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvals(jac).abs().log().sort(descending=True).values


def _zero_biases(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name:
                p.zero_()
    return module.double()


def test_rnn_at_its_fixed_point_has_the_log_moduli_of_w_hh() -> None:
    torch.manual_seed(0)
    rnn = _zero_biases(nn.RNN(2, 6))
    lam = _fixed_point_exponents(rnn)
    torch.testing.assert_close(lam, _log_moduli(rnn.weight_hh_l0.detach()), atol=1e-2, rtol=0)


def test_two_layer_rnn_at_its_fixed_point_has_the_block_triangular_spectrum() -> None:
    torch.manual_seed(1)
    rnn = _zero_biases(nn.RNN(2, 4, num_layers=2))
    w1, w2, wi2 = (rnn.weight_hh_l0.detach(), rnn.weight_hh_l1.detach(), rnn.weight_ih_l1.detach())
    jac = torch.zeros(8, 8, dtype=D64)
    jac[:4, :4] = w1  # h1' = tanh(W_hh1 h1 + ...)
    jac[4:, :4] = wi2 @ w1  # layer 2 reads the new h1
    jac[4:, 4:] = w2
    torch.testing.assert_close(_fixed_point_exponents(rnn), _log_moduli(jac), atol=1e-2, rtol=0)


def test_lstm_at_its_fixed_point_has_the_log_moduli_of_the_hand_formed_hc_jacobian() -> None:
    torch.manual_seed(2)
    n = 4
    lstm = _zero_biases(nn.LSTM(3, n))
    w_g = lstm.weight_hh_l0.detach()[2 * n : 3 * n]  # gates i, f, g, o
    eye = torch.eye(n, dtype=D64)
    # at h = c = 0, zero input and biases: every gate is σ(0) = 1/2, tanh(g) = 0, so
    # c' = ½c + ½·tanh(W_g h): ∂c'/∂h = ½W_g, ∂c'/∂c = ½I; h' = ½·tanh(c'): ∂h'/∂(h, c) = ½·∂c'/∂(h, c)
    jac = torch.cat([torch.cat([0.25 * w_g, 0.25 * eye], 1), torch.cat([0.5 * w_g, 0.5 * eye], 1)], 0)
    lam = _fixed_point_exponents(lstm)
    ref = _log_moduli(jac)
    torch.testing.assert_close(lam[:n], ref[:n], atol=1e-2, rtol=0)
    # J = [½I; I]·[½W_g, ½I] has rank n: the other n directions are annihilated (λ = -inf up to round-off)
    assert (lam[n:] < -20).all() and (ref[n:] < -20).all()
    # the cell state matters: without the c block the spectrum would be log|eig(¼W_g)|
    assert not torch.allclose(lam[:n], _log_moduli(0.25 * w_g), atol=0.05)


def test_gru_at_its_fixed_point_has_the_log_moduli_of_the_hand_formed_jacobian() -> None:
    torch.manual_seed(3)
    n = 5
    gru = _zero_biases(nn.GRU(3, n))
    w_n = gru.weight_hh_l0.detach()[2 * n :]  # gates r, z, n
    # r = z = ½, n = tanh(½·W_hn h) -> h' = ½n + ½h: J = ½I + ¼W_hn
    jac = 0.5 * torch.eye(n, dtype=D64) + 0.25 * w_n
    torch.testing.assert_close(_fixed_point_exponents(gru), _log_moduli(jac), atol=1e-2, rtol=0)


def _driven_rnn(n: int = 8, gain: float = 1.6) -> nn.RNN:
    torch.manual_seed(4)
    rnn = nn.RNN(3, n).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.randn(n, n, dtype=D64) * gain / math.sqrt(n))
    return rnn


def test_driven_tanh_rnn_top_exponent_matches_a_two_trajectory_estimate() -> None:
    rnn = _driven_rnn()
    steps, warmup = 1200, 200
    xs = torch.randn(steps, 1, 3, generator=torch.Generator().manual_seed(5), dtype=D64)
    params = recurrent_params(rnn)
    out = qr_lyapunov(
        recurrent_step(params), torch.zeros(1, 8, dtype=D64), xs, torch.randn(1, 8, 1, dtype=D64), warmup=warmup
    )
    lam1 = float(out.log_r[0, 0]) / out.steps
    # reference: a second trajectory at distance 1e-7, renormalised every step (Benettin), with torch's cell
    cell = nn.RNNCell(3, 8).double()
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in rnn.state_dict().items()})
    eps = 1e-7
    with torch.no_grad():
        h = torch.zeros(1, 8, dtype=D64)
        d = torch.randn(1, 8, dtype=D64, generator=torch.Generator().manual_seed(6))
        h2 = h + eps * d / d.norm()
        total = 0.0
        for t in range(steps):
            h, h2 = cell(xs[t], h), cell(xs[t], h2)
            dist = float((h2 - h).norm())
            if t >= warmup:
                total += math.log(dist / eps)
            h2 = h + (h2 - h) * (eps / dist)
    assert abs(lam1) > 0.02  # not a trivially zero exponent
    assert lam1 == pytest.approx(total / (steps - warmup), abs=5e-3)


def test_sum_of_exponents_is_the_time_average_of_log_det_j() -> None:
    rnn = _driven_rnn(n=6, gain=1.2)
    steps, warmup = 150, 30
    xs = torch.randn(steps, 2, 3, generator=torch.Generator().manual_seed(7), dtype=D64)
    out = qr_lyapunov(
        recurrent_step(recurrent_params(rnn)),
        torch.zeros(2, 6, dtype=D64),
        xs,
        torch.randn(2, 6, 6, dtype=D64),
        warmup=warmup,
        qr_every=3,
        check=True,
    )
    # reference: J_t = diag(1 - h_t²)·W_hh along torch's own trajectory
    hs = rnn(xs)[0].detach()  # [T, B, N]
    w = rnn.weight_hh_l0.detach()
    ref = torch.stack(
        [torch.linalg.slogdet((1 - hs[t] ** 2)[:, :, None] * w).logabsdet for t in range(warmup, steps)]
    ).sum(0)
    torch.testing.assert_close(out.log_r.sum(-1), ref, rtol=0, atol=1e-9)
    assert out.logdet is not None
    torch.testing.assert_close(out.logdet, ref, rtol=0, atol=1e-9)


def test_qr_every_m_steps_gives_the_same_spectrum() -> None:
    rnn = _driven_rnn(n=6, gain=1.2)
    xs = torch.randn(400, 1, 3, generator=torch.Generator().manual_seed(8), dtype=D64)
    frame = torch.randn(1, 6, 6, dtype=D64, generator=torch.Generator().manual_seed(9))
    step = recurrent_step(recurrent_params(rnn))
    a = qr_lyapunov(step, torch.zeros(1, 6, dtype=D64), xs, frame, warmup=100, qr_every=1)
    b = qr_lyapunov(step, torch.zeros(1, 6, dtype=D64), xs, frame, warmup=100, qr_every=4)
    torch.testing.assert_close(a.log_r, b.log_r, rtol=0, atol=1e-8)


def test_a_switched_off_relu_network_gives_zero_pivots_and_minus_inf() -> None:
    rnn = _zero_biases(nn.RNN(2, 3, nonlinearity="relu"))  # relu'(0) = 0: J = 0 at the zero state
    params = recurrent_params(rnn)
    out = qr_lyapunov(
        recurrent_step(params), torch.zeros(1, 3, dtype=D64), torch.zeros(5, 1, 2, dtype=D64), torch.randn(1, 3, 2)
    )
    assert out.zero_pivots.tolist() == [10.0]
    assert torch.isneginf(out.log_r).all()


def test_bad_shapes_are_refused_with_the_shapes_in_the_message() -> None:
    step = recurrent_step(recurrent_params(nn.RNN(2, 3)))
    with pytest.raises(InputError, match=r"frame must be \[batch=1, n=3, k\]"):
        qr_lyapunov(step, torch.zeros(1, 3), torch.zeros(4, 1, 2), torch.zeros(1, 3, 4))
    with pytest.raises(InputError, match="warmup"):
        qr_lyapunov(step, torch.zeros(1, 3), torch.zeros(4, 1, 2), torch.zeros(1, 3, 1), warmup=4)
    with pytest.raises(InputError, match="bidirectional"):
        recurrent_params(nn.GRU(2, 3, bidirectional=True))
    with pytest.raises(InputError, match="step function"):
        recurrent_params(nn.Linear(2, 3))


def test_kaplan_yorke_and_entropy_rate_by_hand() -> None:
    lam = torch.tensor([0.4, 0.1, -0.25, -1.0], dtype=D64)
    # partial sums 0.4, 0.5, 0.25, -0.75: j = 3, D = 3 + 0.25 / 1.0
    assert kaplan_yorke_dimension(lam) == pytest.approx(3.25)
    assert kaplan_yorke_dimension(lam - 1.0) == 0.0  # λ_1 < 0: a stable fixed point
    assert kaplan_yorke_dimension(torch.tensor([0.3, 0.2])) == 2.0  # all partial sums ≥ 0
    assert float(entropy_rate(lam)) == pytest.approx(0.5)
