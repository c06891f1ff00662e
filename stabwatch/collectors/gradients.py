"""Gradient norms, global and per layer, in one on-device reduction pass (`functional.squared_norms`).

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
from stabwatch.functional.gradients import squared_norms

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
        self._index_cache: dict[tuple[int, ...], tuple[list[str], torch.Tensor, torch.Tensor | None]] = {}

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
        sq = squared_norms(grads)
        self._pending = (sq.sum().sqrt(), sq, owners)

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
        total, squares, owners = self._pending
        self._pending = None
        readout.add("grad_norm", total)
        if self.per_layer:
            names, index, present = self._layer_index(owners, squares.device)
            per_layer = torch.zeros(len(self.layers), dtype=torch.float64, device=squares.device)
            per_layer = per_layer.index_add_(0, index, squares).sqrt()
            readout.add_layers("grad_norm", names, per_layer if present is None else per_layer[present])

    def _layer_index(
        self, owners: list[int], device: torch.device
    ) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        """(names of the layers that have gradients, owner index tensor, their positions or None if all)."""
        key = tuple(owners)
        hit = self._index_cache.get(key)
        if hit is None or hit[1].device != device:
            present = sorted(set(owners))
            full = len(present) == len(self.layers)
            hit = (
                [self.layers[i] for i in present],
                torch.tensor(owners, device=device),
                None if full else torch.tensor(present, device=device),
            )
            if len(self._index_cache) >= 16:
                self._index_cache.clear()
            self._index_cache[key] = hit
        return hit

    def finish(self, step: int, readout: Readout, record: Any) -> None:
        if record.grad_norm is not None:
            record.grad_source = self._source
