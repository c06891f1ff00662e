"""`AnalysisResults`: serialisation round trips, plots, reports, and life without matplotlib."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from stabwatch.analysis import AnalysisResults, StabilityAnalyzer
from stabwatch.errors import StabwatchError
from tests.analysis.analysis_helpers import mlp, mse_step, regression_loader

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def results() -> AnalysisResults:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StabilityAnalyzer(mlp(), n_trajectories=4, track_gradients=True, verbose=False).analyze(
            mse_step(), regression_loader(), 3
        )


def _assert_same(a: AnalysisResults, b: AnalysisResults) -> None:
    for f in fields(AnalysisResults):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f.name)
        elif isinstance(x, float):
            assert (math.isnan(x) and math.isnan(y)) or x == y, f.name
        else:
            assert x == y, f.name


def test_dict_and_json_round_trip_everything(results, tmp_path):
    _assert_same(results, AnalysisResults.from_dict(results.to_dict()))
    path = tmp_path / "metrics.json"
    text = results.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text)
    _assert_same(results, AnalysisResults.from_json(path))


def test_non_finite_values_survive_strict_json():
    r = AnalysisResults(
        convergence_ratio=0.0,
        lyapunov=-math.inf,
        behavior="convergent",
        spread_evolution=np.array([1.0, 0.0]),
        pca_trajectories=np.zeros((2, 2, 1)),
        pca_explained_variance=np.array([1.0]),
        effective_dimensionality=math.nan,
    )
    text = r.to_json()
    assert "-Infinity" in text and "NaN" in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = AnalysisResults.from_dict(json.loads(text))
    assert back.lyapunov == -math.inf and math.isnan(back.effective_dimensionality)
    assert back.local_lyapunov[0] == -math.inf


def test_a_deep_lyapunov_dict_is_accepted_and_can_be_plotted():
    legacy = {  # the keys deep-lyapunov 0.1.2 writes to metrics.json
        "convergence_ratio": 1.23,
        "lyapunov": 0.069,
        "behavior": "divergent",
        "effective_dimensionality": 1.0,
        "n_trajectories": 3,
        "n_checkpoints": 4,
        "n_parameters": 100,
        "spread_evolution": [1.0, 1.1, 1.2, 1.23],
        "pca_explained_variance": [0.9, 0.1],
        "trajectory_metrics": [{"trajectory_id": 0, "final_loss": 0.1, "path_length": 2.0}],
    }
    r = AnalysisResults.from_dict(legacy)
    np.testing.assert_array_equal(r.checkpoint_times, [0, 1, 2, 3])
    np.testing.assert_allclose(r.local_lyapunov, np.diff(np.log(legacy["spread_evolution"])))
    for plot in (r.plot_trajectories, r.plot_convergence, r.plot_lyapunov):
        assert plot() is not None


def test_plots_draw_the_data(results):
    fig = results.plot_trajectories()
    ax = fig.axes[0]
    assert len(ax.lines) == results.n_trajectories
    np.testing.assert_allclose(ax.lines[1].get_xdata(), results.pca_trajectories[:, 1, 0])
    fig = results.plot_convergence()
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), results.spread_evolution)
    assert fig.axes[0].get_yscale() == "log"
    fig = results.plot_lyapunov()
    from matplotlib.container import BarContainer

    bars = next(c for c in fig.axes[0].containers if isinstance(c, BarContainer))
    heights = [p.get_height() for p in bars]
    np.testing.assert_allclose(heights, results.local_lyapunov)


def test_plots_draw_into_given_axes(results):
    from matplotlib.figure import Figure

    fig = Figure()
    axes = fig.subplots(1, 3)
    assert results.plot_trajectories(ax=axes[0]) is fig
    assert results.plot_convergence(ax=axes[1]) is fig
    assert results.plot_lyapunov(ax=axes[2]) is fig


@pytest.mark.parametrize(("fmt", "embed"), [("html", True), ("markdown", True), ("markdown", False), ("html", False)])
def test_save_report(results, tmp_path, fmt, embed):
    out = tmp_path / "report"
    path = results.save_report(out, embed_images=embed, format=fmt)
    assert path == out / ("report.html" if fmt == "html" else "report.md")
    text = path.read_text()
    assert "Convergence ratio" in text and f"{results.convergence_ratio:.4g}" in text
    assert ("data:image/png;base64," in text) == embed
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ([] if embed else ["convergence.png", "lyapunov.png", "trajectories.png"])
    _assert_same(results, AnalysisResults.from_json(out / "metrics.json"))


def test_save_report_rejects_file_paths_and_unknown_formats(results, tmp_path):
    with pytest.raises(ValueError, match="looks like a file"):
        results.save_report(tmp_path / "report.html")
    with pytest.raises(StabwatchError, match="format"):
        results.save_report(tmp_path / "r", format="pdf")


def test_html_report_escapes_diagnostics(results, tmp_path):
    r = AnalysisResults.from_dict({**results.to_dict(), "diagnostics": ["<script>alert(1)</script>"]})
    text = r.save_report(tmp_path / "r").read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text


def test_plotting_without_matplotlib_names_the_extra(results, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install stabwatch\[plot\]") as info:
        results.plot_convergence()
    assert isinstance(info.value, StabwatchError)


def test_importing_the_analysis_does_not_need_matplotlib():
    code = (
        "import sys; sys.modules['matplotlib'] = None; "
        "import stabwatch.analysis as a; import stabwatch; "
        "assert 'matplotlib.pyplot' not in sys.modules; print(sorted(a.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "StabilityAnalyzer" in out.stdout


@pytest.mark.parametrize("n", [2, 3, 5])
def test_to_dict_is_strict_json_for_every_number_of_trajectories(n, one_thread):
    res = StabilityAnalyzer(mlp(), n_trajectories=n, verbose=False).analyze(mse_step(), regression_loader(), 2)
    d = res.to_dict()
    text = json.dumps(d, allow_nan=False)  # raises on NaN / inf
    assert json.loads(text) == d == json.loads(res.to_json())
    if n == 2:  # no pair is left when one of two replicas is deleted: the interval is undefined
        assert d["lyapunov_ci"] == ["NaN", "NaN"] and math.isnan(res.lyapunov_ci[0])
    else:
        assert all(isinstance(v, float) for v in d["lyapunov_ci"])
    _assert_same(AnalysisResults.from_dict(d), res)
