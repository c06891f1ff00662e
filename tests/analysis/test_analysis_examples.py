"""The three examples run end to end (short), and write their reports."""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import pytest

from stabwatch.analysis import AnalysisResults

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["basic_usage", "custom_training", "comparing_architectures"])
def test_example_runs_and_writes_a_report(name, tmp_path):
    pytest.importorskip("matplotlib")
    main = runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"]
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = main(["--epochs", "2", "--out", str(out)])
    values = list(results.values()) if isinstance(results, dict) else [results]
    assert len(values) > 0
    for r in values:
        assert isinstance(r, AnalysisResults) and r.n_checkpoints == 3
    assert list(out.rglob("metrics.json"))
    assert list(out.rglob("report.*"))
