"""Step one collector by hand, the way the monitor does, with no `Monitor` and no pipeline.

`Drive` attaches a collector to its own `MonitorContext`, marks it active on its scheduled steps, calls
its optimizer-step methods around ``optimizer.step()`` and its ``collect``; `Values` is what the
collector put in the readout after the sync, so each number can be checked against an independent
``torch.linalg`` computation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stabwatch.collectors.base import Collector, MonitorContext, Readout
from stabwatch.metrics import StabilityMetrics


class Values:
    """The synced readout of one step, by kind: global fields, per-layer fields, extra keys."""

    def __init__(self, readout: Readout, values: list[float]) -> None:
        assert len(readout.entries) == len(values)
        self.readout = readout
        self.entries = list(zip(readout.entries, values, strict=True))

    def __len__(self) -> int:
        return len(self.entries)

    def field(self, name: str) -> float | None:
        hits = [v for (kind, n, _), v in self.entries if kind == "field" and n == name]
        assert len(hits) <= 1, f"{name} added {len(hits)} times"
        return hits[0] if hits else None

    def layers(self, name: str) -> dict[str, float]:
        """``{layer: value}`` of a per-layer field (each layer at most once)."""
        out: dict[str, float] = {}
        for (kind, n, layer), v in self.entries:
            if kind == "layer" and n == name:
                assert layer is not None and layer not in out, f"{name} of {layer} added twice"
                out[layer] = v
        return out

    def extra(self, layer: str | None = None) -> dict[str, float]:
        """``{key: value}`` of the extra keys (for one layer when given)."""
        return {n: v for (kind, n, lay), v in self.entries if kind == "extra" and lay == layer}

    def record(self, step: int) -> StabilityMetrics:
        """The record the pipeline would build from these values."""
        fields: dict[str, Any] = {}
        layers: dict[str, dict[str, float]] = {}
        extra: dict[str, float] = {}
        for (kind, name, layer), value in self.entries:
            if kind == "field":
                fields[name] = value
            elif kind == "layer":
                layers.setdefault(layer or "", {})[name] = value
            elif kind == "extra":
                extra[f"{name}/{layer}" if layer else name] = value
        return StabilityMetrics(step=step, layers=layers, extra=extra, **fields)


class Drive:
    """One collector on ``model`` (and ``optimizer``), stepped by hand.

    Example::

        drive = Drive(GradCollector(every=1), model, opt)
        values = drive.train_step(loss_fn, batch)   # forward, backward, optimizer step, collect, sync
        drive.close()                               # detach: every hook removed
    """

    def __init__(
        self, collector: Collector, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0
    ) -> None:
        self.collector = collector
        self.model = model
        self.optimizer = optimizer
        self.generator = torch.Generator().manual_seed(seed)
        self.ctx = MonitorContext.build(model, optimizer, self.generator)
        self.ctx.collectors = [collector]
        collector.attach(self.ctx)
        self.step = 0
        self.record: StabilityMetrics | None = None
        self._begin()

    def _begin(self) -> None:
        c = self.collector
        c.active = c.always_collect or c.scheduled(self.step)
        c.begin_step(self.step)

    def optimizer_step(self) -> None:
        """``optimizer.step()`` with the collector's pre/post-step methods around it (when active)."""
        assert self.optimizer is not None
        if self.collector.active:
            self.collector.before_optimizer_step()
        self.optimizer.step()
        if self.collector.active:
            self.collector.after_optimizer_step()

    def train_step(
        self, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, *, optimizer_step: bool = True
    ) -> Values:
        """zero_grad, forward, backward, the optimizer step (if any), then `collect`."""
        if self.optimizer is not None:
            self.optimizer.zero_grad()
        else:
            self.model.zero_grad()
        loss = loss_fn(self.model, batch)
        loss.backward()
        if self.optimizer is not None and optimizer_step:
            self.optimizer_step()
        return self.collect(loss, batch)

    def collect(self, loss: torch.Tensor | None = None, batch: Any = None) -> Values:
        """Close the step: `collect` (if active), sync, `finish` on the record; then begin the next step."""
        c = self.collector
        readout = Readout()
        if c.active:
            with torch.no_grad():
                c.collect(self.step, readout, loss, batch)
        n_collected = len(readout.entries)
        if loss is not None:
            readout.add("loss", loss.detach().reshape(()))
        values = Values(readout, readout.sync())
        self.record = values.record(self.step)
        if c.active:
            c.finish(self.step, readout, self.record)
        values.entries = values.entries[:n_collected]  # what the collector added (not the loss)
        self.step += 1
        self._begin()
        return values

    def close(self) -> None:
        self.collector.detach()


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def batch(n: int = 16, n_in: int = 8, n_out: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_in, generator=g), torch.randint(0, n_out, (n,), generator=g)


def layer_norms(tensors: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """``{layer: sqrt(sum ||t||^2)}`` in float64: the reference of every per-layer norm."""
    return {
        layer: float(torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in ts])))
        for layer, ts in tensors.items()
    }
