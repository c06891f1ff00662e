"""The ``lyapunov_spectrum`` collector: its keys, its values against exact results, its schedule, and that
training with it on is bit-identical to training without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.analysis import lyapunov_spectrum
from stabwatch.collectors import FAMILIES, PRESETS, LyapunovSpectrumCollector
from stabwatch.errors import ConfigError


class Seq(nn.Module):
    """``[B, T, 3]`` -> an LSTM(3, 4) then a GRU(4, 5) then a linear head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.gru = nn.GRU(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.lstm(x)[0])[0][:, -1])


def _train(model: nn.Module, collector: LyapunovSpectrumCollector | None, steps: int = 4):
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(123)
    records = []
    collectors = [collector] if collector is not None else []
    with sw.Monitor(model, opt, preset="cheap", collectors=collectors, alerts=False) as mon:
        for _ in range(steps):
            x, y = torch.randn(6, 7, 3, generator=g), torch.randint(0, 2, (6,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            rec = mon.step(loss=loss)
            if rec is not None:
                records.append(rec)
    return records, opt


def test_registered_and_off_in_cheap_and_default() -> None:
    assert FAMILIES["lyapunov_spectrum"] is LyapunovSpectrumCollector
    for preset in ("cheap", "default"):
        assert "lyapunov_spectrum" not in {c.family for c in PRESETS[preset]()}


def test_keys_and_values_of_every_recurrent_module(one_thread) -> None:
    torch.manual_seed(0)
    model = Seq()
    col = LyapunovSpectrumCollector(every=2, top_k=3, steps=40, warmup=10)
    records, _ = _train(model, col, steps=3)  # the last record is measured on the final weights
    assert len(records) == 3
    scheduled = [i for i, r in enumerate(records) if "lyapunov_spectrum/max" in r.to_dict()]
    assert scheduled == [0, 2]  # every=2
    assert not [k for k in records[1].to_dict() if k.startswith("lyapunov_spectrum")]
    keys = sorted(k for k in records[2].to_dict() if k.startswith("lyapunov_spectrum"))
    assert len(keys) == 7  # max + top1..3 of each module
    flat = records[2].to_dict()
    per = {m: [flat[f"lyapunov_spectrum_layers/top{i}/{m}"] for i in (1, 2, 3)] for m in ("lstm", "gru")}
    assert flat["lyapunov_spectrum/max"] == max(per["lstm"][0], per["gru"][0])
    for values in per.values():
        assert values == sorted(values, reverse=True)
    # the same numbers offline, on the collector's probe (drawn from its own seeded generator)
    xs, _ = col._probe("gru", 4, 3, 5)
    offline = lyapunov_spectrum(
        model.gru, xs.transpose(0, 1).float(), k=3, warmup=10, seed=sum(map(ord, "gru"))
    )  # batch_first
    assert per["gru"] == pytest.approx(offline.mean.tolist(), abs=1e-6)


def test_at_a_fixed_point_the_collector_reads_the_exact_spectrum(one_thread) -> None:
    # zero biases, zero input, zero state: an RNN's Jacobian is W_hh, its exponents log|eig(W_hh)|
    torch.manual_seed(1)
    rnn = nn.RNN(2, 5, batch_first=True).double()
    with torch.no_grad():
        rnn.bias_ih_l0.zero_()
        rnn.bias_hh_l0.zero_()
    col = LyapunovSpectrumCollector(every=1, top_k=2, warmup=300, probe=torch.zeros(1, 800, 2, dtype=torch.float64))
    opt = torch.optim.SGD(rnn.parameters(), lr=0.0)
    with sw.Monitor(rnn, opt, preset="cheap", collectors=[col], alerts=False) as mon:
        rnn(torch.zeros(1, 3, 2, dtype=torch.float64))[0].sum().backward()
        opt.step()
        rec = mon.step()
    exact = torch.linalg.eigvals(rnn.weight_hh_l0.detach()).abs().log().sort(descending=True).values
    got = [rec.to_dict()[f"lyapunov_spectrum_layers/top{i}/_root_"] for i in (1, 2)]
    assert got == pytest.approx(exact[:2].tolist(), abs=1e-2)


def test_training_is_bit_identical_with_the_collector_on(one_thread) -> None:
    torch.manual_seed(0)
    plain_model = Seq()
    watched_model = Seq()
    watched_model.load_state_dict(plain_model.state_dict())
    _, opt0 = _train(plain_model, None)
    rng0 = torch.get_rng_state()
    records, opt1 = _train(watched_model, LyapunovSpectrumCollector(every=1, top_k=2, steps=20, warmup=5))
    assert all("lyapunov_spectrum/max" in r.to_dict() for r in records)  # it really ran
    for name, value in plain_model.state_dict().items():
        assert torch.equal(value, watched_model.state_dict()[name]), name
    for (n, p0), p1 in zip(plain_model.named_parameters(), watched_model.parameters(), strict=True):
        assert torch.equal(p0.grad, p1.grad), n
    for a, b in zip(opt0.state.values(), opt1.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(rng0, torch.get_rng_state())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in watched_model.modules())


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="warmup"):
        LyapunovSpectrumCollector(steps=10, warmup=10)
    with pytest.raises(ConfigError, match="probe"):
        LyapunovSpectrumCollector(probe=torch.zeros(3, 4))
    with pytest.raises(ConfigError, match="top_k"):
        LyapunovSpectrumCollector(top_k=0)
    model = Seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    col = LyapunovSpectrumCollector(modules=("rnn",))
    with (
        pytest.raises(ConfigError, match=r"\['rnn'\] are not"),
        sw.Monitor(model, opt, preset="cheap", collectors=[col]),
    ):
        pass
