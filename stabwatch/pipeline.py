"""The record path every front-end shares.

A front-end decides *when* (a `stabwatch.Monitor` through hooks on the model and optimizer, the SNN
drop-in `stabwatch.compat.StabilityMonitor` through tensors passed in by hand, the trajectory analyzer
once per checkpoint, framework callbacks at their hook points); the `RecordPipeline` does the rest, the
same way for all of them:

    collectors add device tensors to a `Readout`  ->  one device->host copy  ->  a `StabilityMetrics`
    ->  collectors fill what needs the synced values  ->  alert rules  ->  kept records  ->  sinks

Around the optimizer step a front-end calls `gradients_ready` once the gradients the optimizer will use
are final (after accumulation, AMP unscaling, clipping and, for ``optimizer.step(closure)``, after the
closure ran) and `update_done` after the parameters were updated. The pipeline passes both to the
collectors that are scheduled and to the skip-step guard, and times everything it runs
(``monitor/overhead_ms``).

Sinks are written by one background thread each (`stabwatch.sinks._dispatch.Dispatcher`): publishing a
record never waits on a tracker, and a tracker that is down has its records spilled and replayed.

Under ``torch.distributed`` (`stabwatch.distributed`) every rank builds its records; values tagged as
differing per rank are reduced across ranks in `build` (one all-gather after a four-number layout check,
only when the world has more than one process), only rank 0 writes to the sinks unless ``all_ranks``,
and rank 0's stop decision is broadcast so that every rank raises at the same step.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from stabwatch import distributed as _dist
from stabwatch.alerts.actions import instability_error
from stabwatch.collectors.base import Collector, MonitorContext, Readout
from stabwatch.errors import ConfigError, InstabilityError
from stabwatch.metrics import Alert, StabilityMetrics

__all__ = ["RecordPipeline", "sink_list"]

log = logging.getLogger("stabwatch")


class RecordPipeline:
    """Readouts in, records out: the one path from collected tensors to sinks.

    Args:
        collectors: the metric families to run (each with its own schedule).
        sinks: where records go (each gets its own background writer).
        engine: an `stabwatch.alerts.AlertEngine`, or ``None`` for no alert rules.
        guard: a `stabwatch.alerts.StepGuard` (already attached to the optimizer), or ``None``.
        raise_on: the severity at which `record` raises `stabwatch.InstabilityError` (``None``: never).
        per_layer: keep per-layer values in the records.
        log_every: emit a record every N steps (a non-finite step is always emitted).
        max_records: how many records `records` keeps.
        distributed: the front-end runs on every rank of the default process group in lockstep (as
            `stabwatch.Monitor` does): with more than one process, values that differ per rank are reduced
            across ranks, rank 0's stop decision is broadcast, and only rank 0 writes to the sinks unless
            ``all_ranks``. ``False`` (a front-end used on one rank only): no collective, every rank writes.
        all_ranks: with ``distributed``, write to the sinks on every rank; by default only rank 0 does
            (the others build records, kept in `records`, and never touch their sinks).

    Raises:
        ConfigError: a `stabwatch.Shadow` among the collectors of a run with more than one process.

    Example:
        >>> from stabwatch.collectors.base import Readout
        >>> pipe = RecordPipeline()
        >>> readout = Readout(); readout.add("grad_norm", torch.tensor(2.0))
        >>> pipe.publish(pipe.build(0, readout)).grad_norm
        2.0
        >>> pipe.close()
    """

    def __init__(
        self,
        collectors: Sequence[Collector] = (),
        *,
        sinks: Sequence[Any] = (),
        engine: Any = None,
        guard: Any = None,
        raise_on: Any = None,
        per_layer: bool = True,
        log_every: int = 1,
        max_records: int = 1000,
        distributed: bool = False,
        all_ranks: bool = False,
    ) -> None:
        from stabwatch.sinks._dispatch import Dispatcher

        self.distributed = distributed
        if distributed and _dist.world_size() > 1 and any(c.family == "shadow" for c in collectors):
            raise ConfigError(
                f"Shadow: not supported with torch.distributed (rank {_dist.rank()} of {_dist.world_size()}): the "
                "replica is a local copy trained on this rank's batch, which is not the map the synchronised "
                "training applies (its gradient is the mean over all ranks' batches); run the shadow in a "
                "single-process run, or pass shadow= only when torch.distributed.get_world_size() == 1"
            )
        self.collectors = list(collectors)
        self.engine = engine
        self.guard = guard
        self.raise_on = raise_on
        self.per_layer = per_layer
        self.log_every = log_every
        self.records: collections.deque[StabilityMetrics] = collections.deque(maxlen=max_records)
        self.alerts: collections.deque[Alert] = collections.deque(maxlen=max(1000, max_records))
        self.step = 0
        self._hook_time = 0.0
        #: whether this process writes to the sinks (rank 0, or every rank with ``all_ranks``)
        self.writes = all_ranks or not distributed or _dist.is_main()
        # one background writer per sink; other ranks never touch theirs (no file, run or folder made)
        self._dispatch = Dispatcher(list(sinks) if self.writes else [])
        self._layout_warned = False
        self._open = False
        #: what the collectors see (set by a front-end that attaches them to a model)
        self.ctx: MonitorContext | None = None

    # lifecycle -------------------------------------------------------------------------------------
    def open(self, params: dict[str, str] | None = None) -> None:
        """Start the sink writers (``params``: the run's configuration, logged by tracker sinks)."""
        if self._open:
            return
        if params:
            self._dispatch.set_params(params)
        self._dispatch.start()
        self._open = True
        self.begin(self.step)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every published record reached its sink; ``False`` if a sink is still failing."""
        return self._dispatch.flush(timeout)

    def close(self) -> None:
        """Drain and close the sinks (what cannot be sent stays in a spill file). Idempotent."""
        self._dispatch.close()

    def sink_problems(self) -> list[str]:
        """One line per sink failing now (the error, how many records wait and where): what to report."""
        return self._dispatch.problems()

    # the optimizer step ----------------------------------------------------------------------------
    def _each(self, what: str, method: str) -> None:
        for c in self.collectors:
            if c.active:
                try:
                    getattr(c, method)()
                except Exception as exc:  # noqa: BLE001 - monitoring never kills training
                    c.fail(f"{c.family} ({what})", exc)

    def gradients_ready(self, grad_scale: torch.Tensor | None = None) -> None:
        """The gradients the optimizer is about to use are final: let the collectors and the guard read them.

        Args:
            grad_scale: the factor the gradients are still multiplied by (``GradScaler`` stepping a
                fused or capturable optimizer, which unscales inside its kernel); ``None`` if unscaled.
        """
        t0 = time.perf_counter()
        if self.ctx is not None:
            self.ctx.grad_scale = grad_scale
        self._each("before optimizer step", "before_optimizer_step")
        if self.guard is not None:
            try:
                self.guard.before_step(self.step, grad_scale)
            except Exception as exc:  # noqa: BLE001 - the guard never kills training
                log.warning("stabwatch: skip-step guard failed at step %d (%s: %s)", self.step, type(exc).__name__, exc)
        self._hook_time += time.perf_counter() - t0

    def update_done(self) -> None:
        """The optimizer updated the parameters (undone first if the guard skips this step)."""
        t0 = time.perf_counter()
        if self.guard is not None:  # undo a skipped step before any collector reads the update
            try:
                self.guard.after_step()
            except Exception as exc:  # noqa: BLE001
                log.warning(
                    "stabwatch: skip-step guard failed to restore step %d (%s: %s)", self.step, type(exc).__name__, exc
                )
        self._each("after optimizer step", "after_optimizer_step")
        if self.ctx is not None:
            self.ctx.grad_scale = None
        self._hook_time += time.perf_counter() - t0

    # records ---------------------------------------------------------------------------------------
    def emits(self, step: int) -> bool:
        return step % self.log_every == 0

    def begin(self, step: int) -> None:
        """Prepare ``step``: mark the collectors scheduled for it active."""
        emits = self.emits(step)
        for c in self.collectors:
            c.active = c.always_collect or (emits and c.scheduled(step))
            try:
                c.begin_step(step)
            except Exception as exc:  # noqa: BLE001
                c.fail(f"{c.family} (begin step)", exc)

    def record(self, loss: torch.Tensor | float | None = None, batch: Any = None) -> StabilityMetrics | None:
        """Close the current step: collect, sync once, build, alert, publish; then begin the next step.

        Returns the record, or ``None`` on a step that ``log_every`` skips. Raises
        `stabwatch.InstabilityError` (after the record reached the sinks) when ``raise_on`` says so or
        an alert callback asked to stop.
        """
        t0 = time.perf_counter()
        step = self.step
        readout = Readout(across_ranks=self.distributed and _dist.world_size() > 1)
        ran: list[Collector] = []
        with torch.no_grad():
            for c in self.collectors:
                if not c.active:
                    continue
                try:
                    c.collect(step, readout, loss if isinstance(loss, torch.Tensor) else None, batch)
                    ran.append(c)
                except Exception as exc:  # noqa: BLE001
                    c.fail(f"{c.family} metrics", exc)
            if loss is not None:
                try:
                    value = loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else float(loss)
                    readout.add("loss", value, reduce="mean")  # each rank's loss is on its own batch
                except Exception as exc:  # noqa: BLE001
                    log.warning("stabwatch: could not read the loss (%s)", exc)
        record = self.build(step, readout)
        for c in ran:
            try:
                c.finish(step, readout, record)
            except Exception as exc:  # noqa: BLE001
                c.fail(f"{c.family} metrics", exc)
        emit = self.emits(step) or bool(record.nonfinite)
        self.step += 1
        self.begin(self.step)
        if not emit:
            self._hook_time += time.perf_counter() - t0
            if self._agrees():  # rank 0 may have emitted (and stopped) where this rank did not
                error = _dist.agree_stop(None)
                if error is not None:
                    self.flush()
                    raise error
            return None
        extra: list[Alert] = self.guard.pop_alerts() if self.guard is not None else []
        hook_time = self._hook_time + sum(c.take_hook_time() for c in self.collectors)
        self._hook_time = 0.0
        return self.publish(record, extra_alerts=extra, started=t0, hook_time=hook_time)

    def build(self, step: int, readout: Readout) -> StabilityMetrics:
        """Sync ``readout`` (one device->host copy) and assemble the record of ``step`` from it.

        A readout made `across_ranks` is first reduced across ranks (`Readout.reduce_across_ranks`):
        every rank must then build the same records.
        """
        with torch.no_grad():
            if readout.across_ranks and not readout.reduce_across_ranks() and not self._layout_warned:
                self._layout_warned = True
                log.warning(
                    "stabwatch: rank %d: the ranks' records hold different entries at step %d (a collector "
                    "failed on one rank?); this record keeps per-rank values and leaves out sharded norms. "
                    "Further mismatches are not logged.",
                    _dist.rank(),
                    step,
                )
            if readout.failures and not self._layout_warned:
                self._layout_warned = True
                log.warning("stabwatch: values reduced across ranks could not be used (%s)", readout.failures[0])
            values = readout.sync()
        fields: dict[str, Any] = {}
        layers: dict[str, dict[str, float]] = {}
        extra: dict[str, float] = {}
        for (kind, name, layer), value in zip(readout.entries, values, strict=True):
            if kind == "field":
                fields[name] = value
            elif kind == "layer":
                layers.setdefault(layer or "", {})[name] = value
            elif kind == "extra":
                if layer is None:
                    extra[name] = value
                elif self.per_layer:
                    extra[f"{name}/{layer}"] = value
        if not self.per_layer:
            layers = {}
        return StabilityMetrics(step=step, layers=layers, extra=extra, **fields)

    def publish(
        self,
        record: StabilityMetrics,
        *,
        extra_alerts: Sequence[Alert] = (),
        started: float | None = None,
        hook_time: float = 0.0,
    ) -> StabilityMetrics:
        """Run the alert rules on ``record``, keep it and hand it to the sinks (a queue append).

        Raises `stabwatch.InstabilityError` after the record reached the sinks when an alert at or
        above ``raise_on`` fired or an alert callback asked to stop.
        """
        fired: list[Alert] = list(extra_alerts)
        stop: InstabilityError | None = None
        if self.engine is not None:
            try:
                fired = self.engine.evaluate(record, extra=fired)
                stop = self.engine.stop_error  # a callback asked to stop: raised after the sinks
            except Exception as exc:  # noqa: BLE001
                log.warning("stabwatch: alert evaluation failed at step %d: %s", record.step, exc)
        if fired:
            record.alerts.extend(fired)
            self.alerts.extend(fired)
        if started is not None:
            record.overhead_ms = (hook_time + time.perf_counter() - started) * 1e3
        if self.records.maxlen:
            self.records.append(record)
        self._dispatch.submit(record)  # sinks are written by background threads
        error = stop or instability_error(fired, self.raise_on)
        if self._agrees():  # rank 0 decides; every rank stops at the same step
            error = _dist.agree_stop(error)
        if error is not None:
            self.flush()
            raise error
        return record

    def _agrees(self) -> bool:
        """Whether records must carry rank 0's stop decision: more than one process, and something can stop
        (``raise_on`` or alert callbacks, which may raise `stabwatch.InstabilityError`)."""
        callbacks = getattr(getattr(self.engine, "callbacks", None), "callbacks", None)
        if not self.distributed or (self.raise_on is None and not callbacks):
            return False
        return _dist.world_size() > 1

    # state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The step counter, every collector's state (by family), the alert rules' and the guard's:
        tensors and plain Python values only (``torch.load(weights_only=True)`` loads them)."""
        return {
            "step": self.step,
            "collectors": {c.family: c.state_dict() for c in self.collectors},
            "alerts": self.engine.state_dict() if self.engine is not None else None,
            "guard": self.guard.state_dict() if self.guard is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore `state_dict` output.

        Raises:
            ConfigError: ``strict`` and the saved families are not this pipeline's (the message names
                the ones missing on either side); nothing is loaded then.
        """
        saved = state.get("collectors", {})
        if not isinstance(saved, dict) or "step" not in state:
            raise ConfigError(
                "load_state_dict: expected a state_dict() with 'step' and 'collectors', got keys "
                f"{sorted(state) if isinstance(state, dict) else type(state).__name__}"
            )
        if "spectral" in saved and "weight" not in saved:  # the family's name before it was renamed
            saved = {("weight" if k == "spectral" else k): v for k, v in saved.items()}
        mine = [c.family for c in self.collectors]
        missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
        if strict and (missing or extra):
            raise ConfigError(
                "load_state_dict: the checkpoint was saved with other metric families "
                f"(saved: {', '.join(sorted(saved)) or 'none'}; here: {', '.join(mine) or 'none'}"
                + (f"; not in the checkpoint: {', '.join(missing)}" if missing else "")
                + (f"; only in the checkpoint: {', '.join(extra)}" if extra else "")
                + "). Resume with the same preset, every= and collectors (and shadow), or pass strict=False "
                "to load the families both have"
            )
        self.step = int(state["step"])
        for c in self.collectors:
            if c.family in saved:
                c.load_state_dict(saved[c.family])
        if self.engine is not None and state.get("alerts") is not None:
            self.engine.load_state_dict(state["alerts"])
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        if self._open:
            self.begin(self.step)


def sink_list(sinks: Any, owner: str = "Monitor") -> list[Any]:
    """A front-end's ``sinks=`` as a list: ``None``, one sink or a sequence of sinks, each with ``write``,
    ``flush`` and ``close``.

    Raises:
        ConfigError: ``sinks`` is neither (the message starts with ``owner``).
    """
    if sinks is None:
        return []
    if any(callable(getattr(sinks, m, None)) for m in ("write", "flush", "close")):
        sinks = [sinks]  # a single sink
    elif isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
        raise ConfigError(
            f"{owner}: sinks= takes a sink or a list of sinks (e.g. [sw.sinks.JsonlSink('run.jsonl')]), "
            f"got {type(sinks).__name__}"
        )
    out = list(sinks)
    for i, sink in enumerate(out):
        missing = [m for m in ("write", "flush", "close") if not callable(getattr(sink, m, None))]
        if missing:
            raise ConfigError(
                f"{owner}: sinks[{i}] ({type(sink).__name__}) lacks {', '.join(missing)}; a sink "
                "needs write(record), flush() and close()"
            )
    return out
