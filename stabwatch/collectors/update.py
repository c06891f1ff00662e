"""Update-to-weight ratios and weight norms.

Emits ``update_ratio`` (``update/ratio``) = ``||theta_t - theta_{t-1}|| / ||theta_{t-1}||`` over all
parameters, ``update_norm``, ``weight_norm`` (``update/weight_norm``) and the same per layer
(``update_layers/<metric>/<module>``). At a scheduled step the parameters are copied in the optimizer's
pre-step hook into one persistent scratch buffer (allocated once, the size of the trainable weights) and
the difference is reduced after the step.
"""

from __future__ import annotations

from typing import Any

import torch

from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.functional.gradients import group_norms, squared_norms

__all__ = ["UpdateCollector"]


class UpdateCollector(Collector):
    family = "update"
    default_every = 10

    class Options(CollectorOptions):
        per_layer: bool = True

    per_layer: bool

    def setup(self, ctx: MonitorContext) -> None:
        self._params = [p for _, p in ctx.params]
        self.layers = ctx.layers
        self._owner_idx = ctx.param_layer
        self._buffer: list[torch.Tensor] | None = None
        self._weights_sq: torch.Tensor | None = None
        self._result: tuple[torch.Tensor, torch.Tensor] | None = None
        self._index: torch.Tensor | None = None

    def teardown(self) -> None:
        self._buffer = None
        self._result = None

    def begin_step(self, step: int) -> None:
        self._result = None

    def before_optimizer_step(self) -> None:
        if not self.active:
            return
        with torch.no_grad():
            if self._buffer is None:
                self._buffer = [p.detach().clone() for p in self._params]
            else:
                torch._foreach_copy_(self._buffer, [p.detach() for p in self._params])
            self._weights_sq = squared_norms(self._buffer)  # ||theta_{t-1}||^2 per tensor, while the copy is hot

    def after_optimizer_step(self) -> None:
        if not self.active or self._buffer is None or self._weights_sq is None:
            return
        with torch.no_grad():
            torch._foreach_sub_(self._buffer, [p.detach() for p in self._params])
            self._result = (self._weights_sq, squared_norms(self._buffer))
        self._weights_sq = None

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        if self._result is None:
            return
        weights_sq, deltas_sq = self._result
        self._result = None
        w_total = weights_sq.sum().sqrt()
        d_total = deltas_sq.sum().sqrt()
        readout.add("weight_norm", w_total)
        readout.add("update_norm", d_total)
        readout.add("update_ratio", d_total / w_total)
        if self.per_layer and self.ctx is not None and self.ctx.per_layer:
            if self._index is None or self._index.device != weights_sq.device:
                self._index = torch.tensor(self._owner_idx, device=weights_sq.device)
            both = group_norms(torch.stack([weights_sq, deltas_sq]), self._index, len(self.layers))
            readout.add_layers("weight_norm", self.layers, both[0])
            readout.add_layers("update_ratio", self.layers, both[1] / both[0])
