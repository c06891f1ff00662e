"""Relative rules need an absolute floor: a gradient creeping from 1e-6 to 1e-3 in a dead network is not
an explosion, however large the ratio. Scripted values modelled on examples/snn_training.py's silent run
(hidden layer never fires; fc1's gradient 1.6e-6 -> 6.7e-5 over 115 steps, one step at 1.0e-3), and the
same rules on a real explosion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stabwatch.alerts import AlertEngine, RatioRule, SpikeRule, TrendRule, default_rules
from stabwatch.alerts.defaults import GRAD_FLOOR, UPDATE_FLOOR
from stabwatch.diagnosis import analyse
from stabwatch.errors import ConfigError
from stabwatch.metrics import AlertReason, StabilityMetrics

SPIKE_STEP = 115


def _silent_snn(n: int = 120, seed: int = 0, fc1_spike: float = 1.004e-3) -> list[StabilityMetrics]:
    """The silent SNN's records: lif1/lif2 dead, fc1's gradient tiny and creeping up, one step ~132x its
    median; fc2 (and so the global norm) a healthy 0.05-0.3."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        if s < 100:  # creeping up from 1.6e-6 to 7.6e-6
            fc1 = 1.6e-6 * (7.6e-6 / 1.6e-6) ** (s / 100)
        else:  # faster in the last steps: 1.2e-5 at 100, 6.7e-5 at 114, then 1e-4 and on
            fc1 = 1.2e-5 * (6.7e-5 / 1.2e-5) ** ((s - 100) / 14)
        fc1 = fc1_spike if s == SPIKE_STEP else fc1 * math.exp(0.15 * rng.standard_normal())
        fc2 = 0.1 * math.exp(0.5 * rng.standard_normal())
        out.append(
            StabilityMetrics(
                step=s,
                loss=2.303,
                grad_norm=math.hypot(fc1, fc2),
                update_ratio=1.5e-3 * math.exp(0.2 * rng.standard_normal()),
                layers={
                    "fc1": {"grad_norm": fc1},
                    "fc2": {"grad_norm": fc2},
                    "lif1": {"firing_rate_mean": 0.0, "dead_neuron_frac": 1.0, "saturated_neuron_frac": 0.0},
                    "lif2": {"firing_rate_mean": 0.0, "dead_neuron_frac": 1.0, "saturated_neuron_frac": 0.0},
                },
            )
        )
    return out


def test_the_snn_scenario_reproduces_the_false_explosion_without_a_floor():
    """The bug as reported: purely relative rules call fc1's 7.6e-6 -> 1e-3 an explosion and the diagnosis
    ranks "learning rate too high" second."""
    recs = _silent_snn()
    median = float(np.median([r.layers["fc1"]["grad_norm"] for r in recs[SPIKE_STEP - 50 : SPIKE_STEP]]))
    assert 5e-6 < median < 1e-5  # the report: "rising from 7.6e-6 to 1e-3"
    assert recs[SPIKE_STEP].layers["fc1"]["grad_norm"] / median > 50  # past grad_explode_layer's instant_factor
    rules = default_rules(grad_floor=None)
    for rule in rules:  # nor the revival guard (a rise while a layer is silent is not an explosion)
        rule.suppressed_by = ()
    alerts = AlertEngine(rules, log_alerts=False).run(recs)
    fired = [a for a in alerts if a.rule == "grad_explode_layer"]
    assert [(a.step, a.layer) for a in fired] == [(SPIKE_STEP, "fc1")]
    causes = [c.key for c in analyse(recs, alerts).causes]
    assert causes[:2] == ["dead_units", "step_size"]


def test_the_revival_guard_alone_keeps_a_reviving_network_quiet():
    """Without the floor, the gradient rules stay quiet when the jump comes as the silent layer starts
    firing again (``silent_layer`` recovers at that record): a recovery, not an explosion. While the layer
    stays silent they are not suppressed (the jump is an alert again)."""
    recs = _silent_snn()
    for r in recs[SPIKE_STEP:]:
        r.layers["lif1"].update(firing_rate_mean=2e-3, dead_neuron_frac=0.97)
    alerts = AlertEngine(default_rules(grad_floor=None), log_alerts=False).run(recs)
    assert not [a for a in alerts if a.reason is AlertReason.EXPLODING_GRADIENT], [str(a) for a in alerts]
    assert ("silent_layer", SPIKE_STEP, "lif1") in {
        (a.rule, a.step, a.layer) for a in alerts if a.reason.value == "recovered"
    }
    assert [c.key for c in analyse(recs, alerts).causes] == ["dead_units"]
    still_silent = AlertEngine(default_rules(grad_floor=None), log_alerts=False).run(_silent_snn())
    assert [(a.rule, a.step) for a in still_silent if a.reason is AlertReason.EXPLODING_GRADIENT] == [
        ("grad_explode_layer", SPIKE_STEP)
    ]


def test_the_default_floor_keeps_the_dead_network_quiet():
    recs = _silent_snn()
    alerts = AlertEngine(default_rules(), log_alerts=False).run(recs)
    assert not [a for a in alerts if a.reason is AlertReason.EXPLODING_GRADIENT], [str(a) for a in alerts]
    assert {a.rule for a in alerts} == {"spiking_dead", "silent_layer"}
    causes = [c.key for c in analyse(recs, alerts).causes]
    assert causes == ["dead_units"]


@pytest.mark.parametrize("seed", range(3))
def test_a_real_explosion_still_fires_with_the_floor(seed):
    """The same network once it learns: fc1's gradient ~0.5, then 100x at one step (and the global norm
    with it) -> the per-layer and the global rule fire at that step, critical globally."""
    recs = _silent_snn(seed=seed)
    rng = np.random.default_rng(seed + 10)
    for r in recs:
        fc1 = 0.5 * math.exp(0.2 * rng.standard_normal()) * (100.0 if r.step == SPIKE_STEP else 1.0)
        r.layers["fc1"]["grad_norm"] = fc1
        for lif in ("lif1", "lif2"):  # it learns, so it fires
            r.layers[lif].update(firing_rate_mean=0.1, dead_neuron_frac=0.2)
        r.grad_norm = math.hypot(fc1, r.layers["fc2"]["grad_norm"])
    alerts = AlertEngine(default_rules(), log_alerts=False).run(recs)
    exploded = {(a.rule, a.step, a.layer) for a in alerts if a.reason is AlertReason.EXPLODING_GRADIENT}
    assert ("grad_explode_layer", SPIKE_STEP, "fc1") in exploded
    assert ("grad_explode", SPIKE_STEP, None) in exploded
    assert "step_size" in [c.key for c in analyse(recs, alerts).causes]


@pytest.mark.parametrize(("name", "layer"), [("grad_explode", None), ("grad_explode_layer", "fc1")])
def test_the_floor_is_the_boundary(name, layer):
    """After a 1e-5 baseline: 0.99 x the floor never fires (a ratio of ~1000); 2 x the floor fires at once
    (a ratio past instant_factor waives patience)."""

    def alert_steps(peak: float) -> list[int]:
        rule = next(r for r in default_rules() if r.name == name)
        assert rule.floor == GRAD_FLOOR
        values = [1e-5] * 20 + [peak] + [1e-5] * 5
        return [
            s for s, v in enumerate(values) if (a := rule.update(s, v, layer)) and a.reason is not AlertReason.RECOVERED
        ]

    assert alert_steps(0.99 * GRAD_FLOOR) == []
    assert alert_steps(2 * GRAD_FLOOR) == [20]


def test_values_below_the_floor_become_the_new_baseline():
    """A value stopped by the floor joins the window like a normal one, so the next jump is judged against
    the new level (median 1e-3), not the old one (1e-5)."""
    rule = RatioRule("grad_norm", factor=10, window=20, min_history=5, floor=1e-2)
    values = [1e-5] * 10 + [1e-3] * 20 + [0.05, 0.5]
    fired = [a for s, v in enumerate(values) if (a := rule.update(s, v))]
    assert [a.step for a in fired] == [30]
    assert fired[0].message == "grad_norm 0.05 is 50× its 20-step median 0.001"


def test_floor_on_ratio_trend_and_spike_rules():
    # RatioRule: 0.05 after a 1e-3 baseline (50x, above the floor) fires at once
    rule = RatioRule("grad_norm", factor=10, window=20, min_history=5, floor=1e-2)
    assert [s for s, v in enumerate([1e-3] * 10 + [0.05]) if rule.update(s, v)] == [10]
    # TrendRule: the same fitted growth (x1.05 per step) alerts only once the latest value reached the floor
    values = [1e-4 * 1.05**s for s in range(200)]

    def trend(**kw):
        return TrendRule("grad_norm", window=50, factor=4, min_t=5, **kw)

    detector = trend()
    triggered = [s for s, v in enumerate(values) if (d := detector.check(s, v)) is not None and d.triggered]
    plain = trend()
    first_plain = next(s for s, v in enumerate(values) if plain.update(s, v))
    floored = trend(floor=1e-2)
    first_floored = next(s for s, v in enumerate(values) if floored.update(s, v))
    assert first_plain == triggered[0] == 49  # the first full window: fitted x1.05^49 = x10.9 >= x4
    crossing = math.ceil(math.log(1e-2 / 1e-4) / math.log(1.05))  # 1e-4 * 1.05^s >= 1e-2
    assert first_floored == crossing == 95 and first_floored in triggered
    # SpikeRule: a 20x log-scale outlier of a tiny loss stays quiet under the floor, fires above it
    noisy = [1e-6 * math.exp(0.05 * math.sin(1.7 * i)) for i in range(40)]
    quiet = SpikeRule("loss", z=6, window=50, warmup=20, floor=1e-3)
    assert [s for s, v in enumerate([*noisy, 2e-5]) if quiet.update(s, v)] == []
    loud = SpikeRule("loss", z=6, window=50, warmup=20, floor=1e-7)
    assert [s for s, v in enumerate([*noisy, 2e-5]) if loud.update(s, v)] == [40]


def test_update_jump_has_its_own_floor():
    rule = next(r for r in default_rules() if r.name == "update_jump")
    assert rule.floor == UPDATE_FLOOR
    low = [1e-6] * 20 + [1e-4] * 3  # 100x, but each step moves the weights by 0.01% of their norm
    assert [s for s, v in enumerate(low) if rule.update(s, v)] == []
    rule.reset()
    high = [1e-3] * 20 + [2e-2] * 3
    assert [s for s, v in enumerate(high) if rule.update(s, v)] == [21]  # 20x: patience 2
    rule.reset()
    huge = [1e-3] * 20 + [5e-2] * 3
    assert [s for s, v in enumerate(huge) if rule.update(s, v)] == [20]  # 50x: at once (instant_factor)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: RatioRule("grad_norm", floor=-1.0), "RatioRule.floor"),
        (lambda: RatioRule("grad_norm", floor="high"), "RatioRule.floor"),
        (lambda: RatioRule("grad_norm", direction="down", floor=-1.0), "RatioRule.floor"),
        (lambda: TrendRule("grad_norm", direction="falling", floor=1.0), "TrendRule.floor"),
        (lambda: SpikeRule("loss", floor=math.inf), "SpikeRule.floor"),
        (lambda: default_rules(grad_floor=-1), "default_rules.grad_floor"),
    ],
)
def test_bad_floors_are_config_errors(make, field):
    with pytest.raises(ConfigError, match=field):
        make()
