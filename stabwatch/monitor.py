"""`Monitor`: the front-end for a hand-written loop. It attaches the collectors' hooks to the model and
the optimizer, tells the `stabwatch.pipeline.RecordPipeline` when the gradients are final and when the
update is done (also for ``optimizer.step(closure)`` and ``GradScaler`` with fused optimizers), and
removes every hook on exit. Records are made, alerted on and sent by the pipeline.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from stabwatch.collectors import FAMILIES, PRESETS, Collector, MonitorContext
from stabwatch.errors import ConfigError, StabwatchError, validated
from stabwatch.metrics import Alert, StabilityMetrics
from stabwatch.pipeline import RecordPipeline, sink_list

__all__ = ["Monitor", "MonitorConfig"]

log = logging.getLogger("stabwatch")

ScheduleSpec = int | Callable[[int], bool] | None


#: options that moved into a family's own options model: the message points to the new spelling
_MOVED_OPTIONS = {
    "grad_sv_top_k": "collectors=[sw.collectors.GradSVCollector(top_k=...)]",
    "grad_sv_exact_max_dim": "collectors=[sw.collectors.GradSVCollector(exact_max_dim=...)]",
    "spectral_radius": "collectors=[sw.collectors.WeightCollector(radius=...)]",
    "nonfinite_mode": "collectors=[sw.collectors.NonfiniteCollector(mode=...)]",
    "spiking_adapters": "collectors=[sw.collectors.SpikingCollector(adapters=[...])]",
    "spiking_dead_threshold": "collectors=[sw.collectors.SpikingCollector(dead_threshold=...)]",
    "spiking_saturated_threshold": "collectors=[sw.collectors.SpikingCollector(saturated_threshold=...)]",
}
#: family names of earlier versions
_RENAMED_FAMILIES = {"spectral": "weight"}


class MonitorConfig(BaseModel):
    """The monitor's own options (a family's options live in its collector, e.g. ``GradSVCollector(top_k=5)``).

    Attributes:
        preset: ``"cheap"`` (gradient norms and non-finite checks each step, update ratios every 50),
            ``"default"`` (plus update ratios every 10 steps, gradient/weight spectra every 100,
            activations every 50, spiking-layer statistics every 10) or ``"full"`` (every family every
            step). See `stabwatch.collectors.PRESETS`.
        every: per-family schedule overrides ``{family: period | callable | None}``; ``None`` or 0
            turns a family off. Families: ``grad, nonfinite, update, grad_sv, weight, activation,
            spiking``.
        log_every: emit a record every N steps (a non-finite value is always emitted at once).
        max_records: how many records `Monitor.records` keeps in memory (oldest dropped).
        per_layer: emit per-layer values.
        seed: seed of the monitor's own RNG (random probes); training's RNG is never touched.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    preset: Literal["cheap", "default", "full"] = "default"
    every: dict[str, Any] = Field(default_factory=dict)
    log_every: int = Field(default=1, ge=1)
    max_records: int = Field(default=1000, ge=0)
    per_layer: bool = True
    seed: int = 0

    @field_validator("every")
    @classmethod
    def _check_every(cls, value: dict[str, Any]) -> dict[str, Any]:
        for family, spec in value.items():
            if family in _RENAMED_FAMILIES:
                raise ValueError(f"family {family!r} is now called {_RENAMED_FAMILIES[family]!r}")
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
    step pre/post hooks on the optimizer. The gradients measured are the ones the optimizer uses: read
    just before ``optimizer.step()``, or, for ``optimizer.step(closure)`` (LBFGS, Lightning), right after
    the closure's first call; ``GradScaler``'s scale is divided out where a fused optimizer still sees it.
    Update ratios are taken across the step. All hooks are removed on exit, also when the body raised.
    The monitor never changes training: hook bodies run under ``torch.no_grad()``, keep no tensor past
    the step and draw random numbers from the monitor's own ``torch.Generator``.

    Args:
        model: the module being trained.
        optimizer: its optimizer (optional; without it gradients are read at `step` and update ratios
            are not available).
        sinks: where records go: a sink or a list of sinks (`stabwatch.sinks`).
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
        collectors: configured `Collector` instances: one of a preset's families replaces the preset's
            (``collectors=[sw.collectors.GradSVCollector(every=10, top_k=5)]``), others are added
            (custom metric families). A collector passed here keeps its own schedule.
        **options: further `MonitorConfig` fields (``log_every``, ``max_records``, ``per_layer``, ``seed``).

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
        sinks: Any = (),
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
        for name in options:
            if name in _MOVED_OPTIONS:
                raise ConfigError(f"Monitor: {name}= is an option of its family now; pass {_MOVED_OPTIONS[name]}")
        if every is not None and not isinstance(every, dict):
            raise ConfigError(f"Monitor: every= must be a dict {{family: period}}, got {type(every).__name__}")
        self.config: MonitorConfig = validated(
            MonitorConfig, "Monitor", preset=preset, every=dict(every or {}), **options
        )
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
            foreign = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in model_ids]
            if foreign:
                raise StabwatchError(
                    f"Monitor: the optimizer holds {len(foreign)} parameter(s) that are not the model's "
                    f"(shapes {foreign[:3]}); build the optimizer from model.parameters()"
                )
        self.model = model
        self.optimizer = optimizer
        self.sinks = sink_list(sinks, "Monitor")
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.config.seed)
        built = self._build_collectors(collectors)
        self.shadow = shadow
        if shadow is not None:
            if not isinstance(shadow, Collector):
                raise StabwatchError(f"Monitor: shadow must be a stabwatch.Shadow, got {shadow!r}")
            built.append(shadow)
        from stabwatch.alerts.actions import parse_raise_on

        self._pipeline = RecordPipeline(
            built,
            sinks=self.sinks,
            engine=self._build_engine(alerts, on_alert),
            guard=self._build_guard(guard),
            raise_on=parse_raise_on(raise_on),
            per_layer=self.config.per_layer,
            log_every=self.config.log_every,
            max_records=self.config.max_records,
        )
        self._attached = False
        self._closed = False
        self._optimizer_steps = 0
        self._handles: list[Any] = []
        self._ctx: MonitorContext | None = None

    # construction helpers -------------------------------------------------------------------------
    def _build_collectors(self, extra: Iterable[Collector]) -> list[Collector]:
        """The preset's collectors with ``every=`` applied; the user's (own schedules) replace a family's."""
        given = list(extra)
        for c in given:
            if not isinstance(c, Collector):
                raise StabwatchError(f"Monitor: collectors must be Collector instances, got {c!r}")
        mine = {c.family for c in given}
        built = [c for c in PRESETS[self.config.preset]() if c.family not in mine]
        for family, spec in self.config.every.items():
            matching = [c for c in built if c.family == family]
            for c in matching:
                c.reschedule(spec)
            if not matching and spec and family not in mine:
                built.append(FAMILIES[family](spec))
        built = [c for c in built if c.every] + given
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
            raise ConfigError(f"Monitor: alerts must be True, False, a list of rules or an AlertEngine, got {alerts!r}")
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
            raise ConfigError("Monitor: guard=True needs the optimizer: Monitor(model, optimizer, guard=True)")
        if guard is True:
            return StepGuard()
        if isinstance(guard, StepGuard):
            return guard
        raise ConfigError(f"Monitor: guard must be True, False or a stabwatch.alerts.StepGuard, got {guard!r}")

    # what the pipeline holds -----------------------------------------------------------------------
    @property
    def records(self) -> collections.deque[StabilityMetrics]:
        """The last ``max_records`` records."""
        return self._pipeline.records

    @property
    def alerts(self) -> collections.deque[Alert]:
        """The alerts raised so far (the last ``max(1000, max_records)``)."""
        return self._pipeline.alerts

    @property
    def collectors(self) -> list[Collector]:
        """The metric families this monitor runs (the shadow included)."""
        return list(self._pipeline.collectors)

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
        ctx = MonitorContext.build(self.model, self.optimizer, self._generator, per_layer=self.config.per_layer)
        ctx.collectors = self._pipeline.collectors
        self._ctx = self._pipeline.ctx = ctx
        try:
            for c in self._pipeline.collectors:
                c.attach(ctx)
            if self.optimizer is not None:
                self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
                self._handles.append(self.optimizer.register_step_post_hook(self._post_step))
                if self._pipeline.guard is not None:
                    self._pipeline.guard.attach(self.optimizer)
        except BaseException:
            self._detach()
            raise
        self._attached = True
        self._pipeline.open(self.describe())
        return self

    def close(self) -> None:
        """Remove every hook, then flush and close the sinks. Idempotent; runs on every ``with`` exit."""
        if self._closed:
            return
        self._closed = True
        try:
            self._detach()
        finally:
            self._pipeline.close()  # drains every sink's queue; what cannot be sent stays in a spill file

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._pipeline.guard is not None:
            self._pipeline.guard.detach()
        for c in self._pipeline.collectors:
            try:
                c.detach()
            except Exception as exc:  # noqa: BLE001
                log.warning("stabwatch: detaching %s failed: %s", c.family, exc)
        self._attached = False

    # hooks -----------------------------------------------------------------------------------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        """The optimizer's pre-step hook: gradients are final here, unless ``step(closure)`` computes them."""
        # ``args`` starts with the optimizer itself (torch passes the bound call's arguments)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        # GradScaler hands a fused/capturable optimizer still-scaled gradients and sets this attribute to
        # the scale for the duration of the step (``None`` once unscale_ ran); tested in tests/test_grad_sources.py
        scale = getattr(optimizer, "grad_scale", None)
        scale = scale if isinstance(scale, torch.Tensor) else None
        if closure is None:
            self._pipeline.gradients_ready(scale)
            return None
        wrapped = self._after_first_call(closure, scale)
        if len(args) > 1:
            return (args[0], wrapped, *args[2:]), kwargs
        return args, {**kwargs, "closure": wrapped}

    def _after_first_call(self, closure: Callable[[], Any], scale: torch.Tensor | None) -> Callable[[], Any]:
        """``closure`` that declares the gradients ready after its first call (LBFGS calls it again later)."""
        pending = [True]

        def _closure() -> Any:
            loss = closure()
            if pending:
                pending.clear()
                self._pipeline.gradients_ready(scale)
            return loss

        return _closure

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._optimizer_steps += 1
        self._pipeline.update_done()

    # the step --------------------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """Index of the next record (the number of `step` calls so far)."""
        return self._pipeline.step

    @property
    def optimizer_steps(self) -> int:
        """How many times the optimizer stepped while attached (framework callbacks record a step when it
        advanced, so gradient-accumulation micro-batches make no record)."""
        return self._optimizer_steps

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
        return self._pipeline.record(loss, batch)

    # results ---------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every emitted record reached its sink and the sinks are flushed.

        Returns ``False`` if a sink is still failing after `timeout` seconds (default: its
        ``close_timeout``); its records are kept in its spill file and retried.
        """
        return self._pipeline.flush(timeout)

    def diagnose(self) -> str:
        """A readable summary of the run so far: trends per metric, alerts, likely causes, what to try."""
        from stabwatch.diagnosis import diagnose

        return diagnose(list(self.records), list(self.alerts))

    def describe(self) -> dict[str, str]:
        """The run's configuration as flat ``{name: str}`` (what tracker sinks log as parameters)."""
        import stabwatch

        params: dict[str, str] = {"version": stabwatch.__version__, "model": type(self.model).__name__}
        if self.optimizer is not None:
            params["optimizer"] = type(self.optimizer).__name__
            lr = self.optimizer.param_groups[0].get("lr")
            if lr is not None:
                params["lr"] = str(float(lr))
        params["n_parameters"] = str(sum(p.numel() for p in self.model.parameters()))
        for name, value in self.config.model_dump().items():
            if name != "every":
                params[name] = str(value)
        for c in self._pipeline.collectors:
            params[f"every.{c.family}"] = getattr(c.every, "__name__", None) or str(c.every)
        params["families"] = ",".join(c.family for c in self._pipeline.collectors)
        return params

    def state_dict(self) -> dict[str, Any]:
        """The monitor's resumable state: step counter, collector state, alert-engine state."""
        return {"generator": self._generator.get_state(), **self._pipeline.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (e.g. when resuming from a checkpoint)."""
        self._generator.set_state(state["generator"])
        self._pipeline.load_state_dict(state)

    def __repr__(self) -> str:
        fams = ", ".join(c.family for c in self._pipeline.collectors)
        return f"Monitor(step={self._pipeline.step}, preset={self.config.preset!r}, families=[{fams}])"
