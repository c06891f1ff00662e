"""`diagnose`: a readable summary of a run from its records and alerts."""

from __future__ import annotations

import math
from collections.abc import Sequence

from stabwatch.metrics import Alert, StabilityMetrics

__all__ = ["diagnose", "trend"]

_WATCHED = ("loss", "grad_norm", "update_ratio", "grad_condition", "spectral_norm", "spectral_radius",
            "firing_rate_mean", "dead_neuron_frac", "lyapunov")


def trend(values: Sequence[float]) -> tuple[str, float]:
    """Classify a series as rising / falling / stable by the least-squares slope of log|x| per step.

    Returns:
        ``(label, slope)`` where slope is in log units per step, computed over the finite values.
    """
    pts = [(i, math.log(abs(v))) for i, v in enumerate(values) if math.isfinite(v) and v != 0]
    if len(pts) < 3:
        return "n/a", 0.0
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else 0.0
    total = slope * (pts[-1][0] - pts[0][0])
    if total > math.log(2):
        return "rising", slope
    if total < -math.log(2):
        return "falling", slope
    return "stable", slope


def diagnose(records: Sequence[StabilityMetrics], alerts: Sequence[Alert] = ()) -> str:
    """Summarise a run: per-metric trends with first/last values, the alerts, and what to try."""
    if not records:
        return "stabwatch: no records yet."
    lines = [f"stabwatch diagnosis: steps {records[0].step}..{records[-1].step} ({len(records)} records)"]
    for field in _WATCHED:
        series = [getattr(r, field) for r in records if getattr(r, field) is not None]
        if not series:
            continue
        label, slope = trend(series)
        lines.append(
            f"  {field:<18} {label:<8} first {series[0]:.3g}  last {series[-1]:.3g}  "
            f"(x{math.exp(slope):.3f}/record)"
        )
    nonfinite = [r for r in records if r.nonfinite]
    if nonfinite:
        r = nonfinite[0]
        lines.append(f"  NON-FINITE values from step {r.step}, first in {r.nonfinite_source}")
    if alerts:
        lines.append(f"  alerts ({len(alerts)}):")
        for a in list(alerts)[-10:]:
            lines.append(f"    {a}")
            if a.suggestion:
                lines.append(f"      try: {a.suggestion}")
    else:
        lines.append("  no alerts")
    return "\n".join(lines)
