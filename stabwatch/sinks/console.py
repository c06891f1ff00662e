"""`ConsoleSink`: a compact line per record (and every alert, once) on a stream, in step order.

Records reach a sink in step order (the dispatcher hands them to each sink in turn, from one writer
thread), so the per-step lines and the alerts they carry come out in step order too. Each line goes
through ``tqdm.write`` when tqdm is installed: an active progress bar on the same terminal is cleared,
the line printed, the bar redrawn, so no stale copies of the bar are left behind; on a stream that is not
a terminal no bar is drawn and the lines are plain (no carriage returns).

An alert line names its layer as ``layer '0'`` (a module path such as ``0`` would otherwise read as a
number), a recovery is one short line, and a rule's suggestion (``try: ...``) is printed the first time
the rule fires only.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stabwatch.errors import validated
from stabwatch.metrics import Alert, AlertReason, StabilityMetrics

__all__ = ["ConsoleSink", "format_alert"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    every: int = Field(default=1, ge=1)
    stream: Any = None

    @field_validator("stream")
    @classmethod
    def _check_stream(cls, value: Any) -> Any:
        if value is not None and not callable(getattr(value, "write", None)):
            raise ValueError("expected a text stream (an object with write()) or None")
        return value


def format_alert(alert: Alert) -> str:
    """One line for an alert: ``[warning] step 22 grad_explode_layer, layer '0': <message>``; a recovery:
    ``[recovered] step 31 grad_explode_layer, layer '0'``.

    Example:
        >>> from stabwatch.metrics import Severity
        >>> format_alert(Alert(rule="r", reason=AlertReason.SPIKE, severity=Severity.WARNING, step=3,
        ...                    metric="grad_norm", layer="0", message="grad_norm 9 is 10x its median"))
        "[warning] step 3 r, layer '0': grad_norm 9 is 10x its median"
    """
    where = f", layer {alert.layer!r}" if alert.layer else ""
    if alert.reason is AlertReason.RECOVERED:
        return f"[recovered] step {alert.step} {alert.rule}{where}"
    return f"[{alert.severity.value}] step {alert.step} {alert.rule}{where}: {alert.message}"


class ConsoleSink:
    """Print ``str(record)`` every ``every`` records and every alert as it happens (each once).

    Args:
        every: print one line per this many records (alerts are always printed).
        stream: where to print (default ``sys.stderr``); with ``tqdm`` installed, lines are written
            through ``tqdm.write`` so they do not break a progress bar.

    Raises:
        ConfigError: a bad argument (the message names it and what is allowed).
    """

    def __init__(self, every: int = 1, stream: TextIO | None = None) -> None:
        opts = validated(_Options, "ConsoleSink", every=every, stream=stream)
        self.every: int = opts.every
        self.stream: TextIO | None = opts.stream
        self._n = 0
        self._suggested: set[str] = set()  # rules whose suggestion was printed

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stderr
        try:
            from tqdm import tqdm
        except ImportError:
            print(text, file=stream)
        else:
            tqdm.write(text, file=stream)

    def write(self, record: StabilityMetrics) -> None:
        lines = []
        if self._n % self.every == 0:
            lines.append(str(record))
        self._n += 1
        for alert in record.alerts:
            lines.append(f"  {format_alert(alert)}")
            if alert.suggestion and alert.reason is not AlertReason.RECOVERED and alert.rule not in self._suggested:
                self._suggested.add(alert.rule)
                lines.append(f"    try: {alert.suggestion}")
        if lines:
            self._print("\n".join(lines))

    def flush(self) -> None:
        stream = self.stream or sys.stderr
        stream.flush()

    def close(self) -> None:
        self.flush()
