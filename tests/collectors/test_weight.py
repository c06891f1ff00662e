"""`WeightCollector` on its own: spectral norms against ``torch.linalg.matrix_norm(ord=2)`` and spectral
radii of recurrent gate blocks against ``torch.linalg.eigvals``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabwatch.collectors import WeightCollector
from tests.collectors.drive import Drive


def _with_spectrum(w: torch.Tensor, s: list[float], seed: int) -> None:
    """Overwrite ``w`` with ``U diag(s) V^T`` (a clear gap, so power iteration converges fast)."""
    g = torch.Generator().manual_seed(seed)
    m, n = w.shape
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    with torch.no_grad():
        w.copy_((u * torch.tensor(s, dtype=torch.float64)) @ v.T)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.inp = nn.Linear(6, 20)
        self.sq = nn.Linear(20, 20)
        self.lstm = nn.LSTM(20, 5, batch_first=True)
        self.gru = nn.GRU(5, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(torch.tanh(self.sq(torch.relu(self.inp(x)))))
        h, _ = self.gru(h)
        return self.head(h[:, -1])


def _norm(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), ord=2))


def _radius(w: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(w.detach().double()).abs().max())


def _gate_radii(module: nn.Module, prefix: str, gates: str) -> dict[str, float]:
    w = module.weight_hh_l0
    h = w.shape[1]
    return {f"{prefix}.weight_hh_l0.{gate}": _radius(w[i * h : (i + 1) * h]) for i, gate in enumerate(gates)}


def test_spectral_norms_and_recurrent_radii_match_linalg():
    model = Net()
    _with_spectrum(model.inp.weight, [3.0, 1.0, 0.5], seed=0)
    _with_spectrum(model.sq.weight, [2.0, 0.7], seed=1)
    drive = Drive(WeightCollector(every=1), model)
    rng = torch.get_rng_state()
    values = drive.collect()
    assert torch.equal(torch.get_rng_state(), rng)  # start vectors from the monitor's generator
    norms = values.layers("spectral_norm")
    matrices = {
        "inp": model.inp.weight,
        "sq": model.sq.weight,
        "lstm.weight_ih_l0": model.lstm.weight_ih_l0,
        "lstm.weight_hh_l0": model.lstm.weight_hh_l0,
        "gru.weight_ih_l0": model.gru.weight_ih_l0,
        "gru.weight_hh_l0": model.gru.weight_hh_l0,
        "head": model.head.weight,
    }
    assert sorted(norms) == sorted(matrices)
    assert norms["inp"] == pytest.approx(3.0, rel=1e-5) and norms["sq"] == pytest.approx(2.0, rel=1e-5)
    for layer in ("inp", "sq"):
        assert norms[layer] == pytest.approx(_norm(matrices[layer]), rel=1e-5)
    for layer, w in matrices.items():  # random Gaussian weights: no gap, 30 iterations give ~1e-2
        assert norms[layer] == pytest.approx(_norm(w), rel=5e-2), layer
        assert norms[layer] <= _norm(w) * (1 + 1e-5), layer  # power iteration approaches from below
    assert values.field("spectral_norm") == pytest.approx(max(norms.values()), rel=1e-12)
    # recurrent radii: every gate block of the LSTM (i, f, g, o) and the GRU (r, z, n); `sq` is square but
    # not recurrent
    want = _gate_radii(model.lstm, "lstm", "ifgo") | _gate_radii(model.gru, "gru", "rzn")
    radii = values.layers("spectral_radius")
    assert sorted(radii) == sorted(want)
    for key, r in want.items():
        assert radii[key] == pytest.approx(r, rel=1e-5), key
    assert values.field("spectral_radius") == pytest.approx(max(want.values()), rel=1e-5)
    drive.close()


def test_warm_started_power_iteration_converges_over_records():
    model = Net()
    drive = Drive(WeightCollector(every=1), model)
    errors = []
    for _ in range(40):
        got = drive.collect().layers("spectral_norm")["lstm.weight_ih_l0"]
        errors.append(abs(got - _norm(model.lstm.weight_ih_l0)) / _norm(model.lstm.weight_ih_l0))
    assert len(errors) == 40 and errors[-1] < 1e-4 and errors[-1] <= errors[0]
    drive.close()


@pytest.mark.parametrize(("radius", "square_included"), [("square", True), ("none", False)])
def test_radius_option(radius, square_included):
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    _with_spectrum(model[0].weight, [1.5, 1.0], seed=2)
    drive = Drive(WeightCollector(every=1, radius=radius), model)
    radii = drive.collect().layers("spectral_radius")
    assert set(radii) == ({"0"} if square_included else set())
    if square_included:
        assert radii["0"] == pytest.approx(_radius(model[0].weight), rel=1e-5)
    drive.close()
