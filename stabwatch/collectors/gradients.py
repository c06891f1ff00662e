"""Gradient norms, global and per layer, in one fused reduction.

Emits ``grad_norm`` (``grad/norm``) and per layer ``layers[<module>]["grad_norm"]``
(``grad/norm/<module>``): the L2 norm over the parameters a module owns directly. The gradients are
read in the optimizer's pre-step hook (after accumulation, AMP unscaling and any clipping done before
``optimizer.step()``); when no optimizer step ran since the last record they are read at
``Monitor.step``. The record's ``grad_source`` says which.
"""

from __future__ import annotations

from typing import Any

import torch

from stabwatch.collectors.base import Collector, MonitorContext, Readout
from stabwatch.functional.gradients import gradient_norm, group_norms

__all__ = ["GradientCollector"]


class GradientCollector(Collector):
    family = "grad"

    def __init__(self, every: Any = 1, per_layer: bool = True) -> None:
        super().__init__(every)
        self.per_layer = per_layer
        self._pending: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None
        self._source = "monitor_step"

    def setup(self, ctx: MonitorContext) -> None:
        self.layers = ctx.layers
        self._owner_idx = ctx.param_layer

    def _measure(self) -> None:
        assert self.ctx is not None
        grads, owners = [], []
        for i, (_, p) in enumerate(self.ctx.params):
            if p.grad is not None:
                grads.append(p.grad.detach())
                owners.append(self._owner_idx[i])
        if not grads:
            self._pending = None
            return
        total, per = gradient_norm(grads)
        self._pending = (total, per, owners)

    def begin_step(self, step: int) -> None:
        self._pending = None

    def before_optimizer_step(self) -> None:
        if self.active:
            self._measure()
            self._source = "optimizer_pre_step"

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        if self._pending is None:
            self._measure()
            self._source = "monitor_step"
        if self._pending is None:
            return
        total, per, owners = self._pending
        self._pending = None
        readout.add("grad_norm", total)
        if self.per_layer:
            layer_norms = group_norms(per, owners, len(self.layers))
            present = sorted(set(owners))
            readout.add_layers("grad_norm", [self.layers[i] for i in present], layer_norms[present])

    def finish(self, step: int, readout: Readout, record: Any) -> None:
        if record.grad_norm is not None:
            record.grad_source = self._source
