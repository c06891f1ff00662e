"""Non-finite detection that names the layer.

Every forward call of a leaf module that can *create* a non-finite value adds one on-device flag,
``not isfinite(sum(output))`` (one reduction pass, summed in float32 for half-precision outputs; a
finite float32 output could only sum to inf above ~3e38, i.e. at activations of ~1e30, which is
reported as non-finite too). Modules that map finite inputs to finite outputs (ReLU family, Tanh,
Sigmoid, Dropout, pooling, Flatten, Identity) are not hooked: a non-finite value cannot first appear
there, so checking them would only cost time. At the record the flags are synced
with everything else and the first module *in execution order* whose output went non-finite is named.
If all activations were finite but a gradient is not, the module named is the first one in backward
execution order (the last in forward order) whose gradient norm is non-finite: where the NaN entered
the backward pass. Otherwise a non-finite loss is reported as ``"loss"``.

Sets the record's ``nonfinite`` (bool) and ``nonfinite_source`` (module path, ``"loss"`` or None).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from stabwatch.collectors.base import Collector, MonitorContext, Readout

__all__ = ["NonFiniteCollector", "first_tensor"]

_FINITE_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
)


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a module output (a tensor, or a tuple/list/dict of them)."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, (tuple, list)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        for o in out.values():
            t = first_tensor(o)
            if t is not None:
                return t
    return None


class NonFiniteCollector(Collector):
    family = "nonfinite"
    always_collect = True

    def setup(self, ctx: MonitorContext) -> None:
        self._names: list[str] = []
        self._flags: list[torch.Tensor] = []
        self._calls: list[int] = []
        self._order_done = False
        for i, (name, module) in enumerate(
            (n, m)
            for n, m in ctx.model.named_modules()
            if not any(True for _ in m.children()) and not isinstance(m, _FINITE_PRESERVING)
        ):
            self._names.append(name or "(root)")
            self.hook(module.register_forward_hook(self.guard(self._make_hook(i))))

    def _make_hook(self, index: int) -> Any:
        def _hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self.active:
                return
            t = first_tensor(out)
            if t is None:
                return
            with torch.no_grad():
                d = t.detach()
                total = d.sum(dtype=torch.float32) if d.dtype in (torch.float16, torch.bfloat16) else d.sum()
                self._flags.append(~torch.isfinite(total))
            self._calls.append(index)

        return _hook

    def teardown(self) -> None:
        self._flags, self._calls = [], []

    def begin_step(self, step: int) -> None:
        self._flags, self._calls = [], []

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        if self._flags:
            devices = {f.device for f in self._flags}
            dev = next(iter(devices))
            flags = torch.stack([f.to(dev) for f in self._flags]) if len(devices) > 1 else torch.stack(self._flags)
            readout.add_internal("nonfinite_flags", flags.to(torch.float64))
        if not self._order_done and self._calls and self.ctx is not None:
            seen: list[str] = []
            for i in self._calls:
                if self._names[i] not in seen:
                    seen.append(self._names[i])
            self.ctx.module_order[:] = seen
            self._order_done = True
        self._last_calls = self._calls
        self._flags, self._calls = [], []

    def finish(self, step: int, readout: Readout, record: Any) -> None:
        flags = readout.internal("nonfinite_flags")
        source: str | None = None
        for i, flag in zip(self._last_calls, flags, strict=False):
            if flag:
                source = self._names[i]
                break
        if source is None:
            bad = [
                layer
                for layer, vals in record.layers.items()
                if "grad_norm" in vals and not math.isfinite(vals["grad_norm"])
            ]
            if bad:
                order = self.ctx.module_order if self.ctx is not None else []
                rank = {name: i for i, name in enumerate(order)}
                source = max(bad, key=lambda layer: rank.get(layer, -1))
        if source is None and record.grad_norm is not None and not math.isfinite(record.grad_norm):
            source = "gradients"
        if source is None and record.loss is not None and not math.isfinite(record.loss):
            source = "loss"
        record.nonfinite = source is not None
        record.nonfinite_source = source
        self._last_calls = []
