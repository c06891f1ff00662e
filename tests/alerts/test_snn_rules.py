"""The rules for spiking networks (issue #20): suppression of the gradient rules while silent neurons revive,
the per-layer ratio binding, falls from a level, the step-size signals that need no history; then real
snntorch runs: a healthy run measured every step stays quiet, a dead start, a saturated start and a far too
large learning rate are flagged within a few steps with the right first cause and spiking advice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.alerts import AlertEngine, RatioRule, SustainedRule, default_rules
from stabwatch.alerts.base import Binding, RecordView
from stabwatch.diagnosis import analyse
from stabwatch.errors import ConfigError
from stabwatch.metrics import AlertReason, Severity, StabilityMetrics

NON_SPIKING_ADVICE = ("ReLU", "He ", "He/", "Xavier", "BatchNorm")


# --- scripted ---------------------------------------------------------------------------------------------------


def test_layers_ratio_binding_divides_two_fields_of_each_layer():
    r = StabilityMetrics(
        step=0,
        layers={
            "fc1": {"grad_norm": 2e-6, "weight_norm": 4.0},
            "fc2": {"grad_norm": 1.0},  # no weight norm at this step: left out
            "fc3": {"grad_norm": 1.0, "weight_norm": 0.0},  # no ratio to a zero norm
        },
    )
    b = Binding("layers_ratio:grad_norm/weight_norm")
    assert b.values(RecordView(r)) == [("fc1", 5e-7)] and b.label == "grad_norm/weight_norm" and b.per_layer
    for bad in ("layers_ratio:grad_norm", "layers_ratio:grad_norm/nope"):
        with pytest.raises(ConfigError, match="layers_ratio"):
            Binding(bad)


def test_a_fall_is_judged_only_from_a_level_above_the_floor():
    def fired(level: float) -> list[int]:
        rule = RatioRule("firing_rate_mean", factor=2, direction="down", window=20, min_history=10, floor=0.01)
        values = [level] * 15 + [0.4 * level] * 3
        return [s for s, v in enumerate(values) if (a := rule.update(s, v)) and a.reason is not AlertReason.RECOVERED]

    assert fired(0.1) == [15]  # 0.1 -> 0.04: 2.5x below its median
    assert fired(0.005) == []  # 0.005 -> 0.002: the same ratio, from below the floor


def _revival_records(n: int, silent_until: int, jump_at: int) -> list[StabilityMetrics]:
    rng = np.random.default_rng(0)
    out = []
    for s in range(n):
        g = 1e-3 * math.exp(0.1 * rng.standard_normal()) * (1000.0 if s >= jump_at else 1.0)
        rate = 0.0 if s < silent_until else 0.05
        out.append(StabilityMetrics(step=s, grad_norm=g, layers={"lif1": {"firing_rate_mean": rate}}))
    return out


def _engine() -> AlertEngine:
    return AlertEngine(
        [
            RatioRule("grad_norm", factor=10, window=20, min_history=5, name="jump", suppressed_by=("quiet",)),
            SustainedRule("layers:firing_rate_mean", below=1e-4, patience=2, name="quiet"),
        ],
        log_alerts=False,
    )


def _jumps(records: list[StabilityMetrics]) -> list[int]:
    return [a.step for a in _engine().run(records) if a.rule == "jump" and a.reason is not AlertReason.RECOVERED]


def test_a_rise_as_a_silent_layer_revives_is_not_an_explosion():
    # the jump comes at the very record the layer fires again: suppressed (the watched rule runs first)
    alerts = _engine().run(_revival_records(80, silent_until=40, jump_at=40))
    assert [(a.rule, a.reason.value, a.step) for a in alerts] == [("quiet", "threshold", 1), ("quiet", "recovered", 40)]
    # the same jump while the layer stays silent is an explosion, and so is one 100+ steps after the revival
    assert _jumps(_revival_records(80, silent_until=80, jump_at=40))[:1] == [40]
    assert _jumps(_revival_records(200, silent_until=40, jump_at=160))[:1] == [160]


def test_a_suppressed_value_becomes_the_baseline_and_the_state_round_trips():
    recs = _revival_records(120, silent_until=40, jump_at=40)
    recs += [
        StabilityMetrics(step=s, grad_norm=30.0, layers={"lif1": {"firing_rate_mean": 0.05}}) for s in range(145, 150)
    ]
    straight = _engine()
    expected = straight.run(recs)
    # the revived level (~1) joined the window: 30 is ~30x the new median, not ~30000x the silent one
    (late,) = [a for a in expected if a.rule == "jump" and a.reason is not AlertReason.RECOVERED]
    assert late.step == 145
    ratio = float(late.message.split(" is ")[1].split("×")[0])
    assert 20 < ratio < 40, late.message
    first = _engine()
    got = first.run(recs[:60])
    state = json.loads(json.dumps(first.state_dict()))
    assert state["recent"] == {"quiet": 40}
    resumed = _engine()
    resumed.load_state_dict(state)
    assert got + resumed.run(recs[60:]) == expected


def test_an_update_larger_than_the_weights_is_critical_at_once():
    rule = next(r for r in default_rules() if r.name == "update_too_large")
    assert rule.update(0, 1.0) is None  # a zero-initialised layer's first update is exactly 1
    alert = rule.update(1, 6.7)
    assert alert is not None and alert.severity is Severity.CRITICAL and alert.step == 1


def test_loss_jump_ignores_a_noisy_spike_count_loss_and_catches_a_jump():
    rng = np.random.default_rng(3)
    rule = next(r for r in default_rules() if r.name == "loss_jump")
    # a cross-entropy of spike counts near convergence: heavy-tailed, 0.005-0.3 around a median of 0.03
    noisy = [0.03 * math.exp(0.8 * rng.standard_normal()) for _ in range(500)]
    assert [s for s, v in enumerate(noisy) if rule.update(s, v)] == []
    alert = rule.update(500, 14.5)  # the learning rate 100x: the loss of a broken network
    assert alert is not None and alert.reason is AlertReason.LOSS_SPIKE and "× its 50-step median" in alert.message


# --- real snntorch runs -----------------------------------------------------------------------------------------

snn = pytest.importorskip("snntorch")


class _SNN(nn.Module):
    def __init__(self, threshold: float = 1.0, beta: float = 0.9, gain: float = 1.0) -> None:
        super().__init__()
        from snntorch import surrogate

        grad = surrogate.fast_sigmoid(slope=25)
        self.gain = gain
        self.fc1 = nn.Linear(64, 64)
        self.lif1 = snn.Leaky(beta=beta, threshold=threshold, spike_grad=grad)
        self.fc2 = nn.Linear(64, 10)
        self.lif2 = snn.Leaky(beta=0.9, spike_grad=grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m1, m2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = []
        for t in range(x.shape[0]):
            s1, m1 = self.lif1(self.fc1(self.gain * x[t]), m1)
            s2, m2 = self.lif2(self.fc2(s1), m2)
            out.append(s2)
        return torch.stack(out)


def _run(steps: int = 30, lr: float = 2e-3, **model_kw) -> tuple[sw.Monitor, list[sw.Alert]]:
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x, y = torch.tensor(x_np, dtype=torch.float32) / 16.0, torch.tensor(y_np)
    torch.manual_seed(0)
    model = _SNN(**model_kw)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    alerts: list[sw.Alert] = []
    with sw.Monitor(model, opt, every={"spiking": 1}, on_alert=alerts.append) as mon:
        for _ in range(steps):
            idx = torch.randint(0, len(y), (32,), generator=g)
            spikes = (torch.rand(10, 32, 64, generator=g) < x[idx]).float()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(spikes).sum(0), y[idx])
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    return mon, alerts


def _flags(alerts: list[sw.Alert]) -> list[sw.Alert]:
    return [a for a in alerts if a.severity is not Severity.INFO and a.reason is not AlertReason.RECOVERED]


@pytest.mark.slow
def test_real_snn_runs_flagged_early_with_spiking_advice():
    mon, alerts = _run()
    assert _flags(alerts) == [], [str(a) for a in alerts]  # healthy, the spiking family every step

    cases = {  # scenario -> (model options, learning rate, first cause)
        "dead": ({"threshold": 10.0, "gain": 0.25}, 2e-3, "dead_units"),
        "saturated": ({"threshold": 0.01, "beta": 1.0, "gain": 10.0}, 2e-3, "saturation"),
        "lr": ({}, 0.5, "step_size"),
    }
    for name, (kw, lr, key) in cases.items():
        mon, alerts = _run(steps=15, lr=lr, **kw)
        flags = _flags(alerts)
        assert flags and flags[0].step <= 5, (name, [str(a) for a in alerts])
        d = analyse(list(mon.records), list(mon.alerts))
        first = d.causes[0]
        assert first.key == key, (name, d.to_text())
        text = " ".join([first.title, *first.actions])
        assert not [w for w in NON_SPIKING_ADVICE if w in text], (name, text)
        if name == "lr":
            assert flags[0].rule == "update_too_large" and flags[0].step == 0 and "clip" not in text
        else:
            assert "threshold" in text


def test_spiking_dead_needs_the_layer_dead_for_ten_steps():
    def fired(values: list[float], resume: int | None = None) -> list[tuple[int, str]]:
        rule = next(r for r in default_rules() if r.name == "spiking_dead")
        out = []
        for s, v in enumerate(values):
            if s == resume:
                state = json.loads(json.dumps(rule.state_dict()))
                rule = next(r for r in default_rules() if r.name == "spiking_dead")
                rule.load_state_dict(state)
            if (a := rule.update(s, v, "lif2")) is not None:
                out.append((a.step, a.reason.value))
        return out

    readout = [0.6] + [1.0] * 9 + [0.9] + [1.0] * 3 + [0.5] * 20  # silent at steps 1-9 and 11-13, then firing
    assert fired(readout) == []
    dead = [1.0] * 40
    assert fired(dead) == [(10, "dead_neurons")]
    assert fired(dead, resume=7) == [(10, "dead_neurons")]
