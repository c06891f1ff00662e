"""examples/snn_training.py runs, and in its badly initialised run the dead-neuron alert names lif1."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from stabwatch.metrics import AlertReason
from stabwatch.sinks import read_jsonl

pytest.importorskip("snntorch", reason="snntorch is a test dependency (pip install -e '.[dev]')")
pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "snn_training.py"


@pytest.mark.slow
def test_snn_example_healthy_and_silent_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("snn_training", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--steps", "40", "--out", str(tmp_path)])
    healthy, silent = results["healthy"], results["silent"]

    dead = {AlertReason.DEAD_NEURONS, AlertReason.SILENT_LAYER}
    assert not [a for a in healthy["monitor"].alerts if a.reason in dead]
    fired = [a for a in silent["monitor"].alerts if a.reason == AlertReason.DEAD_NEURONS]
    assert "lif1" in {a.layer for a in fired}
    assert healthy["accuracy"] > 0.5 > silent["accuracy"]

    text = silent["monitor"].diagnose()
    assert "spiking_dead [lif1]" in text and "lower the firing threshold" in text
    out = capsys.readouterr().out
    assert "== silent SNN" in out and "spiking_dead [lif1]" in out

    records = list(read_jsonl(silent["path"]))
    assert len(records) == 40
    assert records[20].layers["lif1"]["dead_neuron_frac"] == 1.0  # the spiking family ran at step 20
    assert records[21].firing_rate_mean is None  # and not at step 21 (default period 10)
