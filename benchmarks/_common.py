"""Timing helpers shared by the benchmarks: interleaved repeats, medians, ratios in one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_per_step(step: Callable[[], None], steps: int) -> float:
    """Seconds per call of ``step`` over ``steps`` calls."""
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def interleaved(configs: dict[str, Callable[[int], float]], repeats: int) -> dict[str, float]:
    """Run each config's timing function ``repeats`` times, round-robin, and return the medians.

    Interleaving spreads slow drifts of the machine (other load, turbo, caches) over all configs.
    """
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            samples[name].append(fn(0))
    return {k: statistics.median(v) for k, v in samples.items()}
