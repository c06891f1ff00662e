"""MlflowSink against real MLflow stores: a server killed and restarted mid-run, lost responses,
request limits, run ownership, replay, and errors at construction."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import stabwatch as sw
from stabwatch.sinks import LayerKeyPolicy
from stabwatch.sinks._dispatch import Dispatcher
from tests.helpers import mlp, train
from tests.sinks.conftest import free_port
from tests.sinks.readers import read_mlflow, same
from tests.sinks.test_contract import make_records

pytest.importorskip("mlflow")
from mlflow import MlflowClient

from stabwatch.sinks import MlflowSink


def _expected(records, policy=None):
    policy = policy or LayerKeyPolicy()
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for key, value in policy.select(rec).items():
            out.setdefault(key, []).append((rec.step, value))
    return out


def _assert_exactly_once(uri, run_id, records, policy=None):
    want = _expected(records, policy)
    got, _ = read_mlflow(uri, run_id, list(want))
    for key, series in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in series], f"{key}: {[s for s, _ in got[key]]}"
        for (step, a), (_, b) in zip(series, got[key]):
            assert same(a, b, inf_as_max=True), f"{key}@{step}: {a} != {b}"


@pytest.mark.slow
@pytest.mark.server
def test_server_killed_and_restarted_mid_run_loses_and_duplicates_nothing(live_mlflow, caplog):
    server = live_mlflow
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = MlflowSink(tracking_uri=server.uri, experiment="kill-restart", close_timeout=90, log_figures=False)
    seen_spill = []
    with (
        caplog.at_level(logging.WARNING, logger="stabwatch"),
        sw.Monitor(model, opt, sinks=[sink], preset="cheap") as mon,
    ):
        train(model, opt, 30, monitor=mon)
        assert mon.flush(timeout=30)
        server.stop()  # the tracker dies mid-run
        for _ in range(4):  # training goes on; the sink fails, spills and retries
            train(model, opt, 20, monitor=mon)
            time.sleep(0.3)
        seen_spill = list(mon._dispatch.workers[0].spill_path.parent.glob("*.jsonl"))
        server.start()  # ...and comes back before close
        train(model, opt, 30, monitor=mon)
    records = list(mon.records)
    assert len(records) == 140 and [r.step for r in records] == list(range(140))
    assert seen_spill, "the outage must have spilled records to disk"
    assert not list(seen_spill[0].parent.glob("*.jsonl")), "everything was delivered: no spill left"
    failures = [m for m in caplog.messages if "MlflowSink failed" in m]
    assert len(failures) == 1, caplog.messages  # a warning once, not per step
    _assert_exactly_once(server.uri, sink.run_id, records)
    assert MlflowClient(server.uri).get_run(sink.run_id).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.server
def test_down_until_close_leaves_a_spill_file_that_replay_sends_once(live_mlflow, caplog, tmp_path):
    from stabwatch.cli import main

    server = live_mlflow
    records = make_records(30)
    sink = MlflowSink(tracking_uri=server.uri, experiment="replay", close_timeout=1.5, log_figures=False)
    d = Dispatcher([sink], backoff_min=0.2)
    for rec in records[:10]:
        d.submit(rec)
    assert d.flush(timeout=30)
    server.stop()
    for rec in records[10:]:
        d.submit(rec)
    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        d.close()
    message = next(m for m in caplog.messages if "stabwatch replay" in m)
    spill, target = re.search(r"stabwatch replay (\S+) --to (\S+)", message).groups()
    assert Path(spill).is_file() and f"run_id={sink.run_id}" in target
    assert [r.step for r in sw.sinks.read_jsonl(spill)] == list(range(10, 30))
    server.start()
    assert main(["replay", spill, "--to", target, "--keep"]) == 0
    _assert_exactly_once(server.uri, sink.run_id, records)
    assert main(["replay", spill, "--to", target]) == 0  # again: everything is already there
    _assert_exactly_once(server.uri, sink.run_id, records)
    assert not Path(spill).exists()


class _LostResponses:
    """Wrap a store's log_batch: some calls are stored but their answer is lost, some never arrive."""

    def __init__(self, store, stored_then_lost=(2, 5), never_arrive=(4,)):
        self.inner = store.log_batch
        self.calls = 0
        self.stored_then_lost = set(stored_then_lost)
        self.never_arrive = set(never_arrive)
        self.sizes: list[int] = []

    def __call__(self, run_id, metrics, params, tags):
        self.calls += 1
        if self.calls in self.never_arrive:
            raise ConnectionError("connection refused")
        self.sizes.append(len(metrics) + len(params) + len(tags))
        self.inner(run_id, metrics, params, tags)
        if self.calls in self.stored_then_lost:
            raise TimeoutError("read timed out (the batch was stored)")


def test_lost_responses_are_not_sent_twice(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    records = make_records(60)
    sink = MlflowSink(tracking_uri=uri, log_figures=False)
    faults = _LostResponses(sink._store)
    sink._store.log_batch = faults
    d = Dispatcher([sink], batch_size=8, backoff_min=0.01, backoff_max=0.05)
    for rec in records:
        d.submit(rec)
    d.close()
    assert faults.calls > 6
    _assert_exactly_once(uri, sink.run_id, records)


def test_retry_with_a_longer_batch_resumes_at_the_right_entity(tmp_path):
    """A batch split over several requests fails part-way; the retry carries more records."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    layers = {f"b.{i}": {"grad_norm": float(i)} for i in range(450)}
    alert = make_records(8)[7].alerts[0]
    records = [
        sw.StabilityMetrics(step=s, grad_norm=1.0, layers=layers, alerts=[alert] if s % 2 == 0 else [])
        for s in range(6)
    ]
    sink = MlflowSink(tracking_uri=uri, layer_keys="all", log_figures=False)
    faults = _LostResponses(sink._store, stored_then_lost=(1,), never_arrive=(2,))
    sink._store.log_batch = faults
    with pytest.raises(TimeoutError):
        sink.write_batch(records[:3])  # request 1 stored, its answer lost
    with pytest.raises(ConnectionError):
        sink.write_batch(records[:3])  # request 2 never arrives
    sink.write_batch(records)  # the dispatcher's retry: same head, more records
    sink.close()
    _assert_exactly_once(uri, sink.run_id, records, LayerKeyPolicy("all"))
    tags = MlflowClient(uri).get_run(sink.run_id).data.tags
    assert tags["stabwatch.alerts.count"] == "3"


def test_requests_stay_within_mlflow_limits(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    layers = {f"block.{i}": {"grad_norm": float(i), "update_ratio": i / 1e3} for i in range(1200)}
    records = [sw.StabilityMetrics(step=s, grad_norm=1.0, layers=layers) for s in range(2)]
    sink = MlflowSink(tracking_uri=uri, layer_keys="all", log_figures=False)
    faults = _LostResponses(sink._store, stored_then_lost=(), never_arrive=())
    sink._store.log_batch = faults
    sink.write_batch(records)
    sink.close()
    assert max(faults.sizes) <= 1000 and sum(faults.sizes) >= 2 * 2401
    got, _ = read_mlflow(uri, sink.run_id, ["grad/norm/block.1199", "update/ratio/block.0", "grad/norm"])
    assert [s for s, _ in got["grad/norm/block.1199"]] == [0, 1]
    assert got["update/ratio/block.0"] == [(0, 0.0), (1, 0.0)]


def test_uses_the_active_run_and_does_not_end_it(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as run:
            model = mlp()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            with sw.Monitor(model, opt, preset="cheap", sinks=[MlflowSink()]) as mon:
                train(model, opt, 5, monitor=mon)
            mlflow.log_metric("user/metric", 1.0, step=0)
            assert MlflowClient(uri).get_run(run.info.run_id).info.status == "RUNNING"
        client = MlflowClient(uri)
        got = client.get_run(run.info.run_id)
        assert got.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "grad/norm")] == list(range(5))
        assert got.data.params["stabwatch.preset"] == "cheap"
        assert got.data.params["stabwatch.model"] == "Sequential"
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "stabwatch")}
        assert {"stabwatch/alerts.json", "stabwatch/metrics.png"} <= arts
    finally:
        mlflow.set_tracking_uri(None)


def test_wrong_tracking_uri_fails_at_construction(tmp_path):
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(sw.StabwatchError, match=rf"127\.0\.0\.1:{port}.*mlflow server"):
        MlflowSink(tracking_uri=f"http://127.0.0.1:{port}", request_timeout=2)
    assert time.monotonic() - t0 < 20  # no minutes of hidden retries
    (tmp_path / "a_file").write_text("")
    with pytest.raises(sw.StabwatchError, match="not a writable folder"):
        MlflowSink(tracking_uri=f"sqlite:///{tmp_path}/a_file/dir/m.db")
    with pytest.raises(sw.StabwatchError, match="tracking_uri"):
        MlflowSink(tracking_uri="nosuchscheme://x")
    with pytest.raises(sw.StabwatchError, match="run 'no-such-run'"):
        MlflowSink(tracking_uri=f"sqlite:///{tmp_path}/m.db", run_id="no-such-run")


def test_missing_tracker_packages_name_the_extra(monkeypatch, tmp_path):
    for module in ("mlflow", "wandb", "tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(sw.StabwatchError, match=re.escape("stabwatch[mlflow]")):
        MlflowSink()
    with pytest.raises(sw.StabwatchError, match=re.escape("stabwatch[wandb]")):
        sw.sinks.WandbSink()
    with pytest.raises(sw.StabwatchError, match=re.escape("stabwatch[tensorboard]")):
        sw.sinks.TensorBoardSink(tmp_path)


def test_import_stabwatch_does_not_import_trackers():
    import subprocess

    code = (
        "import sys, stabwatch\n"
        "bad = [m for m in ('mlflow', 'wandb', 'tensorboard') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert 'MlflowSink' in stabwatch.sinks.__all__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_never_waits_on_the_tracker(tmp_path):
    """A tracker that hangs does not hold up training: every step returns while log_batch is stuck."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    sink = MlflowSink(tracking_uri=uri, log_figures=False)
    release = threading.Event()
    inner = sink._store.log_batch

    def hanging(*args):
        release.wait(60)
        return inner(*args)

    sink._store.log_batch = hanging
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sw.Monitor(model, opt, preset="cheap", sinks=[sink]) as mon:
        recs = train(model, opt, 50, monitor=mon)  # would deadlock if step waited on the sink
        assert len(recs) == 50
        release.set()
    _assert_exactly_once(uri, sink.run_id, recs)
