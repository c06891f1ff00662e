"""`stabwatch.analysis.lyapunov_spectrum` against exact results: modules, layouts, user step functions,
batching, units and the log-det self-check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabwatch.analysis import LyapunovSpectrum, lyapunov_spectrum
from stabwatch.errors import ConfigError, InputError

D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matrices: one torch thread (`tests/conftest.py::one_thread`)."""


def _log_moduli(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvals(a).abs().log().sort(descending=True).values


def test_user_step_function_of_a_linear_map_gives_log_moduli_of_its_eigenvalues() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=D64) / 2

    def step(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # one sequence: s [4], x [4]
        return a @ s + x

    inputs = torch.randn(3, 600, 4, generator=g, dtype=D64)  # [B, T, d]: a linear map ignores the drive
    spec = lyapunov_spectrum(step, inputs, h0=torch.zeros(3, 4, dtype=D64), warmup=200)
    assert isinstance(spec, LyapunovSpectrum)
    assert spec.exponents.shape == (3, 4) and spec.state_dim == 4 and spec.steps == 400
    torch.testing.assert_close(spec.mean, _log_moduli(a), atol=1e-2, rtol=0)
    assert spec.sum_check < 1e-10  # k = n: Σλ = mean log|det J| = log|det A|
    assert spec.logdet is not None
    torch.testing.assert_close(spec.logdet, torch.linalg.slogdet(a).logabsdet.expand(3), atol=1e-12, rtol=0)


def test_a_batched_user_step_equals_the_module_it_rewrites() -> None:
    torch.manual_seed(1)
    rnn = nn.RNN(3, 5, batch_first=True).double()
    w_ih, w_hh, b = rnn.weight_ih_l0.detach(), rnn.weight_hh_l0.detach(), rnn.bias_ih_l0 + rnn.bias_hh_l0

    def step(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w_ih.T + h @ w_hh.T + b.detach())

    xs = torch.randn(2, 80, 3, dtype=D64)
    mod = lyapunov_spectrum(rnn, xs, k=3, warmup=20)
    user = lyapunov_spectrum(step, xs, h0=torch.zeros(2, 5, dtype=D64), k=3, warmup=20, batched=True)
    torch.testing.assert_close(mod.exponents, user.exponents, rtol=0, atol=1e-12)


def test_lstm_state_is_hc_with_2n_exponents_and_h0_is_read_in_torch_layout() -> None:
    torch.manual_seed(2)
    lstm = nn.LSTM(3, 4, num_layers=2).double()
    xs = torch.randn(60, 2, 3, dtype=D64)  # [T, B, d]
    h0 = (torch.randn(2, 2, 4, dtype=D64), torch.randn(2, 2, 4, dtype=D64))
    spec = lyapunov_spectrum(lstm, xs, h0=h0, warmup=10)
    assert spec.state_dim == 16 and spec.exponents.shape == (2, 16)
    assert spec.sum_check < 1e-8  # against log|det J| of Jacobians formed with jacfwd
    assert (spec.exponents[:, :-1] >= spec.exponents[:, 1:]).all()
    # batch_first is honoured: the same sequences in [B, T, d] give the same spectrum
    lstm_bf = nn.LSTM(3, 4, num_layers=2, batch_first=True).double()
    lstm_bf.load_state_dict(lstm.state_dict())
    spec_bf = lyapunov_spectrum(lstm_bf, xs.transpose(0, 1), h0=h0, warmup=10)
    torch.testing.assert_close(spec.exponents, spec_bf.exponents, rtol=0, atol=1e-12)


def test_mean_and_spread_over_the_batch_and_bits() -> None:
    torch.manual_seed(3)
    gru = nn.GRU(2, 6).double()
    xs = torch.randn(100, 5, 2, dtype=D64)
    spec = lyapunov_spectrum(gru, xs, k=3, warmup=20)
    torch.testing.assert_close(spec.mean, spec.exponents.mean(0))
    torch.testing.assert_close(spec.std, spec.exponents.std(0))
    assert (spec.std > 0).all()  # different drives, different finite-time exponents
    bits = lyapunov_spectrum(gru, xs, k=3, warmup=20, unit="bits")
    torch.testing.assert_close(bits.exponents, spec.exponents / math.log(2))
    assert bits.unit == "bits" and math.isnan(bits.sum_check)  # k < n: no check
    assert spec.max == float(spec.mean[0])
    assert torch.equal(spec.entropy_rate, spec.exponents.clamp_min(0).sum(-1))


def test_a_contracting_network_has_dimension_zero_and_no_entropy() -> None:
    rnn = nn.RNN(2, 4, bias=False).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(0.5 * torch.eye(4, dtype=D64))
    spec = lyapunov_spectrum(rnn, torch.randn(50, 1, 2, dtype=D64), k=4)
    assert spec.max < 0 and spec.kaplan_yorke == 0.0 and float(spec.entropy_rate[0]) == 0.0


def test_relu_network_switched_off_warns_and_gives_minus_inf() -> None:
    rnn = nn.RNN(2, 3, nonlinearity="relu", bias=False)
    with pytest.warns(RuntimeWarning, match="zero pivots"):
        spec = lyapunov_spectrum(rnn, torch.zeros(10, 1, 2), warmup=0)
    assert torch.isneginf(spec.exponents).all() and int(spec.zero_pivots.sum()) == 30


def test_the_global_rng_is_not_touched() -> None:
    torch.manual_seed(5)
    gru = nn.GRU(2, 3)
    before = torch.get_rng_state()
    lyapunov_spectrum(gru, torch.randn(20, 1, 2, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(before, torch.get_rng_state())


def test_bad_input_is_refused_with_a_clear_message() -> None:
    rnn = nn.RNN(3, 4)
    with pytest.raises(InputError, match=r"must be \[T, B, d\]"):
        lyapunov_spectrum(rnn, torch.zeros(5, 2, 7))
    with pytest.raises(ConfigError, match=r"k must be an int in \[1, 4\]"):
        lyapunov_spectrum(rnn, torch.zeros(5, 2, 3), k=5)
    with pytest.raises(ConfigError, match="warmup"):
        lyapunov_spectrum(rnn, torch.zeros(5, 2, 3), warmup=5)
    with pytest.raises(ConfigError, match="unit"):
        lyapunov_spectrum(rnn, torch.zeros(5, 2, 3), unit="dB")
    with pytest.raises(InputError, match="h0 for RNN"):
        lyapunov_spectrum(rnn, torch.zeros(5, 2, 3), h0=torch.zeros(2, 2, 4))
    with pytest.raises(InputError, match=r"model\.lstm"):
        lyapunov_spectrum(nn.Sequential(nn.Linear(3, 3)), torch.zeros(5, 2, 3))
    with pytest.raises(InputError, match="needs h0"):
        lyapunov_spectrum(lambda s, x: s, torch.zeros(2, 5, 3))
    with pytest.raises(InputError, match="same shape"):
        lyapunov_spectrum(lambda s, x: s[:2], torch.zeros(1, 5, 3), h0=torch.zeros(1, 4))


@pytest.mark.slow
def test_the_example_runs_and_plots(tmp_path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "rnn_spectrum.py"
    spec = importlib.util.spec_from_file_location("rnn_spectrum_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--steps", "4", "--every", "2", "--lrs", "0.01", "1.0", "--out", str(tmp_path)])
    assert set(results) == {0.01, 1.0}
    for r in results.values():
        assert len(r["lambda1"]) == 2 and len(r["spectrum"]) == 16
        assert r["spectrum"] == sorted(r["spectrum"], reverse=True)
    assert (tmp_path / "rnn_spectrum.png").stat().st_size > 10_000
