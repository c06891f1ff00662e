"""The default rules on real training: faults are caught within 5 steps, healthy runs stay quiet.

An MLP on scikit-learn's digits and a tanh RNN on generated sine sequences (see `scenarios.py`).
Detection delays and false-alarm rates over more seeds are printed by `benchmarks/bench_alerts.py`.
"""

from __future__ import annotations

import pytest
import torch

import stabwatch as sw
from tests.alerts.scenarios import EXPECTED, run

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is faster and immune to a busy CI box
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("model", ["mlp", "rnn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_runs_raise_no_warning_or_critical_alert(model, seed):
    result = run(model, seed, steps=1000)
    assert len(result.records) == 1000
    assert result.serious() == [], "\n".join(str(a) for a in result.serious())


# The update family runs every step here: a learning-rate change shows first (and, for the MLP
# near convergence, only, for ~15 steps) in the update-to-weight ratio. With the default preset's
# period of 10 it is caught at the next scheduled step (see the benchmark for those delays).
@pytest.mark.parametrize("model", ["mlp", "rnn"])
@pytest.mark.parametrize("fault", ["lr", "scale", "nan"])
@pytest.mark.parametrize(("seed", "at"), [(0, 311), (1, 707)])
def test_faults_are_detected_within_5_steps(model, fault, seed, at):
    result = run(model, seed, steps=1000, fault=fault, at=at, every={"update": 1})
    assert result.early() == [], "\n".join(str(a) for a in result.early())
    delay = result.detection_delay()
    hits = [str(a) for a in result.alerts if a.step >= at][:5]
    assert delay is not None and delay <= 5, f"{fault}@{at}: delay {delay}; alerts: {hits}"
    first = next(a for a in result.alerts if a.step >= at and a.reason in EXPECTED[fault])
    assert first.message and first.suggestion
    if fault == "nan":  # the layer where the NaN entered: the first module, fed the corrupted input
        assert first.layer == ("0" if model == "mlp" else "rnn")


def test_default_preset_catches_nan_and_rnn_faults_at_once():
    for model, fault in [("mlp", "nan"), ("rnn", "lr"), ("rnn", "scale"), ("rnn", "nan")]:
        result = run(model, 2, steps=1000, fault=fault, at=503)
        assert result.early() == []
        assert result.detection_delay() is not None and result.detection_delay() <= 5, (model, fault)


def _shadow_run(model: str, seed: int, steps: int, lr_factor: float):
    import stabwatch as sw
    from tests.alerts.scenarios import _loss, make

    net, opt, batch = make(model, seed)
    for group in opt.param_groups:
        group["lr"] *= lr_factor
    shadow = sw.Shadow(lambda m, b: _loss(model, m(b[0]), b[1]), every=100)
    with sw.Monitor(net, opt, shadow=shadow, preset="cheap") as mon:
        for step in range(steps):
            x, y = batch(step)
            opt.zero_grad()
            loss = _loss(model, net(x), y)
            loss.backward()
            opt.step()
            mon.step(loss=loss, batch=(x, y))
    return list(mon.alerts)


def test_chaotic_training_is_flagged_by_the_shadow_and_healthy_training_is_not():
    healthy = _shadow_run("mlp", 0, 500, 1.0)
    assert [str(a) for a in healthy if a.severity is not sw.Severity.INFO] == []
    unstable = _shadow_run("mlp", 0, 40, 20.0)
    chaotic = [a for a in unstable if a.rule == "chaotic"]
    assert chaotic and chaotic[0].reason is sw.AlertReason.CHAOTIC_TRAINING and chaotic[0].step <= 12
