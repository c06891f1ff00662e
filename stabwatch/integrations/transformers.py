"""`StabwatchCallback`: a `stabwatch.Monitor` inside the Hugging Face ``Trainer``.

The callback is a thin front-end: it decides *when*, the `stabwatch.Monitor` it builds does the rest.

* ``on_train_begin``: builds ``Monitor(model, optimizer)`` from the Trainer's model and the real
  ``torch.optim.Optimizer`` behind Accelerate's ``AcceleratedOptimizer``, restores the monitor's state when
  the Trainer resumes from a checkpoint, attaches the hooks, and adds one forward hook on the top model
  that reads the loss.
* the optimizer step: the monitor's optimizer pre-step hook reads the gradients the optimizer uses, i.e.
  after gradient accumulation, after the Trainer's ``max_grad_norm`` clipping (the Trainer clips before
  ``optimizer.step()``) and, with a ``GradScaler``, unscaled.
* ``on_step_end`` (once per optimizer step): ``monitor.step(loss=...)`` when the optimizer really stepped.
  Record ``step`` equals ``state.global_step`` (the step the Trainer logs this update at), so stabwatch's
  charts line up with the Trainer's in a tracker. An `stabwatch.InstabilityError` (``raise_on=`` or an
  ``on_alert`` callback that raises it) sets ``control.should_training_stop`` and is logged; it never
  reaches the Trainer.
* ``on_save``: ``monitor.state_dict()`` goes to ``<checkpoint>/stabwatch_monitor.pt`` (``torch.save``;
  loadable with ``torch.load(weights_only=True)``).
* ``on_train_end``: hooks removed, sinks flushed and closed.

``import stabwatch`` never imports ``transformers``; this module does, and raises
`stabwatch.errors.MissingExtraError` naming ``pip install "stabwatch[huggingface]"`` when it is missing.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from stabwatch.alerts.actions import parse_raise_on
from stabwatch.errors import ConfigError, InstabilityError, MissingExtraError, StabwatchError, validated
from stabwatch.metrics import Alert, StabilityMetrics
from stabwatch.monitor import Monitor, MonitorConfig
from stabwatch.pipeline import sink_list

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError(
        'stabwatch.integrations.transformers needs the Hugging Face Trainer: pip install "stabwatch[huggingface]" '
        f"({_exc})"
    ) from _exc

__all__ = ["STATE_FILE", "StabwatchCallback"]

log = logging.getLogger("stabwatch")

#: the file, inside each ``checkpoint-<global_step>`` folder, that holds ``Monitor.state_dict()``
STATE_FILE = "stabwatch_monitor.pt"


class StabwatchCallback(TrainerCallback):
    """Monitor a Hugging Face ``Trainer`` run with stabwatch: one `StabilityMetrics` record per optimizer step.

    Pass it to the Trainer; it attaches a `stabwatch.Monitor` when training begins and closes it when
    training ends::

        cb = StabwatchCallback(sinks=[sw.sinks.JsonlSink("run.jsonl")], raise_on="critical")
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
        trainer.train()
        print(cb.diagnose())

    What is measured, and when:

    * **gradients**: the ones the optimizer uses, read in the optimizer's pre-step hook: summed over the
      ``gradient_accumulation_steps`` micro-batches, clipped to ``max_grad_norm`` (so ``grad/norm`` is at
      most ``max_grad_norm``; the Trainer's own logged ``grad_norm`` is the norm *before* clipping), unscaled
      under fp16 with a ``GradScaler``, in the parameters' dtype (fp32 master weights under ``bf16=True``).
    * **loss** (``loss/value``): the loss of the optimizer step as the Trainer logs it with
      ``logging_steps=1``: the model's ``outputs.loss`` of each training micro-batch (read by a forward hook
      on the top model, detached, kept on the device: no host sync per micro-batch), summed when the
      Trainer normalised it over the accumulated batch (the model got ``num_items_in_batch``), else averaged
      over the micro-batches. No loss is recorded when the model does not return one (a
      ``compute_loss_func`` or label smoothing computes it outside the model).
    * **steps**: one record per optimizer step, numbered like the Trainer: ``record.step ==
      state.global_step`` after the update (the first record is step 1). Schedules (``every=``,
      ``log_every=``) count the same steps, so ``log_every=10`` emits at global steps 10, 20, … like
      ``logging_steps=10``. An optimizer step that did not happen (fp16 ``GradScaler`` skipped it) makes
      no record.

    Stopping: with ``raise_on="critical"`` (or ``"warning"``), or an ``on_alert`` callback that raises
    `stabwatch.InstabilityError`, the callback sets ``control.should_training_stop`` and logs the alerts on the
    ``stabwatch`` logger; the Trainer ends the run normally (``on_train_end``, final logs) and no exception
    escapes.

    Checkpoints: on every Trainer save, ``Monitor.state_dict()`` (step counter, alert windows, collector
    state) is written with ``torch.save`` to ``<output_dir>/checkpoint-<global_step>/stabwatch_monitor.pt``
    (main process only); ``trainer.train(resume_from_checkpoint=...)`` loads it back, so alert windows and
    step numbers continue. The Trainer's ``ExportableState`` mechanism is not used: it rebuilds a callback
    from JSON constructor arguments, which cannot hold sinks, rules or callables.

    Distributed (DDP): every process runs a monitor (after the all-reduce the gradients are the same on
    every rank), the loss is averaged over the ranks, records go to the sinks on rank 0 only
    (``all_ranks=True`` sends them everywhere), and a stop decided on rank 0 stops every rank at the same
    step (the monitor broadcasts rank 0's decision, only when ``raise_on`` or ``on_alert`` is set).

    A ``Trainer.train()`` that raises never reaches ``on_train_end``: call `close` (or use the callback as
    a context manager around ``trainer.train()``) to remove the hooks at once; otherwise they are removed at
    the next ``on_train_begin`` and the sinks are flushed at interpreter exit.

    Args:
        sinks: where records go: a sink or a list of sinks (`stabwatch.sinks`).
        preset / every / log_every: see `stabwatch.monitor.MonitorConfig`.
        alerts: ``True`` for the default rules, ``False``/``None`` for none, or a list of rules / an
            `stabwatch.alerts.AlertEngine`.
        collectors: configured `stabwatch.collectors.Collector` instances (see `stabwatch.Monitor`).
        on_alert: a callable ``fn(alert)`` (or a list of them), called for every alert; raising
            `stabwatch.InstabilityError` from it stops training.
        raise_on: ``"critical"`` (or ``True``) / ``"warning"``: stop training when an alert of that
            severity or worse fires; ``None`` (default) never stops.
        guard: ``True`` or a `stabwatch.alerts.StepGuard`: undo optimizer steps with non-finite or
            spiking gradients.
        all_ranks: send records to the sinks on every process, not only the main one.
        **monitor_options: further `stabwatch.Monitor` options (``max_records``, ``per_layer``, ``seed``,
            ``shadow``).

    Raises:
        ConfigError: a bad option (raised here, before training starts).

    Example:
        >>> cb = StabwatchCallback(preset="cheap", raise_on="critical")
        >>> cb.monitor is None, len(cb.records)
        (True, 0)
    """

    def __init__(
        self,
        *,
        sinks: Any = (),
        preset: str = "default",
        every: dict[str, Any] | None = None,
        alerts: Any = True,
        collectors: Iterable[Any] = (),
        on_alert: Any = None,
        raise_on: Any = None,
        guard: Any = False,
        log_every: int = 1,
        all_ranks: bool = False,
        **monitor_options: Any,
    ) -> None:
        unknown = sorted(set(monitor_options) - set(MonitorConfig.model_fields) - {"shadow"})
        if unknown:
            allowed = ", ".join(sorted({*MonitorConfig.model_fields, "shadow"} - {"preset", "every", "log_every"}))
            raise ConfigError(f"StabwatchCallback: unknown option(s) {', '.join(unknown)}; allowed: {allowed}")
        if every is not None and not isinstance(every, dict):
            raise ConfigError(f"StabwatchCallback: every= must be a dict {{family: period}}, got {every!r}")
        config = {k: v for k, v in monitor_options.items() if k != "shadow"}
        validated(
            MonitorConfig, "StabwatchCallback", preset=preset, every=dict(every or {}), log_every=log_every, **config
        )
        parse_raise_on(raise_on)
        self._sinks = sink_list(sinks, "StabwatchCallback")
        self._options: dict[str, Any] = {
            "preset": preset,
            "every": dict(every or {}),
            "alerts": alerts,
            "collectors": list(collectors),
            "on_alert": on_alert,
            "raise_on": raise_on,
            "guard": guard,
            "log_every": log_every,
            **monitor_options,
        }
        self._all_ranks = bool(all_ranks)
        #: the monitor of the current (or last) ``train()`` call; ``None`` before training begins
        self.monitor: Monitor | None = None
        self._hook: Any = None
        self._seen_optimizer_steps = 0
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._loss_summed = False
        self._loss_factor = 1.0

    # results ---------------------------------------------------------------------------------------
    @property
    def records(self) -> collections.deque[StabilityMetrics]:
        """The monitor's kept records (empty before training begins)."""
        return self.monitor.records if self.monitor is not None else collections.deque()

    @property
    def alerts(self) -> collections.deque[Alert]:
        """The alerts raised so far in this run."""
        return self.monitor.alerts if self.monitor is not None else collections.deque()

    def diagnose(self) -> str:
        """A readable summary of the run: trends, alerts, likely causes, what to try."""
        if self.monitor is None:
            return "stabwatch: no training run was monitored yet (StabwatchCallback attaches in on_train_begin)"
        return self.monitor.diagnose()

    # lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> StabwatchCallback:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and flush/close the sinks. Idempotent; called by ``on_train_end``."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._reset_loss()
        if self.monitor is not None:
            try:
                self.monitor.close()
            except Exception as exc:  # noqa: BLE001 - monitoring never kills training
                log.warning("stabwatch: closing the monitor failed (%s: %s)", type(exc).__name__, exc)

    # Trainer events --------------------------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> Any:
        self.close()  # a monitor a previous train() left attached when it raised
        try:
            self._begin(args, state, model, optimizer)
        except Exception as exc:  # noqa: BLE001 - training goes on unmonitored
            log.error(
                "stabwatch: could not attach to the Trainer (%s: %s); training goes on without monitoring",
                type(exc).__name__,
                exc,
            )
            self.close()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        mon = self.monitor
        if mon is None or self._hook is None:
            return control
        stop = False
        try:
            if mon.optimizer_steps != self._seen_optimizer_steps:
                self._seen_optimizer_steps = mon.optimizer_steps
                loss = self._take_loss()
                try:
                    mon.step(loss=loss)
                except InstabilityError as exc:
                    stop = True
                    self._log_stop(state.global_step, exc)
            self._reset_loss()  # a step the optimizer skipped leaves no loss behind
            if mon.current_step != state.global_step + 1:  # e.g. after a skipped step: keep numbering aligned
                _set_step(mon, state.global_step + 1)
        except Exception as exc:  # noqa: BLE001 - monitoring never kills training
            log.warning("stabwatch: step %d not recorded (%s: %s)", state.global_step, type(exc).__name__, exc)
        if stop:
            control.should_training_stop = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        mon = self.monitor
        if mon is None or not getattr(args, "should_save", True):
            return control
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        try:
            if not os.path.isdir(folder):
                log.warning("stabwatch: checkpoint folder %s not found; monitor state not saved", folder)
                return control
            torch.save(mon.state_dict(), os.path.join(folder, STATE_FILE))
        except Exception as exc:  # noqa: BLE001
            log.warning("stabwatch: could not save the monitor state in %s (%s: %s)", folder, type(exc).__name__, exc)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.close()
        return control

    # internals -------------------------------------------------------------------------------------
    def _begin(self, args: Any, state: Any, model: Any, optimizer: Any) -> None:
        if not isinstance(model, torch.nn.Module):
            raise StabwatchError(f"the Trainer passed no model to on_train_begin (got {type(model).__name__})")
        if getattr(args, "deepspeed", None):
            raise StabwatchError(
                "DeepSpeed steps its own optimizer (ZeRO partitions the gradients); it is not supported"
            )
        # under torch.distributed the monitor sends to the sinks on rank 0 only (unless all_ranks)
        mon = Monitor(model, _torch_optimizer(optimizer), sinks=self._sinks, all_ranks=self._all_ranks, **self._options)
        self.monitor = mon
        saved = _load_checkpoint_state(args, state) if state.global_step > 0 else None
        if saved is not None:
            try:
                mon.load_state_dict(saved)
            except Exception as exc:  # noqa: BLE001 - a state that does not fit costs the alert windows only
                log.warning(
                    "stabwatch: the saved monitor state does not fit (%s: %s); starting fresh", type(exc).__name__, exc
                )
                saved = None
        if mon.current_step != state.global_step + 1:
            if saved is not None:
                log.warning(
                    "stabwatch: the saved monitor state is at step %d, the Trainer resumes at %d; using the Trainer's",
                    mon.current_step - 1,
                    state.global_step,
                )
            _set_step(mon, state.global_step + 1)
        mon.start()
        self._seen_optimizer_steps = mon.optimizer_steps
        self._reset_loss()
        world = int(getattr(args, "world_size", 1) or 1)
        self._loss_factor = float(world) if world > 1 and getattr(args, "average_tokens_across_devices", False) else 1.0
        self._hook = model.register_forward_hook(self._capture_loss, with_kwargs=True)

    def _capture_loss(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        """Forward hook on the top model: keep this training micro-batch's loss (detached, on its device)."""
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation and generation passes
        try:
            loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
            if not isinstance(loss, torch.Tensor):
                return
            value = loss.detach().float().mean()
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1
            # the Trainer passes num_items_in_batch when the model normalises its loss over the whole
            # accumulated batch: the step's loss is then the sum over micro-batches
            self._loss_summed = kwargs.get("num_items_in_batch") is not None
        except Exception as exc:  # noqa: BLE001
            log.debug("stabwatch: could not read the loss (%s)", exc)

    def _take_loss(self) -> torch.Tensor | None:
        if self._loss_sum is None or self._loss_count == 0:
            return None
        if self._loss_summed:
            return self._loss_sum * self._loss_factor
        return self._loss_sum / self._loss_count

    def _reset_loss(self) -> None:
        self._loss_sum = None
        self._loss_count = 0

    def _log_stop(self, global_step: int, exc: InstabilityError) -> None:
        text = str(exc)
        latest = self.monitor.records[-1] if self.monitor is not None and self.monitor.records else None
        if not exc.alerts and latest is not None and latest.alerts:
            text += "\n" + "\n".join(f"  {a}" for a in latest.alerts)
        log.error("stabwatch: stopping the Trainer at global step %d: %s", global_step, text)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that really steps: Accelerate's ``AcceleratedOptimizer`` (itself an
    ``Optimizer`` subclass that delegates) keeps it in ``.optimizer``."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise StabwatchError(
            f"the Trainer's optimizer is a {type(optimizer).__name__}, not a torch.optim.Optimizer, so its step "
            "cannot be hooked"
        )
    return optimizer


def _set_step(monitor: Monitor, step: int) -> None:
    """Number the monitor's next record ``step`` (through its public state round trip)."""
    state = monitor.state_dict()
    state["step"] = step
    monitor.load_state_dict(state)


def _load_checkpoint_state(args: Any, state: Any) -> dict[str, Any] | None:
    """The monitor state saved in the checkpoint the Trainer resumes from, or ``None`` (logged)."""
    folders = []
    explicit = getattr(args, "resume_from_checkpoint", None)
    if isinstance(explicit, str):
        folders.append(explicit)
    folders.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
    for folder in folders:
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            try:
                saved: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a bad file costs the alert windows, not the run
                log.warning(
                    "stabwatch: could not read %s (%s: %s); alert windows start empty", path, type(exc).__name__, exc
                )
                return None
            log.info("stabwatch: monitor state restored from %s", path)
            return saved
    log.warning(
        "stabwatch: resuming at global step %d without a saved monitor state (looked for %s in %s); "
        "alert windows start empty",
        state.global_step,
        STATE_FILE,
        ", ".join(folders),
    )
    return None
