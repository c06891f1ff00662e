"""WandbSink read back from its offline ``run-*.wandb`` file; TensorBoardSink from its event file."""

from __future__ import annotations

import pytest
import torch

import stabwatch as sw
from tests.helpers import mlp, train
from tests.sinks.readers import read_tensorboard, read_wandb
from tests.sinks.test_contract import make_records


def test_wandb_own_step_metric_leaves_the_users_run_and_logs_alone(tmp_path):
    wandb = pytest.importorskip("wandb")
    run = wandb.init(project="user", mode="offline", dir=str(tmp_path))
    try:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with sw.Monitor(model, opt, preset="cheap", sinks=[sw.sinks.WandbSink()]) as mon:
            for i in range(6):
                train(model, opt, 1, monitor=mon)
                run.log({"user/loss": float(i)})
            mon.flush()
        assert wandb.run is run  # the sink did not finish the user's run
        run.log({"user/after": 1.0})
    finally:
        run.finish()
    series, _, records = read_wandb(tmp_path)
    assert [s for s, _ in series["grad/norm"]] == list(range(6))
    assert [v for _, v in series["grad/norm"]] == pytest.approx([r.grad_norm for r in mon.records], rel=1e-12)
    user = [r for r in records if r.WhichOneof("record_type") == "history"]
    user_rows = [{i.key or "/".join(i.nested_key) for i in r.history.item} for r in user]
    assert sum("user/loss" in keys for keys in user_rows) == 6 and any("user/after" in k for k in user_rows)
    metrics = {r.metric.name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert metrics["grad/norm"] == "stabwatch/step" and "user/loss" not in metrics


def test_wandb_alert_cooldown_and_retry_skips_logged_rows(tmp_path):
    pytest.importorskip("wandb")
    sink = sw.sinks.WandbSink(project="p", mode="offline", dir=str(tmp_path), alert_cooldown_s=0.0)
    records = make_records(10)
    calls = {"n": 0}
    real_log = sink.run.log

    def flaky_log(data):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ConnectionError("injected")
        real_log(data)

    sink.run.log = flaky_log
    with pytest.raises(ConnectionError):
        sink.write_batch(records)
    sink.write_batch(records)  # the dispatcher's retry: same head
    sink.close()
    series, alerts, _ = read_wandb(tmp_path)
    assert [s for s, _ in series["loss/value"]] == list(range(10))
    assert len(alerts) == 1 and "step 7" in alerts[0]


def test_wandb_bad_mode_and_dir_fail_at_construction(tmp_path):
    pytest.importorskip("wandb")
    with pytest.raises(sw.StabwatchError, match="mode"):
        sw.sinks.WandbSink(mode="sometimes")
    (tmp_path / "f").write_text("")
    with pytest.raises(sw.StabwatchError, match="dir"):
        sw.sinks.WandbSink(mode="offline", dir=str(tmp_path / "f" / "sub"))


def test_tensorboard_scalars_alerts_and_config(tmp_path):
    pytest.importorskip("tensorboard")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sw.Monitor(model, opt, preset="cheap", sinks=[sw.sinks.TensorBoardSink(tmp_path / "tb")]) as mon:
        train(model, opt, 8, monitor=mon)
    series, _ = read_tensorboard(tmp_path / "tb")
    assert [s for s, _ in series["grad/norm"]] == list(range(8))
    assert [v for _, v in series["grad/norm"]] == pytest.approx([r.grad_norm for r in mon.records], rel=1e-6)
    layer_keys = [k for k in series if k.startswith("grad_layers/norm/")]
    assert len(layer_keys) == 3  # the MLP's three Linear layers
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


def test_tensorboard_unwritable_log_dir_fails_at_construction(tmp_path):
    pytest.importorskip("tensorboard")
    (tmp_path / "f").write_text("")
    with pytest.raises(sw.StabwatchError, match="log_dir"):
        sw.sinks.TensorBoardSink(tmp_path / "f" / "tb")
