"""MlflowSink against real MLflow stores — a server (sqlite behind ``mlflow server``), the file store and
sqlite: a full run read back key by key, a server killed and restarted mid-run, answers lost on the way
back (MLflow's own HTTP retry and the sink's), request limits, run ownership, replay, and errors at
construction. Fakes only inject faults; what is stored is read back with ``MlflowClient``."""

from __future__ import annotations

import logging
import re
import socket
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
    return want


def _fail_fast(monkeypatch, retries=0):
    """MLflow's documented HTTP settings: no hidden minutes of retries against a dead server."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("store", ["file", "server"])
def test_a_full_preset_run_arrives_once_per_key_and_step(store, tmp_path, request, monkeypatch):
    """Every family, per-layer keys of a nested model: the file store needs keys that are never a path
    prefix of one another (a key is a file there), or records are refused, retried and duplicated."""
    from tests.test_metrics import _Nested, shadow_loss

    if store == "file":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
    else:
        uri = request.getfixturevalue("live_mlflow").uri
    model = _Nested(spiking=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = MlflowSink(tracking_uri=uri, experiment="full", layer_keys="all", log_figures=False)
    shadow = sw.Shadow(loss_fn=shadow_loss, every=2, window=2, per_layer=True)
    with sw.Monitor(model, opt, preset="full", shadow=shadow, sinks=[sink]) as mon:
        records = train(model, opt, 6, monitor=mon)
    assert not list((tmp_path / "spill").glob("*.jsonl")), "nothing may be spilled"
    want = _assert_exactly_once(uri, sink.run_id, records, LayerKeyPolicy("all"))
    assert len(want) > 60 and any(k.startswith("grad_layers/") for k in want)
    run = MlflowClient(uri).get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert set(run.data.metrics) == set(want)  # nothing else was logged (no stray keys)


@pytest.mark.slow
@pytest.mark.server
def test_server_killed_and_restarted_mid_run_loses_and_duplicates_nothing(live_mlflow, caplog, monkeypatch, tmp_path):
    _fail_fast(monkeypatch)
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
        seen_spill = list((tmp_path / "spill").glob("*.jsonl"))  # STABWATCH_SPILL_DIR (conftest)
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
def test_down_until_close_leaves_a_spill_file_that_replay_sends_once(live_mlflow, caplog, tmp_path, monkeypatch):
    from stabwatch.cli import main

    _fail_fast(monkeypatch)
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
    """Wrap the client's log_batch: some calls are stored but their answer is lost, some never arrive."""

    def __init__(self, client, stored_then_lost=(2, 5), never_arrive=(4,)):
        self.inner = client.log_batch
        self.calls = 0
        self.stored_then_lost = set(stored_then_lost)
        self.never_arrive = set(never_arrive)
        self.sizes: list[int] = []
        client.log_batch = self

    def __call__(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        self.calls += 1
        if self.calls in self.never_arrive:
            raise ConnectionError("connection refused")
        self.sizes.append(len(metrics) + len(params) + len(tags))
        self.inner(run_id, metrics=metrics, params=params, tags=tags, **kwargs)
        if self.calls in self.stored_then_lost:
            raise TimeoutError("read timed out (the batch was stored)")


class _DroppingProxy:
    """A TCP proxy in front of the MLflow server that forwards every request but, for the chosen
    ``log-batch`` requests (counted from 1), closes the connection instead of relaying the answer: the
    server stored the batch, the client never hears so. The fault is injected; the store is real."""

    def __init__(self, upstream_port: int, drop: set[int]) -> None:
        self.upstream_port = upstream_port
        self.drop = drop
        self.batches = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                length = int(match.group(1)) if match else 0
                while len(rest) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    rest += data
                body, buf = rest[:length], rest[length:]
                request_line, *headers = head.split(b"\r\n")
                headers = [h for h in headers if not h.lower().startswith(b"connection:")] + [b"Connection: close"]
                with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
                    up.sendall(b"\r\n".join([request_line, *headers]) + b"\r\n\r\n" + body)
                    answer = b""
                    while data := up.recv(65536):
                        answer += data
                if b"log-batch" in request_line:
                    with self._lock:
                        self.batches += 1
                        lose = self.batches in self.drop
                        self.dropped += lose
                    if lose:
                        return  # stored upstream; the answer is lost
                conn.sendall(answer)


@pytest.mark.server
@pytest.mark.parametrize("mlflow_retries", [0, 2], ids=["sink-retries", "mlflow-http-retries"])
def test_answers_lost_on_the_way_back_store_each_row_once(live_mlflow, monkeypatch, caplog, mlflow_retries):
    """mlflow-http-retries: MLflow's own client re-posts the identical batch (same timestamps), which the
    server's store keeps once. sink-retries: the request fails, the sink reads its sequence tag back and
    skips what arrived. Either way get_metric_history holds every step of every key once."""
    _fail_fast(monkeypatch, retries=mlflow_retries)
    proxy = _DroppingProxy(live_mlflow.port, drop={2, 4, 5})
    try:
        records = make_records(40)
        sink = MlflowSink(tracking_uri=proxy.uri, experiment="lost-answers", log_figures=False)
        d = Dispatcher([sink], batch_size=8, backoff_min=0.01, backoff_max=0.05)
        with caplog.at_level(logging.WARNING, logger="stabwatch"):
            for rec in records:
                d.submit(rec)
            d.close()
    finally:
        proxy.close()
    assert proxy.dropped == 3
    sink_saw_a_failure = any("MlflowSink failed" in m for m in caplog.messages)
    assert sink_saw_a_failure == (mlflow_retries == 0)  # else MLflow's own retries resent the batches
    _assert_exactly_once(live_mlflow.uri, sink.run_id, records)
    assert MlflowClient(live_mlflow.uri).get_run(sink.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_lost_responses_are_not_sent_twice(store, tmp_path, monkeypatch):
    if store == "file":  # the file store appends rows: only the sequence tag keeps a resend out
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = str(tmp_path / "mlruns")
    else:
        uri = f"sqlite:///{tmp_path / 'm.db'}"
    records = make_records(60)
    sink = MlflowSink(tracking_uri=uri, log_figures=False)
    faults = _LostResponses(sink.client)
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
    _LostResponses(sink.client, stored_then_lost=(1,), never_arrive=(2,))
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
    faults = _LostResponses(sink.client, stored_then_lost=(), never_arrive=())
    sink.write_batch(records)
    sink.close()
    assert max(faults.sizes) <= 1000 and sum(faults.sizes) >= 2 * 2401
    keys = ["grad_layers/norm/block.1199", "update_layers/ratio/block.0", "grad/norm"]
    got, _ = read_mlflow(uri, sink.run_id, keys)
    assert [s for s, _ in got["grad_layers/norm/block.1199"]] == [0, 1]
    assert got["update_layers/ratio/block.0"] == [(0, 0.0), (1, 0.0)]


def test_replay_into_a_partly_written_run_sends_each_key_once_layer_summaries_included(tmp_path, monkeypatch):
    from stabwatch.replay import replay

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    layers = {f"blocks.{i}": {"grad_norm": float(i)} for i in range(70)}  # > 64: quantiles + top-k
    records = [sw.StabilityMetrics(step=s, grad_norm=1.0 + s, layers=layers) for s in range(6)]
    assert "grad_layers/norm/layers:p50" in LayerKeyPolicy().select(records[0])
    sink = MlflowSink(tracking_uri=uri, log_figures=False)
    sink.write_batch(records[:3])  # the tracker got half, then went away
    sink.close()
    spill = tmp_path / "spill.jsonl"
    spill.write_text("".join(r.to_json_line() + "\n" for r in records))
    for _ in range(2):
        assert replay([spill], f"mlflow+{uri}?run_id={sink.run_id}", keep=True) == 6
    _assert_exactly_once(uri, sink.run_id, records)


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
        MlflowSink(tracking_uri=f"http://127.0.0.1:{port}", connect_timeout=2)
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
    from stabwatch.errors import MissingExtraError

    with pytest.raises(MissingExtraError, match=re.escape("stabwatch[mlflow]")):
        MlflowSink()
    with pytest.raises(MissingExtraError, match=re.escape("stabwatch[wandb]")):
        sw.sinks.WandbSink()
    with pytest.raises(MissingExtraError, match=re.escape("stabwatch[tensorboard]")):
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
    inner = sink.client.log_batch

    def hanging(*args, **kwargs):
        release.wait(60)
        return inner(*args, **kwargs)

    sink.client.log_batch = hanging
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sw.Monitor(model, opt, preset="cheap", sinks=[sink]) as mon:
        recs = train(model, opt, 50, monitor=mon)  # would deadlock if step waited on the sink
        assert len(recs) == 50
        release.set()
    _assert_exactly_once(uri, sink.run_id, recs)
