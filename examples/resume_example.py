"""Checkpoint and resume a monitored run: the records and alerts go on as if it had never stopped.

Phase 1 trains for ``--stop-at`` steps, writing records to ``run.jsonl``, and saves the model, the
optimizer and the monitor's state in one checkpoint. Phase 2 (normally a new process, after a crash or a
preemption) builds everything again, loads the checkpoint with ``torch.load(weights_only=True)`` and trains
on to ``--steps``, appending to the same file. The monitor's state carries what the next records depend
on: the step counter, the warm-start vectors of the spectral estimates, the alert rules' windows and the
shadow's open window, so ``run.jsonl`` ends up holding exactly what an uninterrupted run writes
(``reference.jsonl``, made at the end for the comparison).

Run:  python examples/resume_example.py [--steps 60] [--stop-at 25] [--out resume_run]
      (``--phase 1`` / ``--phase 2`` run one phase, as two processes would)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

import stabwatch as sw
from stabwatch.sinks import JsonlSink, read_jsonl


def make_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    return model, torch.optim.Adam(model.parameters(), lr=3e-3)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a step: a resumable data order (a real loader needs its own position in the checkpoint)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 10, generator=g)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def loss_fn(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(b[0]), b[1])


def make_monitor(model: nn.Module, opt: torch.optim.Optimizer, path: Path, mode: str) -> sw.Monitor:
    """Built the same way in both phases: the checkpoint is refused if the configuration differs."""
    return sw.Monitor(
        model,
        opt,
        sinks=[JsonlSink(path, mode=mode)],
        preset="default",
        every={"grad_sv": 5, "weight": 5, "activation": 5},
        shadow=sw.Shadow(loss_fn=loss_fn, every=20, window=10),
    )


def train(mon: sw.Monitor, model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for step in range(start, stop):
        b = batch(step)
        opt.zero_grad()
        loss = loss_fn(model, b)
        loss.backward()
        opt.step()
        mon.step(loss=loss, batch=b)


def phase1(out: Path, stop_at: int) -> None:
    model, opt = make_model()
    with make_monitor(model, opt, out / "run.jsonl", "w") as mon:
        train(mon, model, opt, 0, stop_at)
        # inside the `with`: the monitor's state is saved while it runs
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "monitor": mon.state_dict()}, out / "ckpt.pt")
    print(f"phase 1: trained steps 0-{stop_at - 1}, checkpoint saved to {out / 'ckpt.pt'}")


def phase2(out: Path, steps: int) -> None:
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    model, opt = make_model()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    with make_monitor(model, opt, out / "run.jsonl", "a") as mon:
        mon.load_state_dict(ckpt["monitor"])
        start = mon.current_step
        train(mon, model, opt, start, steps)
    print(f"phase 2: resumed at step {start}, trained to step {steps - 1}")


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def compare(out: Path, steps: int) -> bool:
    """Write the uninterrupted run and compare it with the resumed one, record by record."""
    model, opt = make_model()
    with make_monitor(model, opt, out / "reference.jsonl", "w") as mon:
        train(mon, model, opt, 0, steps)
    resumed, reference = list(read_jsonl(out / "run.jsonl")), list(read_jsonl(out / "reference.jsonl"))
    print(f"records continue: {[r.step for r in resumed] == list(range(steps))}")
    differing = 0
    for a, b in zip(resumed, reference, strict=True):
        fa, fb = a.to_dict(), b.to_dict()
        fa.pop("monitor/overhead_ms", None)
        fb.pop("monitor/overhead_ms", None)
        if fa.keys() != fb.keys() or not all(_same(fa[k], fb[k]) for k in fa):
            differing += 1
    alerts_a = [(x.rule, x.step, x.message) for r in resumed for x in r.alerts]
    alerts_b = [(x.rule, x.step, x.message) for r in reference for x in r.alerts]
    print(f"records that differ from the uninterrupted run: {differing} of {len(reference)}")
    print(f"alerts identical: {alerts_a == alerts_b} ({len(alerts_b)} alerts)")
    return differing == 0 and alerts_a == alerts_b


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stop-at", type=int, default=25, help="the step phase 1 stops before")
    parser.add_argument("--phase", choices=["1", "2", "both"], default="both")
    parser.add_argument("--out", default="resume_run", help="folder for run.jsonl and the checkpoint")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase in ("1", "both"):
        phase1(out, args.stop_at)
    if args.phase in ("2", "both"):
        phase2(out, args.steps)
    return compare(out, args.steps) if args.phase == "both" else True


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
