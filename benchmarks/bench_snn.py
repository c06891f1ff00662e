"""Monitor overhead on a spiking network with 25 time steps (snntorch), vs a bare training step.

The SNN of ``examples/snn_training.py``: scikit-learn digits (64 inputs, rate-coded), ``Linear(64,
256) -> Leaky -> Linear(256, 10) -> Leaky``, 25 time steps (one forward call per step per layer, so
100 module calls per training step), batch 128, Adam, on CPU. Prints the time per training step and
its ratio to the bare loop measured in the same run (configs interleaved, medians of the repeats):

* ``stabwatch:default`` — the default preset as shipped (target: <= 1.05x);
* ``stabwatch:default-no-spiking`` — the same without the spiking family (its marginal cost is the
  difference);
* ``stabwatch:default-no-nonfinite`` — the default preset without the per-module non-finite checks;
* ``stabwatch:only-spiking@10`` / ``@1`` — the spiking family alone at its default period / every step;
* ``stabwatch:full`` — every family every step;
* ``peer:hand-written`` — what SNN code does today: keep each step's spikes and membranes in lists,
  stack them, and compute firing/membrane statistics and a per-parameter ``.item()`` gradient norm
  every step (the reference monitor's ``compute(model, spikes=..., membrane=...)``).

Run: ``python benchmarks/bench_snn.py`` (``--quick`` for a smoke run; ``--cpu-time`` on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved

import stabwatch as sw
from stabwatch.collectors import FAMILIES, PRESETS

T = 25
BATCH = 128
#: the clock the timings use: wall time by default, process CPU time with ``--cpu-time``
CLOCK: list[Callable[[], float]] = [time.perf_counter]


class SNN(nn.Module):
    """Two snntorch ``Leaky`` layers unrolled over ``T`` steps; records spikes when ``record`` is set."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        import snntorch as snn
        from snntorch import surrogate

        grad = surrogate.fast_sigmoid(slope=25)
        self.fc1 = nn.Linear(64, hidden)
        self.lif1 = snn.Leaky(beta=0.9, spike_grad=grad)
        self.fc2 = nn.Linear(hidden, 10)
        self.lif2 = snn.Leaky(beta=0.9, spike_grad=grad)
        self.record = False
        self.spikes: list[torch.Tensor] = []
        self.membrane: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, B, 64]
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = []
        self.spikes, self.membrane = [], []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk2)
            if self.record:
                self.spikes.append(spk1)
                self.membrane.append(mem1)
        return torch.stack(out)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np[:BATCH], dtype=torch.float32) / 16.0
    g = torch.Generator().manual_seed(0)
    spikes = (torch.rand(T, *x.shape, generator=g) < x).float()  # rate coding
    return spikes, torch.tensor(y_np[:BATCH], dtype=torch.long)


def _hand_written(model: SNN) -> Callable[[], None]:
    def extra() -> None:
        spikes = torch.stack(model.spikes, dim=1)  # [B, T, H], as the reference expects
        mem = torch.stack(model.membrane)
        with torch.no_grad():
            rates = spikes.float().mean(dim=1).mean(dim=0)
            _ = (rates.mean().item(), rates.std().item(), (rates < 0.01).float().mean().item())
            _ = (rates > 0.9).float().mean().item()
            _ = (mem.mean().item(), mem.std().item())
            total = 0.0
            for p in model.parameters():
                if p.grad is not None:
                    total += p.grad.data.norm(2).item() ** 2

    return extra


def _runner(kind: str, steps: int) -> Callable[[int], float]:
    torch.manual_seed(0)
    model = SNN()
    x, y = data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon: Any = None
    extra: Callable[[], None] | None = None
    if kind.startswith("stabwatch:"):
        spec = kind.split(":", 1)[1]
        if spec.startswith("only-spiking@"):
            every: dict[str, Any] = {f: None for f in FAMILIES}
            every["spiking"] = int(spec.split("@")[1])
            mon = sw.Monitor(model, opt, preset="cheap", every=every, alerts=False)
        elif spec.startswith("default-no-"):
            mon = sw.Monitor(model, opt, every={spec[len("default-no-") :]: None})
        else:
            mon = sw.Monitor(model, opt, preset=spec)
        mon.start()
    elif kind == "peer:hand-written":
        model.record = True
        extra = _hand_written(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).sum(0), y)
        loss.backward()
        opt.step()
        if extra is not None:
            extra()
        if mon is not None:
            mon.step(loss=loss)

    for _ in range(3):
        step()

    def timed(_: int) -> float:
        t0 = CLOCK[0]()
        for _ in range(steps):
            step()
        return (CLOCK[0]() - t0) / steps

    return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40, help="training steps per timing (use a multiple of 10)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process CPU clock and one torch thread (robust on a machine shared with other "
        "jobs, where wall time measures the neighbours)",
    )
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 10, 2
    if args.cpu_time:
        CLOCK[0] = time.process_time
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, SNN T={T} batch={BATCH}, "
        f"steps={args.steps} repeats={args.repeats}, clock {'process CPU' if args.cpu_time else 'wall'}; "
        f"default spiking period {PRESETS['default']['spiking']}"
    )
    kinds = [
        "bare",
        "stabwatch:default",
        "stabwatch:default-no-spiking",
        "stabwatch:default-no-nonfinite",
        "stabwatch:only-spiking@10",
        "stabwatch:only-spiking@1",
        "stabwatch:full",
        "peer:hand-written",
    ]
    runners = {k: _runner(k, args.steps) for k in kinds}
    med = interleaved(runners, args.repeats)
    bare = med["bare"]
    print(f"\nSNN (snntorch Leaky x2, T={T}): bare step {bare * 1e3:.2f} ms")
    for k in kinds:
        print(f"  {k:<34} {med[k] * 1e3:8.2f} ms   {med[k] / bare:6.3f}x")
    print(f"\n  spiking family, marginal in the default preset: {(med[kinds[1]] - med[kinds[2]]) / bare:+.3%}")


if __name__ == "__main__":
    main()
