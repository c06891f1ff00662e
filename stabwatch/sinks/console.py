"""`ConsoleSink`: a compact line per record (and every alert) on a stream."""

from __future__ import annotations

import sys
from typing import TextIO

from stabwatch.metrics import StabilityMetrics

__all__ = ["ConsoleSink"]


class ConsoleSink:
    """Print ``str(record)`` every ``every`` records and every alert as it happens.

    Args:
        every: print one line per this many records (alerts are always printed).
        stream: where to print (default ``sys.stderr``); with ``tqdm`` installed, lines are written
            through ``tqdm.write`` so they do not break a progress bar.
    """

    def __init__(self, every: int = 1, stream: TextIO | None = None) -> None:
        self.every = max(1, int(every))
        self.stream = stream
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
