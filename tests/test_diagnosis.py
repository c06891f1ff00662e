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
from stabwatch.diagnosis import analyse, diagnose, to_dict, trend
from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics
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
