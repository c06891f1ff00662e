"""Read what a sink wrote back from the tracker itself, as ``{key: [(step, value), ...]}`` in
logged order, plus the alert texts."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.sinks.conftest import wandb_history, wandb_records

Series = dict[str, list[tuple[int, float]]]


def read_mlflow(uri: str, run_id: str, keys: list[str]) -> tuple[Series, dict[str, str]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    series: Series = {}
    for key in keys:
        hist = client.get_metric_history(run_id, key)
        series[key] = [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]
    return series, dict(client.get_run(run_id).data.tags)


def read_wandb(wandb_dir: Path, step_metric: str = "stabwatch/step") -> tuple[Series, list[str], list[Any]]:
    records = wandb_records(wandb_dir)
    series: Series = defaultdict(list)
    for row in wandb_history(records):
        if step_metric not in row:
            continue
        step = int(row[step_metric])
        for key, value in row.items():
            if key.startswith("_") or key == step_metric:
                continue
            series[key].append((step, float(value)))
    alerts = [r.alert.title + ": " + r.alert.text for r in records if r.WhichOneof("record_type") == "alert"]
    return dict(series), alerts, records


def read_tensorboard(log_dir: Path) -> tuple[Series, list[tuple[int, str]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = []
    for tag in acc.Tags().get("tensors", []):
        if tag.startswith("stabwatch/alerts"):
            for e in acc.Tensors(tag):
                texts.append((e.step, e.tensor_proto.string_val[0].decode()))
    return series, texts


def read_jsonl(path: Path) -> Series:
    from stabwatch.sinks import read_jsonl as read

    series: Series = defaultdict(list)
    for rec in read(path):
        for key, value in rec.to_dict().items():
            series[key].append((rec.step, value))
    return dict(series)


def same(a: float, b: float, *, float32: bool = False, inf_as_max: bool = False) -> bool:
    if inf_as_max and math.isinf(a) and b == math.copysign(1.7976931348623157e308, a):
        return True  # MLflow's SQL store keeps ±inf as ±max float (its file store keeps ±inf)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if float32:
        import numpy as np

        return float(np.float32(a)) == b
    return a == b


def dumps(series: Series) -> str:
    return json.dumps({k: v[:5] for k, v in list(series.items())[:5]})
