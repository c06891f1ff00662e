"""`StabwatchCallback`: a `stabwatch.Monitor` inside a PyTorch Lightning ``Trainer``.

The callback is a thin front-end: it decides *when*, the `stabwatch.Monitor` it builds does the rest.

* ``on_fit_start`` (after Lightning configured the optimizers and restored a checkpoint): builds
  ``Monitor(pl_module, optimizer)`` with the real ``torch.optim.Optimizer`` (``trainer.optimizers[i]``, not
  the ``LightningOptimizer`` wrapper), applies the monitor state a checkpoint brought, attaches the hooks.
* the optimizer step: Lightning calls ``optimizer.step(closure)``; the monitor reads the gradients right
  after the closure's first call, which in Lightning runs ``training_step``, ``backward``, the
  ``GradScaler`` unscale and ``gradient_clip_val`` clipping: the gradients measured are the ones the
  optimizer uses (summed over ``accumulate_grad_batches`` micro-batches, unscaled, clipped).
* ``on_train_batch_end``: when the monitored optimizer stepped since the last record,
  ``monitor.step(loss=...)`` makes one record (micro-batches of a gradient-accumulation window make none).
  An `stabwatch.InstabilityError` (``raise_on=`` or an ``on_alert`` callback that raises it) sets
  ``trainer.should_stop`` and is logged; it never reaches Lightning.
* ``state_dict`` / ``load_state_dict``: the monitor's state rides in Lightning checkpoints.
* ``on_fit_end`` / ``on_exception`` / ``teardown``: hooks removed, sinks flushed and closed.

``import stabwatch`` never imports Lightning; this module does, and raises
`stabwatch.errors.MissingExtraError` naming ``pip install "stabwatch[lightning]"`` when it is missing.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from typing import Any

import torch

from stabwatch.alerts.actions import parse_raise_on
from stabwatch.errors import ConfigError, InstabilityError, MissingExtraError, StabwatchError, validated
from stabwatch.metrics import Alert, StabilityMetrics
from stabwatch.monitor import Monitor, MonitorConfig
from stabwatch.pipeline import sink_list

try:
    import lightning.pytorch as pl
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError(
        f'stabwatch.integrations.lightning needs PyTorch Lightning: pip install "stabwatch[lightning]" ({_exc})'
    ) from _exc

__all__ = ["StabwatchCallback"]

log = logging.getLogger("stabwatch")


class StabwatchCallback(pl.Callback):
    """Monitor a Lightning ``Trainer.fit`` with stabwatch: one `StabilityMetrics` record per optimizer step.

    Pass it to the Trainer; it attaches a `stabwatch.Monitor` when fit starts and closes it when fit ends
    (also when fit raised)::

        cb = StabwatchCallback(sinks=[sw.sinks.JsonlSink("run.jsonl")], raise_on="critical")
        trainer = L.Trainer(max_epochs=3, callbacks=[cb])
        trainer.fit(model, train_loader)
        print(cb.diagnose())

    What is measured, and when:

    * **gradients**: the ones the optimizer uses, read after the closure Lightning passes to
      ``optimizer.step`` ran: summed over the ``accumulate_grad_batches`` micro-batches (each scaled by
      ``1/accumulate_grad_batches``, as Lightning does), unscaled under ``precision="16-mixed"`` (the
      ``GradScaler``'s ``unscale_`` runs before), clipped by ``gradient_clip_val``. Under manual
      optimization, what ``opt.step()`` sees (after your ``self.clip_gradients``).
    * **loss** (``loss/value``): the loss ``training_step`` returned, averaged over the micro-batches of
      the optimizer step (their mean, whatever ``accumulate_grad_batches`` is). Lightning hands
      ``on_train_batch_end`` that loss divided by ``accumulate_grad_batches`` (``outputs["loss"]``); the
      callback multiplies it back. Under manual optimization, the loss ``training_step`` returned (a
      tensor, or the ``"loss"`` entry of a dict), averaged over the batches since the last step.
    * **one record per optimizer step**, made in ``on_train_batch_end`` when the monitored optimizer's
      step count advanced. A step the ``GradScaler`` skipped (inf/NaN gradients under fp16) makes no
      record and its losses are dropped. Record ``step`` counts the monitored optimizer's steps; it
      continues after a resume from a checkpoint written with this callback.

    One optimizer is monitored: ``trainer.optimizers[optimizer_index]``. With several (a GAN), make one
    callback per optimizer.

    Stopping: with ``raise_on="critical"`` (or ``"warning"``), or an ``on_alert`` callback that raises
    `stabwatch.InstabilityError`, the monitor's error is caught, its message logged (rank 0, logger
    ``stabwatch``, WARNING) and ``trainer.should_stop`` set; Lightning ends fit after the current batch
    (respecting ``min_steps``/``min_epochs``). Under DDP rank 0 decides: the monitor broadcasts its
    decision, so every rank stops at the same step. Any other failure of the monitor during training is
    logged once and training goes on.

    Args:
        sinks / preset / every / alerts / collectors / on_alert / raise_on / guard / **monitor_options:
            passed to `stabwatch.Monitor` (``log_every``, ``max_records``, ``per_layer``, ``seed``).
            ``raise_on`` stops training instead of raising (see above); default ``None``.
        shadow: a `stabwatch.Shadow`; it gets each step's batch (as ``on_train_batch_end`` sees it, on the
            device). Refused under ``accumulate_grad_batches > 1``: the step spans several batches.
        log_to_trainer: also send each record's flat metrics (``grad/norm``, ``loss/value``, ...) to the
            trainer's own loggers (``logger.log_metrics(metrics, step=record.step)``, rank 0 only).
        optimizer_index: which of ``trainer.optimizers`` to monitor.

    Raises:
        ConfigError: a bad option (at construction), or a ``shadow`` under gradient accumulation or an
            ``optimizer_index`` the module has no optimizer for (at fit start).

    Example:
        >>> import torch, lightning.pytorch as L
        >>> class Reg(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__(); self.net = torch.nn.Linear(4, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch; return torch.nn.functional.mse_loss(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
        >>> cb = StabwatchCallback(preset="cheap")
        >>> trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[cb], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Reg(), torch.utils.data.DataLoader(data, batch_size=2))
        >>> [r.step for r in cb.records], cb.records[-1].grad_norm > 0
        ([0, 1, 2, 3], True)
    """

    def __init__(
        self,
        *,
        sinks: Any = (),
        preset: str = "default",
        every: dict[str, Any] | None = None,
        alerts: Any = True,
        collectors: Any = (),
        shadow: Any = None,
        on_alert: Any = None,
        raise_on: Any = None,
        guard: Any = False,
        log_to_trainer: bool = False,
        optimizer_index: int = 0,
        **monitor_options: Any,
    ) -> None:
        super().__init__()
        # fail at construction, not when fit starts: the Monitor repeats these checks with the model
        if every is not None and not isinstance(every, dict):
            raise ConfigError(
                f"StabwatchCallback: every= must be a dict {{family: period}}, got {type(every).__name__}"
            )
        validated(MonitorConfig, "StabwatchCallback", preset=preset, every=dict(every or {}), **monitor_options)
        parse_raise_on(raise_on)
        if not isinstance(log_to_trainer, bool):
            raise ConfigError(f"StabwatchCallback: log_to_trainer must be True or False, got {log_to_trainer!r}")
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ConfigError(f"StabwatchCallback: optimizer_index must be an int >= 0, got {optimizer_index!r}")
        self._monitor_kwargs: dict[str, Any] = dict(
            sinks=sink_list(sinks, "StabwatchCallback"),
            preset=preset,
            every=every,
            alerts=alerts,
            collectors=list(collectors),
            shadow=shadow,
            on_alert=on_alert,
            raise_on=raise_on,
            guard=guard,
            **monitor_options,
        )
        self.log_to_trainer = log_to_trainer
        self.optimizer_index = optimizer_index
        #: the message of the alert(s) that stopped training, or ``None``
        self.stop_reason: str | None = None
        self._monitor: Monitor | None = None
        self._pending_state: dict[str, Any] | None = None  # from a checkpoint loaded before fit started
        self._seen_steps = 0  # monitor.optimizer_steps at the last record
        self._losses: list[torch.Tensor] = []  # micro-batch losses of the optimizer step in progress
        self._batches = 0  # training batches since the last record
        self._automatic = True
        self._accumulate = 1
        self._failed = False
        self._logger_failed: set[int] = set()
        self._open = False
        self._paused: list[Any] = []  # collectors whose module hooks are off during validation

    # ------------------------------------------------------------------------------------ results
    @property
    def monitor(self) -> Monitor:
        """The `stabwatch.Monitor` of the current (or last) fit.

        Raises:
            StabwatchError: no fit has started yet.
        """
        if self._monitor is None:
            raise StabwatchError("StabwatchCallback.monitor: no fit has started yet; call trainer.fit(...) first")
        return self._monitor

    @property
    def records(self) -> collections.deque[StabilityMetrics]:
        """The records kept in memory (the last ``max_records``); empty before fit."""
        return self._monitor.records if self._monitor is not None else collections.deque()

    @property
    def alerts(self) -> collections.deque[Alert]:
        """The alerts raised so far; empty before fit."""
        return self._monitor.alerts if self._monitor is not None else collections.deque()

    def diagnose(self) -> str:
        """A readable summary of the run so far (see `stabwatch.Monitor.diagnose`)."""
        if self._monitor is not None:
            return self._monitor.diagnose()
        from stabwatch.diagnosis import diagnose

        return diagnose([], [])

    # ------------------------------------------------------------------------------------ lifecycle
    @property
    def state_key(self) -> str:
        return self._generate_state_key(optimizer_index=self.optimizer_index)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._monitor is not None:
            raise StabwatchError(
                "StabwatchCallback: this callback already watched a fit and closed its sinks; use a new "
                "StabwatchCallback for each fit (new.load_state_dict(old.state_dict()) continues the step count)"
            )
        optimizers = list(trainer.optimizers)
        if optimizers and self.optimizer_index >= len(optimizers):
            raise ConfigError(
                f"StabwatchCallback: optimizer_index={self.optimizer_index} but "
                f"{type(pl_module).__name__}.configure_optimizers gave {len(optimizers)} optimizer(s)"
            )
        optimizer = optimizers[self.optimizer_index] if optimizers else None
        inner = getattr(optimizer, "optimizer", None)  # a LightningOptimizer wraps the torch one
        optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        self._automatic = bool(pl_module.automatic_optimization)
        self._accumulate = int(trainer.accumulate_grad_batches)
        if self._monitor_kwargs["shadow"] is not None and self._automatic and self._accumulate > 1:
            raise ConfigError(
                f"StabwatchCallback: shadow= needs one batch per optimizer step, but accumulate_grad_batches="
                f"{self._accumulate}; train the shadow without gradient accumulation or drop shadow="
            )
        monitor = Monitor(pl_module, optimizer, **self._monitor_kwargs)
        if self._pending_state is not None:
            fresh = monitor.state_dict()
            try:
                monitor.load_state_dict(self._pending_state)
            except Exception as exc:  # noqa: BLE001 - a resume is never blocked by the monitor's state
                log.warning(
                    "stabwatch: the checkpoint's monitor state could not be applied (%s: %s); the monitor starts "
                    "fresh at step 0",
                    type(exc).__name__,
                    exc,
                )
                monitor.load_state_dict(fresh)
            self._pending_state = None
        self._monitor = monitor.start()
        self._open = True
        self._seen_steps = monitor.optimizer_steps
        self._losses, self._batches = [], 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._monitor is not None and self._open:
            self._step(trainer, self._monitor, outputs, batch)

    def _step(self, trainer: pl.Trainer, mon: Monitor, outputs: Any, batch: Any) -> None:
        loss = _batch_loss(outputs)
        if loss is not None:
            # automatic optimization hands over training_step's loss divided by accumulate_grad_batches
            scaled = self._automatic and self._accumulate > 1
            self._losses.append(loss.detach() * self._accumulate if scaled else loss.detach())
        self._batches += 1
        if mon.optimizer is not None and mon.optimizer_steps == self._seen_steps:
            if self._automatic and self._batches >= self._accumulate:
                # the window is over but the optimizer did not step (GradScaler found inf/NaN): no record
                self._losses, self._batches = [], 0
            return
        self._seen_steps = mon.optimizer_steps
        losses, self._losses, self._batches = self._losses, [], 0
        step_loss = _mean(losses)
        step = mon.current_step
        stop: InstabilityError | None = None
        record: StabilityMetrics | None = None
        try:
            record = mon.step(loss=step_loss, batch=batch if mon.shadow is not None else None)
        except InstabilityError as exc:
            stop = exc
            record = next((r for r in reversed(mon.records) if r.step == step), None)
        except Exception as exc:  # noqa: BLE001 - monitoring never kills training
            if not self._failed:
                self._failed = True
                log.warning(
                    "stabwatch: recording step %d failed (%s: %s); training goes on, further failures are not logged",
                    step,
                    type(exc).__name__,
                    exc,
                )
        if record is not None and self.log_to_trainer and trainer.is_global_zero:
            metrics = record.to_dict()
            for logger in trainer.loggers:
                try:
                    logger.log_metrics(metrics, step=record.step)
                except Exception as exc:  # noqa: BLE001 - a trainer logger never stops training either
                    if id(logger) not in self._logger_failed:
                        self._logger_failed.add(id(logger))
                        log.warning(
                            "stabwatch: %s.log_metrics failed at step %d (%s: %s); further failures are not logged",
                            type(logger).__name__,
                            step,
                            type(exc).__name__,
                            exc,
                        )
        if stop is not None:
            self._stop(trainer, stop)

    def _stop(self, trainer: pl.Trainer, error: InstabilityError) -> None:
        """Ask Lightning to stop. Under DDP the monitor's pipeline already made every rank raise at the
        same step (rank 0 decides and broadcasts), so every rank sets ``should_stop`` together."""
        first = self.stop_reason is None
        self.stop_reason = str(error)
        trainer.should_stop = True
        if first and trainer.is_global_zero:
            log.warning("stabwatch: stopping training (trainer.should_stop = True): %s", self.stop_reason)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validation forwards (the sanity check, val_check_interval) are not training: take the collectors'
        # module hooks off, so activation or spiking statistics describe training batches only
        if self._monitor is not None and self._open:
            self._paused = [c for c in self._monitor.collectors if c.suspend_hooks()]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        paused, self._paused = self._paused, []
        if self._open:
            for c in paused:
                c.resume_hooks()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._monitor is None or not self._open:
            return
        self._open = False
        try:
            self._monitor.close()
        except Exception as exc:  # noqa: BLE001 - closing never hides the training's own outcome
            log.warning("stabwatch: closing the monitor failed (%s: %s)", type(exc).__name__, exc)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"monitor": Monitor.state_dict()}`` (what Lightning stores in the checkpoint); ``{}`` before fit."""
        if self._monitor is not None:
            return {"monitor": self._monitor.state_dict()}
        if self._pending_state is not None:
            return {"monitor": self._pending_state}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the monitor state of a checkpoint; it is applied when the monitor is built at fit start."""
        state = state_dict.get("monitor")
        if state is None:
            return
        if self._monitor is not None:
            self._monitor.load_state_dict(state)
        else:
            self._pending_state = state

    def __repr__(self) -> str:
        inner = repr(self._monitor) if self._monitor is not None else "not started"
        return f"StabwatchCallback(optimizer_index={self.optimizer_index}, {inner})"


def _batch_loss(outputs: Any) -> torch.Tensor | None:
    """The training-step loss in what ``on_train_batch_end`` gets (Lightning's un-normalised, detached copy)."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return outputs if isinstance(outputs, torch.Tensor) and outputs.numel() == 1 else None


def _mean(losses: list[torch.Tensor]) -> torch.Tensor | None:
    """The mean of the micro-batch losses, on the device (no host sync)."""
    if not losses:
        return None
    if len(losses) == 1:
        return losses[0]
    return torch.stack([x.reshape(()).float() for x in losses]).mean()
