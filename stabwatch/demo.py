"""``stabwatch demo``: a stable and an unstable run, monitored, side by side.

Trains a small MLP on scikit-learn's digits (shipped inside scikit-learn; generated Gaussian-cluster
data when scikit-learn is not installed) twice: once with a sensible learning rate and once with a
learning rate far too high. Writes one JSONL run file per run and prints, in step order, a per-step line
every tenth of the run with each alert once (through `ConsoleSink`, under a progress bar on a terminal;
no bar and no carriage returns when the output is piped), then per run its verdict, the first critical
step, the most likely cause with what to try, and the commands for the full diagnosis and the report.
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
    from stabwatch.alerts import AlertEngine, default_rules
    from stabwatch.diagnosis import analyse

    x, y, source = load_data(seed)
    out = Path(out_dir)
    results: dict[str, Any] = {}
    # a bar only on a terminal: piped or redirected output gets the per-step lines and no redraws
    show_bar = not quiet and sys.stdout.isatty()
    print(f"stabwatch demo: MLP 64-128-128-10 on {source}, {steps} steps, batch {batch_size}")
    for name, lr in zip(("stable", "unstable"), lrs):
        model = _model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        path = out / f"{name}.jsonl"
        sinks: list[Any] = [sw.sinks.JsonlSink(path)]
        if not quiet:  # the one place alerts are printed, in step order with the per-step lines
            sinks.append(sw.sinks.ConsoleSink(every=max(1, steps // 10), stream=sys.stdout))
        # the alerts go to the console sink, not (a second time, out of step order) to the log
        engine = AlertEngine(default_rules(), log_alerts=quiet)
        g = torch.Generator().manual_seed(seed)
        bar = _progress_bar(steps, f"{name} (lr={lr})", show_bar)
        with (
            _logging_through_bar(show_bar),
            sw.Monitor(
                model, opt, sinks=sinks, preset="default", alerts=engine, every={"grad_sv": 10, "weight": 10}
            ) as mon,
        ):
            for _ in range(steps):
                idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                rec = mon.step(loss=loss)
                if bar is not None:
                    if rec is not None:
                        bar.set_postfix_str(
                            f"loss={rec.loss:.3g} grad={rec.grad_norm or float('nan'):.3g}", refresh=False
                        )
                    bar.update(1)  # the count advances with every step
        if bar is not None:  # after the monitor flushed its sinks: the last lines print above the bar
            bar.close()
        d = analyse(list(mon.records), list(mon.alerts))
        print(f"== {name} run (lr={lr}): {_summary(d, list(mon.alerts))}")
        if d.causes:
            cause = d.causes[0]
            print(f"   most likely cause: {cause.title}")
            for action in cause.actions[:2]:
                print(f"   try: {action}")
        print(f"   records: {path}; the full diagnosis: stabwatch diagnose {path}")
        results[name] = (mon, path)
    files = " ".join(str(p) for _, p in results.values())
    print(f"\nboth runs side by side: stabwatch report {files} -o {out / 'report.html'}")
    return results


def _summary(d: Any, alerts: list[Any]) -> str:
    """``UNSTABLE: first critical step 22 (grad_explode); 2 critical, 5 warning`` (recoveries not counted)."""
    from stabwatch.metrics import AlertReason, Severity

    parts = [d.verdict.upper()]
    crit = sorted(
        (a for a in alerts if a.severity is Severity.CRITICAL and a.reason is not AlertReason.RECOVERED),
        key=lambda a: a.step,
    )
    if crit:
        parts.append(f"first critical step {crit[0].step} ({crit[0].rule})")
    counts = ", ".join(f"{n} {sev}" for sev, n in d.counts.items() if n)
    return "; ".join(parts) + (f"; {counts} alert(s), recoveries not counted" if counts else "; no alerts")


def _progress_bar(steps: int, desc: str, show: bool) -> Any:
    """A tqdm bar updated by hand (``None`` when not shown or tqdm is missing)."""
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=steps, desc=desc, file=sys.stdout, dynamic_ncols=True)


def _logging_through_bar(show: bool) -> Any:
    """While a bar is shown, log records go through the bar's writer (``tqdm.write``): no stale bar copies."""
    import contextlib

    if not show:
        return contextlib.nullcontext()
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return logging_redirect_tqdm()  # the root logger's console handlers (where `stabwatch` logs land)


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
