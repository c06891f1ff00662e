"""Non-finite detection that names the layer.

The outputs of the leaf modules that can *create* a non-finite value are checked with
``not isfinite(sum(output))`` (one reduction pass, summed in float32 for half-precision outputs; a
finite float32 output could only sum to inf above ~3e38, i.e. at activations of ~1e30, which is
reported as non-finite too). By default this is *lazy*: a hook only keeps a reference to the output,
and the reductions run only on a step whose loss or gradient norm came out non-finite (healthy steps
pay a list append per call). ``mode="eager"`` reduces every output in its hook instead. Modules
that map finite inputs to finite outputs (ReLU family, Tanh,
Sigmoid, Dropout, pooling, Flatten, Identity) are not hooked: a non-finite value cannot first appear
there, so checking them would only cost time. The first module *in execution order* whose output
went non-finite is named.
If all activations were finite but a gradient is not, the module named is the first one in backward
execution order (the last in forward order) whose gradient norm is non-finite: where the NaN entered
the backward pass. Otherwise a non-finite loss is reported as ``"loss"``.

Sets the record's ``nonfinite`` (bool) and ``nonfinite_source``: the module path (``"(root)"`` for a
model that is itself a leaf module); ``"gradients"`` when the global gradient norm is non-finite but no
module's output or per-layer gradient norm is (per-layer gradient norms off:
``GradCollector(per_layer=False)``); ``"loss"`` when only the loss is; None on a healthy step.

Schedule: the family runs at **every** step whatever its period, so that a NaN is never missed and its
record is always emitted: ``every={"nonfinite": N}`` only switches it on (any N, or a callable) or off
(None/0). A period other than 1 logs a warning saying so.

Memory (lazy mode): each held output stays alive until `Monitor.step` closes the step, also after the
backward pass has freed autograd's own reference to it, so the step's peak memory can grow by the
outputs of the hooked modules that autograd does not keep (up to ``max_held`` of them). Where that
matters (large activations, little memory headroom), use ``mode="eager"`` (no reference kept), a
smaller ``max_held``, or turn the family off.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout

__all__ = ["NonfiniteCollector", "first_tensor"]

log = logging.getLogger("stabwatch")

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


class NonfiniteCollector(Collector):
    """Detect NaN/Inf in loss, gradients and activations, and name where it appeared first.

    Args:
        mode: ``"lazy"`` (default) keeps a reference to each checked module output of the step (no
            computation in the hook) and reduces them only when the loss or a gradient came out
            non-finite — a second, small device->host copy on that failing step only. ``"eager"``
            reduces every output in its hook (one ``sum`` per call) and also catches a non-finite
            activation whose effect never reached the loss or the gradients.
        max_held: in lazy mode, how many outputs one step may hold (each kept alive until
            `Monitor.step`); calls beyond it (a long unrolled loop, evaluation batches between two
            steps) are reduced eagerly instead.

    Outputs are only held from forward passes run with autograd enabled (training passes); an
    evaluation loop under ``torch.no_grad()`` between two steps is not checked.

    The collector runs at every step: ``every`` only turns it on or off (see the module docstring).
    """

    family = "nonfinite"
    always_collect = True
    default_every = 1

    class Options(CollectorOptions):
        mode: Literal["lazy", "eager"] = "lazy"
        max_held: int = Field(default=4096, ge=0)

    mode: str
    max_held: int

    def __init__(self, every: Any = 1, **options: Any) -> None:
        super().__init__(every, **options)
        _warn_if_periodic(every)

    def reschedule(self, every: Any) -> None:
        super().reschedule(every)
        _warn_if_periodic(every)

    def setup(self, ctx: MonitorContext) -> None:
        self._names: list[str] = []
        self._reset()
        self._order_done = False
        self._last: tuple[list[int], list[torch.Tensor | None]] = ([], [])
        for i, (name, module) in enumerate(
            (n, m)
            for n, m in ctx.model.named_modules()
            if not any(True for _ in m.children()) and not isinstance(m, _FINITE_PRESERVING)
        ):
            self._names.append(name or "(root)")
            self.add_hook(module.register_forward_hook, self.guard(self._make_hook(i)))

    def _reset(self) -> None:
        self._calls: list[int] = []
        self._held: list[torch.Tensor | None] = []  # lazy: the output; None where a flag was taken
        self._flags: list[torch.Tensor] = []  # eager flags (one per call with a None in _held)
        self._flag_calls: list[int] = []

    def _make_hook(self, index: int) -> Any:
        def _hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self.active or (self.mode == "lazy" and not torch.is_grad_enabled()):
                return
            t = first_tensor(out)
            if t is None:
                return
            self._calls.append(index)
            if self.mode == "lazy" and len(self._held) < self.max_held:
                self._held.append(t.detach())
                return
            self._held.append(None)
            self._flags.append(_nonfinite_flag(t))
            self._flag_calls.append(index)

        return _hook

    def teardown(self) -> None:
        self._reset()
        self._last = ([], [])

    def begin_step(self, step: int) -> None:
        self._reset()

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        if self._flags:
            dev = self._flags[0].device
            readout.add_internal("nonfinite_flags", torch.stack([f.to(dev) for f in self._flags]).double())
        if not self._order_done and self._calls and self.ctx is not None:
            self.ctx.module_order[:] = list(dict.fromkeys(self._names[i] for i in self._calls))
            self._order_done = True
        self._last = (self._calls, self._held)
        self._last_flag_calls = self._flag_calls
        self._reset()

    def _first_bad_output(self, readout: Readout, suspicious: bool) -> str | None:
        calls, held = self._last
        eager = dict(zip(range(len(self._last_flag_calls)), readout.internal("nonfinite_flags")))
        lazy_idx = [i for i, h in enumerate(held) if h is not None]
        lazy_flags: dict[int, float] = {}
        if suspicious and lazy_idx:  # the rare failing step: reduce the held outputs now
            flags = torch.stack([_nonfinite_flag(held[i]).cpu() for i in lazy_idx])  # type: ignore[arg-type]
            lazy_flags = dict(zip(lazy_idx, flags.tolist()))
        k = 0
        for pos, (call, h) in enumerate(zip(calls, held)):
            bad = lazy_flags.get(pos, 0.0) if h is not None else eager.get(k, 0.0)
            if h is None:
                k += 1
            if bad:
                return self._names[call]
        return None

    def finish(self, step: int, readout: Readout, record: Any) -> None:
        grad_bad = record.grad_norm is not None and not math.isfinite(record.grad_norm)
        loss_bad = record.loss is not None and not math.isfinite(record.loss)
        source = self._first_bad_output(readout, suspicious=grad_bad or loss_bad)
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
        if source is None and grad_bad:
            source = "gradients"
        if source is None and loss_bad:
            source = "loss"
        record.nonfinite = source is not None
        record.nonfinite_source = source
        self._last = ([], [])


def _warn_if_periodic(every: Any) -> None:
    """Say that a period has no effect on this family (it runs at every step, or not at all)."""
    periodic = callable(every) or (isinstance(every, int) and not isinstance(every, bool) and every > 1)
    if periodic:
        log.warning(
            "stabwatch: every['nonfinite']=%r has no effect beyond turning the family on: the non-finite "
            "checks run at every step (a NaN must never be missed). Use None or 0 to turn them off.",
            every,
        )


def _nonfinite_flag(t: torch.Tensor) -> torch.Tensor:
    """``not isfinite(sum(t))`` on the device: one reduction, float32 accumulation for half types."""
    d = t.detach()
    total = d.sum(dtype=torch.float32) if d.dtype in (torch.float16, torch.bfloat16) else d.sum()
    return ~torch.isfinite(total)
