"""Activation statistics through forward hooks, sampled on a schedule.

Hooks the activation modules (``ReLU`` family, ``Tanh``, ``Sigmoid``, ``GELU``/``SiLU``/``ELU``...); a
model with none gets hooks on its ``Linear``/``Conv`` outputs instead (mean/std only). A module called
several times in one step (an RNN cell, an unrolled loop) is averaged over its calls.

Emits per layer (`stabwatch.functional.activations.activation_statistics`):

* ``activation_mean``, ``activation_std``: mean and std *pooled* over the batch and the units (all
  elements of the output). A batch collapsed onto one varied vector keeps a pooled std near 1.
* ``activation_batch_std`` (``activation_layers/batch_std/<layer>``): the spread *across the batch*,
  each unit's std over the samples, root-mean-square over the units; near 0 when every sample gives
  the same output. Left out for a batch of one sample (no spread is defined).
* ``dead_frac`` (``ReLU``, ``ReLU6``): units ``<= 0`` for the whole batch, through which no gradient
  flows. ``LeakyReLU``, ``RReLU`` and ``PReLU`` pass a gradient for negative inputs, so they are never
  dead and get no ``dead_frac`` (mean, std and batch std only).
* ``saturated_frac`` (tanh/sigmoid): elements with ``|y| > 0.99`` or outside ``[0.01, 0.99]``.

and globally the mean of each over the layers that have it (``activation/mean``,
``activation/batch_std`` ...).

Distributed (more than one process): each rank sees its own batch, so per layer the element count, the
sum, the sum of squares and the saturated count are summed across ranks (the record's one all-gather)
and the mean, std and saturated fraction computed from the sums: those of the combined batch.
``dead_frac`` is the mean over ranks of each rank's fraction (a unit is dead when it is zero for that
rank's whole batch; the exact combined-batch value would need every unit's maximum from every rank).
``activation_batch_std`` is the within-rank spread: the ranks' mean squared batch stds weighted by
their ``B_r - 1`` (a pooled variance), which leaves out how far the ranks' unit means differ (the exact
combined-batch value would need every unit's mean from every rank); a batch collapsed on every rank
reads 0 either way.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from stabwatch import distributed as _dist
from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.collectors.nonfinite import first_tensor
from stabwatch.functional.activations import activation_statistics

__all__ = ["ActivationCollector"]

_KINDS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.ReLU, nn.ReLU6), "relu"),  # no gradient below 0: units can die
    ((nn.LeakyReLU, nn.RReLU, nn.PReLU), "leaky"),  # a gradient below 0 too: never dead
    ((nn.Tanh, nn.Hardtanh), "tanh"),
    ((nn.Sigmoid, nn.Hardsigmoid), "sigmoid"),
    ((nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus), "smooth"),
)
_FALLBACK = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FIELDS = ("activation_mean", "activation_std", "dead_frac", "saturated_frac", "activation_batch_std")
#: the columns of `activation_statistics`'s vector each field reads
_APPLIES = {
    "activation_mean": lambda kind: True,
    "activation_std": lambda kind: True,
    "dead_frac": lambda kind: kind == "relu",
    "saturated_frac": lambda kind: kind in ("tanh", "sigmoid"),
    "activation_batch_std": lambda kind: True,
}


def _kind(module: nn.Module) -> str | None:
    for types, kind in _KINDS:
        if isinstance(module, types):
            return kind
    return None


class ActivationCollector(Collector):
    family = "activation"
    default_every = 50

    class Options(CollectorOptions):
        saturation: float = Field(default=0.99, gt=0.0, le=1.0)

    saturation: float

    def setup(self, ctx: MonitorContext) -> None:
        targets = [(n, m, _kind(m)) for n, m in ctx.model.named_modules() if _kind(m) is not None]
        if not targets:
            targets = [(n, m, "linear") for n, m in ctx.model.named_modules() if isinstance(m, _FALLBACK)]
        self.layers = [n or "(root)" for n, _, _ in targets]
        self._kinds = [kind or "linear" for _, _, kind in targets]
        self._reset()
        for i, (_, module, kind) in enumerate(targets):
            self.add_hook(module.register_forward_hook, self.guard(self._make_hook(i, kind or "linear")))

    def _reset(self) -> None:
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}
        self._numel: dict[int, int] = {}  # elements seen per layer (used when reduced across ranks)
        self._samples: dict[int, int] = {}  # samples (batch rows) seen per layer
        self._single: set[int] = set()  # layers called with a batch of one sample (no batch std)

    def _make_hook(self, index: int, kind: str) -> Any:
        def _hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self.active:
                return
            t = first_tensor(out)
            if t is None or t.numel() == 0:
                return
            with torch.no_grad():
                stats = activation_statistics(t, kind, saturation=self.saturation)
            if index in self._sums:
                self._sums[index] = self._sums[index] + stats
                self._counts[index] += 1
            else:
                self._sums[index] = stats
                self._counts[index] = 1
            samples = t.shape[0] if t.ndim > 1 else t.numel()
            if samples < 2:
                self._single.add(index)
            self._numel[index] = self._numel.get(index, 0) + t.numel()
            self._samples[index] = self._samples.get(index, 0) + samples

        return _hook

    def begin_step(self, step: int) -> None:
        self._reset()

    def teardown(self) -> None:
        self._reset()

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        if not self._sums:
            return
        idx = sorted(self._sums)
        stats = torch.stack([self._sums[i] / self._counts[i] for i in idx])  # [L, 5]
        numel = [self._numel.get(i, 0) / self._counts[i] for i in idx]  # elements per call
        samples = [self._samples.get(i, 0) / self._counts[i] for i in idx]  # samples per call
        spread = [i not in self._single for i in idx]
        self._reset()
        if readout.across_ranks:
            self._add_global(readout, idx, stats, numel, samples, spread)
        else:
            self._add(readout, idx, stats, spread)

    def _add_global(
        self,
        readout: Readout,
        idx: list[int],
        stats: torch.Tensor,
        numel: list[float],
        samples: list[float],
        spread: list[bool],
    ) -> None:
        """Sums over this rank's elements, added across ranks, then the statistics of the combined batch."""
        s = stats.double()
        n = torch.tensor(numel, dtype=torch.float64, device=s.device)
        # a rank's batch std weighs by its B - 1 (0 where it saw one sample: its std is NaN, left out)
        weights = [b - 1 if ok else 0.0 for b, ok in zip(samples, spread, strict=True)]
        w = torch.tensor(weights, dtype=torch.float64, device=s.device)
        mean, std, dead, sat, bstd = s.unbind(1)
        bvar = torch.where(w > 0, bstd.square(), torch.zeros_like(bstd))
        raw = torch.stack([n, n * mean, (n - 1) * std.square() + n * mean.square(), dead, n * sat, w, w * bvar], 1)
        ranks = _dist.world_size()

        def _combined(total: torch.Tensor) -> None:
            nn_, s1, s2, dead_sum, sat_n, w_sum, wv_sum = total.unbind(1)
            m = s1 / nn_
            var = ((s2 - nn_ * m.square()) / (nn_ - 1).clamp_min(1)).clamp_min(0)
            batch_std = (wv_sum / w_sum).sqrt()  # NaN where no rank saw two samples
            values = torch.stack([m, var.sqrt(), dead_sum / ranks, sat_n / nn_, batch_std], dim=1)
            self._add(readout, idx, values, spread)

        readout.add_reduced(raw, "sum", _combined, key=tuple(idx))

    def _add(self, readout: Readout, idx: list[int], stats: torch.Tensor, spread: list[bool]) -> None:
        for j, field in enumerate(_FIELDS):
            keep = [
                k
                for k, i in enumerate(idx)
                if _APPLIES[field](self._kinds[i]) and (field != "activation_batch_std" or spread[k])
            ]
            if not keep:
                continue
            col = stats[keep, j]
            readout.add_layers(field, [self.layers[idx[k]] for k in keep], col)
            readout.add(field, col.mean())
