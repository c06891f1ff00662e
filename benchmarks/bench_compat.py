"""The SNN-monitor drop-in against the hand-written monitor it replaces, on the same calls.

Target (issue #17): `stabwatch.compat.StabilityMonitor.compute` no slower per call than the hand-written
``StabilityMonitor.compute`` (``tests/test_compat_reference.py``, the reference of
``../shared/references/snn-stability-monitor-reference.py.txt`` with its indentation restored) on the
same model gradients, spike and membrane recordings. Both run in this process, one thread, in rounds of
one call each (the order rotating); every call is timed on its own and the figures are the medians of
those single calls and the ratio compat / reference of this run (< 1: faster). Medians of single calls,
not means over batches of calls: on a shared machine a few calls in a hundred lose a time slice (~4 ms)
to another process, which a mean charges to whichever monitor was running.

Sizes: ``docs`` is the migration guide's network (20-32-4, batch 16, 10 steps), ``mid`` a 100-256-256-10
network (batch 64, 25 steps), ``mnist`` snntorch's tutorial network (784-1000-10, batch 128, 25 steps).

``--breakdown`` also times, on the same calls, the compat monitor with no alert rules (``rules=[]``: the
statistics, the record and the pipeline) and the validation of one record (``StabilityMetrics(...)`` of
the same values): what the alert rules and the record add to the reference's work.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from stabwatch.compat import StabilityMonitor
from stabwatch.metrics import StabilityMetrics

SIZES = {  # name -> (layer widths, batch, time steps)
    "docs": ((20, 32, 4), 16, 10),
    "mid": ((100, 256, 256, 10), 64, 25),
    "mnist": ((784, 1000, 10), 128, 25),
}


def load_reference() -> object:
    """The hand-written monitor, from the test suite's verified copy."""
    path = Path(__file__).resolve().parents[1] / "tests" / "test_compat_reference.py"
    spec = importlib.util.spec_from_file_location("snn_monitor_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup(widths: tuple[int, ...], batch: int, steps: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A model with gradients, and the recordings of its first hidden layer."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(widths)])
    model(torch.randn(batch, widths[0])).pow(2).mean().backward()
    g = torch.Generator().manual_seed(1)
    hidden = widths[1]
    calls = {
        "lyapunov": torch.tensor(0.02),
        "spikes": (torch.rand(batch, steps, hidden, generator=g) < 0.15).float(),
        "membrane": torch.randn(batch, steps, hidden, generator=g),
    }
    return model, calls


#: calls of each monitor per (size, compute_sv), in rounds of one call each
CALLS = {"docs": (1500, 400), "mid": (300, 40), "mnist": (60, 10)}


def per_call(steps: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Median seconds per call of each step: rounds of one call of each (their order rotating each round),
    every call timed on its own. On a shared machine a call now and then loses a time slice (milliseconds)
    to another process; the median of single calls leaves those out, where a mean over a batch of calls
    would charge them to whichever monitor ran then."""
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    clock = time.perf_counter
    for r in range(calls):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            step = steps[name]
            t0 = clock()
            step()
            times[name].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=float, default=1.0, help="scale the number of timed calls (default 1)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few calls, small sizes only")
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--breakdown", action="store_true", help="also time compat without alert rules, and one record")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = load_reference()
    scale = 0.05 if args.quick else args.calls
    sizes = ["docs"] if args.quick else args.sizes
    print(f"torch {torch.__version__}, 1 thread; medians of single calls, the monitors' calls interleaved")
    print(f"{'size':<7}{'compute_sv':<12}{'reference':>12}{'compat':>12}{'compat/ref':>12}{'calls':>8}")
    for size in sizes:
        model, calls = setup(*SIZES[size])
        for sv in (False, True):
            n = max(5, round(CALLS[size][sv] * scale))
            monitors = {"reference": ref.StabilityMonitor(), "compat": StabilityMonitor()}  # type: ignore[attr-defined]
            if args.breakdown:
                monitors["no rules"] = StabilityMonitor(rules=[])
            steps: dict[str, Callable[[], object]] = {
                name: partial(mon.compute, model, compute_sv=sv, **calls) for name, mon in monitors.items()
            }
            for step in steps.values():  # warm up (first-call allocations, lazy imports)
                step()
            if args.breakdown:
                record = monitors["compat"].compute(model, compute_sv=sv, **calls).record  # type: ignore[attr-defined]
                values = record.model_dump(exclude={"alerts", "overhead_ms"}, exclude_none=True)
                steps["record"] = partial(StabilityMetrics, **values)
            t = per_call(steps, n)
            for name in monitors:
                if name != "reference":
                    monitors[name].close()  # type: ignore[attr-defined]
            ratio = t["compat"] / t["reference"]
            print(
                f"{size:<7}{sv!s:<12}{t['reference'] * 1e6:>10.0f}us{t['compat'] * 1e6:>10.0f}us{ratio:>11.2f}x{n:>8}"
            )
            if args.breakdown:
                rules, bare = t["compat"] - t["no rules"], t["no rules"] - t["record"]
                print(
                    f"{'':<19}compat = {bare * 1e6:.0f}us statistics and pipeline + {t['record'] * 1e6:.0f}us record "
                    f"+ {rules * 1e6:.0f}us alert rules ({len(monitors['compat'].engine)} rules)"  # type: ignore[attr-defined]
                )


if __name__ == "__main__":
    main()
