"""`SpillQueue`: a sink's undelivered records in a JSON-lines file, read back in order.

The dispatcher keeps a sink's records in memory while the sink keeps up. When it does not (the queue
is full, or the sink raised), the head of the queue and every later record go to a spill file instead,
and the worker reads them back from there, oldest first, until the file is drained. This module is that
file and nothing else: no threads, no locks (the dispatcher calls it under its own lock), so a test
drives it step by step.

The file holds one `StabilityMetrics.to_json_line()` per line, the `JsonlSink` format, so
`read_jsonl` and ``stabwatch replay`` read it. Lines ``[read, written)`` are the undelivered records:
`peek` returns the next ones from the read cursor, `advance` moves the cursor once they were
delivered, and `finalize` rewrites the file to hold exactly the undelivered lines (or deletes it when
there are none).

Failures:

* **a write fails** (disk full, folder removed): logged once; the queue is *broken* from then on and
  `append` returns ``False``, so the caller keeps those records in memory. What the file already held
  is still read back; a torn last line (a write that failed part-way) lies past the counted lines and
  is never read.
* **a line does not parse** (the file was damaged on disk): logged with its line number and skipped;
  `corrupt` counts such lines. Nothing else is lost.

Example:
    >>> import tempfile, pathlib
    >>> from stabwatch.metrics import StabilityMetrics
    >>> q = SpillQueue(pathlib.Path(tempfile.mkdtemp()) / "spill.jsonl")
    >>> q.start([StabilityMetrics(step=0), StabilityMetrics(step=1)])
    True
    >>> q.append([StabilityMetrics(step=2)])
    True
    >>> [r.step for r in q.peek(2)], q.pending
    ([0, 1], 3)
    >>> q.advance(2); [r.step for r in q.peek(5)]
    [2]
    >>> q.finalize()
    1
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from stabwatch.metrics import StabilityMetrics

__all__ = ["SpillQueue"]

log = logging.getLogger("stabwatch")

Opener = Callable[[Path, str], IO[bytes]]


def _open(path: Path, mode: str) -> IO[bytes]:
    return open(path, mode)  # the queue owns the handle until finalize/discard


class SpillQueue:
    """An append-only JSON-lines file of records with a read cursor (see the module docstring).

    Args:
        path: the spill file (its folder is created on `start`).
        owner: the sink's name, for log messages.
        opener: ``opener(path, mode) -> binary file``; tests pass one whose writes fail.

    Attributes:
        active: the file is open and holds the queue's head.
        broken: a write failed; nothing more is written to the file.
        written: records written over the queue's life (across activations).
        corrupt: unreadable lines skipped.
    """

    def __init__(self, path: Path, owner: str = "sink", opener: Opener = _open) -> None:
        self.path = Path(path)
        self.owner = owner
        self._opener = opener
        self._out: IO[bytes] | None = None
        self._in: IO[bytes] | None = None
        self.active = False
        self.broken = False
        self.written = 0
        self.corrupt = 0
        self._count = 0  # lines in the file (of this activation)
        self._read = 0  # lines consumed
        self._offset = 0  # byte offset of the first unconsumed line
        self._marks: list[tuple[int, int]] = []  # per peeked record: (lines consumed, offset) after it
        self._error_logged = False

    @property
    def pending(self) -> int:
        """Undelivered lines in the file (0 when not active)."""
        return self._count - self._read if self.active else 0

    # writing -----------------------------------------------------------------------------------------
    def start(self, head: Sequence[StabilityMetrics] = ()) -> bool:
        """Create the file holding `head` and make the queue active; ``False`` if that failed."""
        if self.active:
            return True
        if self.broken:
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._out = self._opener(self.path, "wb")
            self._in = self._opener(self.path, "rb")
        except OSError as exc:
            self._abort()
            self._failed(exc)
            return False
        self.active = True
        self._count = self._read = self._offset = 0
        self._marks = []
        if not self.append(head):
            self._abort()
            return False
        return True

    def _abort(self) -> None:
        """A start that failed: nothing in the file counts, so it goes."""
        self._close_files()
        self.active = False
        with contextlib.suppress(OSError):
            self.path.unlink()

    def append(self, records: Sequence[StabilityMetrics]) -> bool:
        """Append `records`; ``False`` (and nothing counted) when the queue is inactive or the write fails."""
        if not self.active or self.broken or self._out is None:
            return False
        if not records:
            return True
        data = "".join(r.to_json_line() + "\n" for r in records).encode("utf-8")
        try:
            self._out.write(data)
            self._out.flush()
        except OSError as exc:
            self._failed(exc)
            return False
        self._count += len(records)
        self.written += len(records)
        return True

    def _failed(self, exc: OSError) -> None:
        self.broken = True
        if not self._error_logged:
            self._error_logged = True
            log.error(
                "stabwatch: cannot write the spill file %s (%s); %s's undelivered records are kept in "
                "memory from now on",
                self.path,
                exc,
                self.owner,
            )

    # reading -----------------------------------------------------------------------------------------
    def peek(self, n: int) -> list[StabilityMetrics]:
        """Up to `n` undelivered records from the read cursor, oldest first, without consuming them.

        Unreadable lines are logged and skipped (those before the first good one are consumed at once).
        """
        self._marks = []
        if not self.active or self._in is None or n <= 0:
            return []
        self._in.seek(self._offset)
        out: list[StabilityMetrics] = []
        line_no, offset = self._read, self._offset
        while len(out) < n and line_no < self._count:
            raw = self._in.readline()
            line_no += 1
            offset += len(raw)
            try:
                out.append(StabilityMetrics.from_json_line(raw.decode("utf-8")))
            except ValueError as exc:
                self.corrupt += 1
                log.error(
                    "stabwatch: line %d of the spill file %s is not a record (%s); skipped",
                    line_no,
                    self.path,
                    str(exc).splitlines()[0][:200],
                )
                if not out:  # nothing before it to deliver first: consume it now
                    self._read, self._offset = line_no, offset
                continue
            self._marks.append((line_no, offset))
        return out

    def advance(self, n: int) -> None:
        """Consume the first `n` records of the last `peek` (they were delivered)."""
        if n <= 0:
            return
        if n > len(self._marks):
            raise ValueError(f"SpillQueue.advance({n}): only {len(self._marks)} record(s) were peeked")
        self._read, self._offset = self._marks[n - 1]
        self._marks = self._marks[n:]

    # ending ------------------------------------------------------------------------------------------
    def discard(self) -> None:
        """Close and delete the file (it is drained); the queue can be started again."""
        self._close_files()
        self.active = False
        self._count = self._read = self._offset = 0
        self._marks = []
        with contextlib.suppress(OSError):
            self.path.unlink()

    def finalize(self) -> int:
        """Leave exactly the undelivered lines in the file (delete it if none); return how many.

        The queue is inactive afterwards.
        """
        if not self.active:
            return 0
        pending = self.pending
        if pending and (self._read or self.broken) and self._in is not None:
            try:  # drop the delivered head (and a torn tail after a failed write)
                self._in.seek(self._offset)
                data = b"".join(self._in.readline() for _ in range(pending))
                tmp = self.path.with_suffix(self.path.suffix + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, self.path)
            except OSError as exc:
                log.error("stabwatch: compacting the spill file %s failed: %s", self.path, exc)
        self._close_files()
        self.active = False
        self._count = self._read = self._offset = 0
        self._marks = []
        if not pending:
            with contextlib.suppress(OSError):
                self.path.unlink()
        return pending

    def _close_files(self) -> None:
        for f in (self._out, self._in):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._out = self._in = None
