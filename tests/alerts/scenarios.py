"""Real training runs for the detection tests and `benchmarks/bench_alerts.py`: an MLP on scikit-learn's
digits and a small tanh RNN on generated sine sequences, healthy or with a fault injected at a step.

Faults (injected right before the forward pass of step ``at``):

* ``"lr"``: every param group's learning rate is multiplied by 20;
* ``"scale"``: every weight matrix is multiplied in place (MLP ×4, RNN recurrent weight ×3);
* ``"nan"``: one input element of the batch is NaN (a corrupted sample).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import stabwatch as sw

__all__ = ["FAULTS", "MODELS", "RunResult", "run"]

FAULTS = ("lr", "scale", "nan")
MODELS = ("mlp", "rnn")

#: the alert reasons that count as detecting each fault
#: (a larger learning rate shows first in the update-to-weight ratio; scaled weights blow a tanh RNN
#: up, but push the converged MLP's tanh layer into saturation, where its gradient vanishes)
EXPECTED = {
    "lr": {
        sw.AlertReason.UPDATE_RATIO,
        sw.AlertReason.EXPLODING_GRADIENT,
        sw.AlertReason.LOSS_SPIKE,
        sw.AlertReason.NON_FINITE,
    },
    "scale": {
        sw.AlertReason.EXPLODING_GRADIENT,
        sw.AlertReason.LOSS_SPIKE,
        sw.AlertReason.NON_FINITE,
        sw.AlertReason.SPECTRAL_RADIUS,
        sw.AlertReason.VANISHING_GRADIENT,
        sw.AlertReason.SATURATED_NEURONS,
    },
    "nan": {sw.AlertReason.NON_FINITE},
}

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    global _DIGITS
    if _DIGITS is None:
        from stabwatch.demo import load_data

        x, y, _ = load_data(0)
        _DIGITS = (x, y)
    return _DIGITS


class _RNN(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


def _sines(n: int, length: int, g: torch.Generator) -> torch.Tensor:
    freq = 0.1 + 0.4 * torch.rand(n, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    t = torch.arange(length + 1, dtype=torch.float32)
    return torch.sin(freq * t + phase) + 0.05 * torch.randn(n, length + 1, generator=g)


def make(model: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """Model, optimizer and a ``batch(step) -> (x, y)`` function, all seeded."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if model == "mlp":
        net: nn.Module = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        )
        opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        x, y = _digits()

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(0, x.shape[0], (64,), generator=g)
            return x[idx].clone(), y[idx]

    elif model == "rnn":
        net = _RNN()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        data = _sines(512, 24, g)

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(0, data.shape[0], (32,), generator=g)
            seq = data[idx]
            return seq[:, :-1, None].clone(), seq[:, 1:, None]

    else:
        raise ValueError(model)
    return net, opt, batch


def _loss(model: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if model == "mlp":
        return nn.functional.cross_entropy(out, y)
    return nn.functional.mse_loss(out, y)


@dataclass
class RunResult:
    alerts: list[sw.Alert]
    records: list[sw.StabilityMetrics]
    seconds: float
    fault: str | None = None
    at: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def serious(self) -> list[sw.Alert]:
        """Warning or critical alerts (recoveries are info)."""
        return [a for a in self.alerts if a.severity is not sw.Severity.INFO]

    def detection_delay(self) -> int | None:
        """Steps from the fault to the first alert of an expected reason (None: not detected)."""
        if self.fault is None or self.at is None:
            return None
        hits = [a.step - self.at for a in self.alerts if a.step >= self.at and a.reason in EXPECTED[self.fault]]
        return min(hits) if hits else None

    def early(self) -> list[sw.Alert]:
        """Serious alerts before the fault (false alarms)."""
        if self.at is None:
            return self.serious()
        return [a for a in self.serious() if a.step < self.at]


def run(
    model: str = "mlp",
    seed: int = 0,
    steps: int = 1000,
    fault: str | None = None,
    at: int = 500,
    monitor: bool = True,
    stop_after: int | None = 20,
    **monitor_options: Any,
) -> RunResult:
    """Train ``steps`` steps (with the default rules unless ``alerts=`` is given); inject ``fault`` at
    step ``at``; stop ``stop_after`` steps after the fault (the run is broken by then)."""
    net, opt, batch = make(model, seed)
    end = steps if fault is None or stop_after is None else min(steps, at + stop_after)
    monitor_options.setdefault("preset", "default")
    mon = sw.Monitor(net, opt, **monitor_options) if monitor else None
    t0 = time.perf_counter()
    if mon is not None:
        mon.start()
    try:
        for step in range(end):
            x, y = batch(step)
            if fault is not None and step == at:
                _inject(fault, model, net, opt, x)
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, net(x), y)
            loss.backward()
            opt.step()
            if mon is not None:
                mon.step(loss=loss)
    finally:
        if mon is not None:
            mon.close()
    seconds = time.perf_counter() - t0
    alerts = list(mon.alerts) if mon is not None else []
    records = list(mon.records) if mon is not None else []
    return RunResult(alerts, records, seconds, fault, at if fault else None)


def _inject(fault: str, model: str, net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    if fault == "lr":
        for group in opt.param_groups:
            group["lr"] *= 20
    elif fault == "scale":
        with torch.no_grad():
            if model == "mlp":
                for p in net.parameters():
                    if p.ndim == 2:
                        p.mul_(4.0)
            else:
                net.rnn.weight_hh_l0.mul_(3.0)  # type: ignore[union-attr]
    elif fault == "nan":
        x.view(-1)[0] = float("nan")
    else:
        raise ValueError(fault)
