"""The docs' claim on global values: the spiking family pools all neurons of all layers (a layer weighs
by its size), the activation family takes an unweighted mean over layers (each layer counts once).
Two layers of very different sizes make the two readings differ; each is checked against its own
computation from the layers' values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.collectors import ActivationCollector, SpikingCollector
from stabwatch.collectors.spiking import SpikingAdapter

OFF = {"update": None, "grad_sv": None, "weight": None, "activation": None, "spiking": None}


class Fire(nn.Module):
    """A 'neuron' layer: spikes where the input exceeds 1, membrane = the input (kept in ``self.v``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.v = x
        return (x > 1.0).float()


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.small = Fire()  # 2 neurons, always firing
        self.big = Fire()  # 8 neurons, never firing
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.small(torch.full((x.shape[0], 2), 2.0))
        b = self.big(torch.zeros(x.shape[0], 8))
        return self.w * (x.sum() + a.sum() + b.sum())


def test_spiking_global_values_pool_the_neurons():
    model = Two()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    adapter = SpikingAdapter(Fire, spikes=0, membrane="v", threshold=1.0)
    collectors = [SpikingCollector(every=1, adapters=[adapter])]
    with sw.Monitor(model, opt, preset="cheap", every=OFF, collectors=collectors, alerts=False) as mon:
        loss = model(torch.ones(4, 1))
        loss.backward()
        opt.step()
        record = mon.step(loss=loss)
    assert record is not None
    assert record.layers["small"]["firing_rate_mean"] == 1.0 and record.layers["big"]["firing_rate_mean"] == 0.0
    assert record.firing_rate_mean == pytest.approx(2 / 10)  # pooled: 2 firing neurons of 10; not (1 + 0) / 2
    assert record.dead_neuron_frac == pytest.approx(8 / 10)


def test_activation_global_values_are_unweighted_means_over_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with sw.Monitor(
        model, opt, preset="cheap", every=OFF, collectors=[ActivationCollector(every=1)], alerts=False
    ) as mon:
        loss = model(torch.randn(16, 3, generator=torch.Generator().manual_seed(1))).square().mean()
        loss.backward()
        opt.step()
        record = mon.step(loss=loss)
    assert record is not None
    means = [record.layers[name]["activation_mean"] for name in ("1", "3")]
    assert record.activation_mean == pytest.approx(sum(means) / 2)  # each layer once, whatever its width
    assert record.activation_mean != pytest.approx((2 * means[0] + 64 * means[1]) / 66)
