"""examples/snn_failures.py and benchmarks/bench_snn_diagnosis.py at a tiny size: the independent
measurements, the monitors leaving training unchanged, and the judging of what stabwatch said."""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

from stabwatch.diagnosis import Cause, Diagnosis
from stabwatch.metrics import Alert, AlertReason, Severity

pytest.importorskip("snntorch", reason="snntorch is a test dependency (pip install -e '.[dev]')")
pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the benchmark imports the example by this name
    spec.loader.exec_module(module)
    return module


ex = _load("snn_failures", ROOT / "examples" / "snn_failures.py")


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name in ("healthy", "dead"):
        for run in ex.train(ex.SCENARIOS[name], steps=STEPS, configs=("default", "spiking@1")):
            out[name, run.config] = run
    (out["healthy", None],) = ex.train(ex.SCENARIOS["healthy"], steps=STEPS, configs=())
    (out["dead", "alone"],) = ex.train(ex.SCENARIOS["dead"], steps=STEPS, configs=("spiking@1",))
    return out


@pytest.mark.slow
def test_monitors_do_not_change_training(runs):
    bare, watched = runs["healthy", None], runs["healthy", "default"]
    assert bare.trace == watched.trace  # every loss, rate, gradient and update ratio, bit for bit
    assert bare.accuracy == watched.accuracy


@pytest.mark.slow
def test_two_monitors_on_one_run_alert_as_one_alone(runs):
    together, alone = runs["dead", "spiking@1"], runs["dead", "alone"]
    assert [str(a) for a in together.alerts] == [str(a) for a in alone.alerts]
    assert together.trace == alone.trace


@pytest.mark.slow
def test_independent_measurements(runs):
    healthy, dead = runs["healthy", "spiking@1"], runs["dead", "spiking@1"]
    assert dead.trace[0]["dead/hidden"] == 1.0 and dead.trace[0]["rate/hidden"] == 0.0
    assert 0.02 < healthy.trace[0]["rate/hidden"] < 0.5 and healthy.trace[0]["dead/hidden"] < 0.5
    # threshold 10 for the dead layer: the membrane is far below it; healthy: below threshold 1 on average
    assert dead.trace[0]["threshold_distance/hidden"] > 5 > healthy.trace[0]["threshold_distance/hidden"] > 0
    # stabwatch's spiking statistics, computed by its own hooks, agree with the example's counts
    for step in (0, STEPS - 1):
        layer = healthy.records[step].layers["lif1"]
        assert layer["firing_rate_mean"] == pytest.approx(healthy.trace[step]["rate/hidden"], rel=1e-5)
        assert layer["dead_neuron_frac"] == pytest.approx(healthy.trace[step]["dead/hidden"], abs=1e-6)
    assert ex.visible_at(dead) == (0, "hidden > 50% dead (rate < 0.01)")
    assert ex.visible_at(healthy)[0] is None


def _alert(step: int, rule: str, reason: AlertReason, severity: Severity = Severity.WARNING) -> Alert:
    return Alert(rule=rule, reason=reason, severity=severity, step=step, metric="m", message="scripted")


def _scripted(name: str, alerts: list[Alert], cause: Cause | None):
    """A run of ``name`` over 80 steps whose hidden rate is 0.1 until step 60 and 0.02 after."""
    trace = [{"rate/hidden": 0.1 if i < 60 else 0.02} for i in range(80)]
    diag = Diagnosis(0, 79, 80, [], [], [cause] if cause else [], None, None, {})
    return ex.Run(ex.SCENARIOS[name], "default", trace, 0.5, 1.0, alerts, [], diag)


def test_judge():
    dead = AlertReason.DEAD_NEURONS
    spiking = Cause("dead_units", "dead or silent units", 3, [], ["lower the threshold"])
    relu = Cause("dead_units", "dead or silent units", 3, [], ["LeakyReLU/GELU, He init"])
    step = Cause("step_size", "the learning rate is too high", 3, [], ["lower the learning rate"])

    v = ex.judge(_scripted("slow-death", [_alert(65, "spiking_dead", dead)], spiking))
    assert (v.visible, v.delay, v.met) == (60, 5, True)
    late = ex.judge(_scripted("slow-death", [_alert(71, "spiking_dead", dead)], spiking))
    assert not late.met and "11 steps late" in late.why
    early = ex.judge(_scripted("slow-death", [_alert(40, "spiking_dead", dead)], spiking))
    assert not early.met and early.false_flags == 1 and early.flag is None
    assert early.why == "1 warning(s) before the onset (50); not flagged"
    info_only = ex.judge(_scripted("slow-death", [_alert(61, "x", dead, Severity.INFO)], spiking))
    assert not info_only.met and info_only.why == "not flagged"
    wrong = ex.judge(_scripted("slow-death", [_alert(61, "spiking_dead", dead)], step))
    assert not wrong.met and not wrong.cause_ok and "cause step_size" in wrong.why
    advice = ex.judge(_scripted("slow-death", [_alert(61, "spiking_dead", dead)], relu))
    assert not advice.met and advice.cause_ok and not advice.advice_ok and "ReLU" in advice.why

    healthy = _scripted("healthy", [], None)
    assert ex.judge(healthy).met
    healthy.alerts = [_alert(5, "spiking_dead", dead)]
    assert not ex.judge(healthy).met


@pytest.mark.slow
def test_example_and_benchmark_print_what_stabwatch_says(tmp_path, capsys):
    (run,) = ex.main(["--scenarios", "dead", "--steps", "10", "--spiking-every", "1"])
    out = capsys.readouterr().out
    assert "== dead: hidden threshold 10x" in out and "visible at step 0" in out
    assert run.first_alert is not None and f"first alert: {run.first_alert}" in out
    assert run.diagnosis is not None and f"cause [{run.diagnosis.causes[0].key}]" in out
    with pytest.raises(SystemExit):
        ex.main(["--scenarios", "nope"])

    bench = _load("bench_snn_diagnosis", ROOT / "benchmarks" / "bench_snn_diagnosis.py")
    md = tmp_path / "results.md"
    # the benchmark sets up its process (torch threads, stabwatch's log level, warning filters): put them back
    logger, threads = logging.getLogger("stabwatch"), torch.get_num_threads()
    level = logger.level
    try:
        with warnings.catch_warnings():
            runs = bench.main(["--scenarios", "dead", "--steps", "10", "--configs", "spiking@1", "--out", str(md)])
    finally:
        logger.setLevel(level)
        torch.set_num_threads(threads)
    assert [(r.scenario.name, r.config) for r in runs] == [("dead", "spiking@1")]
    text = md.read_text()
    assert "| dead | spiking@1 | hidden layer silent for 10 steps, 100% dead at the end | 0 |" in text
    assert "targets met: spiking@1" in text and "What stabwatch said (spiking@1):" in text
