"""JSONL and console sinks, through a real Monitor run."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch

import stabwatch as sw
from stabwatch.sinks import read_jsonl
from tests.helpers import mlp, train


def test_jsonl_sink_writes_every_record_and_reads_back(tmp_path):
    path = tmp_path / "sub" / "run.jsonl"
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sw.Monitor(model, opt, sinks=[sw.sinks.JsonlSink(path)], preset="full") as mon:
        recs = train(model, opt, 7, monitor=mon)
        mon.step(loss=float("nan"))
    back = list(read_jsonl(path))
    assert [r.step for r in back] == list(range(8))
    assert back[3].to_dict() == recs[3].to_dict()
    assert math.isnan(back[-1].loss) and back[-1].nonfinite


def test_jsonl_sink_unwritable_path_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(sw.StabwatchError, match="cannot open"):
        sw.sinks.JsonlSink(blocker / "run.jsonl")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(sw.StabwatchError, match="writable"):
            sw.sinks.JsonlSink(ro / "run.jsonl")


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(sw.StabilityMetrics(step=0).to_json_line() + "\n{not json}\n")
    with pytest.raises(sw.StabwatchError, match=r"bad.jsonl:2"):
        list(read_jsonl(p))


def test_console_sink_prints_lines_and_alerts():
    buf = io.StringIO()
    sink = sw.sinks.ConsoleSink(every=2, stream=buf)
    alert = sw.Alert(
        rule="r",
        reason=sw.AlertReason.NON_FINITE,
        severity=sw.Severity.CRITICAL,
        step=1,
        metric="loss",
        message="boom",
    )
    for i in range(4):
        sink.write(sw.StabilityMetrics(step=i, loss=1.0, alerts=[alert] if i == 1 else []))
    sink.close()
    out = buf.getvalue()
    assert "step 0" in out and "step 2" in out and "step 1 |" not in out and "boom" in out


def test_sinks_satisfy_the_protocol(tmp_path):
    assert isinstance(sw.sinks.JsonlSink(tmp_path / "a.jsonl"), sw.sinks.Sink)
    assert isinstance(sw.sinks.ConsoleSink(), sw.sinks.Sink)
