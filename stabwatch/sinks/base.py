"""The `Sink` protocol: where records go.

A sink is any object with three methods:

* ``write(record)`` — take one `StabilityMetrics` (called from the monitor, in step order);
* ``flush()`` — push buffered records to the tracker/disk;
* ``close()`` — flush and release resources; calling it twice is harmless.

Sinks import their tracker lazily (inside ``__init__`` or the first ``write``), so ``import stabwatch``
works without any tracker installed. A sink may raise: the monitor isolates it, logs the failure once
and training goes on.

Example: a 20-line custom sink that keeps the gradient norm of every step in a CSV file::

    import csv
    import stabwatch as sw

    class CsvGradSink:
        def __init__(self, path):
            self._file = open(path, "w", newline="")
            self._csv = csv.writer(self._file)
            self._csv.writerow(["step", "loss", "grad_norm"])

        def write(self, record: sw.StabilityMetrics) -> None:
            self._csv.writerow([record.step, record.loss, record.grad_norm])

        def flush(self) -> None:
            self._file.flush()

        def close(self) -> None:
            if not self._file.closed:
                self._file.close()

    with sw.Monitor(model, opt, sinks=[CsvGradSink("grads.csv")]) as mon: ...
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from stabwatch.metrics import StabilityMetrics

__all__ = ["Sink"]


@runtime_checkable
class Sink(Protocol):
    """Anything with ``write(record)``, ``flush()`` and ``close()``."""

    def write(self, record: StabilityMetrics) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...
