"""Monitor overhead vs a bare training step, and vs what people use today.

Prints, for an 8x512 MLP (batch 128) and a small CNN on CPU, the time per training step as a ratio to
the bare loop measured in the same run:

* stabwatch presets ``cheap``, ``default``, ``full``, and ``full`` with one family at a time (where
  the time goes);
* a hand-written monitor: per-parameter ``.item()`` gradient-norm loop (``peer:item-loop``) and the
  same plus a full ``svdvals`` of every gradient on the CPU each step (``peer:item+svd``);
* ``wandb.watch(model, log="gradients", log_freq=1)`` in offline mode, where wandb is installed;
* ``read:grad-pass``: the bare step plus one `functional.squared_norms` pass over the gradients (what
  the ``grad`` family reduces), the floor of any monitor that reads every gradient at every step.

Targets (issue #2): default <= 1.03x, full <= 1.5x. Run: ``python benchmarks/bench_overhead.py``.
The configs run in lockstep, one training step of each per round, every step timed
(`_common.lockstep`): on a shared machine whose speed drifts by tens of percent over seconds, only
neighbouring steps compare. ``bare-2``, a second bare loop, shows the noise floor. ``--cpu-time``
times with the process's CPU time and one torch thread, for a machine shared with other jobs (the
monitor's self-timed ``monitor/overhead_ms`` stays wall time: it is inflated there).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import lockstep

import stabwatch as sw
from stabwatch.collectors import FAMILIES
from stabwatch.functional import squared_norms

#: batches cycled through (gradients differ from step to step, as in training, so warm starts of the
#: iterative spectra do not look better than they are)
POOL = 8


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    layers.append(nn.Linear(512, 10))
    return nn.Sequential(*layers), torch.randn(POOL, 128, 512), torch.randint(0, 10, (POOL, 128))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    return model, torch.randn(POOL, 64, 3, 32, 32), torch.randint(0, 10, (POOL, 64))


def _runner(
    make: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]], kind: str
) -> tuple[Callable[[], None], Callable[[], float | None]]:
    model, x, y = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    mon: Any = None
    extra: Callable[[], None] | None = None
    if kind.startswith("stabwatch:"):
        spec = kind.split(":", 1)[1]
        if spec.startswith("only-"):
            fam = spec[5:]
            every = {f: (1 if f == fam else None) for f in FAMILIES}
            mon = sw.Monitor(model, opt, preset="cheap", every=every, alerts=False)
        else:
            mon = sw.Monitor(model, opt, preset=spec)
        mon.start()
    elif kind == "peer:item-loop":

        def extra() -> None:
            total = 0.0
            for p in model.parameters():
                if p.grad is not None:
                    total += p.grad.data.norm(2).item() ** 2
            _ = total**0.5
    elif kind == "peer:item+svd":

        def extra() -> None:
            total = 0.0
            for p in model.parameters():
                if p.grad is not None:
                    total += p.grad.data.norm(2).item() ** 2
                    if p.ndim >= 2:
                        torch.linalg.svdvals(p.grad.detach().reshape(p.shape[0], -1).cpu())
    elif kind == "read:grad-pass":
        params = [p for p in model.parameters() if p.requires_grad]

        def extra() -> None:
            float(squared_norms([p.grad for p in params if p.grad is not None]).sum())
    elif kind == "peer:wandb.watch":
        import wandb

        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
        run = wandb.init(project="bench", dir=tempfile.mkdtemp(), mode="offline")
        run.watch(model, log="gradients", log_freq=1)
        step_count = [0]

        def extra() -> None:
            step_count[0] += 1
            run.log({"loss": 0.0})  # watch's histograms are emitted with the next log call

    i = [0]

    def step() -> None:
        b = i[0] % POOL
        i[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[b]), y[b])
        loss.backward()
        opt.step()
        if extra is not None:
            extra()
        if mon is not None:
            mon.step(loss=loss)

    for _ in range(5):
        step()

    def self_reported() -> float | None:  # the monitor's own monitor/overhead_ms, median over its records
        if mon is None or not mon.records:
            return None
        return statistics.median(r.overhead_ms for r in mon.records if r.overhead_ms is not None)

    return step, self_reported


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=400, help="lockstep rounds (one step of every config each)")
    ap.add_argument("--window", type=int, default=100, help="rounds per ratio window (>= the longest schedule)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few rounds")
    ap.add_argument("--model", choices=["mlp", "cnn", "both"], default="both")
    ap.add_argument("--kinds", default="", help="comma-separated subset of configs (default: all)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process CPU clock and one torch thread (for a machine shared with other jobs)",
    )
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.window = 6, 3
    clock = time.perf_counter
    if args.cpu_time:
        clock = time.process_time
        torch.set_num_threads(1)
    logging.getLogger("stabwatch").setLevel(logging.CRITICAL + 1)  # alerts on these random-label runs are not the point
    try:
        import wandb  # noqa: F401

        has_wandb = True
    except ImportError:
        has_wandb = False
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} lockstep rounds, "
        f"clock {'process CPU' if args.cpu_time else 'wall'}"
    )
    print(f"ratio: median over windows of {args.window} rounds of (config time / bare time), iqr its spread,")
    print("total: ratio of the summed times; self: the monitor's own monitor/overhead_ms (median per record)")
    print("and 1 + self / bare step. bare and bare-2 are two identical bare loops: how far they sit from each")
    print("other is what separate model instances alone differ by (memory placement), the floor of the ratios")
    models = {"mlp": ("MLP 8x512, batch 128", mlp), "cnn": ("small CNN, batch 64", cnn)}
    for key in ("mlp", "cnn") if args.model == "both" else (args.model,):
        name, make = models[key]
        kinds = ["bare", "bare-2", "stabwatch:cheap", "stabwatch:default", "stabwatch:full"]
        kinds += [f"stabwatch:only-{f}" for f in FAMILIES]
        kinds += ["read:grad-pass", "peer:item-loop", "peer:item+svd"] + (["peer:wandb.watch"] if has_wandb else [])
        if args.kinds:
            kinds = ["bare", "bare-2"] + [k for k in args.kinds.split(",") if k not in ("bare", "bare-2")]
        built = {k: _runner(make, k) for k in kinds}
        res = lockstep({k: b[0] for k, b in built.items()}, ("bare", "bare-2"), args.rounds, args.window, clock)
        bare_ms = (res["bare"][0] + res["bare-2"][0]) / 2 * 1e3
        print(f"\n{name}: bare step {bare_ms:.2f} ms (baseline: the mean of bare and bare-2 in each round)")
        for k in kinds:
            sec, ratio, iqr, total = res[k]
            own = built[k][1]()
            own_s = f"   self {own:6.3f} ms = {1 + own / bare_ms:5.3f}x" if own is not None else ""
            print(f"  {k:<28} {sec * 1e3:8.2f} ms   {ratio:6.3f}x  (iqr {iqr:.3f}, total {total:.3f}x){own_s}")
        if not has_wandb:
            print("  peer:wandb.watch             skipped (wandb not installed)")


if __name__ == "__main__":
    main()
