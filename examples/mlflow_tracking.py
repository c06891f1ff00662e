"""Log a monitored training run to MLflow, then look at it in the MLflow UI.

Starts nothing by itself: the run goes to the tracking URI you give — ``--tracking-uri``, else the
``MLFLOW_TRACKING_URI`` environment variable, else a local SQLite file ``sqlite:///mlruns.db`` — and at
the end the script prints the command that opens the MLflow UI on it.

An MLP trains on scikit-learn's digits (generated clusters without scikit-learn); at two thirds of the
run its learning rate is raised 30-fold, so the run shows what an instability looks like: the update
ratio jumps, alerts fire (tags ``stabwatch.alert.<rule>`` and the artifact ``stabwatch/alerts.json``),
and the ``stabwatch/metrics.png`` figure marks them.

Run::

    python examples/mlflow_tracking.py                                  # sqlite:///mlruns.db
    python examples/mlflow_tracking.py --tracking-uri http://127.0.0.1:5000   # a running `mlflow server`
    MLFLOW_TRACKING_URI=sqlite:///runs/mlflow.db python examples/mlflow_tracking.py --steps 100
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

import stabwatch as sw
from stabwatch.demo import load_data

DEFAULT_URI = "sqlite:///mlruns.db"


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """How to open the MLflow UI on ``tracking_uri`` at this run."""
    scheme = urlparse(tracking_uri).scheme
    if scheme in ("http", "https"):
        return f"Open {tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    env = "MLFLOW_ALLOW_FILE_STORE=true " if scheme in ("", "file") else ""
    return (
        "Open the MLflow UI on this store (it serves until Ctrl-C):\n"
        f"    {env}mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000\n"
        f"then http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id} "
        "(tab 'Model metrics': grad/norm, update/ratio, and per layer grad_layers/norm/...)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI,
        help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI})",
    )
    parser.add_argument("--experiment", default="stabwatch-example", help="MLflow experiment name")
    parser.add_argument("--run-name", default="digits-mlp")
    parser.add_argument("--no-figures", action="store_true", help="skip the metrics figure at close")
    args = parser.parse_args(argv)

    x, y, source = load_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    jump_at = (2 * args.steps) // 3

    sink = sw.sinks.MlflowSink(
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        run_name=args.run_name,
        tags={"data": source},
        log_figures=not args.no_figures,
    )
    with sw.Monitor(model, opt, sinks=[sink], every={"update": 1}) as mon:
        for step in range(args.steps):
            if step == jump_at:
                for group in opt.param_groups:
                    group["lr"] *= 30  # the instability the records will show
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            mon.step(loss=loss)

    from mlflow import MlflowClient

    experiment_id = MlflowClient(args.tracking_uri).get_run(sink.run_id).info.experiment_id
    print(f"logged {len(mon.records)} steps to {args.tracking_uri}: experiment {args.experiment!r}, run {sink.run_id}")
    print(f"alerts: {len(mon.alerts)}" + (f" (first: {mon.alerts[0]})" if mon.alerts else ""))
    print(ui_hint(args.tracking_uri, experiment_id, sink.run_id))
    return {"tracking_uri": args.tracking_uri, "run_id": sink.run_id, "monitor": mon}


if __name__ == "__main__":
    main()
