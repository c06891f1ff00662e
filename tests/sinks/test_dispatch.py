"""The background writer with fault-injecting sinks: outages, full queues, partial writes, close with
the tracker still down, Ctrl-C, flush, and that records never go out on the training thread."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

import stabwatch as sw
from stabwatch.replay import replay
from stabwatch.sinks._dispatch import Dispatcher
from tests.helpers import mlp, train


def _records(n: int) -> list[sw.StabilityMetrics]:
    return [sw.StabilityMetrics(step=s, loss=1.0 / (s + 1), grad_norm=float(s)) for s in range(n)]


class Tracker:
    """A sink that stores what it receives; `down` makes every write fail; `fail_at` fails once."""

    def __init__(self, fail_at: set[int] | None = None, delay: float = 0.0) -> None:
        self.got: list[int] = []
        self.threads: set[int] = set()
        self.down = False
        self.fail_at = set(fail_at or ())
        self.delay = delay
        self.closed = 0

    def write(self, record):
        self.threads.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise ConnectionError("tracker down")
        if record.step in self.fail_at:
            self.fail_at.discard(record.step)
            raise TimeoutError(f"flaky at {record.step}")
        self.got.append(record.step)

    def flush(self):
        pass

    def close(self):
        self.closed += 1


def test_outage_is_spilled_retried_and_delivered_in_order_once(tmp_path, caplog):
    sink = Tracker(fail_at={3, 50})
    d = Dispatcher([sink], batch_size=8, queue_size=16, backoff_min=0.01, backoff_max=0.05)
    worker = d.workers[0]
    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        for rec in _records(40):
            d.submit(rec)
        sink.down = True
        for rec in _records(200)[40:]:
            d.submit(rec)
        deadline = time.monotonic() + 10
        while worker.spill_path.exists() is False and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.spill_path.exists(), "an outage spills to disk"
        sink.down = False
        assert d.flush(timeout=30)
        d.close()
    assert sink.got == list(range(200))
    assert not worker.spill_path.exists()
    assert sum("Tracker failed" in m for m in caplog.messages) == 1
    assert sink.closed == 1


def test_full_queue_spills_without_blocking_and_keeps_order(tmp_path):
    gate = threading.Event()

    class Stuck(Tracker):
        def write(self, record):
            gate.wait(30)
            super().write(record)

    sink = Stuck()
    d = Dispatcher([sink], queue_size=5, batch_size=4)
    for rec in _records(300):  # the sink takes nothing: this returns only if submit never blocks
        d.submit(rec)
    assert d.workers[0].spilled > 250
    gate.set()
    d.close()
    assert sink.got == list(range(300))


def test_partial_batch_failure_resends_only_the_rest():
    sink = Tracker(fail_at={5, 6, 17})
    d = Dispatcher([sink], batch_size=10, backoff_min=0.01)
    for rec in _records(30):
        d.submit(rec)
    d.close()
    assert sink.got == list(range(30))


def test_down_at_close_leaves_exactly_the_unsent_records_for_replay(tmp_path, caplog):
    sink = Tracker()
    sink.close_timeout = 0.3
    d = Dispatcher([sink], backoff_min=0.05)
    for rec in _records(12):
        d.submit(rec)
    assert d.flush(timeout=10)
    sink.down = True
    for rec in _records(30)[12:]:
        d.submit(rec)
    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        d.close()
    spill = d.workers[0].spill_path
    assert [r.step for r in sw.sinks.read_jsonl(spill)] == list(range(12, 30))
    hint = next(m for m in caplog.messages if "not delivered" in m)
    assert str(spill) in hint and "stabwatch replay" in hint
    sink.down = False
    assert replay([spill], "", sink=sink) == 18
    assert sink.got == list(range(30)) and not spill.exists()


def test_monitor_exit_drains_on_exception_and_ctrl_c():
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        sink = Tracker(delay=0.002)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(type(exc)), sw.Monitor(model, opt, preset="cheap", sinks=[sink]) as mon:
            train(model, opt, 25, monitor=mon)
            raise exc
        assert sink.got == list(range(25)) and sink.closed == 1


def test_records_are_written_off_the_training_thread_and_flush_drains():
    sink = Tracker(delay=0.001)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sw.Monitor(model, opt, preset="cheap", sinks=[sink]) as mon:
        train(model, opt, 10, monitor=mon)
        assert mon.flush()
        assert sink.got == list(range(10))
    assert threading.get_ident() not in sink.threads and len(sink.threads) == 1


def test_log_config_receives_the_monitor_configuration():
    seen = {}

    class WithConfig(Tracker):
        def log_config(self, params):
            seen.update(params)

    model = mlp()
    with sw.Monitor(model, torch.optim.Adam(model.parameters()), preset="cheap", sinks=[WithConfig()]):
        pass
    assert seen["preset"] == "cheap" and seen["optimizer"] == "Adam" and seen["model"] == "Sequential"


def test_unwritable_spill_dir_fails_at_construction(tmp_path):
    (tmp_path / "f").write_text("")
    sink = Tracker()
    sink.spill_dir = tmp_path / "f" / "spill"
    with pytest.raises(sw.StabwatchError, match="spill_dir"):
        sw.Monitor(mlp(), sinks=[sink])
