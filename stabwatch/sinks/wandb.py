"""`WandbSink`: stabwatch metrics in a Weights & Biases run.

What goes where:

* the monitor configuration → ``run.config["stabwatch"]``;
* each record → one ``run.log`` row holding its metrics plus ``stabwatch/step = record.step``; every
  stabwatch key is declared with ``define_metric(key, step_metric="stabwatch/step")``, so W&B plots it
  against stabwatch's own step and the user's own ``wandb.log`` calls and steps are left alone;
* alerts → ``run.alert`` (level INFO/WARN/ERROR from the severity), at most once per rule and layer per
  `alert_cooldown_s` seconds; in offline mode W&B stores them in the run file.

Works in ``mode="offline"`` (no network; ``wandb sync`` uploads later) and ``"disabled"``.

Caveat: W&B numbers rows with its own ``_step``, and every ``log`` call adds a row. If you also call
``wandb.log(..., step=N)`` with explicit steps, W&B drops rows whose ``step`` is below its current
``_step``; log your own metrics without ``step=`` (or against your own step metric with
``define_metric``), as you would with any second logger.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from stabwatch.errors import MissingExtraError, StabwatchError, validated
from stabwatch.metrics import Severity, StabilityMetrics
from stabwatch.sinks._keys import LayerKeyPolicy, resolve_policy
from stabwatch.sinks.base import SinkOptions

__all__ = ["WandbSink"]

log = logging.getLogger("stabwatch")

_LEVELS = {Severity.INFO: "INFO", Severity.WARNING: "WARN", Severity.CRITICAL: "ERROR"}


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise MissingExtraError("WandbSink needs the wandb package: pip install 'stabwatch[wandb]'") from exc
    return wandb


class _Options(SinkOptions):
    project: str | None = Field(default=None, min_length=1)
    mode: Literal["online", "offline", "disabled", "shared"] | None = None
    step_metric: str = Field(default="stabwatch/step", min_length=1)
    alert_cooldown_s: float = Field(default=300.0, ge=0.0, allow_inf_nan=False)


class WandbSink:
    """Log stabwatch records to W&B.

    Uses `run` if given, else the active ``wandb.run``, else ``wandb.init(project=..., mode=...,
    **init_kwargs)`` — and finishes only a run it started.

    Args:
        project: W&B project of a run the sink starts.
        mode: ``"online"``, ``"offline"``, ``"disabled"`` or ``None`` (W&B's default / ``WANDB_MODE``).
        run: an existing run to log into.
        layer_keys: which per-layer keys to send: a `LayerKeyPolicy` or a mode name (default ``"auto"``).
        step_metric: name of stabwatch's step metric.
        alert_cooldown_s: minimum seconds between two ``run.alert`` calls of the same rule and layer.
        spill_dir: where the dispatcher spills undelivered records.
        close_timeout: how long closing keeps retrying.
        **init_kwargs: passed to ``wandb.init`` (``name``, ``dir``, ``id``, ``resume``, ``settings`` ...).

    Raises:
        ConfigError: a bad argument (the message names it and what is allowed).
        MissingExtraError: wandb is not installed (a `StabwatchError` and an ``ImportError``).
        StabwatchError: ``wandb.init`` failed, or ``dir`` cannot be written.
    """

    def __init__(
        self,
        project: str | None = None,
        mode: str | None = None,
        run: Any = None,
        *,
        layer_keys: LayerKeyPolicy | str | None = None,
        step_metric: str = "stabwatch/step",
        alert_cooldown_s: float = 300.0,
        spill_dir: str | os.PathLike[str] | None = None,
        close_timeout: float = 30.0,
        **init_kwargs: Any,
    ) -> None:
        opts = validated(
            _Options,
            "WandbSink",
            project=project,
            mode=mode,
            step_metric=step_metric,
            alert_cooldown_s=alert_cooldown_s,
            spill_dir=spill_dir,
            close_timeout=close_timeout,
        )
        self.layer_keys = resolve_policy(layer_keys)
        wandb = _import_wandb()
        if "dir" in init_kwargs and init_kwargs["dir"] is not None:
            folder = str(init_kwargs["dir"])
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise StabwatchError(f"WandbSink dir {folder!r} cannot be created ({exc.strerror})") from exc
            if not os.access(folder, os.W_OK):
                raise StabwatchError(f"WandbSink dir {folder!r} is not writable; pass dir=... elsewhere")
        self.step_metric = opts.step_metric
        self.alert_cooldown_s = opts.alert_cooldown_s
        self.spill_dir = opts.spill_dir
        self.close_timeout = opts.close_timeout
        self._owns_run = False
        if run is None and wandb.run is not None:
            run = wandb.run
        if run is None:
            try:
                run = wandb.init(project=project, mode=mode, **init_kwargs)
            except Exception as exc:
                raise StabwatchError(
                    f"WandbSink: wandb.init(project={project!r}, mode={mode!r}) failed "
                    f"({type(exc).__name__}: {exc}); run `wandb login`, or use mode='offline'"
                ) from exc
            self._owns_run = True
        self.run = run
        self.run.define_metric(self.step_metric, hidden=True)
        self._defined: set[str] = set()
        self._head_done = 0  # records of the next batch's head already logged
        self._last_alert: dict[tuple[str, str | None], float] = {}
        self._closed = False
        project_name = getattr(run, "project", None) or project or ""
        mode_q = f"&mode={mode}" if mode else ""
        self.replay_uri = f"wandb://{project_name}?run_id={getattr(run, 'id', '')}{mode_q}"

    def log_config(self, params: dict[str, str]) -> None:
        """Store the monitor configuration in ``run.config["stabwatch"]``."""
        self.run.config.update({"stabwatch": dict(params)}, allow_val_change=True)

    def write(self, record: StabilityMetrics) -> None:
        self.write_batch([record])

    def write_batch(self, records: Sequence[StabilityMetrics]) -> None:
        """One ``run.log`` row per record, in order; a retried batch skips the rows already logged."""
        if self._closed:
            raise StabwatchError("WandbSink is closed")
        for i in range(min(self._head_done, len(records)), len(records)):
            record = records[i]
            data: dict[str, Any] = self.layer_keys.select(record)
            for key in data:
                if key not in self._defined:
                    self.run.define_metric(key, step_metric=self.step_metric)
                    self._defined.add(key)
            data[self.step_metric] = record.step
            self.run.log(data)
            self._head_done = i + 1
            for alert in record.alerts:
                self._alert(alert)
        self._head_done = 0

    def _alert(self, alert: Any) -> None:
        key = (alert.rule, alert.layer)
        now = time.monotonic()
        last = self._last_alert.get(key)
        if last is not None and now - last < self.alert_cooldown_s:
            return
        self._last_alert[key] = now
        text = alert.message + (f"\nSuggestion: {alert.suggestion}" if alert.suggestion else "")
        try:
            self.run.alert(
                title=f"stabwatch: {alert.rule}"[:63],
                text=f"step {alert.step}: {text}",
                level=_LEVELS.get(alert.severity, "WARN"),
                wait_duration=self.alert_cooldown_s,
            )
        except Exception as exc:  # noqa: BLE001 - an alert that cannot be sent must not repeat the row
            log.warning("stabwatch: WandbSink could not send alert %s: %s", alert.rule, exc)

    def flush(self) -> None:
        """Rows are handed to W&B's own background process at `write`; nothing to do."""

    def close(self) -> None:
        """Finish the run if the sink started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_run:
            self.run.finish()

    def __repr__(self) -> str:
        return f"WandbSink(run={getattr(self.run, 'id', None)!r})"
