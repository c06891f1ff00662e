"""examples/mlflow_tracking.py and examples/wandb_tracking.py run at a tiny size, and the tracker holds what
the monitor measured: ``grad/norm`` of every step, read back through MLflow's client and from the W&B
offline run file."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import offline_tracker_env
from tests.sinks.readers import read_mlflow, read_wandb

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 12


def _main(name: str) -> Any:
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"]


@pytest.fixture
def _quiet_trackers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    offline_tracker_env(monkeypatch, tmp_path)


def _grad_norms(monitor: Any) -> list[tuple[int, float]]:
    return [(r.step, r.grad_norm) for r in monitor.records]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["env", "default"])
def test_mlflow_example_logs_grad_norm_and_says_how_to_open_the_ui(
    where: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    _quiet_trackers,
    one_thread,
) -> None:
    pytest.importorskip("mlflow")
    if where == "env":
        uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
        (tmp_path / "store").mkdir()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    else:  # nothing given: a SQLite file in the working directory
        uri = "sqlite:///mlruns.db"
    out = _main("mlflow_tracking")(["--steps", str(STEPS), "--no-figures"])
    assert out["tracking_uri"] == uri
    if where == "default":
        assert (tmp_path / "mlruns.db").is_file()

    series, tags = read_mlflow(uri, out["run_id"], ["grad/norm", "update/ratio"])
    expected = _grad_norms(out["monitor"])
    assert len(expected) == STEPS and all(v is not None and v > 0 for _, v in expected)
    assert series["grad/norm"] == expected  # every step, the value the monitor measured, once
    assert len(series["update/ratio"]) == STEPS
    assert tags["stabwatch.alerts.count"] == str(len(out["monitor"].alerts))

    text = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri {uri}" in text
    assert out["run_id"] in text


def test_mlflow_ui_hint_for_a_server_and_a_file_store() -> None:
    hint = runpy.run_path(str(EXAMPLES / "mlflow_tracking.py"))["ui_hint"]
    assert hint("http://127.0.0.1:5000/", "3", "abc") == "Open http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert "MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri /tmp/mlruns" in hint("/tmp/mlruns", "0", "r")
    assert "MLFLOW_ALLOW_FILE_STORE" not in hint("sqlite:///m.db", "0", "r")


@pytest.mark.slow
def test_wandb_example_logs_grad_norm_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], _quiet_trackers, one_thread
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = _main("wandb_tracking")(["--steps", str(STEPS)])
    assert out["run_dir"].parent == tmp_path / "wandb" and out["run_dir"].name.startswith("offline-run-")

    series, alerts, _ = read_wandb(tmp_path)
    expected = _grad_norms(out["monitor"])
    assert len(expected) == STEPS and all(v is not None and v > 0 for _, v in expected)
    assert series["grad/norm"] == expected
    sent = {f"stabwatch: {a.rule}" for a in out["monitor"].alerts}  # one run.alert per rule and layer
    assert sent and {text.split(": step ")[0] for text in alerts} == sent
    assert f"wandb sync {out['run_dir']}" in capsys.readouterr().out
