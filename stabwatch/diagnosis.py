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
* **Causes in a chain.** Vanishing gradients, saturated, dead or silent units and collapse within 100 steps
  after the first step-size alert (update ratio, loss jump, gradient explosion) are its consequence: they
  count for the step size ("weights blow up, then the surrogate gradients vanish and neurons saturate").
* **Spiking networks** (the records carry a firing rate or a ``spiking/...`` key): dead/silent, saturated
  and vanishing-surrogate causes give spiking advice (threshold, input scaling, bias, leak β, surrogate
  slope, a firing-rate regulariser), not ReLU / He / Xavier / BatchNorm; a vanishing gradient that comes
  with silent or saturated neurons is theirs (the membranes sit far from the threshold); a gradient alert
  while a silent layer fires again is a recovery; the trend lines of the firing rate, the dead and
  saturated fractions and the membrane's distance to the threshold count as evidence.
* **Transformers**: alerts on the ``attention`` family's keys (``attention_logit_growth``,
  ``attention_entropy_collapse``) are evidence for attention logit growth, whose advice is qk-layernorm, a
  lower peak learning rate or a longer warm-up, and a z-loss for drifting output logits; what clipping does
  is said for the run's optimizer (little under Adam & co.).
* **Clipping** is not suggested under an adaptive optimizer (``optimizer=``: Adam & co. step by about the
  learning rate whatever the gradient), nor, the optimizer unknown, while gradients vanish.
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
    "membrane_threshold_distance",
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
            return (
                f"{self.metric + ' ':<22}{self.label:<8} {values}, too few steps for a trend; latest {fmt(self.latest)}"
            )
        text = (
            f"{self.metric + ' ':<22}{self.label:<8} median {fmt(self.first_median)} → {fmt(self.last_median)}"
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
    metric: str = ""

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


@dataclass(frozen=True)
class _CauseSpec:
    """A cause: its title and what to try, and, for a spiking network, the spiking-specific versions."""

    title: str
    actions: tuple[str, ...]
    spiking_title: str | None = None
    spiking_actions: tuple[str, ...] | None = None


_CLIP_ACTION = "clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={clip})"

_CLIP_ATTENTION = "gradient clipping"  # replaced by the optimizer's own text (`_attention_clip_text`)

_CAUSES: dict[str, _CauseSpec] = {
    "attention_logits": _CauseSpec(
        "attention logit growth: the pre-softmax attention logits grow without bound and the attention "
        "entropy collapses (heads attend to single keys), the transformer instability of Wortsman et al. 2023",
        (
            "add qk-layernorm: a LayerNorm (or RMSNorm) on each head's queries and keys before q·kᵀ "
            "(Dehghani et al. 2023; Wortsman et al. 2023): it keeps the logits small at the same learning rate",
            "lower the peak learning rate (÷3 to ÷10) or lengthen the warm-up",
            "if the output logits drift too (attention/z_max growing far above log(vocabulary size)), add a "
            "z-loss: 1e-4 · logsumexp(logits)² per token to the loss (PaLM; Wortsman et al. 2023)",
            _CLIP_ATTENTION,
        ),
    ),
    "step_size": _CauseSpec(
        "the learning rate (step size) is too high for this model/batch",
        (
            "lower the learning rate (÷3 to ÷10), or add / lengthen the warm-up",
            _CLIP_ACTION,
            "Monitor(guard=True) skips single bad steps while you fix the cause",
        ),
        "the learning rate (step size) is too high: large steps blow the weights up, then the membranes leave "
        "the surrogate's window (neurons saturate or fall silent) and the surrogate gradients vanish",
        (
            "lower the learning rate (÷3 to ÷10), or add / lengthen the warm-up; check the scheduler (a "
            "restart, a jump) at the step named above",
            _CLIP_ACTION,
            "Monitor(guard=True) skips single bad steps while you fix the cause",
        ),
    ),
    "numerics": _CauseSpec(
        "a numerical overflow or an invalid operation (log(0), 0/0, sqrt of a negative, fp16 overflow)",
        (
            "look at the named layer and the loss for log/exp/division/sqrt; add epsilons",
            "under AMP use bf16 or torch.amp.GradScaler; keep the loss in float32",
            "check the batch at that step for NaN/inf inputs or labels",
            "torch.autograd.set_detect_anomaly(True) names the op (slow: for debugging only)",
        ),
    ),
    "recurrent": _CauseSpec(
        "the recurrent weights amplify small hidden states (spectral radius > 1); gradients through time can "
        "grow only where ‖W_hh‖₂ > 1 (the radius alone neither implies nor rules it out)",
        (
            "regularise the recurrent weights: orthogonal init, spectral normalisation, weight decay on W_hh",
            "check the gradient alerts: they, not the radius, say whether gradients through time explode",
            "clip gradients (clip_grad_norm_) and shorten truncated-BPTT windows",
            "an LSTM/GRU instead of a vanilla RNN",
        ),
    ),
    "propagation": _CauseSpec(
        "poor signal propagation: initialisation or saturating activations",
        (
            "change the initialisation (He for ReLU, Xavier/Glorot for tanh; smaller scale if units saturate)",
            "add normalisation (LayerNorm/BatchNorm) or residual connections",
            "prefer ReLU/GELU over sigmoid/tanh in deep stacks; normalise the inputs",
        ),
        "poor signal propagation through the spiking layers (input or weight scale off for the thresholds)",
        (
            "rescale the inputs (input gain / encoding) and the initial weights so each layer's membrane "
            "reaches its threshold at a moderate rate (~5-20 %)",
            "lower the learning rate",
        ),
    ),
    "dead_units": _CauseSpec(
        "dead or silent units (no output, so no gradient)",
        (
            "lower the learning rate (large steps kill ReLUs)",
            "LeakyReLU/GELU, He init, a small positive bias",
            "spiking layers: lower the threshold, raise the input gain, check the surrogate-gradient slope",
        ),
        "silent or dying spiking neurons: they never reach the threshold, so they pass nothing on and their "
        "surrogate gradient is almost zero",
        (
            "lower the firing threshold, or raise the input scaling (gain) / the initial weight scale, so the "
            "membrane reaches the threshold",
            "look for what pushes the layer down (a drifting or too negative bias, weight decay, a firing-rate "
            "penalty that is too strong); a small positive bias init helps",
            "add a firing-rate regulariser that keeps each layer's rate above a floor (e.g. penalise rates < 1 %)",
            "a wider surrogate (a smaller slope) gives sub-threshold neurons some gradient to recover with",
        ),
    ),
    "saturation": _CauseSpec(
        "saturated units (they sit at their maximum output, so they pass no gradient)",
        (
            "normalise the inputs; use a smaller initialisation scale",
            "lower the learning rate",
        ),
        "saturated spiking neurons: they fire at (almost) every time step and the membrane sits above the "
        "threshold, so spike rates carry no information and the surrogate lets little gradient through",
        (
            "raise the firing threshold, or lower the input scaling (gain) / the weight scale",
            "add leak: a membrane decay β < 1 (β = 1 integrates without forgetting and climbs past the threshold)",
            "add a firing-rate regulariser that pulls rates down (e.g. towards 5-20 %)",
            "check the reset: a reset by subtraction of a tiny threshold barely lowers the membrane",
        ),
    ),
    "vanishing_surrogate": _CauseSpec(
        "vanishing gradients",
        (
            "change the initialisation (He for ReLU, Xavier/Glorot for tanh)",
            "add normalisation or residual connections",
        ),
        "the surrogate gradient lets almost nothing through: the surrogate is too steep for where the "
        "membranes are, so the layers before the spiking neurons barely learn",
        (
            "use a wider surrogate: a smaller slope (snntorch fast_sigmoid slope ~25 or less, atan alpha ~2)",
            "bring the membranes near the threshold: input scaling (gain), weight init scale, the threshold",
            "normalise the inputs; check the gradient floor per layer (grad_floor_layer) after the change",
        ),
    ),
    "conditioning": _CauseSpec(
        "a jump of a layer's gradient condition number (σ₁/σ_min of the batch gradient, not the Hessian's; "
        "raised only by a rule of your own, none of the default rules watches it)",
        (
            "check whether the batch size changed: the batch gradient has rank <= B, and its condition number "
            "follows B",
            "otherwise add normalisation, or use an adaptive optimizer (Adam/AdamW); lower the learning rate",
        ),
    ),
}

#: alert reasons that are direct signs of too large a step (``update_ratio_low`` excluded by name)
_STEP_REASONS = frozenset(
    {
        AlertReason.EXPLODING_GRADIENT,
        AlertReason.LOSS_SPIKE,
        AlertReason.UPDATE_RATIO,
        AlertReason.CHAOTIC_TRAINING,
        AlertReason.NON_FINITE,
    }
)
#: what a too large step leaves behind: alerts of these reasons that follow a step-size alert (within
#: `_AFTERMATH` steps) count for the step size, not for a cause of their own
_AFTERMATH_REASONS = frozenset(
    {
        AlertReason.VANISHING_GRADIENT,
        AlertReason.SATURATED_NEURONS,
        AlertReason.DEAD_NEURONS,
        AlertReason.SILENT_LAYER,
        AlertReason.COLLAPSE,
    }
)
_AFTERMATH = 100
#: record fields of the spiking family (an alert on one of them is about spiking neurons)
_SPIKING_FIELDS = frozenset(
    {
        "firing_rate_mean",
        "firing_rate_std",
        "dead_neuron_frac",
        "saturated_neuron_frac",
        "membrane_mean",
        "membrane_std",
        "membrane_threshold_distance",
    }
)
#: optimizers whose step is about ``lr`` per weight whatever the gradient's size (clipping does not bound it)
_ADAPTIVE = ("adam", "rmsprop", "adagrad", "adadelta", "adafactor", "lion", "lamb", "sophia", "nadam", "radam")


def _targets(s: AlertSummary, spiking: bool) -> list[str]:
    """The causes an alert group is evidence for (in a spiking network, vanishing gradients point at the
    surrogate and saturated spiking neurons at saturation, not at ReLU/He/Xavier territory)."""
    r = s.reason
    out: list[str] = []
    if r in _STEP_REASONS and not (r is AlertReason.UPDATE_RATIO and "low" in s.rule):
        out.append("step_size")
    if r is AlertReason.NON_FINITE:
        out.append("numerics")
    if r is AlertReason.SPECTRAL_RADIUS:
        out.append("recurrent")
    if r is AlertReason.VANISHING_GRADIENT:
        out.append("vanishing_surrogate" if spiking else "propagation")
    if r is AlertReason.SATURATED_NEURONS:
        out.append("saturation" if _is_spiking_metric(s.metric) else "propagation")
    if r is AlertReason.COLLAPSE:
        out.append("propagation")
    if r in (AlertReason.DEAD_NEURONS, AlertReason.SILENT_LAYER):
        out.append("dead_units")
    if r is AlertReason.ILL_CONDITIONED:
        out.append("conditioning")
    if s.metric.startswith(("attention/", "attention_layers/")):
        out.append("attention_logits")
    return out


def _is_spiking_metric(metric: str) -> bool:
    return metric in _SPIKING_FIELDS or metric.startswith("spiking")


def is_spiking_run(records: Sequence[StabilityMetrics]) -> bool:
    """Whether the records come from a spiking network: the spiking family measured something (a global or
    per-layer firing rate, or a ``spiking/...`` extra key)."""
    for r in records:
        if r.firing_rate_mean is not None or any(k.startswith("spiking") for k in r.extra):
            return True
        if any("firing_rate_mean" in vals for vals in r.layers.values()):
            return True
    return False


#: steps a dead / saturation alert may come after a vanishing-gradient alert and still explain it
_NEAR = 20


def _explained_by(s: AlertSummary, summaries: list[AlertSummary]) -> str | None:
    """``"dead_units"`` or ``"saturation"`` when a vanishing (surrogate) gradient comes with silent / dead or
    saturated spiking neurons: the membranes sit far from the threshold, so the surrogate passes little
    whatever its slope; ``None`` when nothing else explains it."""
    best: tuple[int, str] | None = None
    for other in summaries:
        if other.first_step > s.first_step + _NEAR:  # before it (an episode going on), or just after
            continue
        if other.reason in (AlertReason.DEAD_NEURONS, AlertReason.SILENT_LAYER):
            key = "dead_units"
        elif other.reason is AlertReason.SATURATED_NEURONS and _is_spiking_metric(other.metric):
            key = "saturation"
        else:
            continue
        if best is None or other.first_step < best[0]:
            best = (other.first_step, key)
    return None if best is None else best[1]


def _adaptive(optimizer: str | None) -> bool | None:
    """``True`` for an optimizer whose step does not scale with the gradient (Adam & co.), ``False`` for
    another, ``None`` when unknown."""
    if not optimizer:
        return None
    name = optimizer.lower()
    return any(word in name for word in _ADAPTIVE)


def _revival(records: Sequence[StabilityMetrics], step: int) -> str | None:
    """If a spiking layer was silent before ``step`` and fires again around it, say which (a gradient rising
    back then is the network recovering, not exploding); else ``None``."""
    window = [r for r in records if step - _AFTERMATH <= r.step <= step + 10]
    rates: dict[str, list[tuple[int, float]]] = {}
    for r in window:
        for layer, vals in r.layers.items():
            v = vals.get("firing_rate_mean")
            if v is not None and math.isfinite(v):
                rates.setdefault(layer, []).append((r.step, v))
    for layer, pts in rates.items():
        before = [v for s, v in pts if s < step]
        after = [v for s, v in pts if s >= step - 1]
        if before and after and min(before) < _SILENT_RATE and max(after) > max(2 * min(before), _SILENT_RATE):
            return f"{layer}'s firing rate {fmt(min(before))} → {fmt(max(after))}"
    return None


#: a firing rate below this is a silent layer (for telling recovery from explosion)
_SILENT_RATE = 1e-3


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
                a.rule,
                a.reason,
                a.severity,
                1,
                a.step,
                a.step,
                [a.layer] if a.layer else [],
                a.message,
                a.suggestion,
                a.metric,
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


def _causes(
    records: Sequence[StabilityMetrics],
    summaries: list[AlertSummary],
    trends: list[Trend],
    first: Alert | None,
    optimizer: str | None,
) -> list[Cause]:
    """Rank the likely causes (see the module docstring)."""
    spiking = is_spiking_run(records)
    by_trend = {t.metric: t for t in trends}
    score: dict[str, int] = {}
    evidence: dict[str, list[str]] = {}

    def add(key: str, points: int, text: str) -> None:
        score[key] = score.get(key, 0) + points
        evidence.setdefault(key, []).append(text)

    def when(s: AlertSummary) -> str:
        return f"step {s.first_step}" if s.count == 1 else f"{s.count}×, from step {s.first_step}"

    # a gradient rising back while a silent spiking layer starts firing again is the network recovering
    revived: dict[str, str] = {}
    for s in summaries:
        if s.reason is AlertReason.EXPLODING_GRADIENT and spiking:
            how = _revival(records, s.first_step)
            if how is not None:
                revived[s.rule] = how
    step_alerts = [
        s
        for s in summaries
        if "step_size" in _targets(s, spiking) and s.rule not in revived and s.reason is not AlertReason.NON_FINITE
    ]
    big_step = min((s.first_step for s in step_alerts), default=None)
    for s in summaries:
        weight = _WEIGHT[s.severity]
        if s.rule in revived:
            add("dead_units", 0, f"{s.rule} ({when(s)}): the gradient rising back as {revived[s.rule]} (recovery)")
            continue
        targets = _targets(s, spiking)
        aftermath = (
            big_step is not None
            and s.reason in _AFTERMATH_REASONS
            and big_step <= s.first_step <= big_step + _AFTERMATH
        )
        if aftermath:  # weights blown up by a large step: what follows is its consequence
            add("step_size", weight, f"then {s.rule} ({when(s)})")
            for key in targets:
                add(key, 0, f"{s.rule} ({when(s)}, after the large step at step {big_step})")
            continue
        owner = _explained_by(s, summaries) if spiking and s.reason is AlertReason.VANISHING_GRADIENT else None
        if owner is not None:  # little surrogate gradient because the membranes sit far from the threshold
            where = "below" if owner == "dead_units" else "above"
            add(owner, weight, f"{s.rule} ({when(s)}): the membranes sit far {where} the threshold")
            continue
        for key in targets:
            add(key, weight, f"{s.rule} ({when(s)})")
    for metric, floor in (("grad_norm", GRAD_FLOOR), ("loss", None)):
        t = by_trend.get(metric)
        if t is not None and t.recent == "rising" and (floor is None or t.latest >= floor) and not revived:
            add("step_size", 1, f"{metric} rising since step {t.recent_from} ({t.rate(t.recent_per_100)})")
    if spiking:  # the trend lines of the spiking statistics are evidence too
        for metric, label, key, level in (
            ("firing_rate_mean", "falling", "dead_units", 0.0),
            ("dead_neuron_frac", "rising", "dead_units", 0.5),
            ("saturated_neuron_frac", "rising", "saturation", 0.1),
        ):
            t = by_trend.get(metric)  # a fraction rising from 0 to 0.004 is not news: it must reach `level`
            if t is not None and label in (t.label, t.recent) and t.last_median >= level:
                add(key, 1, f"{metric} {label} {fmt(t.first_median)} → {fmt(t.last_median)}")
        t = by_trend.get("membrane_threshold_distance")
        if t is not None and t.label != "n/a" and t.last_median < 0:
            add(
                "saturation",
                1,
                f"membrane_threshold_distance {fmt(t.last_median)} (the membrane sits above the threshold)",
            )
    if first is not None:
        s0 = next((s for s in summaries if s.rule == first.rule), None)
        if s0 is not None and s0.rule not in revived:
            keys = (
                ["step_size"]
                if big_step is not None and s0.reason in _AFTERMATH_REASONS and first.step >= big_step
                else _targets(s0, spiking)
            )
            for key in keys:
                score[key] = score.get(key, 0) + 1
    clip = _clip_text(records)
    vanishing = any(s.reason is AlertReason.VANISHING_GRADIENT for s in summaries) or any(
        t.metric == "grad_norm" and "falling" in (t.label, t.recent) for t in trends
    )
    adaptive = _adaptive(optimizer)
    causes: list[Cause] = []
    for key, spec in _CAUSES.items():
        if not evidence.get(key):
            continue
        use_spiking = spiking and spec.spiking_title is not None
        if key == "step_size":  # the spiking story of a large step only when its aftermath was seen
            use_spiking = use_spiking and any(e.startswith("then ") for e in evidence[key])
        title = spec.spiking_title if use_spiking else spec.title
        actions = list(spec.spiking_actions if use_spiking and spec.spiking_actions else spec.actions)
        if key == "step_size" and _CLIP_ACTION in actions:
            i = actions.index(_CLIP_ACTION)
            if adaptive:
                actions[i] = (
                    f"not clipping: under {optimizer} the step is about lr per weight whatever the gradient's size, "
                    "so clipping the gradient does not bound it; lower the learning rate instead"
                )
            elif adaptive is None and vanishing:
                del actions[i]  # the gradients are vanishing: clipping them cannot help
            else:
                actions[i] = actions[i].format(clip=clip)
        if key == "attention_logits":
            actions[actions.index(_CLIP_ATTENTION)] = _attention_clip_text(optimizer, adaptive)
        causes.append(Cause(key, title or spec.title, max(score.get(key, 0), 1), evidence[key], actions))
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
    return sorted(causes, key=lambda c: -c.score)


def _attention_clip_text(optimizer: str | None, adaptive: bool | None) -> str:
    """What gradient clipping does against attention logit growth, for this run's optimizer."""
    if adaptive:
        return (
            f"gradient clipping does little here: under {optimizer} the step is about lr per weight whatever "
            "the gradient's size, so clipping does not bound how fast q and k grow"
        )
    if adaptive is False:
        return (
            f"under {optimizer} the step scales with the gradient, so clipping it (clip_grad_norm_) caps each "
            "step; qk-layernorm removes the cause"
        )
    return (
        "gradient clipping bounds the step only for SGD-type optimizers; under Adam & co. the step is about lr "
        "per weight whatever the gradient's size, so clipping does not stop the growth"
    )


def _clip_text(records: Sequence[StabilityMetrics]) -> str:
    grad_median = median(r.grad_norm for r in records if r.grad_norm is not None and math.isfinite(r.grad_norm))
    if grad_median > 0:
        return f"≈{fmt(2 * grad_median)} (2× the median grad norm {fmt(grad_median)})"
    return "2× the typical norm"


def analyse(
    records: Sequence[StabilityMetrics], alerts: Sequence[Alert] | None = None, *, optimizer: str | None = None
) -> Diagnosis:
    """Build the `Diagnosis` of a run.

    Args:
        records: the run's records, in step order.
        alerts: its alerts (default: those stored in the records).
        optimizer: the optimizer's class name (``Monitor.describe()["optimizer"]``), if known: under an
            adaptive optimizer (Adam & co.) clipping is not suggested (it does not bound the step).

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

    causes = _causes(records, summaries, trends, first, optimizer)
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


def diagnose(
    records: Sequence[StabilityMetrics], alerts: Sequence[Alert] | None = None, *, optimizer: str | None = None
) -> str:
    """A readable summary of a run: trends per metric, the alerts, likely causes and what to try.

    Args:
        records: the run's records (e.g. ``list(monitor.records)`` or `stabwatch.sinks.read_jsonl`).
        alerts: its alerts (default: those stored in the records).
        optimizer: the optimizer's class name, if known (see `analyse`).

    Example:
        >>> recs = [StabilityMetrics(step=s, loss=2.0 * 0.99 ** s, grad_norm=1.0) for s in range(200)]
        >>> print(diagnose(recs).splitlines()[1])
        verdict: HEALTHY (no alerts)
    """
    _check_inputs(records, alerts)
    if not records:
        return "stabwatch: no records yet."
    return analyse(records, alerts, optimizer=optimizer).to_text()


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
