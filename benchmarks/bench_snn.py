"""Monitor overhead on a spiking network with 25 time steps (snntorch), vs a bare training step.

The SNN of ``examples/snn_training.py``: scikit-learn digits (64 inputs, rate-coded), ``Linear(64,
256) -> Leaky -> Linear(256, 10) -> Leaky``, 25 time steps (one forward call per step per layer, so
100 module calls per training step), batch 128, Adam, on CPU. Prints the time per training step and
its ratio to the bare loops measured in the same run (configs in lockstep, `_common.lockstep`):

* ``stabwatch:default`` — the default preset as shipped (target: <= 1.05x);
* ``stabwatch:default-no-spiking`` — the same without the spiking family (its marginal cost is the
  difference);
* ``stabwatch:default-no-nonfinite`` — the default preset without the per-module non-finite checks;
* ``stabwatch:nothing`` — every family off: the cost of `Monitor.step` itself (a record per step);
* ``stabwatch:only-spiking@10`` / ``@1`` — the spiking family alone at its default period / every step;
* ``stabwatch:full`` — every family every step;
* ``peer:hand-written`` — what SNN code does today: keep each step's spikes and membranes in lists,
  stack them, and compute firing/membrane statistics and a per-parameter ``.item()`` gradient norm
  every step (the reference monitor's ``compute(model, spikes=..., membrane=...)``).

Run: ``python benchmarks/bench_snn.py`` (``--quick`` for a smoke run; ``--cpu-time`` on a shared machine).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from _common import lockstep
from snn_training import SNN, T, load_digits_spikes, rate_code

import stabwatch as sw
from stabwatch.collectors import FAMILIES, PRESETS

BATCH = 128
#: the clock the timings use: wall time by default, process CPU time with ``--cpu-time``
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = load_digits_spikes()
    return rate_code(x[:BATCH], torch.Generator().manual_seed(0)), y[:BATCH]


def _hand_written(model: SNN) -> Callable[[], None]:
    def extra() -> None:
        spikes = torch.stack(model.spk_rec, dim=1)  # [B, T, H], as the hand-written monitors expect
        mem = torch.stack(model.mem_rec)
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


def _runner(kind: str) -> Callable[[], None]:
    torch.manual_seed(0)
    model = SNN(hidden=256)
    x, y = data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon: Any = None
    extra: Callable[[], None] | None = None
    if kind.startswith("stabwatch:"):
        spec = kind.split(":", 1)[1]
        if spec == "nothing":
            mon = sw.Monitor(model, opt, preset="cheap", every={f: None for f in FAMILIES}, alerts=False)
        elif spec.startswith("only-spiking@"):
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
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200, help="lockstep rounds (one step of every config each)")
    ap.add_argument("--window", type=int, default=50, help="rounds per ratio window (a multiple of 10)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few rounds")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process CPU clock and one torch thread (robust on a machine shared with other "
        "jobs, where wall time measures the neighbours)",
    )
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.window = 6, 3
    if args.cpu_time:
        CLOCK[0] = time.process_time
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("stabwatch").setLevel(logging.ERROR)  # the default preset's alerts are not the point here
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, SNN T={T} batch={BATCH}, "
        f"{args.rounds} lockstep rounds, clock {'process CPU' if args.cpu_time else 'wall'}; "
        f"default spiking period {next(c.every for c in PRESETS['default']() if c.family == 'spiking')}"
    )
    kinds = [
        "bare",
        "bare-2",
        "stabwatch:default",
        "stabwatch:default-no-spiking",
        "stabwatch:default-no-nonfinite",
        "stabwatch:nothing",
        "stabwatch:only-spiking@10",
        "stabwatch:only-spiking@1",
        "stabwatch:full",
        "peer:hand-written",
    ]
    steps = {k: _runner(k) for k in kinds}
    res = lockstep(steps, ("bare", "bare-2"), args.rounds, args.window, clock=CLOCK[0])
    ratio = {k: v[1] for k, v in res.items()}
    print(f"\nSNN (snntorch Leaky x2, T={T}): bare step {res['bare'][0] * 1e3:.2f} ms")
    for k in kinds:
        sec, r, iqr, total = res[k]
        print(f"  {k:<34} {sec * 1e3:8.2f} ms   {r:6.3f}x  (iqr {iqr:.3f}, total {total:.3f}x)")
    print(f"\n  spiking family, marginal in the default preset: {ratio[kinds[2]] - ratio[kinds[3]]:+.2%}")
    for k in ("stabwatch:only-spiking@10", "stabwatch:only-spiking@1"):
        print(f"  {k[10:]}, above the monitor's own per-step cost: {ratio[k] - ratio['stabwatch:nothing']:+.2%}")


if __name__ == "__main__":
    main()
