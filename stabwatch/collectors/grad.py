"""Gradient norms, global and per layer, in one on-device reduction pass (`functional.squared_norms`).

Emits ``grad_norm`` (``grad/norm``) and per layer ``layers[<module>]["grad_norm"]``
(``grad_layers/norm/<module>``): the L2 norm over the parameters a module owns directly. The gradients
measured are the ones the optimizer uses (after accumulation, AMP unscaling and any clipping done
before ``optimizer.step()``): read when the pipeline says they are final — in the optimizer's pre-step
hook, or after the first call of the closure of ``optimizer.step(closure)`` — or, for the torch
optimizers that only read ``.grad``, in its post-step hook after checking that no gradient changed
(cheaper on the CPU: the step has just brought them into the cache); see `GradCollector`. A fused or
capturable optimizer stepped by ``GradScaler`` still sees scaled gradients; the scale is divided out.
When no optimizer step ran since the last record they are read at ``Monitor.step``. The record's
``grad_source`` says which.

Distributed: under DDP every rank holds the synchronised (averaged) gradient, so the norms are global
as read. Under FSDP2 (``fully_shard``: parameters and gradients are ``DTensor`` shards) each rank adds
the squared norms of its local shards (divided by their replication, for HSDP) per layer; the sums are
added across ranks in the record's one all-gather and the square roots taken after it, so ``grad_norm``
and the per-layer norms are those of the full gradient, never of a local shard. Sharded gradients are
read before the optimizer step.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from stabwatch import distributed as _dist
from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.functional.gradients import group_norms, squared_norms

__all__ = ["GradCollector"]

log = logging.getLogger("stabwatch")


#: torch optimizers that read the gradients without writing them (their step neither rescales nor
#: recomputes ``.grad``); LBFGS (a closure re-runs backward) and SparseAdam are not among them
_READ_ONLY_OPTIMIZERS = frozenset(
    ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop")
)


class GradCollector(Collector):
    """See the module docstring.

    Args:
        per_layer: also emit per-layer norms.
        after_step: ``"auto"`` reads the gradients after ``optimizer.step()`` (where the optimizer has
            just brought them into the cache, about a third cheaper on the CPU than before it) when the
            optimizer is a torch one that does not write ``.grad``, and before it otherwise; ``True`` is
            the same as ``"auto"`` (after the step only where that is safe); ``False`` always reads
            them before. Either way the values are those the optimizer saw: every
            gradient's identity and version counter are taken before the step and checked after it,
            and an optimizer that changed them in place is read before the step from then on (its
            record at that step has no ``grad_norm``; a warning says so).
    """

    family = "grad"
    default_every = 1

    class Options(CollectorOptions):
        per_layer: bool = True
        after_step: bool | Literal["auto"] = "auto"

    per_layer: bool
    after_step: bool | str

    def __init__(self, every: Any = 1, **options: Any) -> None:
        super().__init__(every, **options)
        self._pending: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None
        self._source = "monitor_step"
        self._seen: list[tuple[torch.Tensor, int]] | None = None  # (grad, version) taken before the step

    def setup(self, ctx: MonitorContext) -> None:
        self.layers = ctx.layers
        self._owner_idx = ctx.param_layer
        self._index_cache: dict[tuple[int, ...], tuple[list[str], torch.Tensor, torch.Tensor | None]] = {}
        opt = ctx.optimizer
        # FSDP2: DTensor shards; their squares are summed across ranks before the square root
        _dist.check_sharding(ctx.model)
        self._sharded = any(_dist.is_sharded(p) for _, p in ctx.params)
        self._replication = [_dist.replication(p) for _, p in ctx.params] if self._sharded else []
        self._post = (
            not self._sharded
            and self.after_step in ("auto", True)
            and opt is not None
            and type(opt).__name__ in _READ_ONLY_OPTIMIZERS
            and type(opt).__module__.startswith("torch.optim")
            and not any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
        )

    def _grads(self) -> tuple[list[torch.Tensor], list[int]]:
        assert self.ctx is not None
        grads, owners = [], []
        for i, (_, p) in enumerate(self.ctx.params):
            if p.grad is not None:
                grads.append(p.grad)
                owners.append(self._owner_idx[i])
        return grads, owners

    def _local_squares(self) -> tuple[torch.Tensor, list[int]] | None:
        """Sharded: squared norms of this rank's gradient shards, each divided by its replication."""
        assert self.ctx is not None
        local, owners, repl = [], [], []
        for i, (_, p) in enumerate(self.ctx.params):
            if p.grad is not None:
                local.append(_dist.local_tensor(p.grad).detach())
                owners.append(self._owner_idx[i])
                repl.append(float(self._replication[i]))
        if not local:
            return None
        sq = squared_norms(local)
        if any(r != 1.0 for r in repl):
            sq = sq / torch.tensor(repl, dtype=sq.dtype, device=sq.device)
        return sq, owners

    def _measure(self, grads: list[torch.Tensor] | None = None, owners: list[int] | None = None) -> None:
        if self._sharded:
            found = self._local_squares()
            if found is None:
                self._pending = None
                return
            sq, owners = found
        else:
            if grads is None or owners is None:
                grads, owners = self._grads()
            if not grads:
                self._pending = None
                return
            sq = squared_norms([g.detach() for g in grads])
        scale = self.ctx.grad_scale if self.ctx is not None else None
        if scale is not None:  # still multiplied by GradScaler's scale (fused/capturable optimizers)
            sq = sq / scale.to(sq.device, sq.dtype).square()
        self._pending = (sq.sum().sqrt(), sq, owners)

    def begin_step(self, step: int) -> None:
        self._pending = None
        self._seen = None

    def before_optimizer_step(self) -> None:
        if not self.active:
            return
        self._source = "optimizer_pre_step"
        if self._post:  # read after the step; note what the optimizer is about to see
            self._seen = [(g, g._version) for g in self._grads()[0]]
        else:
            self._measure()

    def after_optimizer_step(self) -> None:
        seen, self._seen = self._seen, None
        if not self.active or seen is None:
            return
        grads, owners = self._grads()
        if len(grads) != len(seen) or any(g is not s or g._version != v for g, (s, v) in zip(grads, seen)):
            self._post = False
            self._pending = None
            self._source = "unavailable"
            log.warning(
                "stabwatch: %s changed the gradients in optimizer.step(); grad_norm of this step is not "
                "available, and the gradients are read before the step from now on",
                type(self.ctx.optimizer).__name__ if self.ctx is not None else "the optimizer",
            )
            return
        self._measure(grads, owners)

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        if self._source == "unavailable":
            self._source = "monitor_step"
            return
        if self._pending is None:
            self._measure()
            self._source = "monitor_step"
        if self._pending is None:
            return
        total, squares, owners = self._pending
        self._pending = None
        if self._sharded:
            self._add_sharded(readout, squares, owners)
            return
        readout.add("grad_norm", total)
        if self.per_layer and self.ctx is not None and self.ctx.per_layer:
            names, index, present = self._layer_index(owners, squares.device)
            per_layer = group_norms(squares, index, len(self.layers))
            readout.add_layers("grad_norm", names, per_layer if present is None else per_layer[present])

    def _add_sharded(self, readout: Readout, squares: torch.Tensor, owners: list[int]) -> None:
        """Local squared norms (total, per layer) summed across ranks, then the norms."""
        names, index, present = self._layer_index(owners, squares.device)
        per_layer = self.per_layer and self.ctx is not None and self.ctx.per_layer
        raw = squares.sum().reshape(1)
        if per_layer:
            grouped = torch.zeros(len(self.layers), dtype=torch.float64, device=squares.device)
            grouped.index_add_(0, index, squares.double())
            raw = torch.cat([raw, grouped if present is None else grouped[present]])

        def _norms(total_sq: torch.Tensor) -> None:
            readout.add("grad_norm", total_sq[0].sqrt())
            if per_layer:
                readout.add_layers("grad_norm", names, total_sq[1:].sqrt())

        readout.add_reduced(raw, "sum", _norms, key=tuple(names) if per_layer else None)

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
