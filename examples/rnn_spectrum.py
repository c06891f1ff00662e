"""The Lyapunov spectrum of an LSTM as a readout of training stability across learning rates.

The same LSTM(1, 32) is trained with SGD at a few learning rates on a generated task (recall the input
of ``DELAY`` steps ago from a stream of noise: the network must keep a memory). A
`stabwatch.collectors.LyapunovSpectrumCollector` measures the top exponents of the LSTM on a fixed probe
batch every ``--every`` steps, as in Vogt et al. (2020): a small learning rate leaves the spectrum where
the initialisation put it (strongly contracting: the network forgets fast), a good one moves λ_1 up
towards 0 (memory: the delay task needs it), a too large one pushes it further or makes the training
erratic. The final spectra and λ_1 over training are printed and plotted to ``rnn_spectrum.png``.

Run: ``python examples/rnn_spectrum.py`` (a few minutes on 2 CPU cores; ``--steps``, ``--lrs``, ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import stabwatch as sw
from stabwatch.analysis import lyapunov_spectrum
from stabwatch.collectors import LyapunovSpectrumCollector

DELAY = 5


class Recall(nn.Module):
    """``[B, T, 1]`` noise -> LSTM(1, 32) -> Linear: the prediction of ``x[t - DELAY]`` at every step."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


def _batch(g: torch.Generator, size: int = 32, length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, length, 1, generator=g)
    y = torch.zeros_like(x)
    y[:, DELAY:] = x[:, :-DELAY]
    return x, y


def train(lr: float, steps: int, every: int, seed: int = 0) -> dict[str, list[float]]:
    """Train one model; ``{"step", "lambda1", "loss"}`` at the measured steps, plus the final ``"spectrum"``."""
    torch.manual_seed(seed)
    model = Recall()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    col = LyapunovSpectrumCollector(every=every, top_k=4, steps=80, warmup=30, batch=4)
    g = torch.Generator().manual_seed(seed + 1)
    out: dict[str, list[float]] = {"step": [], "lambda1": [], "loss": []}
    with sw.Monitor(model, opt, preset="cheap", collectors=[col], alerts=False) as mon:
        for _ in range(steps):
            x, y = _batch(g)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x)[:, DELAY:], y[:, DELAY:])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            rec = mon.step(loss=loss)
            if rec is not None and "lyapunov_spectrum/max" in rec.to_dict():
                out["step"].append(float(rec.step))
                out["lambda1"].append(rec.to_dict()["lyapunov_spectrum/max"])
                out["loss"].append(float(loss.detach()))
    # the whole spectrum (2N = 64 exponents: the state is (h, c)) of the trained LSTM, offline
    probe = torch.randn(8, 300, 1, generator=torch.Generator().manual_seed(99))
    spec = lyapunov_spectrum(model.lstm, probe, warmup=100, k=16)  # batch_first: [B, T, 1]
    out["spectrum"] = spec.mean.tolist()
    out["final_loss"] = [float(sum(out["loss"][-3:]) / max(1, len(out["loss"][-3:])))]
    return out


def plot(results: dict[float, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for lr, r in results.items():
        a.plot(r["step"], r["lambda1"], marker="o", label=f"lr = {lr:g}")
        b.plot(range(1, len(r["spectrum"]) + 1), r["spectrum"], marker=".", label=f"lr = {lr:g}")
    a.set(xlabel="training step", ylabel="λ₁ (nats / time step)", title="top exponent during training")
    b.set(xlabel="i", ylabel="λᵢ (nats / time step)", title="top 16 exponents after training")
    for ax in (a, b):
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[float, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.3, 3.0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    results = {lr: train(lr, args.steps, args.every) for lr in args.lrs}
    print(f"{'lr':>8} {'final loss':>11} {'λ1 start':>9} {'λ1 end':>8}   top 4 exponents after training")
    for lr, r in results.items():
        top = " ".join(f"{v:+.3f}" for v in r["spectrum"][:4])
        print(f"{lr:8g} {r['final_loss'][0]:11.4f} {r['lambda1'][0]:+9.3f} {r['lambda1'][-1]:+8.3f}   {top}")
    if not args.no_plot:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(results, args.out / "rnn_spectrum.png")
        print(f"plot: {args.out / 'rnn_spectrum.png'}")
    return results


if __name__ == "__main__":
    main()
