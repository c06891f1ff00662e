"""`Monitor`: the one orchestrator. Attaches the collectors' hooks, schedules them, builds one
`StabilityMetrics` per emitted step with a single device->host copy, runs the alert rules, fans the
record out to the sinks, and removes every hook on exit.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from stabwatch.alerts.actions import instability_error
from stabwatch.collectors import FAMILIES, PRESETS, Collector, MonitorContext, Readout
from stabwatch.errors import InstabilityError, StabwatchError
from stabwatch.metrics import Alert, StabilityMetrics

__all__ = ["Monitor", "MonitorConfig"]

log = logging.getLogger("stabwatch")

ScheduleSpec = int | Callable[[int], bool] | None


class MonitorConfig(BaseModel):
    """Validated monitor options (bad values raise a pydantic ``ValidationError`` naming the field).

    Attributes:
        preset: ``"cheap"`` (gradient norms and non-finite checks each step), ``"default"`` (plus
            update ratios every 10 steps, gradient/weight spectra every 100, activations every 50,
            spiking-layer statistics every 10) or ``"full"`` (every family every step).
        every: per-family schedule overrides ``{family: period | callable | None}``; ``None`` or 0
            turns a family off. Families: ``grad, nonfinite, update, grad_sv, spectral, activation,
            spiking``.
        log_every: emit a record every N steps (a non-finite value is always emitted at once).
        max_records: how many records `Monitor.records` keeps in memory (oldest dropped).
        per_layer: emit per-layer values.
        seed: seed of the monitor's own RNG (random probes); training's RNG is never touched.
        nonfinite_mode: ``"lazy"`` (activations are reduced only on a step whose loss or gradients came
            out non-finite) or ``"eager"`` (every output reduced in its hook; catches NaNs that never
            reach the loss). See `stabwatch.collectors.nonfinite`.
        grad_sv_top_k / grad_sv_exact_max_dim: options of the gradient-spectrum family.
        spectral_radius: ``"recurrent"`` (RNN/LSTM/GRU hidden weights), ``"square"`` or ``"none"``.
        spiking_adapters: `stabwatch.collectors.spiking.SpikingAdapter` s for custom spiking modules (tried before the
            built-in snntorch / spikingjelly / norse ones).
        spiking_dead_threshold / spiking_saturated_threshold: firing rates below / above which a
            spiking neuron counts as dead / saturated (0.01 / 0.9).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    preset: Literal["cheap", "default", "full"] = "default"
    every: dict[str, Any] = Field(default_factory=dict)
    log_every: int = Field(default=1, ge=1)
    max_records: int = Field(default=1000, ge=0)
    per_layer: bool = True
    seed: int = 0
    nonfinite_mode: Literal["lazy", "eager"] = "lazy"
    grad_sv_top_k: int = Field(default=3, ge=1)
    grad_sv_exact_max_dim: int = Field(default=256, ge=1)
    spectral_radius: Literal["recurrent", "square", "none"] = "recurrent"
    spiking_adapters: list[Any] = Field(default_factory=list)
    spiking_dead_threshold: float = Field(default=0.01, ge=0.0)
    spiking_saturated_threshold: float = Field(default=0.9, gt=0.0)

    @field_validator("every")
    @classmethod
    def _check_every(cls, value: dict[str, Any]) -> dict[str, Any]:
        for family, spec in value.items():
            if family not in FAMILIES:
                raise ValueError(f"unknown family {family!r}; allowed: {', '.join(sorted(FAMILIES))}")
            if spec is None or callable(spec):
                continue
            if isinstance(spec, bool) or not isinstance(spec, int) or spec < 0:
                raise ValueError(
                    f"every[{family!r}] must be None/0 (off), a positive int period or a callable "
                    f"step -> bool; got {spec!r}"
                )
        return value

    def periods(self) -> dict[str, ScheduleSpec]:
        out: dict[str, ScheduleSpec] = dict(PRESETS[self.preset])
        out.update(self.every)
        return out


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class Monitor:
    """Watch a training loop and emit one `StabilityMetrics` per step.

    Use it as a context manager around the loop and call `step` once per optimizer step, after
    ``optimizer.step()``::

        with sw.Monitor(model, optimizer, sinks=[sw.sinks.JsonlSink("run.jsonl")]) as mon:
            for x, y in loader:
                optimizer.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); optimizer.step()
                mon.step(loss=loss)
        print(mon.diagnose())

    Hooks: forward hooks on the model's modules (non-finite checks, activation statistics), and
    step pre/post hooks on the optimizer (gradients are read just before ``optimizer.step()``; update
    ratios across it). All are removed on exit, also when the body raised. The monitor never changes
    training: hook bodies run under ``torch.no_grad()``, keep no tensor past the step and draw random
    numbers from the monitor's own ``torch.Generator``.

    Args:
        model: the module being trained.
        optimizer: its optimizer (optional; without it gradients are read at `step` and update ratios
            are not available).
        sinks: where records go (`stabwatch.sinks`).
        preset / every / log_every / max_records / per_layer / seed: see `MonitorConfig`.
        alerts: ``True`` for the default rule set (`stabwatch.alerts.default_rules`), ``False``/``None``
            for none, or a list of rules / an `stabwatch.alerts.AlertEngine`.
        on_alert: a callable ``fn(alert)`` (or a list of them) called for every alert.
        raise_on: ``"critical"`` (or ``True``) / ``"warning"``: raise `stabwatch.InstabilityError` from
            `step` when an alert of that severity or worse fires (after the record reached the sinks);
            ``None`` (default) never raises.
        guard: ``True`` or a `stabwatch.alerts.StepGuard`: undo optimizer steps whose gradients are
            non-finite or spiking (parameters and optimizer state restored bit for bit). Needs the
            optimizer. Off by default.
        shadow: a `stabwatch.Shadow` replica estimating the Lyapunov exponent of training.
        collectors: extra `Collector` instances (custom metric families).
        **options: further `MonitorConfig` fields.

    Example:
        >>> import torch, stabwatch as sw
        >>> model = torch.nn.Linear(4, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with sw.Monitor(model, opt, preset="full") as mon:
        ...     loss = model(torch.ones(3, 4)).pow(2).mean(); loss.backward(); opt.step()
        ...     rec = mon.step(loss=loss)
        >>> rec.step, rec.grad_norm > 0, rec.spectral_norm > 0
        (0, True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sinks: Sequence[Any] = (),
        preset: str = "default",
        every: dict[str, ScheduleSpec] | None = None,
        alerts: Any = True,
        shadow: Any = None,
        collectors: Iterable[Collector] = (),
        on_alert: Any = None,
        raise_on: Any = None,
        guard: Any = False,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise StabwatchError(f"Monitor: model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = MonitorConfig(preset=preset, every=dict(every or {}), **options)  # type: ignore[arg-type]
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise StabwatchError(
                f"Monitor: {type(model).__name__} has no trainable parameters; pass the model you train"
            )
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise StabwatchError(
                    f"Monitor: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
                )
            model_ids = {id(p) for p in model.parameters()}
            foreign = [tuple(p.shape) for p in _optimizer_params(optimizer) if id(p) not in model_ids]
            if foreign:
                raise StabwatchError(
                    f"Monitor: the optimizer holds {len(foreign)} parameter(s) that are not the model's "
                    f"(shapes {foreign[:3]}); build the optimizer from model.parameters()"
                )
        for i, sink in enumerate(sinks):
            missing = [m for m in ("write", "flush", "close") if not callable(getattr(sink, m, None))]
            if missing:
                raise StabwatchError(
                    f"Monitor: sinks[{i}] ({type(sink).__name__}) lacks {', '.join(missing)}; a sink "
                    "needs write(record), flush() and close()"
                )
        self.model = model
        self.optimizer = optimizer
        self.sinks = list(sinks)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.config.seed)
        self._collectors = self._build_collectors()
        for extra in collectors:
            if not isinstance(extra, Collector):
                raise StabwatchError(f"Monitor: collectors must be Collector instances, got {extra!r}")
            self._collectors.append(extra)
        self.shadow = shadow
        if shadow is not None:
            if not isinstance(shadow, Collector):
                raise StabwatchError(f"Monitor: shadow must be a stabwatch.Shadow, got {shadow!r}")
            self._collectors.append(shadow)
        self._engine = self._build_engine(alerts, on_alert)
        from stabwatch.alerts.actions import parse_raise_on

        self._raise_on = parse_raise_on(raise_on)
        self._guard = self._build_guard(guard)
        self.records: collections.deque[StabilityMetrics] = collections.deque(maxlen=self.config.max_records)
        self.alerts: collections.deque[Alert] = collections.deque(maxlen=max(1000, self.config.max_records))
        self._step = 0
        self._attached = False
        self._closed = False
        self._handles: list[Any] = []
        self._hook_time = 0.0
        from stabwatch.sinks._dispatch import Dispatcher

        self._dispatch = Dispatcher(self.sinks)  # one background writer per sink; checks spill dirs
        self._ctx: MonitorContext | None = None

    # construction helpers -------------------------------------------------------------------------
    def _build_collectors(self) -> list[Collector]:
        cfg = self.config
        built: list[Collector] = []
        for family, spec in cfg.periods().items():
            if spec is None or spec == 0:
                continue
            cls = FAMILIES[family]
            kwargs: dict[str, Any] = {"every": spec}
            if family in ("grad", "update"):
                kwargs["per_layer"] = cfg.per_layer
            if family == "grad_sv":
                kwargs.update(top_k=cfg.grad_sv_top_k, exact_max_dim=cfg.grad_sv_exact_max_dim)
            if family == "spectral":
                kwargs["radius"] = cfg.spectral_radius
            if family == "nonfinite":
                kwargs["mode"] = cfg.nonfinite_mode
            if family == "spiking":
                kwargs.update(
                    adapters=cfg.spiking_adapters,
                    dead_threshold=cfg.spiking_dead_threshold,
                    saturated_threshold=cfg.spiking_saturated_threshold,
                )
            built.append(cls(**kwargs))
        return built

    def _build_engine(self, alerts: Any, on_alert: Any = None) -> Any:
        from stabwatch.alerts import AlertEngine, default_rules

        if alerts is None or alerts is False:
            engine = None
        elif alerts is True:
            engine = AlertEngine(default_rules(per_layer=self.config.per_layer))
        elif isinstance(alerts, AlertEngine):
            engine = alerts
        elif isinstance(alerts, (list, tuple)):
            engine = AlertEngine(list(alerts))
        else:
            raise StabwatchError(
                f"Monitor: alerts must be True, False, a list of rules or an AlertEngine, got {alerts!r}"
            )
        if on_alert is not None:
            from stabwatch.alerts.actions import AlertCallbacks

            if engine is None:  # callbacks still see the skip-step guard's alerts
                engine = AlertEngine([])
            for cb in AlertCallbacks(on_alert).callbacks:
                engine.callbacks.add(cb)
        return engine

    def _build_guard(self, guard: Any) -> Any:
        if guard is None or guard is False:
            return None
        from stabwatch.alerts.actions import StepGuard

        if self.optimizer is None:
            raise StabwatchError("Monitor: guard=True needs the optimizer: Monitor(model, optimizer, guard=True)")
        if guard is True:
            return StepGuard()
        if isinstance(guard, StepGuard):
            return guard
        raise StabwatchError(f"Monitor: guard must be True, False or a stabwatch.alerts.StepGuard, got {guard!r}")

    # lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> Monitor:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def start(self) -> Monitor:
        """Attach hooks (called by ``with``)."""
        if self._attached:
            return self
        if self._closed:
            raise StabwatchError("Monitor: this monitor was closed; create a new one")
        self._ctx = MonitorContext.build(self.model, self.optimizer, self._generator)
        try:
            for c in self._collectors:
                c.attach(self._ctx)
            if self.optimizer is not None:
                self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
                self._handles.append(self.optimizer.register_step_post_hook(self._post_step))
                if self._guard is not None:
                    self._guard.attach(self.optimizer)
        except BaseException:
            self._detach()
            raise
        self._attached = True
        from stabwatch.sinks._dispatch import describe_monitor

        self._dispatch.set_params(describe_monitor(self))
        self._dispatch.start()
        self._begin(self._step)
        return self

    def close(self) -> None:
        """Remove every hook, then flush and close the sinks. Idempotent; runs on every ``with`` exit."""
        if self._closed:
            return
        self._closed = True
        try:
            self._detach()
        finally:
            self._dispatch.close()  # drains every sink's queue; what cannot be sent stays in a spill file

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._guard is not None:
            self._guard.detach()
        for c in self._collectors:
            try:
                c.detach()
            except Exception as exc:  # noqa: BLE001
                log.warning("stabwatch: detaching %s failed: %s", c.family, exc)
        self._attached = False

    # hooks -----------------------------------------------------------------------------------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        t0 = time.perf_counter()
        for c in self._collectors:
            if c.active:
                try:
                    c.before_optimizer_step()
                except Exception as exc:  # noqa: BLE001
                    c.fail(f"{c.family} (before optimizer step)", exc)
        if self._guard is not None:
            try:
                self._guard.before_step(self._step)
            except Exception as exc:  # noqa: BLE001 - the guard never kills training
                log.warning(
                    "stabwatch: skip-step guard failed at step %d (%s: %s)", self._step, type(exc).__name__, exc
                )
        self._hook_time += time.perf_counter() - t0

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        t0 = time.perf_counter()
        if self._guard is not None:  # undo a skipped step before any collector reads the update
            try:
                self._guard.after_step()
            except Exception as exc:  # noqa: BLE001
                log.warning(
                    "stabwatch: skip-step guard failed to restore step %d (%s: %s)", self._step, type(exc).__name__, exc
                )
        for c in self._collectors:
            if c.active:
                try:
                    c.after_optimizer_step()
                except Exception as exc:  # noqa: BLE001
                    c.fail(f"{c.family} (after optimizer step)", exc)
        self._hook_time += time.perf_counter() - t0

    def _emits(self, step: int) -> bool:
        return step % self.config.log_every == 0

    def _begin(self, step: int) -> None:
        emits = self._emits(step)
        for c in self._collectors:
            c.active = c.always_collect or (emits and c.scheduled(step))
            try:
                c.begin_step(step)
            except Exception as exc:  # noqa: BLE001
                c.fail(f"{c.family} (begin step)", exc)

    # the step --------------------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """Index of the next record (the number of `step` calls so far)."""
        return self._step

    def step(self, loss: torch.Tensor | float | None = None, batch: Any = None) -> StabilityMetrics | None:
        """Close one training step: gather what the hooks saw, emit a record, prepare the next step.

        Call it once per optimizer step, after ``optimizer.step()``.

        Args:
            loss: this step's loss (tensor or float); a non-finite loss is reported.
            batch: this step's batch (used by the shadow replica).

        Returns:
            The record emitted at this step, or ``None`` on steps that `log_every` skips.
        """
        if not self._attached:
            raise StabwatchError(
                "Monitor.step() called outside the monitor; use `with Monitor(...) as mon:` or mon.start()"
            )
        t0 = time.perf_counter()
        step = self._step
        readout = Readout()
        ran: list[Collector] = []
        with torch.no_grad():
            for c in self._collectors:
                if not c.active:
                    continue
                try:
                    c.collect(step, readout, loss if isinstance(loss, torch.Tensor) else None, batch)
                    ran.append(c)
                except Exception as exc:  # noqa: BLE001
                    c.fail(f"{c.family} metrics", exc)
            if loss is not None:
                try:
                    readout.add("loss", loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else float(loss))
                except Exception as exc:  # noqa: BLE001
                    log.warning("stabwatch: could not read the loss (%s)", exc)
            values = readout.sync()
        record = self._assemble(step, readout, values)
        for c in ran:
            try:
                c.finish(step, readout, record)
            except Exception as exc:  # noqa: BLE001
                c.fail(f"{c.family} metrics", exc)
        emit = self._emits(step) or bool(record.nonfinite)
        self._step += 1
        self._begin(self._step)
        if not emit:
            self._hook_time += time.perf_counter() - t0
            return None
        fired: list[Alert] = self._guard.pop_alerts() if self._guard is not None else []
        stop: InstabilityError | None = None
        if self._engine is not None:
            try:
                fired = self._engine.evaluate(record, extra=fired)
                stop = self._engine.stop_error  # a callback asked to stop: raised after the sinks
            except Exception as exc:  # noqa: BLE001
                log.warning("stabwatch: alert evaluation failed at step %d: %s", step, exc)
        if fired:
            record.alerts.extend(fired)
            self.alerts.extend(fired)
        hook_time = self._hook_time + sum(c.elapsed for c in self._collectors)
        self._hook_time = 0.0
        for c in self._collectors:
            c.elapsed = 0.0
        record.overhead_ms = (hook_time + time.perf_counter() - t0) * 1e3
        if self.config.max_records:
            self.records.append(record)
        self._emit(record)
        error = stop or instability_error(fired, self._raise_on)
        if error is not None:
            self.flush()
            raise error
        return record

    def _assemble(self, step: int, readout: Readout, values: list[float]) -> StabilityMetrics:
        fields: dict[str, Any] = {}
        layers: dict[str, dict[str, float]] = {}
        extra: dict[str, float] = {}
        for (kind, name, layer), value in zip(readout.entries, values, strict=True):
            if kind == "field":
                fields[name] = value
            elif kind == "layer":
                layers.setdefault(layer or "", {})[name] = value
            elif kind == "extra":
                extra[f"{name}/{layer}" if layer else name] = value
        if not self.config.per_layer:
            layers = {}
        return StabilityMetrics(step=step, layers=layers, extra=extra, **fields)

    def _emit(self, record: StabilityMetrics) -> None:
        self._dispatch.submit(record)  # a queue append: sinks are written by background threads

    # results ---------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every emitted record reached its sink and the sinks are flushed.

        Returns ``False`` if a sink is still failing after `timeout` seconds (default: its
        ``close_timeout``); its records are kept in its spill file and retried.
        """
        return self._dispatch.flush(timeout)

    def diagnose(self) -> str:
        """A readable summary of the run so far: trends per metric, alerts, likely causes, what to try."""
        from stabwatch.diagnosis import diagnose

        return diagnose(list(self.records), list(self.alerts))

    def state_dict(self) -> dict[str, Any]:
        """The monitor's resumable state: step counter, collector state, alert-engine state."""
        return {
            "step": self._step,
            "generator": self._generator.get_state(),
            "collectors": {c.family: c.state_dict() for c in self._collectors},
            "alerts": self._engine.state_dict() if self._engine is not None else None,
            "guard": self._guard.state_dict() if self._guard is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (e.g. when resuming from a checkpoint)."""
        self._step = int(state["step"])
        self._generator.set_state(state["generator"])
        for c in self._collectors:
            if c.family in state.get("collectors", {}):
                c.load_state_dict(state["collectors"][c.family])
        if self._engine is not None and state.get("alerts") is not None:
            self._engine.load_state_dict(state["alerts"])
        if self._guard is not None and state.get("guard") is not None:
            self._guard.load_state_dict(state["guard"])
        if self._attached:
            self._begin(self._step)

    def __repr__(self) -> str:
        fams = ", ".join(c.family for c in self._collectors)
        return f"Monitor(step={self._step}, preset={self.config.preset!r}, families=[{fams}])"


def _isfinite(x: float | None) -> bool:
    return x is None or math.isfinite(x)
