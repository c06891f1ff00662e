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

import os
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stabwatch.metrics import StabilityMetrics

__all__ = ["Sink", "SinkOptions", "check_path"]


@runtime_checkable
class Sink(Protocol):
    """Anything with ``write(record)``, ``flush()`` and ``close()``."""

    def write(self, record: StabilityMetrics) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def check_path(value: Any, what: str = "path", *, optional: bool = False) -> Any:
    """A sink option that names a file or folder: a non-empty ``str`` or ``os.PathLike`` (or ``None`` when
    ``optional``). Raises ``ValueError`` (inside a pydantic validator: becomes a `ConfigError`)."""
    if value is None and optional:
        return value
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ValueError(f"expected a {what} (str or os.PathLike){' or None' if optional else ''}")
    return value


class SinkOptions(BaseModel):
    """The constructor arguments every stabwatch sink shares, validated with `stabwatch.errors.validated`.

    A sink subclasses it with its own arguments, so a bad value raises a `ConfigError` that names the
    argument, the value given and what is allowed.

    Attributes:
        spill_dir: where the dispatcher spills undelivered records (``None``: ``$STABWATCH_SPILL_DIR``,
            else ``./stabwatch-spill``).
        close_timeout: seconds closing keeps retrying a failing tracker.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, strict=False)

    spill_dir: str | os.PathLike[str] | None = None
    close_timeout: float = Field(default=30.0, ge=0.0, allow_inf_nan=False)

    @field_validator("spill_dir", mode="before")
    @classmethod
    def _check_spill_dir(cls, value: Any) -> Any:
        return check_path(value, "folder path", optional=True)
