"""One contract, every sink: records pushed through the background dispatcher arrive in the real
tracker — every key of every step, exactly once, in order, values intact — and alerts arrive too."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stabwatch import Alert, AlertReason, Severity, StabilityMetrics
from stabwatch.sinks import JsonlSink, LayerKeyPolicy
from stabwatch.sinks._dispatch import Dispatcher
from tests.sinks.readers import read_jsonl, read_mlflow, read_tensorboard, read_wandb, same

N_STEPS = 40
LAYERS = ["encoder.0", "encoder.1", "head"]
ALERT_STEPS = {7, 23}


def make_records(n: int = N_STEPS) -> list[StabilityMetrics]:
    records = []
    for step in range(n):
        layers = {
            name: {"grad_norm": 0.1 * (i + 1) + step * 1e-3, "update_ratio": 1e-3 / (i + 1 + step)}
            for i, name in enumerate(LAYERS)
        }
        if step == 11:
            layers["head"]["grad_norm"] = float("nan")
        alerts = []
        if step in ALERT_STEPS:
            alerts.append(
                Alert(
                    rule="grad_explode",
                    reason=AlertReason.EXPLODING_GRADIENT,
                    severity=Severity.CRITICAL,
                    step=step,
                    metric="grad_norm",
                    value=100.0 + step,
                    message=f"grad_norm {100.0 + step:.1f} is 40x its median",
                )
            )
        records.append(
            StabilityMetrics(
                step=step,
                loss=1.0 / (step + 1) if step != 11 else float("nan"),
                grad_norm=0.5 + 0.01 * step,
                update_ratio=1e-3 * (1 + step % 5),
                nonfinite=step == 11,
                spectral_norm=float("inf") if step == 30 else 1.0 + step / 100,
                layers=layers,
                extra={"grad_sv/top1/encoder.0": 2.0 + step, "analysis/spread": 0.5},
                alerts=alerts,
            )
        )
    return records


def expected(records: list[StabilityMetrics]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    policy = LayerKeyPolicy()
    for rec in records:
        for key, value in policy.select(rec).items():
            out.setdefault(key, []).append((rec.step, value))
    return out


SINKS = [
    "jsonl",
    pytest.param("mlflow-server", marks=[pytest.mark.server, pytest.mark.slow]),
    "mlflow-sqlite",
    "mlflow-file",
    "wandb",
    "tensorboard",
]


@pytest.mark.parametrize("kind", SINKS)
def test_every_key_of_every_step_arrives_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
):
    records = make_records()
    want = expected(records)
    assert len(want) == 5 + 2 * len(LAYERS) + 2  # global fields, per-layer, extras
    assert "grad_sv_layers/top1/encoder.0" in want and "grad_layers/norm/head" in want
    if kind == "jsonl":
        sink = JsonlSink(tmp_path / "run.jsonl")
    elif kind.startswith("mlflow"):
        from stabwatch.sinks import MlflowSink

        if kind == "mlflow-server":
            uri = request.getfixturevalue("live_mlflow").uri
        elif kind == "mlflow-file":  # MLflow 3 keeps its file store behind this switch
            monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (tmp_path / "mlruns").as_uri()
        else:
            uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        sink = MlflowSink(tracking_uri=uri, experiment="contract", log_figures=False)
    elif kind == "wandb":
        from stabwatch.sinks import WandbSink

        sink = WandbSink(project="contract", mode="offline", dir=str(tmp_path))
    else:
        from stabwatch.sinks import TensorBoardSink

        sink = TensorBoardSink(tmp_path / "tb")
    dispatcher = Dispatcher([sink], params={"preset": "default", "log_every": "1"}, batch_size=16)
    for rec in records:
        dispatcher.submit(rec)
    dispatcher.close()
    assert not list((tmp_path / "spill").glob("*.jsonl")), "nothing may be left unsent"

    float32 = inf_as_max = False
    if kind == "jsonl":
        got = read_jsonl(tmp_path / "run.jsonl")
    elif kind.startswith("mlflow"):
        got, tags = read_mlflow(sink.tracking_uri, sink.run_id, list(want))
        inf_as_max = True
        assert tags["stabwatch.alerts.count"] == str(len(ALERT_STEPS))
        assert "step 23 grad_explode" in tags["stabwatch.alert.grad_explode"]
        from mlflow import MlflowClient

        run = MlflowClient(sink.tracking_uri).get_run(sink.run_id)
        assert run.data.params["stabwatch.preset"] == "default"
        assert run.info.status == "FINISHED"
    elif kind == "wandb":
        got, alerts, wb_records = read_wandb(tmp_path)
        assert len(alerts) == 1 and "step 7" in alerts[0]  # the second one is inside the cooldown
        configs = [r.config for r in wb_records if r.WhichOneof("record_type") == "config"]
        assert any("stabwatch" in (u.key or "/".join(u.nested_key)) for c in configs for u in c.update)
    else:
        got, texts = read_tensorboard(tmp_path / "tb")
        float32 = True
        assert [s for s, _ in texts] == sorted(ALERT_STEPS)
        assert "grad_explode" in texts[0][1]
        assert [p.name for p in (tmp_path / "tb").iterdir() if p.is_dir()] == []  # no per-key folders
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for key, series in want.items():
        steps = [s for s, _ in got[key]]
        assert steps == [s for s, _ in series], f"{kind}: {key} steps {steps}"
        for (step, a), (_, b) in zip(series, got[key]):
            assert same(a, b, float32=float32, inf_as_max=inf_as_max), f"{kind}: {key}@{step}: {a} != {b}"
    assert math.isnan(dict(got["loss/value"])[11])
