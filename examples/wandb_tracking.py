"""Log a monitored training run to Weights & Biases in offline mode: no account, no network.

The run is written under ``--dir`` (default: ``$WANDB_DIR``, else the current folder) as
``wandb/offline-run-*/``; the script prints the ``wandb sync`` command that uploads it later, where the
stabwatch panels appear grouped per family (``grad``, ``update``, ...) and per family's per-layer keys
(``grad_layers``, ...) against ``stabwatch/step``.

An MLP trains on scikit-learn's digits (generated clusters without scikit-learn); at two thirds of the
run its learning rate is raised 30-fold, so alerts fire (``run.alert``, stored in the offline run).

Run::

    python examples/wandb_tracking.py [--steps 300] [--project stabwatch-example] [--dir runs]
    wandb sync runs/wandb/offline-run-*        # later, with an account
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import stabwatch as sw
from stabwatch.demo import load_data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--project", default="stabwatch-example", help="W&B project")
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("WANDB_DIR") or "."), help="where wandb/ goes")
    args = parser.parse_args(argv)

    x, y, source = load_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    jump_at = (2 * args.steps) // 3

    args.dir.mkdir(parents=True, exist_ok=True)
    sink = sw.sinks.WandbSink(
        project=args.project, mode="offline", dir=str(args.dir), name="digits-mlp", config={"data": source}
    )
    run_dir = Path(sink.run.dir).parent  # wandb/offline-run-<time>-<id>
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

    print(f"logged {len(mon.records)} steps offline to {run_dir}")
    print(f"alerts: {len(mon.alerts)}" + (f" (first: {mon.alerts[0]})" if mon.alerts else ""))
    print(
        f"Upload it to W&B (needs an account: `wandb login`), then open the link it prints:\n    wandb sync {run_dir}"
    )
    return {"run_dir": run_dir, "run_id": sink.run.id, "monitor": mon}


if __name__ == "__main__":
    main()
