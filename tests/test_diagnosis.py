"""`diagnose`: trends against independent computations, alert summaries, causes ranked by evidence,
and `Monitor.diagnose` on real training."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.alerts.defaults import GRAD_FLOOR
from stabwatch.diagnosis import analyse, diagnose, to_dict, trend
from stabwatch.errors import StabwatchError
from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics
from stabwatch.numeric import fmt
from tests.helpers import data, mlp


def _alert(rule, reason, step, severity=Severity.WARNING, layer=None, msg="x 1"):
    return Alert(
        rule=rule,
        reason=reason,
        severity=severity,
        step=step,
        metric="m",
        layer=layer,
        message=msg,
        suggestion="do something",
    )


def test_trend_labels_and_rates_against_quartile_medians():
    rng = np.random.default_rng(0)
    steps = list(range(0, 400, 2))
    values = [float(math.exp(0.01 * s + 0.1 * rng.standard_normal())) for s in steps]
    label, rate = trend(values, steps)
    q = len(values) // 4
    a, b = np.median(values[:q]), np.median(values[-q:])
    dx = np.median(steps[-q:]) - np.median(steps[:q])
    assert label == "rising" and rate == pytest.approx((b / a) ** (100 / dx), rel=1e-12)
    assert rate == pytest.approx(math.exp(1.0), rel=0.1)  # x e per 100 steps, the true rate
    assert trend([1 / (1 + s) for s in range(100)])[0] == "falling"
    assert trend([1.0 + 0.01 * (-1) ** s for s in range(100)])[0] == "stable"
    assert trend([1.0, float("nan"), 2.0])[0] == "n/a"
    # a series that changes sign is judged on a linear scale
    label, rate = trend([-0.5 + 0.01 * s for s in range(100)])
    assert label == "rising" and rate == pytest.approx(1.0, rel=1e-9)


def test_recent_trend_catches_a_late_blow_up():
    recs = [StabilityMetrics(step=s, grad_norm=1.0 * (1.05 ** max(0, s - 300))) for s in range(400)]
    d = analyse(recs)
    g = next(t for t in d.trends if t.metric == "grad_norm")
    assert g.recent == "rising" and g.recent_from == 300
    slope = np.polyfit(np.arange(300, 400), np.log([r.grad_norm for r in recs[300:]]), 1)[0]
    assert g.recent_per_100 == pytest.approx(math.exp(100 * slope), rel=1e-6)
    assert "rising since step 300" in diagnose(recs)


def test_alerts_are_grouped_and_causes_ranked():
    recs = [StabilityMetrics(step=s, loss=1.0, grad_norm=2.0) for s in range(100)]
    alerts = [
        _alert("spectral_radius_high", AlertReason.SPECTRAL_RADIUS, 10, layer="rnn.weight_hh_l0"),
        _alert("grad_explode", AlertReason.EXPLODING_GRADIENT, 20, Severity.CRITICAL),
        _alert("grad_explode", AlertReason.EXPLODING_GRADIENT, 40, Severity.CRITICAL),
        _alert("grad_explode", AlertReason.RECOVERED, 21, Severity.INFO),
        _alert("loss_spike", AlertReason.LOSS_SPIKE, 41),
    ]
    d = analyse(recs, alerts)
    assert d.counts == {"critical": 2, "warning": 2, "info": 0}
    assert d.verdict == "unstable"
    ge = next(a for a in d.alerts if a.rule == "grad_explode")
    assert (ge.count, ge.first_step, ge.last_step) == (2, 20, 40)  # the recovery is not counted
    # step size: critical grad_explode (3) + loss_spike (2) = 5; recurrent: warning (2) + first sign (1)
    assert [c.key for c in d.causes] == ["step_size", "recurrent"]
    assert d.causes[0].score == 5 and d.causes[1].score == 3
    assert "max_norm=≈4 (2× the median grad norm 2)" in d.causes[0].actions[1]
    assert d.first_sign.startswith("step 10, spectral_radius_high")
    text = d.to_text()
    assert "regularise the recurrent weights" in text and "verdict: UNSTABLE (2 critical, 2 warning)" in text
    assert to_dict(d)["alerts"][0]["severity"] == "critical"


@pytest.mark.parametrize(
    ("reason", "key", "words"),
    [
        (AlertReason.VANISHING_GRADIENT, "propagation", "initialisation"),
        (AlertReason.DEAD_NEURONS, "dead_units", "LeakyReLU"),
        (AlertReason.ILL_CONDITIONED, "conditioning", "normalisation"),
        (AlertReason.NON_FINITE, "numerics", "log/exp"),
    ],
)
def test_each_reason_points_to_its_cause(reason, key, words):
    recs = [StabilityMetrics(step=s, loss=1.0) for s in range(10)]
    d = analyse(recs, [_alert("r", reason, 5)])
    assert key in [c.key for c in d.causes]
    assert words in "\n".join(next(c for c in d.causes if c.key == key).actions)


def test_nonfinite_records_are_reported_with_the_layer():
    recs = [StabilityMetrics(step=s, loss=1.0, nonfinite=False) for s in range(5)]
    recs.append(StabilityMetrics(step=5, loss=math.nan, nonfinite=True, nonfinite_source="enc.1"))
    d = analyse(recs)
    assert d.verdict == "unstable" and "from step 5, first seen in enc.1, loss = nan" in d.nonfinite


def test_monitor_diagnose_on_real_training():
    def train(lr):
        model = mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        x, y = data(64)
        with sw.Monitor(model, opt, preset="cheap") as mon:
            for i in range(150):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(
                    model(x[i % 4 * 16 : i % 4 * 16 + 16]), y[i % 4 * 16 : i % 4 * 16 + 16]
                )
                if i >= 100:
                    loss = loss * 1000.0  # the effective step size jumps 1000x
                loss.backward()
                opt.step()
                mon.step(loss=loss)
        return mon.diagnose()

    text = train(0.02)
    assert "verdict: UNSTABLE" in text
    assert "1. the learning rate (step size) is too high" in text
    assert re.search(r"grad_explode \(critical, \d+×, (step|steps) 10\d", text), text
    assert "grad_norm" in text.split("alerts, by rule")[0]  # the trend table is there


def test_empty_run():
    assert diagnose([]) == "stabwatch: no records yet."


def _exploding_loss() -> list[StabilityMetrics]:
    """A loss that falls for 190 steps and then explodes in the last 10 (fewer than a quarter of the run):
    its ends say 'rising' (2.4 -> 1655), its quarter medians say 'falling' (1.35 -> 0.14)."""
    return [
        StabilityMetrics(step=s, loss=2.3 * math.exp(-s / 40) + 0.1 if s < 190 else 2.3 * 10 ** ((s - 189) / 3.5))
        for s in range(200)
    ]


def test_trend_label_and_numbers_come_from_the_same_quarter_medians():
    recs = _exploding_loss()
    values = [r.loss for r in recs]
    q = len(values) // 4
    first_median, last_median = float(np.median(values[:q])), float(np.median(values[-q:]))
    assert values[-1] > values[0] and last_median < 0.5 * first_median  # the ends and the medians disagree
    t = next(t for t in analyse(recs).trends if t.metric == "loss")
    assert t.label == "falling"
    assert t.first_median == pytest.approx(first_median, rel=1e-12)
    assert t.last_median == pytest.approx(last_median, rel=1e-12)
    assert t.latest == values[-1]
    line = str(t)
    # the numbers next to the label are the medians it compares, and the label agrees with them
    assert f"falling  median {fmt(first_median)} → {fmt(last_median)}" in line
    assert f"{fmt(values[0])} → {fmt(values[-1])}" not in line
    assert f"latest {fmt(values[-1])}" in line
    assert "rising since step 150" in line  # where the run is heading now is still said
    assert "median of the first quarter of the run → median of the last quarter" in diagnose(recs)


@pytest.mark.parametrize("seed", range(5))
def test_trend_label_agrees_with_its_numbers(seed):
    """Over random log-normal walks: 'rising' iff last/first median >= 2, 'falling' iff <= 1/2."""
    rng = np.random.default_rng(seed)
    values = np.exp(np.cumsum(rng.normal(0, 0.15, size=400)))
    recs = [StabilityMetrics(step=s, grad_norm=float(v)) for s, v in enumerate(values)]
    t = next(t for t in analyse(recs).trends if t.metric == "grad_norm")
    ratio = t.last_median / t.first_median
    assert t.label == ("rising" if ratio >= 2 else "falling" if ratio <= 0.5 else "stable")
    assert ratio == pytest.approx(np.median(values[-100:]) / np.median(values[:100]), rel=1e-12)


def test_a_recent_gradient_rise_below_the_floor_is_not_evidence_of_a_large_step():
    """The relative 'grad_norm rising' evidence has the same absolute floor as the alert rules."""

    def causes(scale: float) -> list[str]:
        recs = [StabilityMetrics(step=s, grad_norm=scale * 1.05 ** max(0, s - 300)) for s in range(400)]
        d = analyse(recs)
        assert d.trends[0].recent == "rising" and d.trends[0].recent_from == 300  # the same trend either way
        return [c.key for c in d.causes]

    assert GRAD_FLOOR > 1e-6 * 1.05**99  # the tiny run never reaches the floor
    assert causes(1e-6) == []
    assert causes(1e-1) == ["step_size"]


@pytest.mark.parametrize(
    ("records", "alerts", "where"),
    [
        ([1, 2], None, "records[0]"),
        ("run.jsonl", None, "records must be a list"),
        ([StabilityMetrics(step=0)], ["alert"], "alerts[0]"),
    ],
)
def test_diagnose_refuses_what_is_not_a_run(records, alerts, where):
    for fn in (analyse, diagnose):
        with pytest.raises(StabwatchError, match=re.escape(where)):
            fn(records, alerts)


def test_a_metric_with_too_few_values_shows_no_rate():
    # the loss at every step, the update ratio only twice (a family on a schedule): no trend for the latter
    recs = [
        sw.StabilityMetrics(step=s, loss=2.0 * 0.99**s, update_ratio=1e-3 if s in (0, 100) else None)
        for s in range(120)
    ]
    lines = diagnose(recs).splitlines()
    (line,) = [ln for ln in lines if ln.lstrip().startswith("update_ratio")]
    assert "n/a" in line and "2 values, too few steps for a trend" in line and "/100 steps" not in line
    (loss,) = [ln for ln in lines if ln.lstrip().startswith("loss ")]
    assert "falling" in loss and "/100 steps" in loss


# --- spiking networks -------------------------------------------------------------------------------------------

NON_SPIKING_ADVICE = ("ReLU", "He ", "He/", "Xavier", "BatchNorm")


def _spiking_records(n: int = 120, rate=lambda s: 0.1, dead=lambda s: 0.2, grad=lambda s: 1.0) -> list:
    return [
        StabilityMetrics(
            step=s,
            loss=1.0,
            grad_norm=grad(s),
            firing_rate_mean=rate(s),
            dead_neuron_frac=dead(s),
            layers={"lif1": {"firing_rate_mean": rate(s), "dead_neuron_frac": dead(s)}},
        )
        for s in range(n)
    ]


def _spk_alert(rule, reason, step, metric, severity=Severity.WARNING, layer="lif1"):
    return Alert(rule=rule, reason=reason, severity=severity, step=step, metric=metric, layer=layer, message="x 1")


def _text(cause) -> str:
    return " ".join([cause.title, *cause.actions])


@pytest.mark.parametrize(
    ("alert", "key", "words"),
    [
        (_spk_alert("membrane_above_threshold", AlertReason.SATURATED_NEURONS, 5, "membrane_threshold_distance"),
         "saturation", ("threshold", "β < 1", "regulariser")),
        (_spk_alert("silent_layer", AlertReason.SILENT_LAYER, 5, "firing_rate_mean"),
         "dead_units", ("threshold", "input scaling", "bias", "regulariser")),
        (_spk_alert("surrogate_vanishing", AlertReason.VANISHING_GRADIENT, 5, "spiking/surrogate_grad", layer=None),
         "vanishing_surrogate", ("slope", "threshold")),
    ],
)  # fmt: skip
def test_spiking_causes_give_spiking_advice(alert, key, words):
    d = analyse(_spiking_records(), [alert])
    first = d.causes[0]
    assert first.key == key
    text = _text(first)
    assert all(w in text for w in words), text
    assert not [w for w in NON_SPIKING_ADVICE if w in text], text


def test_the_same_reasons_keep_their_non_spiking_causes_without_spiking_records():
    recs = [StabilityMetrics(step=s, loss=1.0, grad_norm=1.0) for s in range(50)]
    sat = _alert("saturated_neurons", AlertReason.SATURATED_NEURONS, 5)
    vanish = _alert("grad_vanish", AlertReason.VANISHING_GRADIENT, 5)
    for alert in (sat, vanish):
        first = analyse(recs, [alert]).causes[0]
        assert first.key == "propagation" and "He for ReLU" in _text(first)


def test_a_gradient_rising_as_silent_neurons_revive_is_recovery_not_step_size():
    # lif1 silent until step 60, then firing again; grad_explode fired at step 62 (a rule set without the
    # revival guard): the diagnosis reads it as the recovery
    recs = _spiking_records(
        rate=lambda s: 0.0 if s < 60 else 0.02,
        dead=lambda s: 1.0 if s < 60 else 0.5,
        grad=lambda s: 1e-3 if s < 60 else 1.0,
    )
    alerts = [
        _spk_alert("silent_layer", AlertReason.SILENT_LAYER, 2, "firing_rate_mean"),
        _spk_alert("grad_explode", AlertReason.EXPLODING_GRADIENT, 62, "grad_norm", Severity.CRITICAL, layer=None),
    ]
    d = analyse(recs, alerts)
    assert [c.key for c in d.causes] == ["dead_units"]
    assert any("recovery" in e and "grad_explode" in e for e in d.causes[0].evidence)


def _step_then_collapse() -> tuple[list, list]:
    recs = _spiking_records(grad=lambda s: 1.0 if s < 10 else 1e-5)
    alerts = [
        _spk_alert("update_too_large", AlertReason.UPDATE_RATIO, 0, "update_ratio", Severity.CRITICAL, layer=None),
        _spk_alert("spiking_saturated", AlertReason.SATURATED_NEURONS, 3, "saturated_neuron_frac"),
        _spk_alert("membrane_above_threshold", AlertReason.SATURATED_NEURONS, 4, "membrane_threshold_distance"),
        _spk_alert("grad_vanish", AlertReason.VANISHING_GRADIENT, 11, "grad_norm", layer=None),
        _spk_alert("surrogate_vanishing", AlertReason.VANISHING_GRADIENT, 12, "spiking/surrogate_grad", layer=None),
    ]
    return recs, alerts


@pytest.mark.parametrize(("optimizer", "clip"), [(None, False), ("Adam", False), ("AdamW", False), ("SGD", True)])
def test_weights_blown_up_then_vanishing_surrogates_is_step_size(optimizer, clip):
    recs, alerts = _step_then_collapse()
    d = analyse(recs, alerts, optimizer=optimizer)
    first = d.causes[0]
    assert first.key == "step_size" and first.score >= 3 + 1 + 2 + 2 + 2 + 2
    assert "then grad_vanish (step 11)" in first.evidence and "surrogate gradients vanish" in first.title
    assert ("clip_grad_norm_" in _text(first)) is clip
    if optimizer is not None and optimizer.startswith("Adam"):
        assert f"under {optimizer} the step is about lr per weight" in _text(first)
    others = {c.key: c for c in d.causes[1:]}
    assert "after the large step at step 0" in "; ".join(others["saturation"].evidence)
    assert not [w for w in NON_SPIKING_ADVICE if w in _text(first)]


def test_spiking_trend_lines_are_evidence():
    # the slow death of the issue: no alert, but the trend lines say it
    recs = _spiking_records(
        n=300, rate=lambda s: 0.09 if s < 50 else 0.09 * 0.98 ** (s - 50), dead=lambda s: min(0.95, 0.3 + 0.003 * s)
    )
    d = analyse(recs, [])
    (cause,) = d.causes
    assert cause.key == "dead_units"
    assert any(e.startswith("firing_rate_mean falling 0.09 → ") for e in cause.evidence), cause.evidence
    assert any(e.startswith("dead_neuron_frac rising") for e in cause.evidence), cause.evidence
    healthy = analyse(_spiking_records(n=300), [])
    assert healthy.causes == [] and healthy.verdict == "healthy"


def test_compat_diagnose_gives_spiking_advice():
    from stabwatch.compat import StabilityMonitor

    mon = StabilityMonitor()
    model = nn.Linear(4, 4)
    for _ in range(12):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1)
        mon.compute(model, spikes=torch.ones(4, 10, 20))  # every neuron fires at every step
    text = mon.diagnose()
    causes = text.split("likely causes (most likely first):")[1]
    assert "saturated spiking neurons" in causes and "raise the firing threshold" in causes
    assert not [w for w in NON_SPIKING_ADVICE if w in causes], causes


def _attention_alert(rule: str, step: int, metric: str, value: float) -> Alert:
    return Alert(
        rule=rule,
        reason=AlertReason.THRESHOLD,
        severity=Severity.WARNING,
        step=step,
        metric=metric,
        value=value,
        message=f"{metric} {value}",
        suggestion="qk-layernorm",
    )


@pytest.mark.parametrize(
    ("optimizer", "clip"),
    [("AdamW", "does little here: under AdamW"), ("SGD", "under SGD the step scales"), (None, "only for SGD-type")],
)
def test_attention_alerts_name_attention_logit_growth_and_clipping_is_said_per_optimizer(optimizer, clip):
    recs = [StabilityMetrics(step=s, loss=2.5, grad_norm=0.5) for s in range(40)]
    alerts = [
        _attention_alert("attention_logit_growth", 10, "attention/max_logit", 603.0),
        _attention_alert("attention_entropy_collapse", 20, "attention/entropy_min", 0.01),
        _alert("update_ratio_high", AlertReason.UPDATE_RATIO, 25),  # a later step-size sign ranks below it
    ]
    d = analyse(recs, alerts, optimizer=optimizer)
    assert [c.key for c in d.causes] == ["attention_logits", "step_size"]
    top = d.causes[0]
    assert top.score == 2 + 2 + 1  # two warnings, and the first sign
    assert top.evidence == ["attention_logit_growth (step 10)", "attention_entropy_collapse (step 20)"]
    text = _text(top)
    assert "qk-layernorm" in text and "z-loss" in text and "warm-up" in text and clip in text
    # an alert on another threshold rule (edge of stability) is no evidence for attention
    other = analyse(recs, [_attention_alert("edge_of_stability", 10, "sharpness/eos_ratio", 1.2)])
    assert [c.key for c in other.causes] == []
