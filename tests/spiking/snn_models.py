"""Small snntorch networks that record what their spiking layers emit, and the numpy reference.

The recording is done by the model itself (not by hooks), so the statistics stabwatch reports from its
hooks are checked against an independent computation on the recorded tensors.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", category=UserWarning, module="snntorch")
snn = pytest.importorskip("snntorch", reason="snntorch is a test dependency (pip install -e '.[dev]')")
from snntorch import surrogate  # noqa: E402

T = 8
FIRING = ("firing_rate_mean", "firing_rate_std", "dead_neuron_frac", "saturated_neuron_frac")


class Recorder:
    """Per layer: spike tensors with their time dim, membrane tensors and thresholds, as seen in training."""

    def __init__(self) -> None:
        self.spikes: dict[str, list[tuple[torch.Tensor, int | None]]] = defaultdict(list)
        self.membrane: dict[str, list[tuple[torch.Tensor, Any]]] = defaultdict(list)

    def add(self, layer: str, spikes: torch.Tensor, membrane: torch.Tensor | None, threshold: Any, tdim=None):
        self.spikes[layer].append((spikes.detach().clone(), tdim))
        if membrane is not None:
            th = threshold.detach().clone() if isinstance(threshold, torch.Tensor) else threshold
            self.membrane[layer].append((membrane.detach().clone(), th))

    def clear(self) -> None:
        self.spikes.clear()
        self.membrane.clear()


def reference(rec: Recorder, dead: float = 0.01, sat: float = 0.9) -> dict[str | None, dict[str, float]]:
    """Statistics per layer (and pooled, key ``None``) from the recorded tensors, in float64 numpy."""
    out: dict[str | None, dict[str, float]] = {}
    all_rates, all_v, all_gap = [], [], []
    for layer, items in rec.spikes.items():
        total, n = None, 0
        for s, tdim in items:
            a = s.double().numpy()
            if tdim == 1:
                a = np.swapaxes(a, 0, 1)
            if tdim is None:
                a = a[None]
            part = a.reshape(a.shape[0] * a.shape[1], -1).sum(0)
            total = part if total is None else total + part
            n += a.shape[0] * a.shape[1]
        rates = total / n
        all_rates.append(rates)
        out[layer] = _firing(rates, dead, sat)
    for layer, items in rec.membrane.items():
        vs = [v.double().numpy().reshape(-1) for v, _ in items]
        gaps = (
            [
                (
                    np.broadcast_to(np.asarray(th.double().numpy() if isinstance(th, torch.Tensor) else th), v.shape)
                    - v.double().numpy()
                ).reshape(-1)
                for v, th in items
            ]
            if all(th is not None for _, th in items)
            else None
        )
        v = np.concatenate(vs)
        all_v.append(v)
        out[layer].update(membrane_mean=v.mean(), membrane_std=v.std(ddof=1))
        if gaps is not None:
            gap = np.concatenate(gaps)
            all_gap.append(gap)
            out[layer]["membrane_threshold_distance"] = gap.mean()
    pooled = _firing(np.concatenate(all_rates), dead, sat)
    if all_v:
        v = np.concatenate(all_v)
        pooled.update(membrane_mean=v.mean(), membrane_std=v.std(ddof=1))
    if all_gap:
        pooled["membrane_threshold_distance"] = np.concatenate(all_gap).mean()
    out[None] = pooled
    return out


def _firing(rates: np.ndarray, dead: float, sat: float) -> dict[str, float]:
    return {
        "firing_rate_mean": rates.mean(),
        "firing_rate_std": rates.std(ddof=1) if rates.size > 1 else 0.0,
        "dead_neuron_frac": np.mean(rates < dead),
        "saturated_neuron_frac": np.mean(rates > sat),
    }


def assert_matches(record, ref: dict[str | None, dict[str, float]], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every reference value equals the record's (global and per layer); no extra spiking layers."""
    assert None in ref and len(ref) > 1, "the reference has no spiking layer"
    for layer, values in ref.items():
        got = record.layers[layer] if layer is not None else record.model_dump()
        for field, expected in values.items():
            assert got.get(field) is not None, f"{field} missing for {layer}"
            np.testing.assert_allclose(got[field], expected, rtol=rtol, atol=atol, err_msg=f"{field} of {layer}")
    spiking_layers = {k for k, v in record.layers.items() if "firing_rate_mean" in v}
    assert spiking_layers == {k for k in ref if k is not None}


class TwoLayerSNN(nn.Module):
    """``Linear -> Leaky`` (state passed explicitly) ``-> Linear -> Synaptic(init_hidden=True)``."""

    def __init__(self, seed: int = 0, n_in: int = 10, hidden: int = 24, n_out: int = 6, bias2: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        grad = surrogate.fast_sigmoid(slope=25)
        self.fc1 = nn.Linear(n_in, hidden)
        self.lif1 = snn.Leaky(beta=0.85, spike_grad=grad)
        self.fc2 = nn.Linear(hidden, n_out)
        self.lif2 = snn.Synaptic(alpha=0.7, beta=0.8, spike_grad=grad, init_hidden=True)
        with torch.no_grad():
            self.fc1.weight.mul_(3.0)
            self.fc2.bias.add_(bias2)
        self.rec: Recorder | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, B, n_in]
        mem1 = self.lif1.init_leaky()
        self.lif2.reset_hidden()
        self.lif2.init_synaptic()
        out = []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2 = self.lif2(self.fc2(spk1))  # init_hidden: the membrane is only lif2.mem
            out.append(spk2)
            if self.rec is not None and self.training:
                self.rec.add("lif1", spk1, mem1, self.lif1.threshold)
                self.rec.add("lif2", spk2, self.lif2.mem, self.lif2.threshold)
        return torch.stack(out)


def batch(seed: int, b: int = 12, n_in: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, b, n_in, generator=g) < 0.4).float()
    return x, torch.randint(0, 6, (b,), generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int, mon=None):
    x, y = batch(seed)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x).sum(0), y)
    loss.backward()
    opt.step()
    return mon.step(loss=loss) if mon is not None else None
