"""`ConsoleSink`: a compact line per record (and every alert) on a stream."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stabwatch.errors import validated
from stabwatch.metrics import StabilityMetrics

__all__ = ["ConsoleSink"]


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


class ConsoleSink:
    """Print ``str(record)`` every ``every`` records and every alert as it happens.

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

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stderr
        try:
            from tqdm import tqdm

            tqdm.write(text, file=stream)
        except ImportError:
            print(text, file=stream)

    def write(self, record: StabilityMetrics) -> None:
        if self._n % self.every == 0:
            self._print(str(record))
        self._n += 1
        for alert in record.alerts:
            self._print(f"  ALERT {alert}")

    def flush(self) -> None:
        stream = self.stream or sys.stderr
        stream.flush()

    def close(self) -> None:
        self.flush()
