"""Stability analysis inside your own training loop (manual recording mode).

When the training loop is yours (GANs, RL, schedulers, gradient accumulation...), let the analyzer
make the replicas, train them yourself, and tell it when to record:

    analyzer.start_recording()          # makes the perturbed replicas, records their start
    models = analyzer.get_models()      # train THESE (replica 0 is the unperturbed copy)
    ...                                 # your loop
    analyzer.record_checkpoint()        # after each epoch
    results = analyzer.compute_metrics()

Train the replicas, not the model you passed in: the analyzer never reads the original again (it
warns if a checkpoint finds the replicas unchanged). Give every replica the same batches in the same
order, as below, or data-order noise will be measured as divergence.

Run:  python examples/custom_training.py [--epochs 10] [--out custom_training_report]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stabwatch.analysis import AnalysisResults, StabilityAnalyzer


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))


def make_loader(n_samples: int = 256, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, 10, generator=g)
    y = torch.tanh(x @ torch.randn(10, 5, generator=g)) + 0.1 * torch.randn(n_samples, 5, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


def main(argv: list[str] | None = None) -> AnalysisResults:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="custom_training_report", help="report directory")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    analyzer = StabilityAnalyzer(make_model(), perturbation_scale=0.01, n_trajectories=3, device="cpu", verbose=False)
    analyzer.start_recording()
    models = analyzer.get_models()
    print(f"{len(models)} replicas of {sum(p.numel() for p in models[0].parameters()):,} parameters")

    # One optimizer and one LR schedule per replica, created once: their state persists across epochs.
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5) for opt in optimizers]
    loader = make_loader()
    history: list[dict[str, list[float]]] = [{"loss": []} for _ in models]

    for epoch in range(args.epochs):
        totals = [0.0] * len(models)
        for x, y in loader:  # one batch, every replica: identical data order by construction
            for i, (model, opt) in enumerate(zip(models, optimizers)):
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                totals[i] += loss.item()
        for i, sched in enumerate(schedulers):
            sched.step()
            history[i]["loss"].append(totals[i] / len(loader))
        analyzer.record_checkpoint()
        print(f"epoch {epoch + 1:2d}: mean loss {sum(totals) / len(totals) / len(loader):.4f}")

    results = analyzer.compute_metrics(history)
    low, high = results.lyapunov_ci
    print(
        f"\nconvergence ratio {results.convergence_ratio:.3f}x, λ = {results.lyapunov:+.4f} [{low:+.4f}, {high:+.4f}]"
    )
    print(f"behaviour: {results.behavior}")
    print("local exponents per epoch: " + " ".join(f"{v:+.3f}" for v in results.local_lyapunov))
    for tm in results.trajectory_metrics:
        print(
            f"  replica {tm.trajectory_id}: path length {tm.path_length:.3f}, "
            f"speed {tm.velocity_mean:.3f} ± {tm.velocity_std:.3f} per epoch, final loss {tm.final_loss:.4f}"
        )
    report = results.save_report(args.out, format="markdown")
    print(f"report: {report}")
    return results


if __name__ == "__main__":
    main()
