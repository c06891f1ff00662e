"""A surrogate-gradient spiking network (snntorch) on scikit-learn's digits, monitored by stabwatch.

Two runs of the same SNN, ``Linear(64, 128) -> Leaky -> Linear(128, 10) -> Leaky`` unrolled over 25
time steps, on the 8x8 digits rate-coded as spike trains:

* ``healthy``: the default initialisation. The hidden layer fires at a moderate rate and the network
  learns (test accuracy well above chance within a few epochs).
* ``silent``: a bad initialisation, the hidden layer's bias set to -6 (far below the firing threshold
  of 1). ``lif1`` never fires, no surrogate gradient reaches ``fc1``, and the network cannot learn.
  The dead-neuron alert fires on ``lif1`` and ``Monitor.diagnose()`` names the layer and what to try.

The spiking layers are found by themselves (snntorch ``SpikingNeuron``); stabwatch accumulates spike
counts and membrane sums on the device over the 25 steps and reads them once per record.

Run: ``python examples/snn_training.py`` (``--steps``, ``--out`` for the JSONL run files).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import stabwatch as sw

T = 25


class SNN(nn.Module):
    """Two leaky integrate-and-fire layers with a fast-sigmoid surrogate gradient."""

    def __init__(self, hidden: int = 128, bad_init: bool = False) -> None:
        super().__init__()
        import snntorch as snn
        from snntorch import surrogate

        grad = surrogate.fast_sigmoid(slope=25)
        self.fc1 = nn.Linear(64, hidden)
        self.lif1 = snn.Leaky(beta=0.9, spike_grad=grad)
        self.fc2 = nn.Linear(hidden, 10)
        self.lif2 = snn.Leaky(beta=0.9, spike_grad=grad)
        if bad_init:
            with torch.no_grad():
                self.fc1.bias.fill_(-6.0)
        #: keep the hidden layer's spikes and membrane per step (what SNN code without stabwatch does)
        self.record = False
        self.spk_rec: list[torch.Tensor] = []
        self.mem_rec: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: spikes ``[T, B, 64]``; returns output spikes ``[T, B, 10]``."""
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = []
        self.spk_rec, self.mem_rec = [], []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk2)
            if self.record:
                self.spk_rec.append(spk1)
                self.mem_rec.append(mem1)
        return torch.stack(out)


def load_digits_spikes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1] (the firing probability per time step); train / test split 80 / 20."""
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32) / 16.0
    y = torch.tensor(y_np, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def rate_code(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli spike trains ``[T, B, 64]`` with per-step probability ``x``."""
    return (torch.rand(T, *x.shape, generator=generator) < x).float()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 1) -> float:
    model.eval()
    with torch.no_grad():
        counts = model(rate_code(x, torch.Generator().manual_seed(seed))).sum(0)
    model.train()
    return float((counts.argmax(1) == y).float().mean())


def train(
    name: str,
    bad_init: bool,
    steps: int = 120,
    batch_size: int = 128,
    out_dir: str | Path = "stabwatch_runs",
    seed: int = 0,
    every: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one configuration under a `stabwatch.Monitor`; returns the monitor, accuracy and run file."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_spikes(seed)
    model = SNN(bad_init=bad_init)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    path = Path(out_dir) / f"snn_{name}.jsonl"
    g = torch.Generator().manual_seed(seed)
    with sw.Monitor(model, opt, sinks=[sw.sinks.JsonlSink(path)], every=every or {}) as mon:
        for step in range(steps):
            idx = torch.randint(0, len(y_train), (batch_size,), generator=g)
            opt.zero_grad()
            counts = model(rate_code(x_train[idx], g)).sum(0)  # output spike counts [B, 10]
            loss = nn.functional.cross_entropy(counts, y_train[idx])
            loss.backward()
            opt.step()
            rec = mon.step(loss=loss)
            if rec is not None and rec.firing_rate_mean is not None and step % 20 == 0:
                rates = ", ".join(
                    f"{layer} {vals['firing_rate_mean']:.3f} (dead {vals['dead_neuron_frac']:.0%})"
                    for layer, vals in rec.layers.items()
                    if "firing_rate_mean" in vals
                )
                print(f"  [{name}] step {step:3d}  loss {rec.loss:.3f}  firing rate {rates}")
    acc = accuracy(model, x_test, y_test)
    return {"monitor": mon, "accuracy": acc, "path": path}


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", default="stabwatch_runs", help="folder for the JSONL run files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="snntorch")
    results = {}
    for name, bad_init in (("healthy", False), ("silent", True)):
        print(f"== {name} SNN ({'hidden bias -6' if bad_init else 'default init'}), {args.steps} steps, T={T}")
        res = train(name, bad_init, steps=args.steps, out_dir=args.out, seed=args.seed)
        mon = res["monitor"]
        print(f"  test accuracy {res['accuracy']:.1%}; {len(mon.alerts)} alert(s); records in {res['path']}")
        print(mon.diagnose())
        print()
        results[name] = res
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
