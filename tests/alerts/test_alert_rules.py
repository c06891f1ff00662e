"""Every rule type on scripted value sequences: fires at the expected step and not before, patience,
hysteresis, cooldown, recovery, per-layer streams, validation, and the state round-trip."""

from __future__ import annotations

import copy
import io
import json
import math
import statistics

import numpy as np
import pytest
import torch

from stabwatch.alerts import (
    AlertEngine,
    AllOf,
    AnyOf,
    NonFiniteRule,
    RatioRule,
    SpikeRule,
    SustainedRule,
    ThresholdRule,
    TrendRule,
)
from stabwatch.alerts.base import Binding, RecordView, Rule
from stabwatch.alerts.rules.spike import MAD_TO_SIGMA
from stabwatch.alerts.rules.trend import fit_slope
from stabwatch.errors import StabwatchError
from stabwatch.metrics import AlertReason, Severity, StabilityMetrics
from stabwatch.numeric import fmt

NAN = float("nan")


def feed(rule: Rule, values, start: int = 0, layer=None):
    """[(step, reason, severity)] of the alerts a value sequence raises."""
    out = []
    for i, v in enumerate(values):
        a = rule.update(start + i, v, layer)
        if a is not None:
            out.append((a.step, a.reason.value, a.severity.value))
    return out


def steps(alerts, reason=None):
    return [s for s, r, _ in alerts if reason is None or r == reason]


def noise(n: int, seed: int = 0, scale: float = 0.05, center: float = 1.0):
    rng = np.random.default_rng(seed)
    return list(center * np.exp(scale * rng.standard_normal(n)))


# --- threshold ---------------------------------------------------------------------------------------
def test_threshold_fires_at_first_crossing_once_and_recovers():
    rule = ThresholdRule("spectral_radius", above=1.0)
    seq = [0.5, 0.9, 0.99, 1.0, 1.01, 1.2, 1.3, 0.8, 0.7]
    out = feed(rule, seq)
    assert out == [(4, "threshold", "warning"), (7, "recovered", "info")]


def test_threshold_clear_level_hysteresis():
    rule = ThresholdRule("x", above=1.0, clear=0.9)
    # 0.95 is below the threshold but above the clear level: the episode goes on (no flapping)
    out = feed(rule, [0.5, 1.1, 0.95, 1.05, 0.95, 0.89, 1.01])
    assert out == [(1, "threshold", "warning"), (5, "recovered", "info"), (6, "threshold", "warning")]


def test_threshold_below_and_message_numbers():
    rule = ThresholdRule("layers:firing_rate_mean", below=1e-4, name="silent")
    a = rule.update(3, 2e-5, layer="lif1")
    assert a is not None and a.layer == "lif1" and a.metric == "firing_rate_mean"
    assert a.message == "firing_rate_mean of lif1 2e-05 < 1e-04"


def test_patience_needs_consecutive_observations():
    rule = ThresholdRule("x", above=1.0, patience=3)
    out = feed(rule, [2, 2, 0, 2, 2, 2, 2])
    assert steps(out) == [5]


def test_cooldown_suppresses_realert_until_it_has_passed():
    rule = ThresholdRule("x", above=1.0, cooldown=10)
    seq = [0] * 3 + [2, 0, 2, 0, 2] + [0] * 6 + [2, 2]  # crossings at 3, 5, 7 and 14
    out = feed(rule, seq)
    assert steps(out, "threshold") == [3, 14]  # 5 and 7 are within 10 steps of 3
    assert steps(out, "recovered") == [4]


def test_clear_after_delays_recovery():
    rule = ThresholdRule("x", above=1.0, clear_after=3)
    out = feed(rule, [2, 0, 0, 2, 0, 0, 0])
    assert out == [(0, "threshold", "warning"), (6, "recovered", "info")]


def test_report_recovery_off():
    rule = ThresholdRule("x", above=1.0, report_recovery=False)
    assert steps(feed(rule, [2, 0, 2])) == [0, 2]


def test_none_is_skipped_without_touching_state():
    rule = ThresholdRule("x", above=1.0, patience=2)
    assert feed(rule, [2, None, 2]) == [(2, "threshold", "warning")]
    r2 = RatioRule("x", factor=10, min_history=3)
    feed(r2, [1, None, 1, None, 1])
    assert len(r2._streams[None].det.window) == 3


# --- ratio -------------------------------------------------------------------------------------------
def test_ratio_fires_at_the_spike_not_before():
    base = noise(60, seed=1, scale=0.3)
    seq = [*base, 12 * statistics.median(base[-50:])]
    rule = RatioRule("grad_norm", factor=10, window=50, min_history=10)
    out = feed(rule, seq)
    assert steps(out) == [60]
    a = RatioRule("grad_norm", factor=10, window=50, min_history=10)
    for i, v in enumerate(seq[:-1]):
        a.update(i, v)
    alert = a.update(60, seq[-1])
    med = statistics.median(seq[10:60])
    assert alert is not None and alert.message == (
        f"grad_norm {fmt(seq[-1])} is {seq[-1] / med:.3g}× its 50-step median {fmt(med)}"
    )


def test_ratio_warmup_and_message_example():
    rule = RatioRule("grad_norm", factor=10, window=50, min_history=5)
    # a huge value inside the warm-up is not judged
    assert feed(rule, [1, 1, 100, 1, 1]) == []
    alerts = feed(rule, [1, 1, 1, 1, 11], start=5)
    assert alerts == [(9, "spike", "warning")]


def test_ratio_patience_and_instant_factor():
    rule = RatioRule("g", factor=10, patience=2, instant_factor=50, min_history=5)
    seq = [1.0] * 10 + [20, 1, 1, 20, 20, 1, 1, 60]
    out = feed(rule, seq)
    # one-step 20x at 10: quiet; two in a row at 13-14: alert at 14; 60x at 17: at once
    assert steps(out, "spike") == [14, 17]


def test_ratio_spike_does_not_become_its_own_baseline_until_a_window_passed():
    rule = RatioRule("g", factor=10, window=10, min_history=5)
    out = feed(rule, [1.0] * 10 + [100.0] * 25)
    # the episode lasts a full window (10 values kept out), then the window adapts and recovers
    assert steps(out, "spike") == [10]
    rec = steps(out, "recovered")
    assert len(rec) == 1 and 20 < rec[0] <= 30


def test_ratio_down_direction():
    rule = RatioRule("grad_norm", factor=1000, direction="down", min_history=5)
    out = feed(rule, [0.01] * 8 + [5e-5, 1e-9, 0.01])  # 200x below: quiet; 1e7x below: alert
    assert out == [(9, "spike", "warning"), (10, "recovered", "info")]


def test_ratio_ignores_nonfinite():
    rule = RatioRule("g", factor=10, min_history=3)
    assert feed(rule, [1, 1, 1, NAN, math.inf, 1]) == []


# --- spike -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mad", "ewma"])
def test_spike_fires_at_the_outlier_only(method):
    base = noise(80, seed=2, scale=0.1)
    rule = SpikeRule("loss", z=6, window=50, warmup=20, method=method)
    out = feed(rule, [*base, 5.0, 1.0, 1.0])
    assert out == [(80, "spike", "warning"), (81, "recovered", "info")]


def test_spike_warmup_blocks_early_alerts():
    rule = SpikeRule("loss", z=3, window=50, warmup=20)
    assert feed(rule, [1.0] * 5 + [100.0] + [1.0] * 10) == []


def test_spike_mad_zscore_matches_reference():
    vals = noise(60, seed=3, scale=0.2)
    rule = SpikeRule("loss", z=1e9, window=50, warmup=20)
    for i, v in enumerate(vals):
        rule.update(i, v)
    probe = 3.0
    verdict = rule.check(60, probe)
    ys = np.log(vals[10:60])
    med = np.median(ys)
    sigma = MAD_TO_SIGMA * np.median(np.abs(ys - med))
    z = (math.log(probe) - med) / sigma
    assert f"{z:+.1f}σ" in verdict.text


def test_spike_ewma_matches_reference_recursion():
    vals = noise(40, seed=4, scale=0.2)
    rule = SpikeRule("loss", z=1e9, window=9, warmup=5, method="ewma", log=False)
    for i, v in enumerate(vals):
        rule.update(i, v)
    alpha, m, var = 2 / 10, 0.0, 0.0
    for n, y in enumerate(vals, 1):
        a = max(alpha, 1 / n)
        d = y - m
        m += a * d
        var = (1 - a) * (var + a * d * d)
    st = rule._streams[None].det
    assert st.mean == pytest.approx(m, rel=1e-12) and st.var == pytest.approx(var, rel=1e-12)


def test_spike_min_ratio_keeps_flat_series_quiet():
    flat = [1.0 + 1e-6 * (i % 3) for i in range(40)]
    assert feed(SpikeRule("loss", z=6, window=30, warmup=10, min_ratio=2), [*flat, 1.5]) == []
    assert steps(feed(SpikeRule("loss", z=6, window=30, warmup=10, min_ratio=2), [*flat, 2.5])) == [40]


def test_spike_down_and_log_skips_nonpositive():
    rule = SpikeRule("x", z=5, window=30, warmup=10, direction="down")
    out = feed(rule, [*noise(30, seed=5, scale=0.05), 0.0, -1.0, 0.2])
    assert steps(out, "spike") == [32]


# --- trend -------------------------------------------------------------------------------------------
def test_trend_fires_when_growth_and_significance_are_reached():
    rng = np.random.default_rng(0)
    seq = [float(math.exp(0.05 * rng.standard_normal())) for _ in range(60)]
    seq += [float(1.1 ** (i + 1) * math.exp(0.05 * rng.standard_normal())) for i in range(60)]
    rule = TrendRule("grad_norm", window=30, factor=10, min_t=5)
    out = feed(rule, seq)
    first = steps(out, "trend")[0]
    # the fitted growth over the 30-step window first reaches 10x some steps into the growth phase
    assert 60 < first < 90
    xs = list(range(first - 29, first + 1))
    slope, t = fit_slope([float(x) for x in xs], [math.log(seq[x]) for x in xs])
    assert slope * 29 >= math.log(10) and t >= 5
    xs0 = list(range(first - 30, first))
    slope0, t0 = fit_slope([float(x) for x in xs0], [math.log(seq[x]) for x in xs0])
    assert slope0 * 29 < math.log(10) or t0 < 5  # not before


def test_trend_stays_quiet_on_noise_and_on_a_falling_series():
    rng = np.random.default_rng(1)
    noisy = [float(math.exp(rng.standard_normal())) for _ in range(500)]
    assert feed(TrendRule("loss", window=100, factor=2, min_t=5), noisy) == []
    falling = [float(math.exp(-0.02 * i)) for i in range(200)]
    assert feed(TrendRule("loss", window=50, factor=2), falling) == []
    assert steps(feed(TrendRule("loss", window=50, factor=2, direction="falling"), falling)) == [49]


def test_trend_running_sums_equal_direct_fit():
    rng = np.random.default_rng(2)
    rule = TrendRule("x", window=37, min_change=1e9, log=False, min_t=1)
    xs, ys = [], []
    for i in range(0, 900, 3):
        y = 0.01 * i + float(rng.standard_normal())
        v = rule.check(i, y)
        xs, ys = [*xs, i][-37:], [*ys, y][-37:]
        if v is not None:
            slope, t = fit_slope([float(x) for x in xs], ys)
            assert f"t = {t:.1f}" in v.text and f"{fmt(slope, 3, signed=True)} per step" in v.text


def test_fit_slope_against_numpy():
    rng = np.random.default_rng(3)
    x = np.arange(50.0)
    y = 0.3 * x + rng.standard_normal(50)
    slope, t = fit_slope(list(x), list(y))
    p, cov = np.polyfit(x, y, 1, cov="unscaled")
    resid = y - np.polyval(p, x)
    se = math.sqrt(resid @ resid / 48 * cov[0, 0])
    assert slope == pytest.approx(p[0], rel=1e-10) and t == pytest.approx(p[0] / se, rel=1e-8)


# --- sustained ---------------------------------------------------------------------------------------
def test_sustained_k_of_n():
    rule = SustainedRule("lyapunov", above=0.0, patience=3, within=5)
    seq = [0.1, -0.1, 0.1, -0.1, 0.1, 0.1, -0.2, -0.2, -0.2, -0.2]
    out = feed(rule, seq)
    # 3 of the last 5 positive first at step 4; fewer than 3 of 5 from step 7
    assert out == [(4, "threshold", "warning"), (7, "recovered", "info")]


def test_sustained_consecutive_default():
    rule = SustainedRule("dead", above=0.9, patience=2, reason="dead_neurons")
    out = feed(rule, [0.95, 0.5, 0.95, 0.96, 0.97])
    assert out == [(3, "dead_neurons", "warning")]


# --- non-finite --------------------------------------------------------------------------------------
def test_nonfinite_value_rule():
    rule = NonFiniteRule("loss")
    out = feed(rule, [1.0, NAN, math.inf, 1.0, -math.inf])
    assert out == [(1, "non_finite", "critical"), (3, "recovered", "info"), (4, "non_finite", "critical")]


def test_nonfinite_record_rule_names_the_layer():
    rule = NonFiniteRule()
    recs = [
        StabilityMetrics(step=0, loss=1.0, nonfinite=False),
        StabilityMetrics(step=1, loss=NAN, nonfinite=True, nonfinite_source="enc.act"),
        StabilityMetrics(step=2, loss=NAN, nonfinite=True, nonfinite_source="enc.act"),
        StabilityMetrics(step=3, loss=1.0),  # nonfinite not checked: skipped
        StabilityMetrics(step=4, loss=1.0, nonfinite=False),
    ]
    out = [a for r in recs for a in rule.observe(RecordView(r))]
    assert [(a.step, a.reason) for a in out] == [(1, AlertReason.NON_FINITE), (4, AlertReason.RECOVERED)]
    assert out[0].layer == "enc.act" and "enc.act" in out[0].message and "loss = nan" in out[0].message
    assert out[0].severity is Severity.CRITICAL and out[0].suggestion


# --- combinations ------------------------------------------------------------------------------------
def _rec(step, **kw):
    return StabilityMetrics(step=step, **kw)


def test_allof_needs_every_condition_at_the_same_record():
    rule = AllOf(
        ThresholdRule("grad_norm", above=10), ThresholdRule("loss", above=5), name="blowup", severity="critical"
    )
    recs = [
        _rec(0, grad_norm=1, loss=1),
        _rec(1, grad_norm=20, loss=1),
        _rec(2, grad_norm=1, loss=9),
        _rec(3, grad_norm=20),  # loss missing: no opinion
        _rec(4, grad_norm=20, loss=9),
        _rec(5, grad_norm=1, loss=1),
    ]
    out = [a for r in recs for a in rule.observe(RecordView(r))]
    assert [(a.step, a.reason.value) for a in out] == [(4, "custom"), (5, "recovered")]
    assert out[0].message == "grad_norm 20 > 10 and loss 9 > 5" and out[0].severity is Severity.CRITICAL


def test_anyof_one_alert_for_the_group_and_layer_when_single():
    rule = AnyOf(ThresholdRule("layers:dead_frac", above=0.9), ThresholdRule("loss", above=5), name="any")
    recs = [
        _rec(0, loss=1, layers={"a": {"dead_frac": 0.1}, "b": {"dead_frac": 0.2}}),
        _rec(1, loss=1, layers={"a": {"dead_frac": 0.95}, "b": {"dead_frac": 0.2}}),
        _rec(2, loss=9, layers={"a": {"dead_frac": 0.95}, "b": {"dead_frac": 0.2}}),
        _rec(3, loss=1, layers={"a": {"dead_frac": 0.1}, "b": {"dead_frac": 0.2}}),
    ]
    out = [a for r in recs for a in rule.observe(RecordView(r))]
    assert [(a.step, a.reason.value, a.layer) for a in out] == [(1, "custom", "a"), (3, "recovered", None)]
    with pytest.raises(StabwatchError, match="feed it records"):
        rule.update(0, 1.0)


# --- per-layer streams, validation -------------------------------------------------------------------
def test_per_layer_streams_are_independent():
    rule = RatioRule("layers:grad_norm", factor=10, min_history=3)
    for s in range(5):
        rule.update(s, 1.0, "a")
        rule.update(s, 100.0, "b")
    assert rule.update(5, 20.0, "a") is not None
    assert rule.update(5, 200.0, "b") is None  # b's baseline is 100
    assert sorted(rule.active_layers()) == ["a"]


def test_layers_rel_binding_divides_by_the_layer_median():
    r = _rec(0, layers={"a": {"grad_norm": 1.0}, "b": {"grad_norm": 2.0}, "c": {"grad_norm": 4e-4}})
    assert Binding("layers_rel:grad_norm").values(RecordView(r)) == [("a", 1.0), ("b", 2.0), ("c", 4e-4)]
    two = _rec(0, layers={"a": {"grad_norm": 1.0}, "b": {"grad_norm": 2.0}})
    assert Binding("layers_rel:grad_norm").values(RecordView(two)) == []


def test_flat_key_and_extra_bindings():
    r = _rec(0, grad_norm=3.0, layers={"enc.0": {"grad_norm": 1.5}}, extra={"grad_sv/top1/enc.0": 7.0})
    assert Binding("grad/norm").values(RecordView(r)) == [(None, 3.0)]
    assert Binding("grad_layers/norm/enc.0").values(RecordView(r)) == [("enc.0", 1.5)]
    assert Binding("grad_sv_layers/top1/enc.0").values(RecordView(r)) == [("enc.0", 7.0)]
    assert Binding("grad_sv/top1/enc.0").values(RecordView(r)) == [("enc.0", 7.0)]  # the raw extra form
    assert Binding("grad_layers/norm/missing").values(RecordView(r)) == [("missing", None)]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: AlertEngine([ThresholdRule("grad_nrom", above=1)]),
            "unknown field 'grad_nrom'.*allowed fields: loss",
        ),
        (
            lambda: AlertEngine([AllOf(ThresholdRule("loss", above=1), ThresholdRule("lyap", above=0))]),
            "unknown field 'lyap'",
        ),
        (lambda: ThresholdRule("layers:nope", above=1), "unknown field 'nope'"),
        (lambda: ThresholdRule("loss"), "above= and/or below="),
        (lambda: ThresholdRule("loss", above=1, clear=2), "clear: 2.0 must be <= above=1.0"),
        (lambda: RatioRule("loss", factor=1), "factor: expected a number > 1"),
        (lambda: RatioRule("loss", window=5, min_history=10), "min_history"),
        (lambda: RatioRule("loss", direction="sideways"), "direction"),
        (lambda: SpikeRule("loss", method="median"), "method: expected 'mad' or 'ewma'"),
        (lambda: TrendRule("loss", factor=0.5), "factor: expected a number > 1"),
        (lambda: SustainedRule("loss", above=1, patience=3, within=2), "within"),
        (lambda: ThresholdRule("loss", above=1, severity="fatal"), "severity: expected .info., .warning. or"),
        (lambda: ThresholdRule("loss", above=1, patience=0), "patience: expected an int >= 1"),
        (lambda: AllOf(ThresholdRule("loss", above=1)), "two or more rules"),
    ],
)
def test_bad_configuration_raises_a_clear_error(make, match):
    with pytest.raises(StabwatchError, match=match):
        make()


# --- state round-trip, for every rule type -----------------------------------------------------------
def _sequence(n=160, seed=0):
    rng = np.random.default_rng(seed)
    vals = list(np.exp(0.2 * rng.standard_normal(n)))
    for i in (40, 41, 90):
        vals[i] *= 40
    for i in range(120, 140):
        vals[i] *= 1.15 ** (i - 119)
    vals[60] = NAN
    return [float(v) for v in vals]


RULES = {
    "threshold": lambda: ThresholdRule("x", above=3.0, clear=2.0, patience=2, cooldown=5),
    "ratio": lambda: RatioRule("x", factor=8, window=30, min_history=5, patience=2, instant_factor=30),
    "spike_mad": lambda: SpikeRule("x", z=5, window=40, warmup=10, min_ratio=2, cooldown=3),
    "spike_ewma": lambda: SpikeRule("x", z=5, window=40, warmup=10, method="ewma"),
    "trend": lambda: TrendRule("x", window=20, factor=4, min_t=4),
    "sustained": lambda: SustainedRule("x", above=1.3, patience=3, within=6),
    "nonfinite": lambda: NonFiniteRule("x"),
}


def _roundtrip(state):
    """Through JSON and through torch.save/torch.load(weights_only=True), as a checkpoint would."""
    state = json.loads(json.dumps(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", sorted(RULES))
@pytest.mark.parametrize("cut", [15, 41, 100, 125])
def test_state_roundtrip_resumes_exactly(kind, cut):
    seq = _sequence()
    straight = RULES[kind]()
    expected = [(s, a) for s, v in enumerate(seq) for a in [straight.update(s, v, "L")] if a is not None]
    assert expected, f"the sequence should make {kind} fire"
    first = RULES[kind]()
    got = [(s, a) for s, v in enumerate(seq[:cut]) for a in [first.update(s, v, "L")] if a is not None]
    resumed = RULES[kind]()
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    got += [(s, a) for s, v in enumerate(seq[cut:], cut) for a in [resumed.update(s, v, "L")] if a is not None]
    assert got == expected
    assert resumed.state_dict() == straight.state_dict()


@pytest.mark.parametrize("combo", [AllOf, AnyOf])
def test_state_roundtrip_combinations(combo):
    seq = _sequence()

    def make():
        return combo(RatioRule("grad_norm", factor=8, min_history=5), ThresholdRule("loss", above=2.5))

    recs = [_rec(s, grad_norm=v, loss=seq[(s + 1) % len(seq)]) for s, v in enumerate(seq)]
    straight = make()
    expected = [a for r in recs for a in straight.observe(RecordView(r))]
    assert expected
    first, resumed = make(), make()
    got = [a for r in recs[:70] for a in first.observe(RecordView(r))]
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    got += [a for r in recs[70:] for a in resumed.observe(RecordView(r))]
    assert got == expected


def test_load_state_of_another_rule_type_is_refused():
    state = RatioRule("x").state_dict()
    with pytest.raises(StabwatchError, match="state is for a RatioRule"):
        SpikeRule("x").load_state_dict(state)


def test_state_is_plain_data_and_memory_stays_bounded():
    rule = SpikeRule("x", window=50, warmup=10)
    for s in range(5000):
        rule.update(s, 1.0 + (s % 7) * 0.01)
    st = rule.state_dict()
    assert len(st["streams"][0]["det"]["window"]["values"]) == 50
    assert copy.deepcopy(st) == json.loads(json.dumps(st))


def test_window_mad_by_bisection_matches_sorting():
    from stabwatch.alerts.base import Window

    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 40))
        pool = [float(v) for v in rng.normal(size=3)]  # ties, too
        values = [float(rng.choice(pool)) if rng.random() < 0.3 else float(rng.normal()) for _ in range(n)]
        w = Window(30)
        for step, v in enumerate(values):
            w.push(step, v)
        kept = values[-30:]
        for center in (w.median(), float(rng.normal()), -5.0, 5.0, kept[0]):
            assert w.mad(center) == pytest.approx(statistics.median(abs(v - center) for v in kept), abs=1e-12)
