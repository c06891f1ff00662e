"""Which architecture trains most reproducibly? Compare Lyapunov exponents with confidence intervals.

Five small networks (shallow, deep, residual, dropout, batch norm) are analysed on the same data with
the same optimizer. Each analysis uses a `TrainStep`, so the replicas train in one vectorised pass
(the batch-norm network, which ``vmap`` cannot batch in training mode, falls back to training the
replicas one by one, automatically). Architectures are ranked by their exponent; two are only
really different when their confidence intervals do not overlap.

Each run's records also go to a JSONL file through a stabwatch sink.

Run:  python examples/comparing_architectures.py [--epochs 8] [--out architecture_comparison]
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stabwatch.analysis import AnalysisResults, StabilityAnalyzer, TrainStep
from stabwatch.sinks import JsonlSink


class Residual(nn.Module):
    """``relu(x W1 -> relu -> W2 + skip(x))``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Linear(d_out, d_out))
        self.skip = nn.Linear(d_in, d_out) if d_in != d_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "shallow": lambda: nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 10)),
    "deep": lambda: nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)
    ),
    "residual": lambda: nn.Sequential(Residual(20, 64), Residual(64, 32), nn.Linear(32, 10)),
    "dropout": lambda: nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)
    ),
    "batchnorm": lambda: nn.Sequential(
        nn.Linear(20, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ),
}


def make_loader(n_samples: int = 512, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, 20, generator=g)
    y = torch.sin(x @ torch.randn(20, 10, generator=g))
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


STEP = TrainStep(
    loss_fn=lambda model, batch: F.mse_loss(model(batch[0]), batch[1]),
    optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
)


def analyse(name: str, epochs: int, out: Path) -> AnalysisResults:
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    sink = JsonlSink(out / name / "records.jsonl")
    with StabilityAnalyzer(model, n_trajectories=5, device="cpu", verbose=False, sinks=[sink]) as analyzer:
        results = analyzer.analyze(STEP, make_loader(), n_epochs=epochs)  # closing the analyzer closes the sink
    results.save_report(out / name)
    return results


def main(argv: list[str] | None = None) -> dict[str, AnalysisResults]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="architecture_comparison", help="report directory")
    args = parser.parse_args(argv)
    out = Path(args.out)

    results = {name: analyse(name, args.epochs, out) for name in ARCHITECTURES}

    print(f"\n{'architecture':<12} {'params':>7} {'ratio':>8} {'λ / epoch':>10} {'95% CI':>20} {'eff. dim':>9}")
    ranked = sorted(results.items(), key=lambda kv: kv[1].lyapunov)
    for name, r in ranked:
        low, high = r.lyapunov_ci
        print(
            f"{name:<12} {r.n_parameters:>7,} {r.convergence_ratio:>8.3f} {r.lyapunov:>+10.4f} "
            f"{f'[{low:+.3f}, {high:+.3f}]':>20} {r.effective_dimensionality:>9.2f}"
        )
    (best, rb), (worst, rw) = ranked[0], ranked[-1]
    separated = rb.lyapunov_ci[1] < rw.lyapunov_ci[0]
    print(
        f"\nmost reproducible: {best}; least: {worst} "
        + ("(intervals do not overlap)" if separated else "(intervals overlap: not clearly different)")
    )
    for name, r in results.items():
        for message in r.diagnostics:
            print(f"note [{name}]: {message}")
    print(f"reports and JSONL records in {out}/")
    return results


if __name__ == "__main__":
    main()
