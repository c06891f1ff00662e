"""``stabwatch demo``: a stable and an unstable run, monitored, side by side.

Trains a small MLP on scikit-learn's digits (shipped inside scikit-learn; generated Gaussian-cluster
data when scikit-learn is not installed) twice: once with a sensible learning rate and once with a
learning rate far too high. Writes one JSONL run file per run, prints per-step lines under a progress
bar, the alerts and the diagnosis.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["add_parser", "load_data", "run_demo"]

log = logging.getLogger("stabwatch")


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Digits (1797 x 64, 10 classes) standardised, or generated clusters of the same shape."""
    try:
        from sklearn.datasets import load_digits

        x_np, y_np = load_digits(return_X_y=True)
        x = torch.tensor(x_np, dtype=torch.float32)
        y = torch.tensor(y_np, dtype=torch.long)
        source = "scikit-learn digits"
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(10, 64, generator=g) * 3
        y = torch.randint(0, 10, (1797,), generator=g)
        x = centers[y] + torch.randn(1797, 64, generator=g)
        source = "generated clusters (install scikit-learn for the digits data)"
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, y, source


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))


def run_demo(
    out_dir: str | Path = "stabwatch_runs",
    steps: int = 150,
    batch_size: int = 64,
    lrs: tuple[float, float] = (0.05, 8.0),
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the two demo trainings; return ``{name: (monitor, path)}``."""
    import stabwatch as sw

    x, y, source = load_data(seed)
    out = Path(out_dir)
    results: dict[str, Any] = {}
    print(f"stabwatch demo: MLP 64-128-128-10 on {source}, {steps} steps, batch {batch_size}")
    for name, lr in zip(("stable", "unstable"), lrs):
        model = _model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        path = out / f"{name}.jsonl"
        sinks: list[Any] = [sw.sinks.JsonlSink(path)]
        if not quiet:
            sinks.append(sw.sinks.ConsoleSink(every=max(1, steps // 10), stream=sys.stdout))
        g = torch.Generator().manual_seed(seed)
        try:
            from tqdm import tqdm

            bar: Any = tqdm(range(steps), desc=f"{name} (lr={lr})", disable=quiet, file=sys.stdout)
        except ImportError:  # pragma: no cover
            bar = range(steps)
        with sw.Monitor(model, opt, sinks=sinks, preset="default", every={"grad_sv": 10, "weight": 10}) as mon:
            for _ in bar:
                idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                rec = mon.step(loss=loss)
                if rec is not None and hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"loss={rec.loss:.3g} grad={rec.grad_norm or float('nan'):.3g}")
        print(f"\n== {name} run (lr={lr}): {len(mon.alerts)} alert(s); records in {path}")
        for alert in list(mon.alerts)[:10]:
            print(f"  {alert}")
        print(mon.diagnose())
        results[name] = (mon, path)
    return results


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="train a stable and an unstable run with the monitor on")
    p.add_argument("--out", default="stabwatch_runs", help="folder for the JSONL run files")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no per-step lines or progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.steps < 1:
        print("stabwatch demo: --steps must be >= 1", file=sys.stderr)
        return 2
    run_demo(args.out, steps=args.steps, seed=args.seed, quiet=args.quiet)
    return 0
