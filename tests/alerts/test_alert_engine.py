"""The engine and the default rules on records, and the wiring into `Monitor`: alerts in the record
before the sinks see it, callbacks, logging, ``raise_on``, and resuming with the engine's state."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.alerts import AlertEngine, RatioRule, Rule, ThresholdRule, default_rules
from stabwatch.errors import StabwatchError
from stabwatch.metrics import StabilityMetrics
from tests.helpers import data, mlp

ONSET = 150
LAYERS = ("fc1", "fc2", "fc3")
#: the per-layer field the `collapse` rule watches (``activation_batch_std`` once the collector emits it)
COLLAPSE_FIELD = next(r.binding.field for r in default_rules() if r.name == "collapse")


def _baseline(step: int, rng: np.random.Generator) -> dict:
    def n(center, sigma=0.1):
        return float(center * math.exp(sigma * rng.standard_normal()))

    layers = {
        name: {
            "grad_norm": n(1.0),
            "dead_frac": n(0.1),
            "saturated_frac": n(0.05),
            "activation_std": n(1.0),
            "activation_batch_std": n(1.0),
            "spectral_radius": n(0.8, 0.01),
            "grad_condition": n(50.0, 0.3),
            "weight_norm": n(10.0),
        }
        for name in LAYERS
    }
    layers["lif1"] = {
        "firing_rate_mean": n(0.1),
        "dead_neuron_frac": n(0.2),
        "saturated_neuron_frac": n(0.01),
        "membrane_threshold_distance": n(1.5),
    }
    return {
        "step": step,
        "extra": {"spiking/surrogate_grad": n(0.025)},
        "loss": n(1.0),
        "grad_norm": n(1.0),
        "update_ratio": n(1e-3),
        "lyapunov": -0.05 + 0.01 * float(rng.standard_normal()),
        "nonfinite": False,
        "layers": layers,
    }


def _set(rec, path, fn):
    if len(path) == 1:
        rec[path[0]] = fn(rec[path[0]])
    else:
        rec["layers"][path[0]][path[1]] = fn(rec["layers"][path[0]][path[1]])


# rule -> (what changes from ONSET on, whether it lasts, the step the rule must fire at)
SCENARIOS = {
    "non_finite": (lambda r: r.update(nonfinite=True, nonfinite_source="fc2", loss=math.nan), False, ONSET),
    "grad_explode": (lambda r: _set(r, ["grad_norm"], lambda v: 100 * v), False, ONSET),
    "grad_rising": (lambda r: _set(r, ["grad_norm"], lambda v: v * 1.03 ** (r["step"] - ONSET)), True, None),
    "grad_vanish": (lambda r: _set(r, ["grad_norm"], lambda v: 1e-5 * v), False, ONSET),
    "grad_tiny": (lambda r: _set(r, ["grad_norm"], lambda v: 1e-9), True, ONSET + 19),
    "loss_spike": (lambda r: _set(r, ["loss"], lambda v: 20 * v), False, ONSET),
    "chaotic": (lambda r: r.update(lyapunov=0.2), True, ONSET + 9),
    "update_jump": (lambda r: _set(r, ["update_ratio"], lambda v: 20 * v), True, ONSET + 1),
    "update_ratio_high": (lambda r: r.update(update_ratio=0.5), True, ONSET + 2),
    "update_ratio_low": (lambda r: r.update(update_ratio=1e-8), True, ONSET + 9),
    "grad_explode_layer": (lambda r: _set(r, ["fc2", "grad_norm"], lambda v: 100 * v), False, ONSET),
    "grad_vanish_layer": (lambda r: _set(r, ["fc1", "grad_norm"], lambda v: 1e-5 * v), True, ONSET + 19),
    "no_gradient_layer": (lambda r: _set(r, ["fc1", "grad_norm"], lambda v: 0.0), True, ONSET + 19),
    "spectral_radius": (lambda r: _set(r, ["fc2", "spectral_radius"], lambda v: 1.2), True, ONSET),
    "spectral_radius_high": (lambda r: _set(r, ["fc2", "spectral_radius"], lambda v: 2.0), True, ONSET),
    "dead_neurons": (lambda r: _set(r, ["fc1", "dead_frac"], lambda v: 0.95), True, ONSET + 1),
    "saturated_neurons": (lambda r: _set(r, ["fc2", "saturated_frac"], lambda v: 0.8), True, ONSET + 1),
    "collapse": (lambda r: _set(r, ["fc3", COLLAPSE_FIELD], lambda v: 1e-3 * v), True, ONSET),
    "spiking_dead": (lambda r: _set(r, ["lif1", "dead_neuron_frac"], lambda v: 0.99), True, ONSET + 10),
    "spiking_saturated": (lambda r: _set(r, ["lif1", "saturated_neuron_frac"], lambda v: 0.9), True, ONSET + 2),
    "silent_layer": (lambda r: _set(r, ["lif1", "firing_rate_mean"], lambda v: 0.0), True, ONSET + 2),
    "loss_jump": (lambda r: _set(r, ["loss"], lambda v: 100 * v), False, ONSET),  # 50x or more: at once
    "update_too_large": (lambda r: r.update(update_ratio=2.0), True, ONSET),
    "spiking_rate_falling": (lambda r: _set(r, ["lif1", "firing_rate_mean"], lambda v: 0.3 * v), True, ONSET),
    "spiking_rate_high": (lambda r: _set(r, ["lif1", "firing_rate_mean"], lambda v: 0.6), True, ONSET + 2),
    "membrane_above_threshold": (
        lambda r: _set(r, ["lif1", "membrane_threshold_distance"], lambda v: -1.0),
        True,
        ONSET + 1,
    ),
    "grad_floor_layer": (lambda r: _set(r, ["fc1", "grad_norm"], lambda v: 1e-8), True, ONSET + 2),
    "surrogate_vanishing": (lambda r: r["extra"].update({"spiking/surrogate_grad": 1e-3}), True, ONSET),
    "edge_of_stability": (lambda r: r["extra"].update({"sharpness/eos_ratio": 1.2}), True, ONSET + 2),
    "attention_logit_growth": (lambda r: r["extra"].update({"attention/max_logit": 500.0}), True, ONSET),
    "attention_entropy_collapse": (lambda r: r["extra"].update({"attention/entropy_min": 0.01}), True, ONSET + 1),
}


def _records(rule: str, n: int = 260, seed: int = 0) -> list[StabilityMetrics]:
    rng = np.random.default_rng(seed)
    change, lasting, _ = SCENARIOS[rule]
    out = []
    for s in range(n):
        rec = _baseline(s, rng)
        if s == ONSET or (lasting and s > ONSET):
            change(rec)
        out.append(StabilityMetrics(**rec))
    return out


def test_every_default_rule_has_a_scenario():
    assert {r.name for r in default_rules()} == set(SCENARIOS)


@pytest.mark.parametrize("rule", sorted(SCENARIOS))
def test_each_default_rule_fires_on_its_condition_and_nothing_fires_before(rule):
    engine = AlertEngine(default_rules(), log_alerts=False)
    alerts = engine.run(_records(rule))
    assert [a for a in alerts if a.step < ONSET] == []
    mine = [a for a in alerts if a.rule == rule and a.reason is not sw.AlertReason.RECOVERED]
    assert mine, f"{rule} did not fire; alerts: {[str(a) for a in alerts[:5]]}"
    expected_step = SCENARIOS[rule][2]
    if expected_step is not None:
        assert mine[0].step == expected_step, str(mine[0])
    else:  # the trend rule: fitted growth 10x over 100 steps (1.03^s) with a significant slope
        assert ONSET + 60 <= mine[0].step <= ONSET + 100, str(mine[0])
    a = mine[0]
    assert a.message and a.suggestion and a.severity in (sw.Severity.INFO, sw.Severity.WARNING, sw.Severity.CRITICAL)
    assert re.search(r"\d", a.message), "the message carries the numbers"
    if rule.endswith("_layer") or rule in ("dead_neurons", "saturated_neurons", "collapse") or "spiking" in rule:
        assert a.layer in (*LAYERS, "lif1")


def test_default_rules_skip_unscheduled_metrics():
    engine = AlertEngine(default_rules(), log_alerts=False)
    rng = np.random.default_rng(1)
    recs = []
    for s in range(300):
        full = _baseline(s, rng)
        # activations every 50, spectra every 100, update every 10, as the default preset schedules
        rec = {"step": s, "loss": full["loss"], "grad_norm": full["grad_norm"], "nonfinite": False, "layers": {}}
        if s % 10 == 0:
            rec["update_ratio"] = full["update_ratio"]
        for name, vals in full["layers"].items():
            acts = {"dead_frac", "saturated_frac", "activation_std", "activation_batch_std"}
            keep = {"grad_norm"} | (acts if s % 50 == 0 else set())
            keep |= {"spectral_radius", "grad_condition"} if s % 100 == 0 else set()
            rec["layers"][name] = {k: v for k, v in vals.items() if k in keep}
        recs.append(StabilityMetrics(**rec))
    assert engine.run(recs) == []
    assert engine.run([StabilityMetrics(step=300)]) == []  # an empty record


def test_engine_state_roundtrip_with_default_rules():
    recs = _records("grad_explode") + [
        StabilityMetrics(**{**r.model_dump(exclude={"alerts"}), "step": r.step + 260}) for r in _records("chaotic")
    ]
    straight = AlertEngine(default_rules(), log_alerts=False)
    expected = straight.run(recs)
    assert expected
    first = AlertEngine(default_rules(), log_alerts=False)
    got = first.run(recs[:200])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = AlertEngine(default_rules(), log_alerts=False)
    resumed.load_state_dict(state)
    got += resumed.run(recs[200:])
    assert got == expected


def test_engine_load_state_with_a_changed_rule_set(caplog):
    a = AlertEngine([RatioRule("grad_norm", name="g", min_history=2)], log_alerts=False)
    a.run([StabilityMetrics(step=s, grad_norm=1.0) for s in range(3)])
    b = AlertEngine([RatioRule("grad_norm", name="g", min_history=2), ThresholdRule("loss", above=1, name="l")])
    with caplog.at_level(logging.INFO, logger="stabwatch.alerts"):
        b.load_state_dict(a.state_dict())
    assert "'l' has no saved state" in caplog.text
    assert b["g"].state_dict() == a["g"].state_dict()
    with pytest.raises(StabwatchError, match="expected \\{'version'"):
        b.load_state_dict({"rules": [1, 2]})


def test_engine_validates_rules():
    with pytest.raises(StabwatchError, match="two alert rules are named 'x'"):
        AlertEngine([ThresholdRule("loss", above=1, name="x"), ThresholdRule("grad_norm", above=1, name="x")])
    with pytest.raises(StabwatchError, match=r"expected a stabwatch\.alerts Rule"):
        AlertEngine([object()])  # type: ignore[list-item]
    with pytest.raises(StabwatchError, match="on_alert\\[0\\]: expected a callable"):
        AlertEngine([], callbacks=[3])  # type: ignore[list-item]


def test_a_broken_rule_is_logged_once_and_the_others_go_on(caplog):
    class Broken(Rule):
        def _check(self, state, step, value, active):
            raise RuntimeError("boom")

    engine = AlertEngine([Broken("loss", name="broken"), ThresholdRule("loss", above=1.0, name="ok")])
    with caplog.at_level(logging.WARNING, logger="stabwatch.alerts"):
        fired = engine.run([StabilityMetrics(step=s, loss=2.0) for s in range(3)])
    assert [a.rule for a in fired] == ["ok"]
    assert caplog.text.count("alert rule 'broken' failed at step 0 (RuntimeError: boom)") == 1


def test_alerts_are_logged_by_severity(caplog):
    engine = AlertEngine([ThresholdRule("loss", above=1.0, severity="critical", suggestion="calm down")])
    with caplog.at_level(logging.INFO, logger="stabwatch.alerts"):
        engine.run([StabilityMetrics(step=0, loss=2.0), StabilityMetrics(step=1, loss=0.5)])
    levels = [(r.levelno, r.getMessage().splitlines()[0]) for r in caplog.records]
    assert levels[0][0] == logging.ERROR and "[critical] step 0 threshold:loss: loss 2 > 1" in levels[0][1]
    assert "try: calm down" in caplog.records[0].getMessage()
    assert levels[1][0] == logging.INFO and "recovered" in levels[1][1]


# --- Monitor wiring ----------------------------------------------------------------------------------
class RecordingSink:
    def __init__(self):
        self.seen: list[tuple[int, list[str]]] = []

    def write(self, record):
        self.seen.append((record.step, [a.rule for a in record.alerts]))

    def flush(self):
        pass

    def close(self):
        pass


def _train(model, opt, mon, steps, blow_at=None, x=None, y=None):
    x, y = (x, y) if x is not None else data(64)
    for i in range(steps):
        opt.zero_grad()
        out = model(x[i % 4 * 16 : i % 4 * 16 + 16])
        loss = nn.functional.cross_entropy(out, y[i % 4 * 16 : i % 4 * 16 + 16])
        if blow_at is not None and mon.current_step == blow_at:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        mon.step(loss=loss)


def test_alerts_reach_record_monitor_callbacks_and_sinks_before_write():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sink, got = RecordingSink(), []
    with sw.Monitor(model, opt, sinks=[sink], on_alert=got.append, preset="cheap") as mon:
        _train(model, opt, mon, 12, blow_at=8)
    assert [s for s, rules in sink.seen if "non_finite" in rules] == [8]
    assert [a.rule for a in got] == ["non_finite"] and got[0].step == 8
    assert list(mon.alerts) == got and mon.records[8].alerts == got


def test_raise_on_critical_stops_training_after_the_sinks(caplog):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = RecordingSink()
    with (
        pytest.raises(sw.InstabilityError) as info,
        sw.Monitor(model, opt, sinks=[sink], raise_on="critical", preset="cheap") as mon,
    ):
        _train(model, opt, mon, 12, blow_at=5)
    err = info.value
    assert isinstance(err, sw.StabwatchError) and err.step == 5
    assert [a.rule for a in err.alerts] == ["non_finite"]
    assert "training stopped at step 5" in str(err) and "try:" in str(err)
    assert sink.seen[-1] == (5, ["non_finite"])  # the sink got the record first


def test_raise_on_validation_and_warning_level():
    with pytest.raises(StabwatchError, match="raise_on: expected None, True, 'warning' or 'critical'"):
        sw.Monitor(mlp(), raise_on="info")
    engine = AlertEngine([ThresholdRule("loss", above=5.0, name="big_loss")])
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = data(64)
    with (
        pytest.raises(sw.InstabilityError, match="big_loss"),
        sw.Monitor(model, opt, alerts=engine, raise_on="warning", preset="cheap") as mon,
    ):
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) * 10
            loss.backward()
            opt.step()
            mon.step(loss=loss)


def test_a_failing_callback_is_logged_once_and_a_stopping_one_stops(caplog):
    calls = []

    def bad(alert):
        calls.append(alert)
        raise ValueError("callback bug")

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = AlertEngine([ThresholdRule("loss", above=0.0, name="any_loss", cooldown=0, clear_after=1)])
    with (
        caplog.at_level(logging.WARNING, logger="stabwatch.alerts"),
        sw.Monitor(model, opt, alerts=engine, on_alert=bad, preset="cheap") as mon,
    ):
        _train(model, opt, mon, 3)
    assert len(calls) == 1 and caplog.text.count("callback bug") == 1

    def stop(alert):
        raise sw.InstabilityError(f"stop: {alert.rule}", alerts=[alert], step=alert.step)

    sink = RecordingSink()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with (
        pytest.raises(sw.InstabilityError, match="stop: non_finite"),
        sw.Monitor(model, opt, sinks=[sink], on_alert=stop, preset="cheap") as mon,
    ):
        _train(model, opt, mon, 10, blow_at=4)
    assert sink.seen[-1] == (4, ["non_finite"])


def test_monitor_resume_keeps_the_alert_windows():
    """Straight run vs a run checkpointed at step 30 and resumed in a new Monitor: the same alerts."""

    def make():
        model = mlp(3)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loop(model, opt, mon, start, stop):
        x, y = data(64, seed=3)
        for i in range(start, stop):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i % 4 * 16 : i % 4 * 16 + 16]), y[i % 4 * 16 : i % 4 * 16 + 16])
            (loss * (200.0 if i == 35 else 1.0)).backward()  # a gradient spike at step 35
            opt.step()
            mon.step(loss=loss)

    model, opt = make()
    with sw.Monitor(model, opt, preset="cheap") as mon:
        loop(model, opt, mon, 0, 60)
    expected = [str(a) for a in mon.alerts]
    assert any("grad_explode" in a for a in expected)

    model, opt = make()
    with sw.Monitor(model, opt, preset="cheap") as mon:
        loop(model, opt, mon, 0, 30)
        ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "mon": mon.state_dict()})
    first = [str(a) for a in mon.alerts]
    model, opt = make()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    with sw.Monitor(model, opt, preset="cheap") as mon:
        mon.load_state_dict(ckpt["mon"])
        loop(model, opt, mon, 30, 60)
    assert first + [str(a) for a in mon.alerts] == expected
    # without the state the resumed engine has no window at step 35 (min_history not reached): no alert
    model, opt = make()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    with sw.Monitor(model, opt, preset="cheap") as mon:
        mon.load_state_dict({**ckpt["mon"], "alerts": None})  # the step and collectors, not the alert windows
        loop(model, opt, mon, 30, 60)
    assert not any("grad_explode" in str(a) for a in mon.alerts)


def test_docs_table_lists_every_default_rule():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "alerts.md").read_text(encoding="utf-8")
    for rule in default_rules():
        assert f"`{rule.name}`" in doc, f"docs/alerts.md lacks {rule.name}"
