"""`TensorBoardSink`: stabwatch metrics in TensorBoard event files.

Each metric is one scalar ``add_scalar(key, value, step)`` in a single event file under `log_dir`
(never ``add_scalars``, which makes one folder per key). Alerts are text under the tag
``stabwatch/alerts`` at their step; the monitor configuration is a text table under
``stabwatch/config`` at step 0. View with ``tensorboard --logdir LOG_DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from stabwatch.errors import MissingExtraError, StabwatchError, validated
from stabwatch.metrics import StabilityMetrics
from stabwatch.sinks._keys import LayerKeyPolicy, resolve_policy
from stabwatch.sinks.base import SinkOptions, check_path

__all__ = ["TensorBoardSink"]


class _Options(SinkOptions):
    log_dir: str | os.PathLike[str]
    flush_secs: int = Field(default=30, ge=1)

    @field_validator("log_dir", mode="before")
    @classmethod
    def _check_log_dir(cls, value: Any) -> Any:
        return check_path(value, "folder path")


class TensorBoardSink:
    """Write stabwatch records as TensorBoard scalars.

    Args:
        log_dir: the run folder (created; checked for writability at construction).
        layer_keys: which per-layer keys to write: a `LayerKeyPolicy` or a mode name (default ``"auto"``).
        flush_secs: how often the writer flushes on its own (``flush``/``close`` always do).
        spill_dir: where the dispatcher spills undelivered records.
        close_timeout: how long closing keeps retrying.

    Raises:
        ConfigError: a bad argument (the message names it and what is allowed).
        MissingExtraError: tensorboard is not installed (a `StabwatchError` and an ``ImportError``).
        StabwatchError: `log_dir` cannot be written.

    Example:
        >>> import tempfile, stabwatch as sw
        >>> d = tempfile.mkdtemp()
        >>> sink = sw.sinks.TensorBoardSink(d)
        >>> sink.write(sw.StabilityMetrics(step=0, grad_norm=2.0)); sink.close()
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> acc = EventAccumulator(d); _ = acc.Reload()
        >>> [e.value for e in acc.Scalars("grad/norm")]
        [2.0]
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        layer_keys: LayerKeyPolicy | str | None = None,
        flush_secs: int = 30,
        spill_dir: str | os.PathLike[str] | None = None,
        close_timeout: float = 30.0,
    ) -> None:
        opts = validated(
            _Options,
            "TensorBoardSink",
            log_dir=log_dir,
            flush_secs=flush_secs,
            spill_dir=spill_dir,
            close_timeout=close_timeout,
        )
        self.layer_keys = resolve_policy(layer_keys)
        try:
            import tensorboard  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError(
                "TensorBoardSink needs the tensorboard package: pip install 'stabwatch[tensorboard]'"
            ) from exc
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(opts.log_dir)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StabwatchError(
                f"TensorBoardSink: cannot create log_dir {str(self.log_dir)!r} ({exc.strerror}); "
                "choose a writable folder"
            ) from exc
        if not os.access(self.log_dir, os.W_OK):
            raise StabwatchError(f"TensorBoardSink: log_dir {str(self.log_dir)!r} is not writable")
        self.spill_dir = opts.spill_dir
        self.close_timeout = opts.close_timeout
        self.replay_uri = f"tensorboard://{self.log_dir.absolute()}"
        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir), flush_secs=opts.flush_secs)
        self._head_done = 0  # items of the next batch's head already written

    def log_config(self, params: dict[str, str]) -> None:
        """Write the monitor configuration as a markdown table (tag ``stabwatch/config``, step 0)."""
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self._writer.add_text("stabwatch/config", f"| param | value |\n|---|---|\n{rows}", 0)

    def write(self, record: StabilityMetrics) -> None:
        self.write_batch([record])

    def write_batch(self, records: Sequence[StabilityMetrics]) -> None:
        """Write the records' scalars and alerts in order; a retried batch skips what was written."""
        if self._writer is None:
            raise StabwatchError(f"TensorBoardSink({str(self.log_dir)!r}) is closed")
        items: list[tuple[str, Any, int]] = []
        for record in records:
            items.extend((key, value, record.step) for key, value in self.layer_keys.select(record).items())
            if record.alerts:
                text = "\n\n".join(
                    f"**{a.severity.value}** `{a.rule}`" + (f" [{a.layer}]" if a.layer else "") + f": {a.message}"
                    for a in record.alerts
                )
                items.append(("", text, record.step))
        for i in range(min(self._head_done, len(items)), len(items)):
            key, value, step = items[i]
            if key:
                self._writer.add_scalar(key, value, step)
            else:
                self._writer.add_text("stabwatch/alerts", value, step)
            self._head_done = i + 1
        self._head_done = 0

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file. Idempotent."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoardSink({str(self.log_dir)!r})"
