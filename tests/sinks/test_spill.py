"""SpillQueue driven step by step, with no thread: append, read back in order, partial delivery, compaction,
a damaged line, and a disk that fills up (a fake file object whose writes raise ``OSError``)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import IO, Any

import pytest

from stabwatch.metrics import StabilityMetrics
from stabwatch.sinks import read_jsonl
from stabwatch.sinks._spill import SpillQueue


def _recs(a: int, b: int) -> list[StabilityMetrics]:
    return [
        StabilityMetrics(step=s, loss=1.0 / (s + 1), grad_norm=float("nan") if s == 3 else float(s))
        for s in range(a, b)
    ]


def _steps(records: list[StabilityMetrics]) -> list[int]:
    return [r.step for r in records]


class _FullDisk:
    """A real file whose writes stop after `budget` bytes: the rest of that write is lost and OSError raised."""

    def __init__(self, inner: IO[bytes], budget: list[int]) -> None:
        self.inner = inner
        self.budget = budget  # shared by the handles of one queue

    def write(self, data: bytes) -> int:
        if len(data) > self.budget[0]:
            self.inner.write(data[: self.budget[0]])
            self.inner.flush()
            self.budget[0] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget[0] -= len(data)
        return self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _full_disk_opener(budget: int):
    left = [budget]

    def opener(path: Path, mode: str) -> Any:
        f = open(path, mode)  # noqa: SIM115
        return _FullDisk(f, left) if "w" in mode else f

    return opener


def test_records_come_back_in_order_across_appends_peeks_and_partial_delivery(tmp_path):
    q = SpillQueue(tmp_path / "s.jsonl")
    assert q.pending == 0 and not q.active
    assert q.start(_recs(0, 3))
    assert q.append(_recs(3, 4)) and q.append(_recs(4, 10)) and q.append([])
    assert q.pending == 10 and q.written == 10
    assert _steps(q.peek(4)) == [0, 1, 2, 3]
    assert _steps(q.peek(4)) == [0, 1, 2, 3]  # peeking does not consume
    q.advance(2)  # the sink took two of the four
    assert q.pending == 8
    back = q.peek(100)
    assert _steps(back) == list(range(2, 10))
    assert back[1].grad_norm != back[1].grad_norm  # NaN survives the round trip
    q.advance(3)
    assert q.append(_recs(10, 12))  # writing while reading
    assert _steps(q.peek(100)) == list(range(5, 12))
    with pytest.raises(ValueError, match="peeked"):
        q.advance(8)


def test_finalize_leaves_exactly_the_undelivered_records(tmp_path):
    path = tmp_path / "s.jsonl"
    q = SpillQueue(path)
    q.start(_recs(0, 6))
    q.peek(4)
    q.advance(4)
    assert q.finalize() == 2 and not q.active
    assert _steps(list(read_jsonl(path))) == [4, 5]
    assert not path.with_suffix(".jsonl.tmp").exists()
    q2 = SpillQueue(tmp_path / "t.jsonl")
    q2.start(_recs(0, 2))
    q2.peek(2)
    q2.advance(2)
    assert q2.finalize() == 0 and not (tmp_path / "t.jsonl").exists()  # nothing left: no file


def test_discard_deletes_and_the_queue_can_start_again(tmp_path):
    path = tmp_path / "s.jsonl"
    q = SpillQueue(path)
    q.start(_recs(0, 2))
    q.discard()
    assert not path.exists() and q.pending == 0
    assert q.start(_recs(7, 9)) and _steps(q.peek(5)) == [7, 8] and q.written == 4


def test_a_damaged_line_is_skipped_and_named(tmp_path, caplog):
    path = tmp_path / "s.jsonl"
    q = SpillQueue(path, owner="MlflowSink")
    q.start(_recs(0, 6))
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = lines[0][:10] + b"\x00" * (len(lines[0]) - 11) + b"\n"  # same length: offsets stay valid
    second = b"{not json" + b" " * (len(lines[3]) - 10) + b"\n"
    with open(path, "r+b") as f:
        f.write(damaged)
        f.seek(sum(map(len, lines[:3])))
        f.write(second)
    with caplog.at_level(logging.ERROR, logger="stabwatch"):
        first = q.peek(3)
    assert _steps(first) == [1, 2, 4]  # line 1 (step 0) and line 4 (step 3) are skipped
    assert q.corrupt == 2 and q.pending == 5  # the leading bad line is consumed at once
    assert any("line 1 of the spill file" in m for m in caplog.messages)
    assert any("line 4 of the spill file" in m for m in caplog.messages)
    q.advance(3)
    assert q.pending == 1 and _steps(q.peek(5)) == [5]


def test_disk_full_keeps_what_was_written_and_refuses_the_rest(tmp_path, caplog):
    path = tmp_path / "s.jsonl"
    line = len(_recs(0, 1)[0].to_json_line()) + 1
    q = SpillQueue(path, owner="X", opener=_full_disk_opener(budget=int(2.5 * line)))
    with caplog.at_level(logging.ERROR, logger="stabwatch"):
        assert q.start(_recs(0, 2))
        assert not q.append(_recs(2, 4))  # half a line fits: a torn tail, not counted
        assert not q.append(_recs(4, 5))  # broken: not even tried
    assert q.broken and q.pending == 2 and q.written == 2
    assert sum("cannot write the spill file" in m for m in caplog.messages) == 1
    assert _steps(q.peek(10)) == [0, 1]  # the torn tail is never read
    q.advance(1)
    assert q.finalize() == 1
    assert _steps(list(read_jsonl(path))) == [1]  # compacted: no torn tail for replay to choke on


def test_a_spill_file_that_cannot_be_created_leaves_the_caller_in_charge(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    q = SpillQueue(blocker / "s.jsonl")
    with caplog.at_level(logging.ERROR, logger="stabwatch"):
        assert not q.start(_recs(0, 2))
    assert q.broken and not q.active and not q.append(_recs(2, 3)) and q.finalize() == 0
    q2 = SpillQueue(tmp_path / "s.jsonl", opener=_full_disk_opener(budget=5))
    assert not q2.start(_recs(0, 2))  # the head itself did not fit
    assert not (tmp_path / "s.jsonl").exists() and q2.written == 0
