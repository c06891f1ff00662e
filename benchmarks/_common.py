"""Timing helpers shared by the benchmarks: interleaved repeats, medians, ratios in one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_per_step(step: Callable[[], None], steps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``step`` over ``steps`` calls (wall time; ``clock=time.process_time`` for the
    process's CPU time, which other jobs on a shared machine do not inflate when torch runs one thread)."""
    t0 = clock()
    for _ in range(steps):
        step()
    return (clock() - t0) / steps


def interleaved(configs: dict[str, Callable[[int], float]], repeats: int) -> dict[str, float]:
    """Run each config's timing function ``repeats`` times, round-robin, and return the medians.

    Interleaving spreads slow drifts of the machine (other load, turbo, caches) over all configs.
    """
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            samples[name].append(fn(0))
    return {k: statistics.median(v) for k, v in samples.items()}


def lockstep(
    steps: dict[str, Callable[[], None]],
    baseline: str | tuple[str, ...],
    rounds: int,
    window: int = 50,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, tuple[float, float, float, float]]:
    """Run the configs' training steps in lockstep (one step of each per round) and time every step.

    On a shared machine the speed drifts by tens of percent over seconds (other tenants, clock
    changes), so configs timed one after another, even in short interleaved chunks, differ by more
    than the few percent being measured. Here neighbouring steps of two configs are milliseconds apart
    and see the same machine. Each window of ``window`` rounds gives a ratio of summed step times to
    the baseline's (scheduled work, e.g. an SVD every 100 steps, is amortised over the window), and
    the median over windows is reported. The step order rotates every round. ``baseline`` may name
    several configs (identical bare loops): their mean step time is the baseline, which averages out
    part of the few-percent speed difference that separate model instances show.

    Returns:
        ``{name: (mean seconds per step, median window ratio, interquartile range of the window ratios,
        ratio of the totals)}``.
    """
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = clock()
            steps[name]()
            times[name].append(clock() - t0)
    out: dict[str, tuple[float, float, float, float]] = {}
    bases = (baseline,) if isinstance(baseline, str) else baseline
    base = [statistics.fmean(ts) for ts in zip(*(times[b] for b in bases), strict=True)]
    for k, v in times.items():
        ratios = sorted(
            sum(v[i : i + window]) / sum(base[i : i + window]) for i in range(0, rounds - window + 1, window)
        )
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[k] = (statistics.fmean(v), statistics.median(ratios), q[2] - q[0], sum(v) / sum(base))
    return out
