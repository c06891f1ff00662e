"""`diagnose`: a readable summary of a run — per-metric trends, the alerts, the likely causes, what to try.

Works on what a run leaves behind (its records, with the alerts in them), so it is the same for a
live `Monitor` (`Monitor.diagnose`) and a JSONL file read back (``stabwatch diagnose RUN.jsonl``).

* **Trends.** Over the whole run, the median of the last quarter of a metric's values against the
  median of the first quarter: *rising* at ×2 or more, *falling* at ×½ or less, else *stable* (for a
  metric that changes sign, such as a Lyapunov exponent: a change of a quarter of its range). The two
  medians are what the line shows (``median 2.3 → 0.81``), so the label and the numbers always agree;
  the latest value is shown apart (``latest 669.7``), since one late blow-up does not move a median.
  Over the last quarter, where the run is heading now, the least-squares line through :math:`\\ln|x|`
  (or :math:`x`) against the step: rising/falling when the fitted change is ×2 (or a quarter of the
  range) **and** the slope's t-statistic is at least 3. Rates are given per 100 steps.
* **Alerts.** Grouped by rule: how many, first/last step, worst severity, layers, and the first message.
* **Likely causes.** Each alert reason (and a recent rise of the gradient norm or the loss) is evidence
  for some causes; causes are ranked by the evidence they collect (critical 3, warning 2, info 1 per
  distinct rule, +1 for the cause of the earliest alert — the first sign is usually nearest the cause),
  and each comes with what to try. A recent rise of the gradient norm counts only once the latest
  value has reached the gradient-explosion floor (`stabwatch.alerts.defaults.GRAD_FLOOR`), as for the
  alert rules: a dead network whose gradient creeps up from 1e-6 is not taking too large steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stabwatch.alerts.defaults import GRAD_FLOOR
from stabwatch.alerts.rules.trend import fit_slope
from stabwatch.errors import StabwatchError
from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics
from stabwatch.numeric import fmt, median

__all__ = ["AlertSummary", "Cause", "Diagnosis", "Trend", "analyse", "diagnose", "trend"]

#: metrics summarised, in this order (those a run does not have are left out)
WATCHED: tuple[str, ...] = (
    "loss",
    "grad_norm",
    "update_ratio",
    "weight_norm",
    "grad_max_sv",
    "grad_condition",
    "spectral_norm",
    "spectral_radius",
    "activation_std",
    "activation_batch_std",
    "dead_frac",
    "saturated_frac",
    "firing_rate_mean",
    "dead_neuron_frac",
    "saturated_neuron_frac",
    "lyapunov",
    "lyapunov_local",
    "shadow_divergence",
)

_FIRST_ALERTS = 8
_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}
_WEIGHT = {Severity.INFO: 1, Severity.WARNING: 2, Severity.CRITICAL: 3}


@dataclass
class Trend:
    """The trend of one metric.

    Attributes:
        metric: the record field.
        label: ``"rising"``, ``"falling"``, ``"stable"`` or ``"n/a"`` (fewer than 3 finite values).
        first_median / last_median: the medians of the first and the last quarter of the finite values
            (what `label` compares; with fewer than 4 values, the first and the last value).
        per_100: factor per 100 steps (log scale) or change per 100 steps (linear scale), from the
            first- and last-quarter medians.
        t: the t-statistic of the recent slope.
        log: whether the fit was on log scale.
        n: the number of finite values.
        latest: the last finite value.
        recent: the label over the last quarter of the values (``None`` if too few).
        recent_per_100: its rate.
        recent_from: the first step of that last quarter.
    """

    metric: str
    label: str
    first_median: float
    last_median: float
    per_100: float
    t: float
    log: bool
    n: int
    latest: float
    recent: str | None = None
    recent_per_100: float | None = None
    recent_from: int | None = None

    def rate(self, value: float | None = None) -> str:
        v = self.per_100 if value is None else value
        return f"×{fmt(v, 3)}/100 steps" if self.log else f"{fmt(v, 3, signed=True)}/100 steps"

    def __str__(self) -> str:
        if self.label == "n/a":  # no rate to show: a "×1/100 steps" here would read as a measured one
            values = f"{self.n} value" + ("" if self.n == 1 else "s")
            return f"{self.metric:<22}{self.label:<8} {values}, too few steps for a trend; latest {fmt(self.latest)}"
        text = (
            f"{self.metric:<22}{self.label:<8} median {fmt(self.first_median)} → {fmt(self.last_median)}"
            f"  ({self.rate()}); latest {fmt(self.latest)}"
        )
        if self.recent is not None and self.recent != self.label:
            text += f"; {self.recent} since step {self.recent_from} ({self.rate(self.recent_per_100)})"
        return text


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _classify(steps: Sequence[float], values: Sequence[float], log: bool) -> tuple[str, float, float]:
    """Label, rate per 100 steps and t-statistic of a least-squares fit (used for the recent window)."""
    ys = [math.log(abs(v)) for v in values] if log else list(values)
    slope, t = fit_slope(list(steps), ys)
    change = slope * (steps[-1] - steps[0])
    if log:
        big = abs(change) >= math.log(2)
        rate = _exp(slope * 100)
    else:
        big = max(ys) > min(ys) and abs(change) >= 0.25 * (max(ys) - min(ys))
        rate = slope * 100
    if big and abs(t) >= 3:
        return ("rising" if change > 0 else "falling"), rate, t
    return "stable", rate, t


def _quartiles(steps: Sequence[float], values: Sequence[float], log: bool) -> tuple[str, float, float, float]:
    """Label, rate per 100 steps, and the first- and last-quarter medians they come from (robust to the
    shape of the curve: a fast fall then a plateau is *falling*, whatever a straight line says)."""
    q = max(1, len(values) // 4)
    a, b = median(values[:q]), median(values[-q:])
    dx = median(steps[-q:]) - median(steps[:q])
    if log:
        ratio = b / a
        label = "rising" if ratio >= 2 else "falling" if ratio <= 0.5 else "stable"
        return label, (_exp(math.log(ratio) * 100 / dx) if dx > 0 else 1.0), a, b
    spread = max(values) - min(values)
    diff = b - a
    label = "stable" if spread == 0 or abs(diff) < 0.25 * spread else ("rising" if diff > 0 else "falling")
    return label, (diff * 100 / dx if dx > 0 else 0.0), a, b


def trend(values: Sequence[float], steps: Sequence[float] | None = None) -> tuple[str, float]:
    """Classify a series as rising / falling / stable (see the module docstring).

    Args:
        values: the series (non-finite values are ignored).
        steps: their steps (default 0, 1, 2, ...).

    Returns:
        ``(label, rate)``: the rate is the factor per 100 steps (log scale, for series of one sign) or
        the change per 100 steps (linear scale); ``("n/a", 0.0)`` for fewer than 3 finite values.

    Example:
        >>> label, rate = trend([1.1 ** i for i in range(20)])
        >>> label, round(rate / 1.1 ** 100, 6)  # x1.1 per step = x1.1^100 per 100 steps
        ('rising', 1.0)
        >>> trend([1.0, 1.01, 0.99, 1.0, 1.02])[0]
        'stable'
    """
    xs = list(steps) if steps is not None else list(range(len(values)))
    pairs = [(float(x), float(v)) for x, v in zip(xs, values) if math.isfinite(v)]
    log = all(v > 0 for _, v in pairs) or all(v < 0 for _, v in pairs)
    if len(pairs) < 3:
        return "n/a", 0.0
    return _quartiles([p[0] for p in pairs], [abs(p[1]) if log else p[1] for p in pairs], log)[:2]


def _trend_of(metric: str, steps: list[int], values: list[float]) -> Trend | None:
    pairs = [(float(s), v) for s, v in zip(steps, values) if math.isfinite(v)]
    if not pairs:
        return None
    log = all(v > 0 for _, v in pairs)
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    label, rate, first_median, last_median = _quartiles(xs, ys, log)
    if len(pairs) < 3 or xs[-1] == xs[0]:
        label, rate = "n/a", (1.0 if log else 0.0)
    out = Trend(metric, label, first_median, last_median, rate, 0.0, log, len(pairs), ys[-1])
    if label == "n/a":
        return out
    q = len(pairs) // 4
    if q >= 8:
        r_label, r_rate, t = _classify(xs[-q:], ys[-q:], log)
        out.recent, out.recent_per_100, out.recent_from, out.t = r_label, r_rate, int(xs[-q]), t
    return out


@dataclass
class AlertSummary:
    """The alerts of one rule."""

    rule: str
    reason: AlertReason
    severity: Severity
    count: int
    first_step: int
    last_step: int
    layers: list[str]
    message: str
    suggestion: str

    def __str__(self) -> str:
        where = f" in {', '.join(self.layers[:4])}{' ...' if len(self.layers) > 4 else ''}" if self.layers else ""
        when = f"step {self.first_step}" if self.count == 1 else f"steps {self.first_step}-{self.last_step}"
        return f"{self.rule} ({self.severity.value}, {self.count}×, {when}{where}): {self.message}"


@dataclass
class Cause:
    """A likely cause of what was seen, with the evidence for it and what to try."""

    key: str
    title: str
    score: int
    evidence: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)


# cause -> (title, evidence reasons, actions)
_CAUSES: dict[str, tuple[str, frozenset[AlertReason], tuple[str, ...]]] = {
    "step_size": (
        "the learning rate (step size) is too high for this model/batch",
        frozenset(
            {
                AlertReason.EXPLODING_GRADIENT,
                AlertReason.LOSS_SPIKE,
                AlertReason.UPDATE_RATIO,
                AlertReason.CHAOTIC_TRAINING,
                AlertReason.NON_FINITE,
            }
        ),
        (
            "lower the learning rate (÷3 to ÷10), or add / lengthen the warm-up",
            "clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={clip})",
            "Monitor(guard=True) skips single bad steps while you fix the cause",
        ),
    ),
    "numerics": (
        "a numerical overflow or an invalid operation (log(0), 0/0, sqrt of a negative, fp16 overflow)",
        frozenset({AlertReason.NON_FINITE}),
        (
            "look at the named layer and the loss for log/exp/division/sqrt; add epsilons",
            "under AMP use bf16 or torch.amp.GradScaler; keep the loss in float32",
            "check the batch at that step for NaN/inf inputs or labels",
            "torch.autograd.set_detect_anomaly(True) names the op (slow: for debugging only)",
        ),
    ),
    "recurrent": (
        "the recurrent weights amplify small hidden states (spectral radius > 1); gradients through time can "
        "grow only where ‖W_hh‖₂ > 1 (the radius alone neither implies nor rules it out)",
        frozenset({AlertReason.SPECTRAL_RADIUS}),
        (
            "regularise the recurrent weights: orthogonal init, spectral normalisation, weight decay on W_hh",
            "check the gradient alerts: they, not the radius, say whether gradients through time explode",
            "clip gradients (clip_grad_norm_) and shorten truncated-BPTT windows",
            "an LSTM/GRU instead of a vanilla RNN",
        ),
    ),
    "propagation": (
        "poor signal propagation: initialisation or saturating activations",
        frozenset({AlertReason.VANISHING_GRADIENT, AlertReason.SATURATED_NEURONS, AlertReason.COLLAPSE}),
        (
            "change the initialisation (He for ReLU, Xavier/Glorot for tanh; smaller scale if units saturate)",
            "add normalisation (LayerNorm/BatchNorm) or residual connections",
            "prefer ReLU/GELU over sigmoid/tanh in deep stacks; normalise the inputs",
        ),
    ),
    "dead_units": (
        "dead or silent units (no output, so no gradient)",
        frozenset({AlertReason.DEAD_NEURONS, AlertReason.SILENT_LAYER}),
        (
            "lower the learning rate (large steps kill ReLUs)",
            "LeakyReLU/GELU, He init, a small positive bias",
            "spiking layers: lower the threshold, raise the input gain, check the surrogate-gradient slope",
        ),
    ),
    "conditioning": (
        "a jump of a layer's gradient condition number (σ₁/σ_min of the batch gradient, not the Hessian's; "
        "raised only by a rule of your own, none of the default rules watches it)",
        frozenset({AlertReason.ILL_CONDITIONED}),
        (
            "check whether the batch size changed: the batch gradient has rank <= B, and its condition number "
            "follows B",
            "otherwise add normalisation, or use an adaptive optimizer (Adam/AdamW); lower the learning rate",
        ),
    ),
}


@dataclass
class Diagnosis:
    """Everything `diagnose` prints, as data (`to_text` renders it)."""

    first_step: int
    last_step: int
    n_records: int
    trends: list[Trend]
    alerts: list[AlertSummary]
    causes: list[Cause]
    nonfinite: str | None
    first_sign: str | None
    counts: dict[str, int]
    first_alerts: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``"unstable"`` (critical alerts or non-finite values), ``"warnings"`` or ``"healthy"``."""
        if self.counts.get("critical") or self.nonfinite:
            return "unstable"
        if self.counts.get("warning"):
            return "warnings"
        return "healthy"

    def to_text(self) -> str:
        lines = [f"stabwatch diagnosis: steps {self.first_step}..{self.last_step} ({self.n_records} records)"]
        counts = ", ".join(f"{n} {sev}" for sev, n in self.counts.items() if n) or "no alerts"
        lines.append(f"verdict: {self.verdict.upper()} ({counts})")
        if self.first_sign:
            lines.append(f"first sign: {self.first_sign}")
        if self.trends:
            lines.append("")
            lines.append(
                "trends (median of the first quarter of the run → median of the last quarter; "
                "'since step N': the last quarter):"
            )
            lines.extend(f"  {t}" for t in self.trends)
        if self.nonfinite:
            lines.append("")
            lines.append(f"non-finite: {self.nonfinite}")
        lines.append("")
        if self.alerts:
            lines.append(f"alerts, by rule ({sum(a.count for a in self.alerts)} in all, recoveries not counted):")
            lines.extend(f"  {a}" for a in self.alerts)
            lines.append(f"first alerts, in step order (up to {_FIRST_ALERTS}):")
            lines.extend(f"  {a}" for a in self.first_alerts)
        else:
            lines.append("alerts: none")
        lines.append("")
        if self.causes:
            lines.append("likely causes (most likely first):")
            for i, c in enumerate(self.causes, 1):
                lines.append(f"  {i}. {c.title}")
                lines.append(f"     evidence: {'; '.join(c.evidence)}")
                for action in c.actions:
                    lines.append(f"     try: {action}")
        else:
            lines.append("likely causes: none — no sign of instability in these records.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _summaries(alerts: Iterable[Alert]) -> list[AlertSummary]:
    out: dict[str, AlertSummary] = {}
    for a in alerts:
        if a.reason is AlertReason.RECOVERED:
            continue
        s = out.get(a.rule)
        if s is None:
            out[a.rule] = AlertSummary(
                a.rule, a.reason, a.severity, 1, a.step, a.step, [a.layer] if a.layer else [], a.message, a.suggestion
            )
            continue
        s.count += 1
        s.first_step = min(s.first_step, a.step)
        s.last_step = max(s.last_step, a.step)
        if _RANK[a.severity] > _RANK[s.severity]:
            s.severity = a.severity
        if a.layer and a.layer not in s.layers:
            s.layers.append(a.layer)
    return sorted(out.values(), key=lambda s: (-_RANK[s.severity], s.first_step))


def _check_inputs(records: Any, alerts: Any) -> None:
    """Raise a `StabwatchError` naming the argument unless ``records`` / ``alerts`` are what a run leaves."""
    for name, items, kind in (("records", records, StabilityMetrics), ("alerts", alerts, Alert)):
        if items is None and name == "alerts":
            continue
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise StabwatchError(
                f"diagnose: {name} must be a list of {kind.__name__}, got {type(items).__name__} "
                "(read a run file with stabwatch.sinks.read_jsonl)"
            )
        bad = next((i for i, x in enumerate(items) if not isinstance(x, kind)), None)
        if bad is not None:
            raise StabwatchError(
                f"diagnose: {name}[{bad}] must be a {kind.__name__}, got {type(items[bad]).__name__} "
                f"(build it with {kind.__name__}.model_validate(...), or read a run with stabwatch.sinks.read_jsonl)"
            )


def analyse(records: Sequence[StabilityMetrics], alerts: Sequence[Alert] | None = None) -> Diagnosis:
    """Build the `Diagnosis` of a run.

    Args:
        records: the run's records, in step order.
        alerts: its alerts (default: those stored in the records).

    Raises:
        StabwatchError: ``records`` is not a list of `StabilityMetrics` (or ``alerts`` of `Alert`).
    """
    _check_inputs(records, alerts)
    if alerts is None:
        alerts = [a for r in records for a in r.alerts]
    trends: list[Trend] = []
    for metric in WATCHED:
        pts = [(r.step, getattr(r, metric)) for r in records if getattr(r, metric) is not None]
        if not pts:
            continue
        t = _trend_of(metric, [p[0] for p in pts], [float(p[1]) for p in pts])
        if t is not None:
            trends.append(t)
    bad = next((r for r in records if r.nonfinite), None)
    nonfinite = None
    if bad is not None:
        n_bad = sum(1 for r in records if r.nonfinite)
        loss = f", loss = {bad.loss}" if bad.loss is not None and not math.isfinite(bad.loss) else ""
        nonfinite = (
            f"from step {bad.step}, first seen in {bad.nonfinite_source or 'the record'}{loss} "
            f"({n_bad} record(s) non-finite)"
        )
    summaries = _summaries(alerts)
    real = [a for a in alerts if a.reason is not AlertReason.RECOVERED]
    counts = {
        sev.value: sum(1 for a in real if a.severity is sev)
        for sev in (Severity.CRITICAL, Severity.WARNING, Severity.INFO)
    }
    first = min(real, key=lambda a: a.step) if real else None
    first_sign = f"step {first.step}, {first.rule}: {first.message}" if first is not None else None

    # evidence: alert reasons, plus recent rises of the gradient norm / loss without an alert
    grad_median = median(r.grad_norm for r in records if r.grad_norm is not None and math.isfinite(r.grad_norm))
    clip = (
        f"≈{fmt(2 * grad_median)} (2× the median grad norm {fmt(grad_median)})"
        if grad_median > 0
        else "2× the typical norm"
    )
    causes: list[Cause] = []
    by_trend = {t.metric: t for t in trends}
    for key, (title, reasons, actions) in _CAUSES.items():
        evidence: list[str] = []
        score = 0
        for s in summaries:
            if s.reason in reasons and not (
                key == "step_size" and s.reason is AlertReason.UPDATE_RATIO and "low" in s.rule
            ):
                score += _WEIGHT[s.severity]
                when = f"step {s.first_step}" if s.count == 1 else f"{s.count}×, from step {s.first_step}"
                evidence.append(f"{s.rule} ({when})")
        if key == "step_size":
            for metric, floor in (("grad_norm", GRAD_FLOOR), ("loss", None)):
                t = by_trend.get(metric)
                if t is not None and t.recent == "rising" and (floor is None or t.latest >= floor):
                    score += 1
                    evidence.append(f"{metric} rising since step {t.recent_from} ({t.rate(t.recent_per_100)})")
        if first is not None and first.reason in reasons:
            score += 1
        if score and evidence:
            causes.append(Cause(key, title, score, evidence, [a.format(clip=clip) for a in actions]))
    low = [s for s in summaries if s.rule == "update_ratio_low"]
    if low:
        causes.append(
            Cause(
                "step_too_small",
                "the learning rate is too low (the weights barely move)",
                _WEIGHT[low[0].severity],
                [f"update_ratio_low ({low[0].count}×, from step {low[0].first_step})"],
                ["raise the learning rate (×3 to ×10); check every parameter is in the optimizer"],
            )
        )
    causes.sort(key=lambda c: -c.score)
    return Diagnosis(
        first_step=records[0].step if records else 0,
        last_step=records[-1].step if records else 0,
        n_records=len(records),
        trends=trends,
        alerts=summaries,
        causes=causes,
        nonfinite=nonfinite,
        first_sign=first_sign,
        counts=counts,
        first_alerts=[str(a) for a in sorted(real, key=lambda a: a.step)[:_FIRST_ALERTS]],
    )


def diagnose(records: Sequence[StabilityMetrics], alerts: Sequence[Alert] | None = None) -> str:
    """A readable summary of a run: trends per metric, the alerts, likely causes and what to try.

    Args:
        records: the run's records (e.g. ``list(monitor.records)`` or `stabwatch.sinks.read_jsonl`).
        alerts: its alerts (default: those stored in the records).

    Example:
        >>> recs = [StabilityMetrics(step=s, loss=2.0 * 0.99 ** s, grad_norm=1.0) for s in range(200)]
        >>> print(diagnose(recs).splitlines()[1])
        verdict: HEALTHY (no alerts)
    """
    _check_inputs(records, alerts)
    if not records:
        return "stabwatch: no records yet."
    return analyse(records, alerts).to_text()


def to_dict(diagnosis: Diagnosis) -> dict[str, Any]:
    """The diagnosis as plain data (for ``stabwatch diagnose --json``)."""
    import dataclasses

    out = dataclasses.asdict(diagnosis)
    out["verdict"] = diagnosis.verdict
    for a in out["alerts"]:
        a["reason"] = a["reason"].value
        a["severity"] = a["severity"].value

    def clean(x: Any) -> Any:  # strict JSON: non-finite floats as strings, as JsonlSink writes them
        if isinstance(x, float) and not math.isfinite(x):
            return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(out)
