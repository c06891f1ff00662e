"""`ActivationCollector` on its own: per-layer activation statistics against the same activations
computed again with plain torch ops (no hooks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabwatch.collectors import ActivationCollector
from tests.collectors.drive import Drive


def _stats(y: torch.Tensor, kind: str) -> dict[str, float]:
    y = y.detach().double()
    out = {"activation_mean": float(y.mean()), "activation_std": float(y.std())}
    if kind == "relu":
        out["dead_frac"] = float((y.reshape(y.shape[0], -1) <= 0).all(dim=0).double().mean())
    if kind == "tanh":
        out["saturated_frac"] = float((y.abs() > 0.99).double().mean())
    if kind == "sigmoid":
        out["saturated_frac"] = float(((y > 0.99) | (y < 0.01)).double().mean())
    return out


def _mean_of(calls: list[dict[str, float]]) -> dict[str, float]:
    assert len(calls) > 0
    return {k: sum(c[k] for c in calls) / len(calls) for k in calls[0]}


class Net(nn.Module):
    """ReLU (with dead units), Tanh (saturating), Sigmoid, and a Tanh called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.l1 = nn.Linear(8, 24)
        self.relu = nn.ReLU()
        self.l2 = nn.Linear(24, 16)
        self.tanh = nn.Tanh()
        self.l3 = nn.Linear(16, 16)
        self.sig = nn.Sigmoid()
        self.twice = nn.Tanh()
        with torch.no_grad():
            self.l1.bias[:6] = -50.0  # six units dead for every input
            self.l2.weight.mul_(25.0)  # tanh in its flat tails

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.l1(x))
        b = self.tanh(self.l2(a))
        c = self.sig(self.l3(b))
        return self.twice(self.twice(c) * 3.0)

    def reference(self, x: torch.Tensor) -> dict[str, dict[str, float]]:
        """The same forward with torch functions, statistics per activation module."""
        with torch.no_grad():
            a = torch.relu(self.l1(x))
            b = torch.tanh(self.l2(a))
            c = torch.sigmoid(self.l3(b))
            t1 = torch.tanh(c)
            t2 = torch.tanh(t1 * 3.0)
        return {
            "relu": _stats(a, "relu"),
            "tanh": _stats(b, "tanh"),
            "sig": _stats(c, "sigmoid"),
            "twice": _mean_of([_stats(t1, "tanh"), _stats(t2, "tanh")]),  # averaged over its calls
        }


FIELDS = ("activation_mean", "activation_std", "dead_frac", "saturated_frac")


def test_statistics_match_a_hook_free_recomputation():
    model = Net()
    drive = Drive(ActivationCollector(every=1), model)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    model(x)
    values = drive.collect()
    ref = model.reference(x)
    assert ref["relu"]["dead_frac"] >= 6 / 24 and ref["tanh"]["saturated_frac"] > 0.2
    for field in FIELDS:
        want = {layer: stats[field] for layer, stats in ref.items() if field in stats}
        got = values.layers(field)
        assert sorted(got) == sorted(want) and len(want) > 0, field
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), field
        assert values.field(field) == pytest.approx(sum(want.values()) / len(want), rel=1e-5, abs=1e-7)
    drive.close()


def test_a_model_without_activation_modules_falls_back_to_linear_outputs():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4))
    drive = Drive(ActivationCollector(every=1), model)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    model(x)
    values = drive.collect()
    with torch.no_grad():
        h = model[0](x)
        want = {"0": _stats(h, "linear"), "1": _stats(model[1](h), "linear")}
    for field in ("activation_mean", "activation_std"):
        assert values.layers(field) == pytest.approx({k: v[field] for k, v in want.items()}, rel=1e-5)
    assert values.layers("dead_frac") == {} and values.layers("saturated_frac") == {}
    drive.close()


def test_only_scheduled_steps_are_measured_and_detach_removes_the_hooks():
    model = Net()
    collector = ActivationCollector(every=2)
    drive = Drive(collector, model)
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    counts = []
    for _ in range(4):
        model(x)
        counts.append(len(drive.collect()))
    assert counts[1] == counts[3] == 0 and counts[0] == counts[2] > 0
    drive.close()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
