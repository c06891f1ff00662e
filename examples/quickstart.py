"""Quickstart: monitor a small classifier on scikit-learn's digits and read the records back.

Run: ``python examples/quickstart.py`` (writes ``runs/quickstart.jsonl``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

import stabwatch as sw
from stabwatch.demo import load_data

STEPS = int(os.environ.get("STABWATCH_EXAMPLE_STEPS", "200"))


def main() -> None:
    x, y, source = load_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    sinks = [sw.sinks.JsonlSink("runs/quickstart.jsonl"), sw.sinks.ConsoleSink(every=max(1, STEPS // 5))]
    with sw.Monitor(model, opt, sinks=sinks, every={"grad_sv": 20, "weight": 20}) as mon:
        for _ in range(STEPS):
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    last = mon.records[-1]
    print(f"data: {source}; last record: {last}")
    print(
        "per-layer gradient norms:", {k: round(v["grad_norm"], 4) for k, v in last.layers.items() if "grad_norm" in v}
    )
    print(mon.diagnose())
    records = list(sw.sinks.read_jsonl("runs/quickstart.jsonl"))
    print(f"{len(records)} records read back from runs/quickstart.jsonl")


if __name__ == "__main__":
    main()
