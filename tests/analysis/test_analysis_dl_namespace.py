"""deep-lyapunov's other documented names: ``metrics``, ``visualization``, ``config``, ``__version__``,
``get_logger``. Each number against an independent computation, and against deep-lyapunov 0.1.2 where its
definition is the same (skipped when deep-lyapunov is not installed)."""

from __future__ import annotations

import importlib
import logging
import math

import numpy as np
import pytest

import stabwatch
from stabwatch.analysis import MetricsConfig, StabilityAnalyzer, VisualizationConfig, get_logger
from stabwatch.analysis import metrics as M
from stabwatch.errors import ConfigError
from tests.analysis.analysis_helpers import make_train_fn, mlp, mse_step, regression_loader

DL_METRICS = [
    "compute_lyapunov_exponent",
    "compute_local_lyapunov",
    "compute_convergence_ratio",
    "compute_spread_evolution",
    "project_to_pca",
    "compute_effective_dimensionality",
    "compute_participation_ratio",
]
DL_PLOTS = [
    "plot_trajectories_2d",
    "plot_trajectories_3d",
    "plot_spread_evolution",
    "plot_lyapunov_evolution",
    "plot_convergence_basin",
    "create_analysis_dashboard",
]


def _traj(seed: int = 0, t: int = 6, n: int = 4, p: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.cumsum(rng.normal(size=(t, 1, p)), axis=0)
    growth = np.exp(0.3 * np.arange(t))[:, None, None]
    return base + growth * rng.normal(scale=0.1, size=(1, n, p))


def _pairwise_sq(traj: np.ndarray) -> np.ndarray:
    t, n, _ = traj.shape
    return np.array(
        [[np.sum((traj[k, i] - traj[k, j]) ** 2) for i in range(n) for j in range(i + 1, n)] for k in range(t)]
    )


def test_every_documented_name_is_importable_from_the_stabwatch_namespace():
    for name in DL_METRICS:
        assert callable(getattr(importlib.import_module("stabwatch.analysis.metrics"), name)), name
    for name in DL_PLOTS:
        assert callable(getattr(importlib.import_module("stabwatch.analysis.visualization"), name)), name
    cfg = importlib.import_module("stabwatch.analysis.config")
    assert {"AnalyzerConfig", "MetricsConfig", "VisualizationConfig"} <= set(cfg.__all__)
    from stabwatch.analysis import __version__

    assert __version__ == stabwatch.__version__
    assert set(M.__all__) == set(DL_METRICS)


def test_documented_names_match_deep_lyapunov_signatures():
    dl = pytest.importorskip("deep_lyapunov")
    import inspect

    import deep_lyapunov.metrics as dm
    import deep_lyapunov.visualization as dv

    from stabwatch.analysis import visualization as V

    for mod_theirs, mod_ours, names in ((dm, M, DL_METRICS), (dv, V, DL_PLOTS)):
        for name in names:
            theirs = list(inspect.signature(getattr(mod_theirs, name)).parameters)
            ours = list(inspect.signature(getattr(mod_ours, name)).parameters)
            assert ours[: len(theirs)] == theirs, name  # same positional names, extras keyword-only after
    for cls in ("MetricsConfig", "VisualizationConfig"):
        theirs = set(getattr(dl.config, cls).__dataclass_fields__)
        ours = set(getattr(stabwatch.analysis.config, cls).__dataclass_fields__)
        assert ours == theirs, cls


def test_tracking_names_and_signatures_are_deep_lyapunovs():
    import inspect

    import stabwatch.analysis as ours_pkg
    from stabwatch.analysis import tracking as ours

    assert ours_pkg.tracking is ours  # ``deep_lyapunov.tracking`` with the import changed
    assert set(ours.__all__) == {"TrajectoryTracker", "apply_perturbation", "create_perturbed_copies"}
    pytest.importorskip("deep_lyapunov")
    import deep_lyapunov.tracking as theirs

    assert set(theirs.__all__) == set(ours.__all__)
    for name in ("apply_perturbation", "create_perturbed_copies", "TrajectoryTracker"):
        mine, their = inspect.signature(getattr(ours, name)), inspect.signature(getattr(theirs, name))
        assert [(p.name, p.default) for p in mine.parameters.values()] == [
            (p.name, p.default) for p in their.parameters.values()
        ], name
    public = {n for n in dir(theirs.TrajectoryTracker) if not n.startswith("_")}
    assert public <= {n for n in dir(ours.TrajectoryTracker) if not n.startswith("_")}


def test_spread_ratio_and_exponent_against_direct_pairwise_distances():
    traj = _traj()
    d2 = _pairwise_sq(traj)
    want = np.sqrt(d2.mean(axis=1))
    np.testing.assert_allclose(M.compute_spread_evolution(traj), want, rtol=1e-12)
    assert M.compute_convergence_ratio(traj) == pytest.approx(want[-1] / want[0], rel=1e-12)
    robust = M.compute_spread_evolution(traj, config=MetricsConfig(use_robust_estimators=True))
    np.testing.assert_allclose(robust, np.sqrt(np.median(d2, axis=1)), rtol=1e-12)
    assert not np.allclose(robust, want)
    lam = M.compute_lyapunov_exponent(want, n_epochs=5)
    assert lam == pytest.approx(math.log(want[-1] / want[0]) / 5, rel=1e-12)
    assert M.compute_lyapunov_exponent(want, 0, times=np.arange(6) * 2.0) == pytest.approx(lam / 2, rel=1e-12)
    assert M.compute_lyapunov_exponent(np.array([1.0, 0.0]), 1) == -math.inf
    assert math.isnan(M.compute_lyapunov_exponent(np.array([1.0]), 1))


def test_local_exponents_with_a_window():
    s = np.exp(np.array([0.0, 0.5, 0.7, 1.6, 1.6]))
    np.testing.assert_allclose(M.compute_local_lyapunov(s), [0.5, 0.2, 0.9, 0.0], atol=1e-12)
    np.testing.assert_allclose(M.compute_local_lyapunov(s, window=2), [0.35, 0.55, 0.45], atol=1e-12)
    np.testing.assert_allclose(M.compute_local_lyapunov(s, config=MetricsConfig(lyapunov_window=4)), [0.4], atol=1e-12)
    t = np.array([0.0, 2.0, 4.0, 6.0, 8.0])
    np.testing.assert_allclose(M.compute_local_lyapunov(s, t), [0.25, 0.1, 0.45, 0.0], atol=1e-12)


def test_pca_and_participation_ratio_against_numpy_svd():
    traj = _traj(p=12)
    pts = traj.reshape(-1, 12)
    centred = pts - pts.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False)
    lam = sv**2
    assert M.compute_participation_ratio(pts) == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-10)
    proj, ratio = M.project_to_pca(traj, n_components=3)
    assert proj.shape == (6, 4, 3)
    np.testing.assert_allclose(ratio, lam[:3] / lam.sum(), rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(proj.reshape(-1, 3), axis=0), sv[:3], rtol=1e-10)
    eff = M.compute_effective_dimensionality(traj)
    assert eff.shape == (1,) and eff[0] == pytest.approx(M.compute_participation_ratio(pts))
    windows = M.compute_effective_dimensionality(traj, window_size=4)
    assert windows.shape == (2,)  # windows start at checkpoints 0 and 2
    assert windows[1] == pytest.approx(M.compute_participation_ratio(traj[2:6].reshape(-1, 12)))


def test_metrics_agree_with_deep_lyapunov_where_the_definitions_do():
    pytest.importorskip("deep_lyapunov")
    import deep_lyapunov.metrics as dm

    traj = _traj(p=12)
    pts = traj.reshape(-1, 12)
    assert M.compute_participation_ratio(pts) == pytest.approx(dm.compute_participation_ratio(pts), rel=1e-9)
    ours, our_ratio = M.project_to_pca(traj, 3)
    theirs, their_ratio = dm.project_to_pca(traj, 3)
    np.testing.assert_allclose(our_ratio, their_ratio, rtol=1e-8)
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), rtol=1e-6, atol=1e-9)  # signs may differ
    s = M.compute_spread_evolution(traj)
    np.testing.assert_allclose(M.compute_local_lyapunov(s), dm.compute_local_lyapunov(s), rtol=1e-12)
    assert M.compute_lyapunov_exponent(s, 5) == pytest.approx(dm.compute_lyapunov_exponent(s, 5), rel=1e-12)
    # whole-cloud effective dimensionality = deep-lyapunov's when its window covers the run
    assert M.compute_effective_dimensionality(traj)[0] == pytest.approx(
        dm.compute_effective_dimensionality(traj, window_size=6)[0], rel=1e-9
    )


def test_metrics_config_takes_effect_in_the_analyzer(one_thread):
    loader = regression_loader()
    base = StabilityAnalyzer(mlp(), n_trajectories=4, verbose=False).analyze(mse_step(), loader, 2)
    threshold = base.convergence_ratio * 1.01  # just above the measured ratio: now "convergent"
    cfg = MetricsConfig(convergence_threshold=threshold, min_trajectory_length=5, use_robust_estimators=True)
    with pytest.warns(Warning, match="min_trajectory_length=5"):
        res = StabilityAnalyzer(mlp(), n_trajectories=4, verbose=False, metrics_config=cfg).analyze(
            mse_step(), loader, 2
        )
    iu, ju = np.triu_indices(4, 1)
    d2 = res.pairwise_distances[:, iu, ju] ** 2
    np.testing.assert_allclose(res.spread_evolution, np.sqrt(np.median(d2, axis=1)), rtol=1e-10)
    assert res.lyapunov == pytest.approx(math.log(res.convergence_ratio) / 2, rel=1e-10)
    assert base.behavior == "divergent" or base.convergence_ratio < 1.0
    assert (
        StabilityAnalyzer(
            mlp(), n_trajectories=4, verbose=False, metrics_config=MetricsConfig(convergence_threshold=threshold)
        )
        .analyze(mse_step(), loader, 2)
        .behavior
        == "convergent"
    )
    assert any("min_trajectory_length" in d for d in res.diagnostics)
    assert not any("min_trajectory_length" in d for d in base.diagnostics)


@pytest.mark.parametrize(
    "kwargs",
    [{"convergence_threshold": 0}, {"lyapunov_window": 0}, {"use_robust_estimators": 1}],
)
def test_bad_metrics_config(kwargs):
    with pytest.raises(ConfigError):
        MetricsConfig(**kwargs)
    with pytest.raises(ConfigError):
        StabilityAnalyzer(mlp(), metrics_config=object())  # type: ignore[arg-type]


def test_visualization_functions_draw_and_config_takes_effect(tmp_path, one_thread):
    pytest.importorskip("matplotlib")
    import matplotlib

    from stabwatch.analysis import visualization as V

    res = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(make_train_fn(), regression_loader(), 3)
    cfg = VisualizationConfig(colormap="plasma", show_confidence_bands=False, figure_dpi=40, figure_format="svg")
    fig = V.plot_trajectories_2d(res.pca_trajectories, res.pca_explained_variance, config=cfg)
    first = fig.axes[0].get_lines()[0].get_color()
    np.testing.assert_allclose(matplotlib.colors.to_rgba(first), matplotlib.colormaps["plasma"](0.0))
    V.plot_trajectories_3d(res.pca_trajectories, res.pca_explained_variance)
    V.plot_convergence_basin(res.pca_trajectories, res.pca_explained_variance)
    fig = V.plot_spread_evolution(res.spread_evolution, behavior=res.behavior, convergence_ratio=res.convergence_ratio)
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), res.spread_evolution)
    with_band = V.plot_lyapunov_evolution(res.spread_evolution, res.lyapunov, ci=res.lyapunov_ci)
    no_band = V.plot_lyapunov_evolution(res.spread_evolution, res.lyapunov, ci=res.lyapunov_ci, config=cfg)
    assert len(with_band.axes[0].patches) == len(no_band.axes[0].patches) + 1  # the band is one patch
    heights = [p.get_height() for p in no_band.axes[0].patches]
    np.testing.assert_allclose(heights, res.local_lyapunov, rtol=1e-10)
    V.create_analysis_dashboard(
        res.pca_trajectories,
        res.pca_explained_variance,
        res.spread_evolution,
        res.lyapunov,
        res.convergence_ratio,
        res.behavior,
        save_path=tmp_path / "dash",
        config=cfg,
    )
    assert (tmp_path / "dash.svg").read_text().startswith("<?xml")


def test_get_logger_is_the_logger_the_analysis_writes_to(caplog, one_thread):
    log = get_logger()
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep(level=logging.INFO)
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(mse_step(), regression_loader(), 1)
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    assert any("stability: ratio=" in r.getMessage() for r in seen)


def _jackknife_local(d2: np.ndarray, times: np.ndarray, n: int, w: int) -> np.ndarray:
    """Delete-one-replica jackknife of the windowed local exponents, by loops (independent of stabwatch)."""
    from scipy import stats

    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]

    def local(cols: list[int]) -> np.ndarray:
        s = np.sqrt(d2[:, cols].mean(axis=1))
        return np.array([(math.log(s[k + w]) - math.log(s[k])) / (times[k + w] - times[k]) for k in range(len(s) - w)])

    full = local(list(range(len(pairs))))
    deleted = np.stack([local([m for m, p in enumerate(pairs) if u not in p]) for u in range(n)])
    se = np.sqrt((n - 1) / n * np.sum((deleted - deleted.mean(axis=0)) ** 2, axis=0))
    q = stats.t.ppf(0.975, n - 1)
    return np.stack([full - q * se, full + q * se], axis=1)


def test_lyapunov_window_changes_the_results_local_exponents(tmp_path, one_thread):
    loader = regression_loader()
    n, epochs, w = 4, 5, 2
    one = StabilityAnalyzer(mlp(), n_trajectories=n, verbose=False).analyze(mse_step(), loader, epochs)
    res = StabilityAnalyzer(
        mlp(), n_trajectories=n, verbose=False, metrics_config=MetricsConfig(lyapunov_window=w)
    ).analyze(mse_step(), loader, epochs)
    s, t = res.spread_evolution, res.checkpoint_times
    np.testing.assert_allclose(s, one.spread_evolution, rtol=1e-12)  # the window changes no spread
    want = [(math.log(s[k + w]) - math.log(s[k])) / (t[k + w] - t[k]) for k in range(len(s) - w)]
    assert res.local_lyapunov.shape == (epochs + 1 - w,) and one.local_lyapunov.shape == (epochs,)
    np.testing.assert_allclose(res.local_lyapunov, want, rtol=1e-10)
    assert res.lyapunov_window == w and one.lyapunov_window == 1
    assert res.lyapunov == pytest.approx(one.lyapunov, rel=1e-12)  # the global exponent does not depend on w
    iu, ju = np.triu_indices(n, 1)
    d2 = res.pairwise_distances[:, iu, ju] ** 2
    np.testing.assert_allclose(res.local_lyapunov_ci, _jackknife_local(d2, t, n, w), rtol=1e-8)
    back = type(res).from_dict(res.to_dict())
    assert back.lyapunov_window == w
    np.testing.assert_allclose(back.local_lyapunov, res.local_lyapunov)
    # clipped to T - 1
    big = StabilityAnalyzer(
        mlp(), n_trajectories=n, verbose=False, metrics_config=MetricsConfig(lyapunov_window=50)
    ).analyze(mse_step(), loader, epochs)
    assert big.local_lyapunov.shape == (1,) and big.local_lyapunov[0] == pytest.approx(big.lyapunov, rel=1e-12)
    pytest.importorskip("matplotlib")
    fig = res.plot_lyapunov()
    heights = [p.get_height() for p in fig.axes[0].patches if hasattr(p, "get_height") and p.get_width() < 1.0]
    np.testing.assert_allclose(heights, res.local_lyapunov, rtol=1e-10)
    report = res.save_report(tmp_path / "r", format="markdown").read_text()
    assert f"| {t[0]:g} → {t[w]:g} |" in report.replace(".0 ", " ")


def _png_width(data: bytes) -> int:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big")


def test_visualization_config_takes_effect_in_results_plots_and_report(tmp_path, one_thread):
    pytest.importorskip("matplotlib")
    import matplotlib

    cfg = VisualizationConfig(colormap="plasma", show_confidence_bands=False, figure_dpi=40, figure_format="svg")
    an = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False, visualization_config=cfg)
    res = an.analyze(mse_step(), regression_loader(), 3)
    plain = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(mse_step(), regression_loader(), 3)
    assert res.visualization_config is cfg and plain.visualization_config is None

    def first_color(fig) -> tuple:
        return matplotlib.colors.to_rgba(fig.axes[0].get_lines()[0].get_color())

    assert first_color(res.plot_trajectories()) == pytest.approx(matplotlib.colormaps["plasma"](0.0))
    assert first_color(plain.plot_trajectories()) == pytest.approx(matplotlib.colormaps["viridis"](0.0))
    override = VisualizationConfig(colormap="cividis")
    assert first_color(res.plot_trajectories(config=override)) == pytest.approx(matplotlib.colormaps["cividis"](0.0))
    # confidence bands: error bars on the local exponents and a band around the global one
    with_bands, without = plain.plot_lyapunov().axes[0], res.plot_lyapunov().axes[0]
    assert np.isfinite(plain.lyapunov_ci).all() and np.isfinite(plain.local_lyapunov_ci).all()
    from matplotlib.container import ErrorbarContainer

    def n_errorbars(ax) -> int:
        return sum(isinstance(c, ErrorbarContainer) for c in ax.containers)

    assert n_errorbars(with_bands) == 1 and n_errorbars(without) == 0
    assert len(with_bands.patches) == len(without.patches) + 1  # the global exponent's band
    # the report: files in the configured format and dpi, embedded images in SVG
    out = res.save_report(tmp_path / "files", embed_images=False)
    for name in ("trajectories", "convergence", "lyapunov"):
        assert (out.parent / f"{name}.svg").read_text().startswith("<?xml")
        assert f"{name}.svg" in out.read_text()
    assert "data:image/svg+xml;base64," in res.save_report(tmp_path / "embedded").read_text()
    png = res.save_report(tmp_path / "png", embed_images=False, config=VisualizationConfig(figure_dpi=40))
    assert _png_width((png.parent / "convergence.png").read_bytes()) == 8 * 40  # 8-inch wide figure
    default = plain.save_report(tmp_path / "default", embed_images=False)
    assert _png_width((default.parent / "convergence.png").read_bytes()) == 8 * 150
    assert type(res).from_dict(res.to_dict()).visualization_config == cfg
    with pytest.raises(ConfigError):
        res.plot_convergence(config={"colormap": "plasma"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        StabilityAnalyzer(mlp(), visualization_config=object())  # type: ignore[arg-type]


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, text: str) -> list[logging.LogRecord]:
        return [r for r in self.records if text in r.getMessage()]


@pytest.fixture
def dl_logger():
    """``logging.getLogger("deep_lyapunov")`` with a handler, restored afterwards."""
    log = logging.getLogger("deep_lyapunov")
    keep = _Keep()
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(keep)
    yield log, keep
    log.removeHandler(keep)
    log.setLevel(old_level)
    log.propagate = old_propagate


def _run_analysis() -> None:
    StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(make_train_fn(), regression_loader(), 1)


def test_a_configured_deep_lyapunov_logger_gets_the_records_once(dl_logger, caplog, one_thread):
    log, keep = dl_logger
    log.setLevel(logging.DEBUG)  # what deep-lyapunov's docstring tells its users to do
    caplog.set_level(logging.WARNING)  # root at WARNING: stabwatch.analysis itself is not enabled for INFO
    caplog.handler.setLevel(logging.NOTSET)  # ... but the root's handler takes every level (basicConfig's does)
    _run_analysis()
    summary = keep.messages("stability: ratio=")
    assert len(summary) == 1 and summary[0].name == "deep_lyapunov" and summary[0].levelno == logging.INFO
    assert summary[0].pathname.endswith("trajectory.py")  # the caller, not the logging helper
    assert len(keep.messages("train_fn driver")) == 1  # DEBUG records too
    # the root's handlers (here pytest's) see each record exactly once, as with deep-lyapunov
    at_root = [r for r in caplog.records if "stability: ratio=" in r.getMessage()]
    assert len(at_root) == 1


def test_both_loggers_enabled_no_duplicate_at_the_root(dl_logger, caplog, one_thread):
    log, keep = dl_logger
    log.setLevel(logging.INFO)
    caplog.set_level(logging.INFO)  # root INFO: the stabwatch.analysis chain is enabled as well
    _run_analysis()
    at_root = [r for r in caplog.records if "stability: ratio=" in r.getMessage()]
    assert [r.name for r in at_root] == ["stabwatch.analysis"]
    assert len(keep.messages("stability: ratio=")) == 1
    assert not keep.messages("train_fn driver")  # DEBUG is below the deep_lyapunov logger's level


def test_an_unconfigured_deep_lyapunov_logger_is_left_alone(dl_logger, caplog, one_thread):
    log, keep = dl_logger
    log.removeHandler(keep)
    log.addHandler(logging.NullHandler())  # what deep-lyapunov's import installs
    try:
        caplog.set_level(logging.INFO)
        _run_analysis()
    finally:
        log.handlers = [h for h in log.handlers if not isinstance(h, logging.NullHandler)]
        log.addHandler(keep)
    at_root = [r for r in caplog.records if "stability: ratio=" in r.getMessage()]
    assert [r.name for r in at_root] == ["stabwatch.analysis"]


def test_deep_lyapunov_logger_that_does_not_propagate(dl_logger, caplog, one_thread):
    log, keep = dl_logger
    log.setLevel(logging.INFO)
    log.propagate = False
    caplog.set_level(logging.WARNING)
    caplog.handler.setLevel(logging.NOTSET)
    _run_analysis()
    assert len(keep.messages("stability: ratio=")) == 1
    assert not [r for r in caplog.records if "stability: ratio=" in r.getMessage()]
