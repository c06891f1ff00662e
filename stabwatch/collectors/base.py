"""The collector base class: owns the lifecycle (attach, detach, schedule, state), so a family only
declares what it needs and how to read it out.

A collector gathers tensors during a training step (through hooks it registers in `attach`) and, at a
scheduled step, adds *device* tensors to a shared `Readout`. The `Monitor` then moves everything in the
readout to the host in one copy and builds the record. Collectors never call ``.item()``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from stabwatch import distributed as _dist
from stabwatch.errors import InputError, validated
from stabwatch.schedules import Schedule, make_schedule

__all__ = ["Collector", "CollectorOptions", "MonitorContext", "Readout", "hook_dispatch_seconds", "weight_layer_name"]


def weight_layer_name(param_name: str) -> str:
    """The layer a weight belongs to, as records name it: ``"encoder.0.weight"`` -> ``"encoder.0"``.

    Example:
        >>> weight_layer_name("encoder.0.weight"), weight_layer_name("rnn.weight_hh_l0")
        ('encoder.0', 'rnn.weight_hh_l0')
    """
    return param_name.removesuffix(".weight")


class CollectorOptions(BaseModel):
    """Base of a family's options model: a subclass lists the family's own settings as fields.

    Unknown names are refused (`stabwatch.errors.ConfigError` naming the field and the allowed ones).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


#: marks "no schedule given": the family's `Collector.default_every` applies
_DEFAULT: Any = object()

log = logging.getLogger("stabwatch")


@dataclass
class MonitorContext:
    """What a collector may look at: the model, the optimizer and the monitor's own RNG.

    ``params`` lists the trainable parameters with their qualified names; ``param_owner`` maps each (by ``id``) to
    the path of the module that owns it ("(root)" for the root); ``module_order`` is filled with module paths
    in forward-execution order of the first monitored step.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    generator: torch.Generator
    #: keep per-layer values (``Monitor(per_layer=False)`` lets collectors skip them)
    per_layer: bool = True
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    param_owner: dict[int, str] = field(default_factory=dict)
    module_order: list[str] = field(default_factory=list)
    #: owner modules of the parameters, in first-seen order, and each parameter's index into it
    layers: list[str] = field(default_factory=list)
    param_layer: list[int] = field(default_factory=list)
    #: the factor the gradients are still multiplied by when the optimizer reads them (a fused or
    #: capturable optimizer stepped by ``GradScaler`` unscales inside its kernel), else ``None``
    grad_scale: torch.Tensor | None = None
    #: the collectors attached through this context (filled by the pipeline)
    collectors: list[Collector] = field(default_factory=list)
    #: this step's output logits, when the user passes them (``Monitor.step(logits=...)``), else ``None``
    logits: torch.Tensor | None = None

    @contextlib.contextmanager
    def hooks_paused(self) -> Iterator[None]:
        """Take every collector's module hooks off the model for the duration of the block.

        Used to copy the model without stabwatch's hooks (the shadow replica). Hooks are registered
        again through the public ``register_*`` API afterwards, also when the block raised.
        """
        paused = [c for c in self.collectors if c.suspend_hooks()]
        try:
            yield
        finally:
            for c in paused:
                c.resume_hooks()

    @classmethod
    def build(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        generator: torch.Generator,
        *,
        per_layer: bool = True,
    ) -> MonitorContext:
        ctx = cls(model=model, optimizer=optimizer, generator=generator, per_layer=per_layer)
        seen: set[int] = set()
        layer_index: dict[str, int] = {}
        for mod_name, module in model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                ctx.params.append((full, p))
                owner = mod_name or "(root)"
                ctx.param_owner[id(p)] = owner
                ctx.param_layer.append(layer_index.setdefault(owner, len(layer_index)))
        ctx.layers = list(layer_index)
        return ctx


class Readout:
    """Values gathered for one record, still on the device until `Monitor` syncs them once.

    Collectors call `add` (a global field), `add_layers` (one value per layer for a field) or
    `add_extra` (a free ``family/metric[/layer]`` key). `add_internal` stores tensors a collector needs
    back as floats in `Collector.finish` (e.g. per-module non-finite flags). Values are kept as 1-D
    chunks and concatenated once in `sync`.

    Distributed runs (`stabwatch.distributed`): a value that differs per rank but claims a global value
    carries ``reduce=`` (``"mean"``, ``"sum"``, ``"max"``, ``"min"``; ``None``: already the same on every
    rank), and `add_reduced` hands raw sums (e.g. squares of FSDP shards) reduced across ranks to a
    callback that adds the derived values. `reduce_across_ranks` does all of it with one all-gather per
    record; without a process group it is never called and ``reduce=`` costs nothing.

    Args:
        across_ranks: this record is built on every rank in lockstep and reduced across them (set by a
            `stabwatch.pipeline.RecordPipeline` made with ``distributed=True`` when the world has more than
            one process). Otherwise `add_reduced` hands its values back at once and ``reduce=`` is ignored.
    """

    def __init__(self, across_ranks: bool = False) -> None:
        self.across_ranks = across_ranks
        self.entries: list[tuple[str, str, str | None]] = []  # (kind, name, layer) per value
        self.chunks: list[torch.Tensor] = []
        self.internal_slices: dict[str, tuple[int, int]] = {}
        self.values: list[float] = []
        #: errors raised by `add_reduced` callbacks in `reduce_across_ranks` (their values stay out)
        self.failures: list[str] = []
        self._ops: dict[int, tuple[str, int]] = {}  # chunk -> (reduction across ranks, first entry); absent: global
        self._deferred: list[tuple[torch.Tensor, str, Callable[[torch.Tensor], None], object]] = []

    def _push(
        self, entries: list[tuple[str, str, str | None]], value: torch.Tensor | float, reduce: str | None = None
    ) -> None:
        t = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        t = t.reshape(-1)
        if t.numel() != len(entries):
            raise InputError(f"readout: {len(entries)} names but {t.numel()} values ({entries[:3]}...)")
        if reduce is not None:
            self._ops[len(self.chunks)] = (_check_op(reduce), len(self.entries))
        self.entries.extend(entries)
        self.chunks.append(t)

    def add(self, name: str, value: torch.Tensor | float, reduce: str | None = None) -> None:
        """A global record field, e.g. ``add("grad_norm", total)``."""
        self._push([("field", name, None)], value, reduce)

    def add_layers(self, name: str, layers: Sequence[str], values: torch.Tensor, reduce: str | None = None) -> None:
        """One value per layer for a field: ``values`` is a 1-D tensor aligned with ``layers``."""
        self._push([("layer", name, layer) for layer in layers], values, reduce)

    def add_extra(
        self, key: str, value: torch.Tensor | float, layer: str | None = None, reduce: str | None = None
    ) -> None:
        """A key outside the record's fields, ``family/metric`` (stored under ``extra``)."""
        self._push([("extra", key, layer)], value, reduce)

    def add_internal(self, name: str, values: torch.Tensor, reduce: str | None = None) -> None:
        """Tensors synced with the record and handed back as floats to `Collector.finish`."""
        start = len(self.entries)
        n = values.numel()
        self._push([("internal", name, None)] * n, values, reduce)
        self.internal_slices[name] = (start, start + n)

    def add_reduced(
        self, values: torch.Tensor, reduce: str, then: Callable[[torch.Tensor], None], key: object = None
    ) -> None:
        """Raw values to combine across ranks (``reduce``) before ``then(reduced)`` adds what derives from them.

        Unless the readout is `across_ranks`, ``then`` runs at once on ``values``. Otherwise it runs in
        `reduce_across_ranks` on the reduced values (same shape, float64, same device); if the ranks'
        layouts disagree it does not run (a local shard is never reported as the whole). ``key`` (e.g.
        the layer names) joins the layout check, so that values of different layers are never added.

        Example:
            >>> r = Readout()
            >>> r.add_reduced(torch.tensor([9.0, 16.0]), "sum", lambda t: r.add("grad_norm", t.sum().sqrt()))
            >>> r.sync()
            [5.0]
        """
        _check_op(reduce)
        if not self.across_ranks:
            then(values)
        else:
            self._deferred.append((values.detach(), reduce, then, key))

    def internal(self, name: str) -> list[float]:
        """Floats of an `add_internal` entry after the sync (empty when absent)."""
        if name not in self.internal_slices:
            return []
        a, b = self.internal_slices[name]
        return self.values[a:b]

    def reduce_across_ranks(self) -> bool:
        """Combine the tagged values and the `add_reduced` ones across ranks; ``False`` if the layouts differ.

        Every rank of the default process group must call it for the same record: a four-number
        all-reduce checks that all ranks contribute the same entries, then one all-gather carries them.
        When the layouts differ (a collector failed on one rank) nothing is gathered on any rank, the
        tagged values stay local and the `add_reduced` callbacks are dropped (the caller warns).
        """
        tagged = sorted(self._ops.items())
        deferred, self._deferred = self._deferred, []
        parts = [self.chunks[i] for i, _ in tagged] + [v for v, _, _, _ in deferred]
        ops: list[str | None] = []
        layout: list[object] = []
        for i, (op, start) in tagged:
            n = self.chunks[i].numel()
            ops += [op] * n
            layout += [op, n, *self.entries[start : start + n]]
        for v, op, _, key in deferred:
            ops += [op] * v.numel()
            layout += ["deferred", op, v.numel(), key]
        device = parts[0].device if parts else torch.device("cpu")
        flat = torch.cat([p.reshape(-1).to(device, torch.float64) for p in parts]) if parts else torch.zeros(0)
        try:
            reduced = _dist.reduce_columns(flat, ops, check=_dist.signature(layout))
        except RuntimeError:
            return False
        pos = 0
        for i, _ in tagged:
            n = self.chunks[i].numel()
            self.chunks[i] = reduced[pos : pos + n].to(self.chunks[i].device)
            pos += n
        for v, _, then, _ in deferred:
            n = v.numel()
            try:
                then(reduced[pos : pos + n].reshape(v.shape).to(v.device))
            except Exception as exc:  # noqa: BLE001 - a failing metric never kills training
                self.failures.append(f"{type(exc).__name__}: {exc}")
            pos += n
        return True

    def sync(self) -> list[float]:
        """Move all gathered values to the host: one copy per device (one in the usual case)."""
        if not self.chunks:
            self.values = []
            return self.values
        devices = {c.device for c in self.chunks}
        if len(devices) == 1:
            self.values = torch.cat([c.to(torch.float64) for c in self.chunks]).cpu().tolist()
        else:
            self.values = torch.cat([c.to("cpu", torch.float64) for c in self.chunks]).tolist()
        self.chunks = []
        return self.values


@functools.lru_cache(maxsize=1)
def hook_dispatch_seconds() -> float:
    """What one `Collector.guard`-ed forward hook costs outside the time its guard measures, once per process.

    A small ``nn.Linear`` (gradients on, as in training) is called with and without a guarded no-op
    forward hook; the extra time per call minus what the guard itself counted is PyTorch's hook
    dispatch (the module leaves ``Module.__call__``'s fast path) plus the calls into the guard.
    Median of 5 interleaved rounds of 100 calls each way: about 3 ms, once. Used by
    `Collector.take_hook_time` to count that time into ``monitor/overhead_ms``.
    """
    import statistics

    probe = Collector(None)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's init draws from the global RNG: training's stream
        module, x = nn.Linear(4, 4), torch.zeros(1, 4)

    def _noop(m: nn.Module, args: Any, out: Any) -> None:
        return None

    guarded = probe.guard(_noop)

    def _round(n: int = 100) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            module(x)
        return (time.perf_counter() - t0) / n

    diffs = []
    with torch.enable_grad():
        _round(20)
        for _ in range(5):
            bare = _round()
            handle = module.register_forward_hook(guarded)
            try:
                probe.elapsed, probe.hook_calls = 0.0, 0
                hooked = _round()
                inside = probe.elapsed / max(probe.hook_calls, 1)
            finally:
                handle.remove()
            diffs.append(hooked - bare - inside)
    return max(statistics.median(diffs), 0.0)


def _check_op(op: str) -> str:
    if op not in _dist.REDUCE_OPS:
        raise InputError(f"readout: reduce={op!r} is not one of {', '.join(_dist.REDUCE_OPS)} (or None)")
    return op


class Collector:
    """Base class of a metric family.

    Subclasses set `family` (the ``Monitor(every={...})`` key, the module name and the first segment of
    the keys it emits), `default_every` (its period when a preset does not say), an `Options` model (a
    `CollectorOptions` subclass: the family's own settings, validated at construction and set as
    attributes of the same names) and override what they need:

    * `setup(ctx)` — register module hooks with `self.add_hook(module.register_forward_hook, fn)` (removed
      on `detach`, paused while the shadow copies the model); `self.hook(handle)` keeps any other handle
      for `detach` (not paused);
    * `before_optimizer_step()` / `after_optimizer_step()` — run inside the optimizer's step hooks;
    * `collect(step, readout, loss, batch)` — add device tensors for a scheduled step;
    * `finish(step, readout, record)` — read synced internal values (optional).

    The base class keeps the schedule, the hook handles and the `active` flag (true while the current
    step is scheduled), so hook bodies can return at once on unscheduled steps.
    """

    family: ClassVar[str] = "base"
    #: True when `collect` must run every step even if the family is unscheduled (e.g. non-finite).
    always_collect: ClassVar[bool] = False
    #: the period used when none is given
    default_every: ClassVar[int] = 1
    #: the family's own settings (fields of a `CollectorOptions` subclass)
    Options: ClassVar[type[CollectorOptions]] = CollectorOptions

    def __init__(self, every: int | Schedule | None = _DEFAULT, **options: Any) -> None:
        self.every: int | Schedule | None = self.default_every if every is _DEFAULT else every
        self.schedule: Schedule = make_schedule(self.every, field=f"every[{self.family!r}]")
        self.options = validated(self.Options, type(self).__name__, **options)
        for name in type(self.options).model_fields:
            setattr(self, name, getattr(self.options, name))
        self.active = False
        self.ctx: MonitorContext | None = None
        self._handles: list[Any] = []
        self._hook_specs: list[tuple[Callable[..., Any], Callable[..., Any], dict[str, Any], Any]] = []
        self._suspended = False
        self._failed_once = False
        self.elapsed = 0.0  # seconds spent in this collector's hooks since the last record
        self.hook_calls = 0  # calls of its guarded hooks since the last record

    # lifecycle -------------------------------------------------------------------------------------
    def attach(self, ctx: MonitorContext) -> None:
        self.ctx = ctx
        self.setup(ctx)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if not self._suspended:
            for _, _, _, handle in self._hook_specs:
                handle.remove()
        self._hook_specs.clear()
        self._suspended = False
        self.teardown()
        self.ctx = None
        self.active = False

    def guard(self, fn: Any) -> Any:
        """Wrap a hook body: time it and count the call (both go into ``monitor/overhead_ms``, see
        `take_hook_time`), and never let it raise."""

        def _guarded(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - monitoring never kills training
                self.fail(f"{self.family} hook", exc)
            finally:
                self.elapsed += time.perf_counter() - t0
                self.hook_calls += 1
            return None

        # named after the hook it wraps (a hook listing says which family put it there); still a stabwatch function
        _guarded.__qualname__ = f"{getattr(fn, '__qualname__', repr(fn))} (guarded)"
        _guarded.__wrapped__ = fn  # type: ignore[attr-defined]
        return _guarded

    def take_hook_time(self) -> float:
        """Seconds this collector's hooks cost since the last call, and reset the count.

        The body of every `guard`-ed hook is timed from inside; what a hook costs outside its body
        (PyTorch's hook dispatch: a module with a forward hook leaves ``Module.__call__``'s fast path,
        and the call into the hook) cannot be, and is added as ``calls x`` `hook_dispatch_seconds`.
        """
        seconds = self.elapsed + (self.hook_calls * hook_dispatch_seconds() if self.hook_calls else 0.0)
        self.elapsed = 0.0
        self.hook_calls = 0
        return seconds

    def hook(self, handle: Any) -> None:
        """Keep a hook handle so `detach` removes it."""
        self._handles.append(handle)

    def add_hook(self, register: Callable[..., Any], fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Register ``fn`` with ``register`` (e.g. ``module.register_forward_hook``) and keep the handle.

        Hooks added this way can be paused (`suspend_hooks` / `resume_hooks`, see
        `MonitorContext.hooks_paused`) and are removed by `detach`.
        """
        handle = register(fn, **kwargs)
        self._hook_specs.append((register, fn, kwargs, handle))
        return handle

    def suspend_hooks(self) -> bool:
        """Remove the hooks added with `add_hook` (kept for `resume_hooks`); ``True`` if there were any."""
        if self._suspended or not self._hook_specs:
            return False
        for _, _, _, handle in self._hook_specs:
            handle.remove()
        self._suspended = True
        return True

    def resume_hooks(self) -> None:
        """Register again the hooks that `suspend_hooks` removed."""
        if not self._suspended:
            return
        self._hook_specs = [(reg, fn, kw, reg(fn, **kw)) for reg, fn, kw, _ in self._hook_specs]
        self._suspended = False

    def reschedule(self, every: int | Schedule | None) -> None:
        """Replace the schedule (``None``/0: off; a positive period; a callable ``step -> bool``)."""
        self.schedule = make_schedule(every, field=f"every[{self.family!r}]")
        self.every = every

    def scheduled(self, step: int) -> bool:
        return bool(self.schedule(step))

    def fail(self, what: str, exc: BaseException) -> None:
        """Log a failure of this family once (training goes on; the field stays empty)."""
        if not self._failed_once:
            self._failed_once = True
            log.warning(
                "stabwatch: %s failed (%s: %s); its fields stay empty. Further failures are not logged.",
                what,
                type(exc).__name__,
                exc,
            )

    # to override -----------------------------------------------------------------------------------
    def setup(self, ctx: MonitorContext) -> None:
        """Register hooks; called on `Monitor.__enter__`."""

    def teardown(self) -> None:
        """Drop per-run state; called on `Monitor.__exit__` after hooks are removed."""

    def begin_step(self, step: int) -> None:
        """Called before the forward pass of ``step`` (after the previous record)."""

    def before_optimizer_step(self) -> None:
        """Called in the optimizer's pre-step hook."""

    def after_optimizer_step(self) -> None:
        """Called in the optimizer's post-step hook."""

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        """Add this step's values to ``readout`` (device tensors)."""

    def finish(self, step: int, readout: Readout, record: Any) -> None:
        """Use synced internal values to fill ``record`` (a `StabilityMetrics`)."""

    def state_dict(self) -> dict[str, Any]:
        """What this family carries from one step to later ones (warm-start vectors, windows), for
        ``Monitor.state_dict()``: tensors and plain Python values only, so ``torch.load(weights_only=True)``
        loads it. A family that starts every step afresh keeps the default, ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; called before or after `attach` (keep what `setup` needs)."""
