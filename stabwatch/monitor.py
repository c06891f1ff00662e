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
#: version of the `Monitor.state_dict` format (1: before it had a "version" key)
_STATE_VERSION = 2


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
        all_ranks: under ``torch.distributed``, emit to sinks on every rank; by default only rank 0 writes
            (every rank still builds its records, see docs/distributed.md).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    preset: Literal["cheap", "default", "full"] = "default"
    every: dict[str, Any] = Field(default_factory=dict)
    log_every: int = Field(default=1, ge=1)
    max_records: int = Field(default=1000, ge=0)
    per_layer: bool = True
    seed: int = 0
    all_ranks: bool = False

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
            for none, or a list of rules / an `stabwatch.alerts.AlertEngine`. Alerts are logged on the
            ``stabwatch.alerts`` logger, except when a `stabwatch.sinks.ConsoleSink` is among the sinks (it prints
            each alert once, in step order); an engine you pass keeps its own ``log_alerts``.
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
        **options: further `MonitorConfig` fields (``log_every``, ``max_records``, ``per_layer``, ``seed``,
            ``all_ranks``).

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
            distributed=True,
            all_ranks=self.config.all_ranks,
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
        from stabwatch.sinks.console import ConsoleSink

        if alerts is None or alerts is False:
            engine = None
        elif alerts is True or isinstance(alerts, (list, tuple)):
            rules = default_rules(per_layer=self.config.per_layer) if alerts is True else list(alerts)
            # a console sink prints every alert already, in step order: not a second time on the log
            engine = AlertEngine(rules, log_alerts=not any(isinstance(s, ConsoleSink) for s in self.sinks))
        elif isinstance(alerts, AlertEngine):
            engine = alerts  # its own log_alerts setting
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

    def step(
        self, loss: torch.Tensor | float | None = None, batch: Any = None, logits: torch.Tensor | None = None
    ) -> StabilityMetrics | None:
        """Close one training step: gather what the hooks saw, emit a record, prepare the next step.

        Call it once per optimizer step, after ``optimizer.step()``.

        Args:
            loss: this step's loss (tensor or float); a non-finite loss is reported.
            batch: this step's batch (used by the shadow replica).
            logits: this step's output logits ``[..., classes]`` (optional): the attention family reads the
                log-partition ``z = logsumexp(logits)`` from them instead of recomputing the output head.

        Returns:
            The record emitted at this step, or ``None`` on steps that `log_every` skips.
        """
        if not self._attached:
            raise StabwatchError(
                "Monitor.step() called outside the monitor; use `with Monitor(...) as mon:` or mon.start()"
            )
        ctx = self._pipeline.ctx
        if ctx is not None:
            ctx.logits = logits.detach() if isinstance(logits, torch.Tensor) else None
        try:
            return self._pipeline.record(loss, batch)
        finally:
            if ctx is not None:
                ctx.logits = None

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

        return diagnose(list(self.records), list(self.alerts), optimizer=self.describe().get("optimizer"))

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
        """Everything a resumed run needs to emit the records and alerts an uninterrupted one would.

        Save it with the model and optimizer and load it into a `Monitor` built the same way (see
        ``docs/checkpoint.md``)::

            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "monitor": mon.state_dict()}, path)
            ...
            ckpt = torch.load(path, weights_only=True)
            model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"])
            with sw.Monitor(model, opt, ...same options...) as mon:
                mon.load_state_dict(ckpt["monitor"])

        Holds: ``version`` (of this format), ``config`` (preset, families, the trainable parameters'
        names and shapes: checked on load), the step counter and `optimizer_steps`, the monitor's RNG, each
        family's state (the warm-start vectors of the spectral estimates, the shadow's open window and
        its replica), the alert rules' windows and episodes, and the skip-step guard's window. Only
        tensors and plain Python values: ``torch.load(path, weights_only=True)`` loads it. Tensors are
        references, as in ``Module.state_dict()``: save them (or ``copy.deepcopy`` the dict) right away.
        After the monitor closed it still works, without an open shadow window (closing frees the replica).

        Not in it: the records and alerts kept in `records` / `alerts` (they went to the sinks), and
        training's own RNG (save ``torch.get_rng_state()`` yourself if the run uses dropout).
        """
        return {
            "version": _STATE_VERSION,
            "config": {
                "preset": self.config.preset,
                "families": [c.family for c in self._pipeline.collectors],
                "params": self._param_shapes(),
            },
            "generator": self._generator.get_state(),
            "optimizer_steps": self._optimizer_steps,
            **self._pipeline.state_dict(),
        }

    def _param_shapes(self) -> list[list[Any]]:
        """``[[name, [shape...]], ...]`` of the trainable parameters: what the collectors' state is about."""
        return [[name, list(p.shape)] for name, p in self.model.named_parameters() if p.requires_grad]

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what `state_dict` returned, before or after the monitor starts.

        A state saved by an earlier version (no ``"version"`` key) loads too; what it did not hold
        (warm-start vectors, the shadow's open window) starts fresh.

        Args:
            state: a `state_dict`, e.g. ``torch.load(path, weights_only=True)["monitor"]``.
            strict: refuse a state saved with another configuration. ``False`` loads the families both
                configurations have (the others start fresh) and skips the preset and parameter checks.

        Raises:
            ConfigError: ``strict`` and the state was saved with another preset, other metric families
                (a shadow only on one side included) or other trainable parameters (names or shapes), or
                by a newer stabwatch; the message says what differs. Nothing is loaded then.
        """
        if not isinstance(state, dict):
            raise ConfigError(
                f"Monitor.load_state_dict: expected the dict Monitor.state_dict() returns, got {state!r:.80}"
            )
        version = state.get("version", 1)
        if not isinstance(version, int) or version > _STATE_VERSION:
            raise ConfigError(
                f"Monitor.load_state_dict: state format version {version!r} is newer than this stabwatch's "
                f"({_STATE_VERSION}); upgrade stabwatch to resume from it"
            )
        if not isinstance(state.get("generator"), torch.Tensor):
            raise ConfigError(
                "Monitor.load_state_dict: the state has no 'generator' tensor; pass what Monitor.state_dict() "
                f"returned (keys given: {sorted(state)})"
            )
        config = state.get("config")
        if strict and isinstance(config, dict):
            if config.get("preset") != self.config.preset:
                raise ConfigError(
                    f"Monitor.load_state_dict: the checkpoint was saved with preset={config.get('preset')!r}, this "
                    f"monitor has preset={self.config.preset!r}; resume with the same preset (or strict=False)"
                )
            saved = [(str(n), [int(d) for d in shape]) for n, shape in config.get("params", [])]
            mine = [(n, shape) for n, shape in self._param_shapes()]
            if saved != mine:
                only_saved = [f"{n} {tuple(s)}" for n, s in saved if (n, s) not in mine]
                only_here = [f"{n} {tuple(s)}" for n, s in mine if (n, s) not in saved]
                raise ConfigError(
                    f"Monitor.load_state_dict: the checkpoint was saved for another model ({len(saved)} trainable "
                    f"parameters, this {type(self.model).__name__} has {len(mine)}; only in the checkpoint: "
                    f"{', '.join(only_saved[:5]) or 'none'}; only here: {', '.join(only_here[:5]) or 'none'}). "
                    "Resume with the model the checkpoint was saved from (or strict=False)"
                )
        self._pipeline.load_state_dict(state, strict=strict)  # checks the families before loading anything
        self._generator.set_state(state["generator"])
        self._optimizer_steps = int(state.get("optimizer_steps", self._optimizer_steps))

    def __repr__(self) -> str:
        fams = ", ".join(c.family for c in self._pipeline.collectors)
        return f"Monitor(step={self._pipeline.step}, preset={self.config.preset!r}, families=[{fams}])"
