"""Update-to-weight ratios and weight norms.

Emits ``update_ratio`` (``update/ratio``) = ``||theta_t - theta_{t-1}|| / ||theta_{t-1}||`` over all
parameters, ``update_norm``, ``weight_norm`` (``update/weight_norm``) and the same per layer
(``update_layers/<metric>/<module>``).

Zero weights: where ``||theta_{t-1}|| = 0`` (a LoRA ``B``, a zero-initialised head, before its first
update) the weight after the step *is* the update, and the ratio divides by ``||theta_t|| =
||theta_t - theta_{t-1}||`` instead: 1.0 when the weight moved (all of it is new), 0.0 when it did not
(`stabwatch.functional.gradients.relative_update`), never ``inf`` (a non-finite update stays NaN). The
global ratio changes only when every weight is zero.

At a scheduled step the parameters are copied in the optimizer's pre-step hook into one persistent
scratch buffer (allocated once, the size of the trainable weights) and the difference is reduced
after the step.

Distributed: under DDP the parameters are the same on every rank, so the values are global as read.
Under FSDP2 (``fully_shard``) each rank copies and differences its local shards only (the scratch buffer
is the size of the shard); the squared norms (divided by the replication, for HSDP) are summed across
ranks in the record's one all-gather before the square roots and the ratios, so every value is that of
the full parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from stabwatch import distributed as _dist
from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.functional.gradients import group_norms, relative_update, squared_norms

__all__ = ["UpdateCollector"]


class UpdateCollector(Collector):
    family = "update"
    default_every = 10

    class Options(CollectorOptions):
        per_layer: bool = True

    per_layer: bool

    def setup(self, ctx: MonitorContext) -> None:
        _dist.check_sharding(ctx.model)
        self._params = [p for _, p in ctx.params]
        self._sharded = any(_dist.is_sharded(p) for p in self._params)
        repl = [float(_dist.replication(p)) for p in self._params] if self._sharded else []
        self._replication = repl if any(r != 1.0 for r in repl) else None
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

    def _current(self) -> list[torch.Tensor]:
        """The parameters as this rank holds them (the local shards under FSDP2)."""
        if self._sharded:
            return [_dist.local_tensor(p).detach() for p in self._params]
        return [p.detach() for p in self._params]

    def before_optimizer_step(self) -> None:
        if not self.active:
            return
        with torch.no_grad():
            if self._buffer is None:
                self._buffer = [p.clone() for p in self._current()]
            else:
                torch._foreach_copy_(self._buffer, self._current())
            self._weights_sq = squared_norms(self._buffer)  # ||theta_{t-1}||^2 per tensor, while the copy is hot

    def after_optimizer_step(self) -> None:
        if not self.active or self._buffer is None or self._weights_sq is None:
            return
        with torch.no_grad():
            torch._foreach_sub_(self._buffer, self._current())
            self._result = (self._weights_sq, squared_norms(self._buffer))
        self._weights_sq = None

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        if self._result is None:
            return
        weights_sq, deltas_sq = self._result
        self._result = None
        if self._sharded:
            self._add_sharded(readout, weights_sq, deltas_sq)
            return
        w_total = weights_sq.sum().sqrt()
        d_total = deltas_sq.sum().sqrt()
        readout.add("weight_norm", w_total)
        readout.add("update_norm", d_total)
        readout.add("update_ratio", relative_update(d_total, w_total))
        if self.per_layer and self.ctx is not None and self.ctx.per_layer:
            if self._index is None or self._index.device != weights_sq.device:
                self._index = torch.tensor(self._owner_idx, device=weights_sq.device)
            both = group_norms(torch.stack([weights_sq, deltas_sq]), self._index, len(self.layers))
            readout.add_layers("weight_norm", self.layers, both[0])
            readout.add_layers("update_ratio", self.layers, relative_update(both[1], both[0]))

    def _add_sharded(self, readout: Readout, weights_sq: torch.Tensor, deltas_sq: torch.Tensor) -> None:
        """Local squared norms (totals, per layer) summed across ranks, then norms and ratios."""
        both = torch.stack([weights_sq, deltas_sq]).double()  # [2, P]
        if self._replication is not None:
            both = both / torch.tensor(self._replication, dtype=both.dtype, device=both.device)
        per_layer = self.per_layer and self.ctx is not None and self.ctx.per_layer
        raw = both.sum(dim=1)
        if per_layer:
            if self._index is None or self._index.device != both.device:
                self._index = torch.tensor(self._owner_idx, device=both.device)
            grouped = torch.zeros(2, len(self.layers), dtype=torch.float64, device=both.device)
            raw = torch.cat([raw, grouped.index_add_(1, self._index, both).reshape(-1)])

        def _values(sq: torch.Tensor) -> None:
            norms = sq.sqrt()
            w_total, d_total = norms[0], norms[1]
            readout.add("weight_norm", w_total)
            readout.add("update_norm", d_total)
            readout.add("update_ratio", relative_update(d_total, w_total))
            if per_layer:
                layers = norms[2:].reshape(2, -1)
                readout.add_layers("weight_norm", self.layers, layers[0])
                readout.add_layers("update_ratio", self.layers, relative_update(layers[1], layers[0]))

        readout.add_reduced(raw, "sum", _values)
