"""`JsonlSink`: one JSON object per line, the format `stabwatch diagnose` / `report` read back.

Each line is ``StabilityMetrics.to_json_line()``: strict JSON, ``None`` fields left out, non-finite
floats written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (standard JSON has no literal
for them; Python's ``json`` would write a non-standard ``NaN`` token that other readers reject).
`read_jsonl` turns them back into floats.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stabwatch.errors import StabwatchError, validated
from stabwatch.metrics import StabilityMetrics
from stabwatch.sinks.base import check_path

__all__ = ["JsonlSink", "read_jsonl"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    path: str | os.PathLike[str]
    mode: Literal["w", "a"] = "w"
    flush_every: int = Field(default=50, ge=1)

    @field_validator("path", mode="before")
    @classmethod
    def _check_path(cls, value: Any) -> Any:
        return check_path(value, "file path")


class JsonlSink:
    """Append records to a JSON-lines file.

    Args:
        path: the file; parent folders are created. Checked for writability at construction; the file
            is created at the first ``write``/``flush``/``close`` (a sink that is never used, e.g. on a
            rank other than 0 under ``torch.distributed``, creates nothing).
        mode: ``"w"`` (truncate, the default) or ``"a"`` (append).
        flush_every: flush to the OS every N records (``close``/``flush`` always do).

    Raises:
        ConfigError: a bad argument (the message names it and what is allowed).
        StabwatchError: the file cannot be opened for writing.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); sink = JsonlSink(os.path.join(d, "run.jsonl"))
        >>> sink.write(StabilityMetrics(step=0, loss=float("nan"))); sink.close()
        >>> [r.loss for r in read_jsonl(os.path.join(d, "run.jsonl"))]
        [nan]
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "w", flush_every: int = 50) -> None:
        opts = validated(_Options, "JsonlSink", path=path, mode=mode, flush_every=flush_every)
        self.path = Path(opts.path)
        self._mode = opts.mode
        problem = _unwritable(self.path)
        if problem:
            raise StabwatchError(
                f"JsonlSink: cannot open {str(self.path)!r} for writing ({problem}); choose a writable path"
            )
        self._file: IO[str] | None = None
        self._closed = False
        self.flush_every = opts.flush_every
        self._since_flush = 0

    def _open(self) -> IO[str]:
        if self._file is None:
            if self._closed:
                raise StabwatchError(f"JsonlSink({str(self.path)!r}) is closed")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, self._mode, encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise StabwatchError(
                    f"JsonlSink: cannot open {str(self.path)!r} for writing ({exc.strerror}); choose a writable path"
                ) from exc
        return self._file

    def write(self, record: StabilityMetrics) -> None:
        self._open().write(record.to_json_line() + "\n")
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._closed:
            self._open().flush()
            self._since_flush = 0

    def close(self) -> None:
        if not self._closed:
            self._open()  # a used sink that wrote nothing still leaves its (empty) file
            self._closed = True
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"


def _unwritable(path: Path) -> str:
    """Why ``path`` could not be created or written, without creating anything ('' when it can)."""
    if path.exists():
        if path.is_dir():
            return "it is a folder"
        return "" if os.access(path, os.W_OK) else "the file is not writable"
    probe = path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{str(probe)!r} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"the folder {str(probe)!r} is not writable"
    return ""


class _RunFileNotFound(StabwatchError, FileNotFoundError):
    """A run file that does not exist (still a `FileNotFoundError` for code that catches that)."""


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[StabilityMetrics]:
    """Read the records of a JSONL run file (blank lines skipped; a bad line raises with its number).

    Raises:
        StabwatchError: the file cannot be read (also a `FileNotFoundError` when it does not exist) or a
            line is not a record.
    """
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        raise _RunFileNotFound(f"{path}: no such run file (a JSONL file written by JsonlSink)") from None
    except OSError as exc:
        raise StabwatchError(f"{path}: cannot read the run file ({exc})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield StabilityMetrics.from_json_line(line)
            except ValueError as exc:
                raise StabwatchError(f"{path}:{lineno}: not a stabwatch record ({exc})") from exc
