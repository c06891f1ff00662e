"""The SNN-monitor drop-in against the hand-written monitor it replaces, on the same calls.

Target (issue #17): `stabwatch.compat.StabilityMonitor.compute` no slower per call than the hand-written
``StabilityMonitor.compute`` (``tests/test_compat_reference.py``, the reference of
``../shared/references/snn-stability-monitor-reference.py.txt`` with its indentation restored) on the
same model gradients, spike and membrane recordings. Both run in this process, interleaved, one thread;
the figures are medians of per-call times and the ratio compat / reference of this run (< 1: faster).

Sizes: ``docs`` is the migration guide's network (20-32-4, batch 16, 10 steps), ``mid`` a 100-256-256-10
network (batch 64, 25 steps), ``mnist`` snntorch's tutorial network (784-1000-10, batch 128, 25 steps).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, time_per_step

from stabwatch.compat import StabilityMonitor

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15, help="interleaved repeats (medians are reported)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few repeats, small sizes only")
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = load_reference()
    repeats = 3 if args.quick else args.repeats
    sizes = ["docs"] if args.quick else args.sizes
    print(f"torch {torch.__version__}, 1 thread; per-call medians of {repeats} interleaved repeats")
    print(f"{'size':<7}{'compute_sv':<12}{'reference':>12}{'compat':>12}{'compat/ref':>12}")
    for size in sizes:
        model, calls = setup(*SIZES[size])
        for sv in (False, True):
            n = max(3, (60 if not sv else 12) // (1 if size == "docs" else 4))
            monitors = {"reference": ref.StabilityMonitor(), "compat": StabilityMonitor()}  # type: ignore[attr-defined]

            def timer(
                name: str, n: int = n, sv: bool = sv, monitors: dict = monitors, model: nn.Module = model, calls=calls
            ) -> object:
                mon = monitors[name]
                return lambda _: time_per_step(lambda: mon.compute(model, compute_sv=sv, **calls), n)

            for name in monitors:  # warm up (first-call allocations, lazy imports)
                timer(name)(0)
            t = interleaved({name: timer(name) for name in monitors}, repeats)  # type: ignore[arg-type]
            monitors["compat"].close()  # type: ignore[attr-defined]
            ratio = t["compat"] / t["reference"]
            print(f"{size:<7}{sv!s:<12}{t['reference'] * 1e6:>10.0f}us{t['compat'] * 1e6:>10.0f}us{ratio:>11.2f}x")


if __name__ == "__main__":
    main()
