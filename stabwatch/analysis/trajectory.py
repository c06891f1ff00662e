r"""`StabilityAnalyzer`: perturbation-trajectory analysis of training stability.

Method. Copy the model ``N`` times; perturb copies ``1..N-1`` by ``epsilon * sigma(W) * xi`` per
tensor; train all copies on the same batches with the same noise; at every checkpoint ``t_k``
measure the exact distance ``d_ij(t) = |theta_i(t) - theta_j(t)|`` of every pair in the full weight
space. From the spread

.. math:: s(t) = \sqrt{\tfrac{2}{N(N-1)} \textstyle\sum_{i<j} d_{ij}(t)^2}

come, over ``T`` checkpoints ``t_0 < ... < t_{T-1}``, the convergence ratio ``s(t_{T-1})/s(t_0)``, the
exponent ``lambda = log(s(t_{T-1})/s(t_0)) / (t_{T-1} - t_0)`` (per epoch) and the local exponents per
interval, each with a jackknife confidence interval over replicas. Positions are kept for the PCA of
the trajectory cloud and its effective dimensionality (participation ratio), both from the
``(N T) x (N T)`` Gram matrix, never a ``P x P`` covariance: exactly while the ``N T P`` values fit in
``max_exact_bytes`` (Gram ``O((NT)^2 P)``), else as a ``k``-dimensional random projection
(``O(N T k)`` memory, approximate PCA); the eigendecomposition is ``O((NT)^3)`` either way.

Orchestration only: the math is in `stabwatch.analysis._stats`, the recording in `_recorder`, the
training drivers in `_training`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from tqdm.auto import tqdm

from stabwatch.analysis._config import AnalyzerConfig, MetricsConfig, UnknownSettingError, VisualizationConfig
from stabwatch.analysis._errors import StateError, warn
from stabwatch.analysis._log import analysis_logger
from stabwatch.analysis._recorder import ReplicaView, TrajectoryRecorder
from stabwatch.analysis._replicas import (
    isolated_rng,
    make_replicas,
    parameter_version,
    tracked_parameters,
)
from stabwatch.analysis._results import AnalysisResults, TrajectoryMetrics
from stabwatch.analysis._stats import (
    centered_gram_spectrum,
    growth_rates,
    jackknife_intervals,
    median_spread,
    pair_indices,
    pair_membership,
    participation_ratio,
    path_statistics,
    pca_scores,
    rms_spread,
)
from stabwatch.analysis._training import (
    TrainStep,
    release_stacked,
    train_sequential,
    train_vectorized,
    train_with_fn,
)
from stabwatch.analysis._views import ModelsView, StackedView
from stabwatch.errors import ConfigError, StabwatchError
from stabwatch.metrics import StabilityMetrics
from stabwatch.pipeline import RecordPipeline, sink_list

__all__ = ["StabilityAnalyzer"]

logger = analysis_logger()

#: Spread / weight norm above which the perturbation is no longer "small" (saturation warning).
_SATURATION_LEVEL = 0.1
#: The initial spread must exceed this many times the dtype's machine epsilon (relative to |theta|).
_RESOLUTION_FACTOR = 100.0


def _resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _last_value(history: dict[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        value = history.get(key)
        if isinstance(value, (list, tuple)) and value:
            value = value[-1]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


class StabilityAnalyzer:
    """Measure how training responds to tiny changes of the initial weights.

    A drop-in replacement for ``deep_lyapunov.StabilityAnalyzer`` (same arguments, defaults, methods
    and result fields) whose numbers are measured in the full weight space.

    Args:
        model: the model to analyse; it is copied, never modified.
        perturbation_scale: ``epsilon``, relative to each tensor's standard deviation.
        n_trajectories: ``N`` replicas, counting the unperturbed one.
        n_pca_components: principal components kept for `AnalysisResults.pca_trajectories`.
        track_gradients: also record each replica's gradient norm at every checkpoint.
        record_interval: record every ``r``-th epoch / call (the first and last are always kept).
        device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or ``"mps"``.
        seed: seed of the perturbations and of the shared data order and noise.
        verbose: progress bar over replicas and epochs.
        config: an `AnalyzerConfig`; when given it replaces all the settings above.
        renormalize: Benettin renormalisation at every checkpoint (see `AnalyzerConfig`).
        same_data_order: same batches and noise for every replica (default True).
        projection_dim: ``k`` of the random projection used past `max_exact_bytes`.
        max_exact_bytes: memory allowed for keeping whole trajectories.
        sinks: a stabwatch sink or a list of them; one record per checkpoint is written when metrics
            are computed, through a `stabwatch.pipeline.RecordPipeline` (a background writer per sink,
            a sink that fails gets its records spilled to disk and retried). `close` (or ``with``) closes
            them.
        metrics_config: a `MetricsConfig`: the behaviour threshold, the minimum number of checkpoints
            before a diagnostic, and mean or median spread (default ``MetricsConfig()``).
        visualization_config: a `VisualizationConfig` carried by the results
            (`AnalysisResults.visualization_config`): the default of their ``plot_*`` methods and
            ``save_report`` (colormap, confidence bands, dpi and format of saved images).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> model = nn.Linear(4, 1)
        >>> data = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(4)]
        >>> step = TrainStep(lambda m, b: F.mse_loss(m(b[0]), b[1]))
        >>> results = StabilityAnalyzer(model, n_trajectories=3, verbose=False).analyze(step, data, 2)
        >>> results.spread_evolution.shape
        (3,)
    """

    def __init__(
        self,
        model: nn.Module,
        perturbation_scale: float = 0.01,
        n_trajectories: int = 5,
        n_pca_components: int = 10,
        track_gradients: bool = False,
        record_interval: int = 1,
        device: Literal["auto", "cpu", "cuda", "mps"] | str = "auto",
        seed: int = 42,
        verbose: bool = True,
        config: AnalyzerConfig | None = None,
        *,
        renormalize: bool = False,
        same_data_order: bool = True,
        projection_dim: int = 1024,
        max_exact_bytes: int = 256 * 2**20,
        sinks: Any = None,
        metrics_config: MetricsConfig | None = None,
        visualization_config: VisualizationConfig | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise UnknownSettingError(
                f"StabilityAnalyzer: unknown argument(s) {', '.join(sorted(unknown))}; see "
                "help(StabilityAnalyzer) for the arguments (AnalyzerConfig's settings, config=, sinks=)"
            )
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        explicit = AnalyzerConfig(
            perturbation_scale=perturbation_scale,
            n_trajectories=n_trajectories,
            n_pca_components=n_pca_components,
            track_gradients=track_gradients,
            record_interval=record_interval,
            device=str(device),
            seed=seed,
            verbose=verbose,
            renormalize=renormalize,
            same_data_order=same_data_order,
            projection_dim=projection_dim,
            max_exact_bytes=max_exact_bytes,
        )
        if config is not None:
            if not isinstance(config, AnalyzerConfig):
                raise ConfigError(f"config must be an AnalyzerConfig, got {type(config).__name__}")
            overridden = [k for k, v in explicit.to_dict().items() if v != getattr(AnalyzerConfig(), k)]
            if overridden:
                logger.warning("config= given: ignoring the individual settings %s", ", ".join(overridden))
            explicit = config
        if metrics_config is not None and not isinstance(metrics_config, MetricsConfig):
            raise ConfigError(f"metrics_config must be a MetricsConfig, got {type(metrics_config).__name__}")
        self._metrics_config = metrics_config if metrics_config is not None else MetricsConfig()
        if visualization_config is not None and not isinstance(visualization_config, VisualizationConfig):
            raise ConfigError(
                f"visualization_config must be a VisualizationConfig, got {type(visualization_config).__name__}"
            )
        self._visualization_config = visualization_config
        self._config = explicit
        self._base_model = model
        self._torch_device = _resolve_device(self._config.device)
        self._device = self._torch_device.type
        self._sinks = sink_list(sinks, "StabilityAnalyzer")
        self._pipeline = RecordPipeline(sinks=self._sinks, max_records=0) if self._sinks else None
        self._closed = False
        self._clear()

    # ------------------------------------------------------------------ properties

    @property
    def model(self) -> nn.Module:
        """The model being analysed (never modified)."""
        return self._base_model

    @property
    def config(self) -> AnalyzerConfig:
        """The settings in use."""
        return self._config

    # ------------------------------------------------------------------ state

    def _clear(self) -> None:
        self._models: list[nn.Module] = []
        self._recorder: TrajectoryRecorder | None = None
        self._view: ReplicaView | None = None
        self._is_recording = False
        self._n_checkpoints = 0
        self._calls = 0
        self._pending: float | None = None
        self._version = 0
        self._base_version = 0
        self._warned_idle = False
        self._d0: NDArray[np.float64] = np.zeros(0)
        self._log_growth: list[NDArray[np.float64]] = []
        self._diagnostics: list[str] = []

    def reset(self) -> None:
        """Forget the replicas and everything recorded."""
        done = self._recorder.n_checkpoints if self._recorder is not None else 0
        self._clear()
        logger.info("analyzer reset (cleared %d checkpoints)", done)

    def close(self) -> None:
        """Drain and close the sinks; records a failing sink could not take stay in its spill file (the
        log names it, for ``stabwatch replay``). Idempotent; metrics computed afterwards are not written.
        """
        self._closed = True
        if self._pipeline is not None:
            self._pipeline.close()

    def __enter__(self) -> StabilityAnalyzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _warn(self, message: str) -> None:
        if message not in self._diagnostics:
            self._diagnostics.append(message)
        warn(message)

    def _begin(self, expected_checkpoints: int | None = None) -> None:
        """Make the replicas and record the initial checkpoint."""
        self._clear()
        cfg = self._config
        models, intended = make_replicas(
            self._base_model, cfg.n_trajectories, cfg.perturbation_scale, cfg.seed, self._torch_device
        )
        tracked = tracked_parameters(models[0])
        if not tracked:
            raise ConfigError("the model has no trainable parameters (requires_grad=True) to analyse")
        dtypes = {p.dtype for _, p in tracked}
        store = torch.float64 if torch.float64 in dtypes else torch.float32
        self._recorder = TrajectoryRecorder(
            [p.numel() for _, p in tracked],
            cfg.n_trajectories,
            projection_dim=cfg.projection_dim,
            max_exact_bytes=cfg.max_exact_bytes,
            seed=cfg.seed,
            store_dtype=store,
            expected_checkpoints=expected_checkpoints,
        )
        self._models = models
        self._view = ModelsView(models)
        self._recorder.record(self._view, 0.0, cfg.track_gradients)
        self._d0 = np.sqrt(self._recorder.pair_sq[0][0, 1:])
        self._version = parameter_version(models)
        self._base_version = parameter_version([self._base_model])
        self._check_resolution(intended, dtypes)

    def _check_resolution(self, intended: list[float], dtypes: set[torch.dtype]) -> None:
        """Fail if rounding erased the perturbation; warn if it ate part of it or it is too small."""
        assert self._recorder is not None
        realised = self._d0
        coarsest = max(dtypes, key=lambda d: torch.finfo(d).eps)
        eps = torch.finfo(coarsest).eps
        scale = self._config.perturbation_scale
        if not np.any(realised > 0):
            raise StabwatchError(
                f"perturbation_scale={scale:g} is below the resolution of {coarsest}: after rounding, "
                "every replica equals the original. Use a larger perturbation_scale."
            )
        wanted = np.asarray(intended[1:])
        kept = float(np.min(realised / np.where(wanted > 0, wanted, 1.0)))
        if kept < 0.9:
            self._warn(
                f"rounding to {coarsest} kept only {kept:.0%} of the intended perturbation "
                f"(perturbation_scale={scale:g}); the replicas start closer than asked",
            )
        norm0 = math.sqrt(float(self._recorder.norm_sq[0][0]))
        relative = float(np.median(realised)) / norm0 if norm0 > 0 else math.inf
        if relative < _RESOLUTION_FACTOR * eps:
            self._warn(
                f"the initial spread is {relative:.1e} of the weight norm, below {_RESOLUTION_FACTOR:g}x the "
                f"{coarsest} resolution ({eps:.1e}): rounding during training will look like divergence. "
                f"Use perturbation_scale >= {_RESOLUTION_FACTOR * eps / max(relative, 1e-300) * scale:.1e}"
                + (" or train in float32" if eps > torch.finfo(torch.float32).eps else ""),
            )

    def _record(self, view: ReplicaView, time: float) -> None:
        """Record a checkpoint, then renormalise if asked."""
        assert self._recorder is not None
        self._recorder.record(view, time, self._config.track_gradients)
        self._view = view
        if not self._config.renormalize:
            return
        d = np.sqrt(self._recorder.pair_sq[-1][0, 1:])
        with np.errstate(divide="ignore", invalid="ignore"):
            self._log_growth.append(np.log(d / self._d0))
            alphas = np.ones(self._config.n_trajectories)
            alphas[1:] = np.where(d > 0, self._d0 / np.where(d > 0, d, 1.0), 1.0)
        view.renormalize(alphas)
        self._recorder.refresh(view)

    # ------------------------------------------------------------------ automatic mode

    def analyze(
        self,
        train_fn: Callable[..., Any] | TrainStep,
        train_loader: Iterable[Any],
        n_epochs: int,
        test_loader: Any = None,
        **train_kwargs: Any,
    ) -> AnalysisResults:
        """Train the replicas and compute the metrics.

        Args:
            train_fn: either a deep-lyapunov style ``train_fn(model, loader, n_epochs, **kw)``,
                called as deep-lyapunov calls it: ``train_fn(model, train_loader, 1, **train_kwargs)``
                once per replica per epoch (an optimizer created inside is re-created every epoch),
                a checkpoint after every epoch; or a `TrainStep` (loss as a function of
                ``(model, batch)``) for vectorised training with one optimizer per replica for the
                whole run.
            train_loader: the training batches (any re-iterable; a `DataLoader` with
                ``shuffle=True`` is fine: every replica gets the same order).
            n_epochs: epochs to train.
            test_loader: accepted for compatibility; not used (as in deep-lyapunov).
            **train_kwargs: passed to ``train_fn``.

        Returns:
            `AnalysisResults`.

        Raises:
            StabwatchError: bad arguments, a perturbation erased by rounding, an empty loader.
            Exception: whatever ``train_fn`` raises, unchanged.
        """
        if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or n_epochs < 1:
            raise ConfigError(f"n_epochs must be a positive int, got {n_epochs!r}")
        if not isinstance(train_fn, TrainStep) and not callable(train_fn):
            raise ConfigError("train_fn must be callable (model, loader, n_epochs) or a TrainStep")
        if test_loader is not None:
            logger.info("test_loader is accepted for compatibility with deep-lyapunov and not used")
        if self._is_recording:
            logger.info("analyze() discards the manual recording in progress")
        cfg = self._config
        interval = cfg.record_interval
        n = cfg.n_trajectories
        notes: list[str] = []
        epochs_done = n_epochs

        def on_epoch_end(view: ReplicaView, epoch: int) -> None:
            self._view = view
            if epoch % interval == 0:
                self._record(view, float(epoch))

        expected = 1 + n_epochs // interval + (1 if n_epochs % interval else 0)
        with isolated_rng(self._torch_device):
            self._begin(expected)
            models = self._models
            progress = tqdm(
                total=n * n_epochs, disable=not cfg.verbose, desc="stability analysis", unit="replica-epoch"
            )
            common: dict[str, Any] = {
                "same_order": cfg.same_data_order,
                "seed": cfg.seed,
                "on_epoch_end": on_epoch_end,
                "progress": progress,
            }
            try:
                if isinstance(train_fn, TrainStep):
                    histories = None
                    if train_fn.vectorize is not False:
                        histories = train_vectorized(
                            train_fn, models, train_loader, n_epochs, device=self._torch_device, **common
                        )
                    if histories is None:
                        histories = train_sequential(
                            train_fn, models, train_loader, n_epochs, device=self._torch_device, **common
                        )
                else:
                    if cfg.renormalize:
                        notes.append(
                            "renormalize=True with a train_fn rescales parameters and buffers only; the "
                            "optimizer state inside train_fn is not renormalised (pass a TrainStep for "
                            "an exact Benettin estimate)"
                        )
                    histories, fn_notes, passes = train_with_fn(
                        train_fn, models, train_loader, n_epochs, dict(train_kwargs), **common
                    )
                    notes += fn_notes
                    epochs_done = passes if passes > 0 else n_epochs
            finally:
                progress.close()
            assert self._recorder is not None and self._view is not None
            final = float(epochs_done)
            if self._recorder.times[-1] < final:
                self._record(self._view, final)
            if isinstance(self._view, StackedView):
                self._view = ModelsView(models)  # drops the stacked gradients and optimizer state
                release_stacked(models)
        for note in notes:
            self._warn(note)
        self._n_checkpoints = self._recorder.n_checkpoints
        return self.compute_metrics(histories)

    # ------------------------------------------------------------------ manual mode

    def start_recording(self) -> None:
        """Make the replicas (see `get_models`) and record their initial state.

        Train every model returned by `get_models` (not the model given to the analyzer), call
        `record_checkpoint` after each epoch, then `compute_metrics`.

        Raises:
            StabwatchError: (also a `RuntimeError`) if already recording.
        """
        if self._is_recording:
            raise StateError("Already recording. Call reset() first.")
        self._begin()
        self._is_recording = True
        self._n_checkpoints = 1
        if self._config.renormalize:
            self._diagnostics.append(
                "renormalize=True in manual mode rescales parameters and buffers only; optimizer state "
                "is not renormalised"
            )
        assert self._recorder is not None
        logger.info(
            "Recording started: tracking %s parameters in %d replicas",
            f"{self._recorder.n_params:,}",
            self._config.n_trajectories,
        )

    def record_checkpoint(self) -> None:
        """Record the replicas' current weights (every `record_interval`-th call).

        Raises:
            StabwatchError: (also a `RuntimeError`) if `start_recording` was not called.
        """
        if not self._is_recording or self._view is None:
            raise StateError("Not recording. Call start_recording() first.")
        self._calls += 1
        self._n_checkpoints += 1
        version = parameter_version(self._models)
        if version == self._version and not self._warned_idle:
            self._warned_idle = True
            moved = parameter_version([self._base_model]) != self._base_version
            hint = " The model passed to StabilityAnalyzer changed instead:" if moved else ""
            self._warn(
                "record_checkpoint(): no replica changed since the previous checkpoint." + hint + " train the "
                "models returned by get_models(); the analyzer never trains or reads the original model."
            )
        self._version = version
        if self._calls % self._config.record_interval == 0:
            self._record(self._view, float(self._calls))
            self._pending = None
        else:
            self._pending = float(self._calls)

    def get_models(self) -> list[nn.Module]:
        """The ``N`` replicas (index 0 is the unperturbed copy), trained in place.

        Raises:
            StabwatchError: (also a `RuntimeError`) before `start_recording` / `analyze`.
        """
        if not self._models:
            raise StateError("Models not created. Call start_recording() first.")
        return self._models

    # ------------------------------------------------------------------ metrics

    def compute_metrics(self, training_metrics: Sequence[dict[str, Any]] | None = None) -> AnalysisResults:
        """Compute every metric from what was recorded.

        Args:
            training_metrics: optional per-replica dicts with ``"loss"`` and ``"accuracy"`` (or
                ``"test_acc"``) histories, as deep-lyapunov accepted.

        Returns:
            `AnalysisResults`; also written to the sinks, one record per checkpoint.

        Raises:
            StabwatchError: (also a `RuntimeError`) with fewer than two checkpoints.
        """
        rec = self._recorder
        if rec is None or (rec.n_checkpoints + (self._pending is not None)) < 2:
            raise StateError(
                "Insufficient trajectory data. Record at least 2 checkpoints "
                "(start_recording(), train, record_checkpoint())."
            )
        if self._pending is not None and self._view is not None:
            self._record(self._view, self._pending)
            self._pending = None
        cfg = self._config
        mcfg = self._metrics_config
        reducer = median_spread if mcfg.use_robust_estimators else rms_spread
        n = cfg.n_trajectories
        times = np.asarray(rec.times)
        pair_sq = np.stack(rec.pair_sq)
        if cfg.renormalize:
            growth = np.vstack([np.zeros((1, n - 1)), *self._log_growth])
            d2 = (self._d0[None, :] * np.exp(np.cumsum(growth, axis=0))) ** 2
            membership = np.eye(n - 1, dtype=bool)
            measured = pair_sq[:, 0, 1:]
        else:
            iu, ju = pair_indices(n)
            d2 = pair_sq[:, iu, ju]
            membership = pair_membership(n)
            measured = d2
        spread = reducer(d2)
        ratio = float(spread[-1] / spread[0])
        window = mcfg.lyapunov_window
        lam, local = growth_rates(spread, times, window)
        ci, local_ci = jackknife_intervals(d2, membership, times, reducer=reducer, window=window)
        vals, vecs = centered_gram_spectrum(rec.gram())
        n_comp = min(cfg.n_pca_components, rec.n_params, vals.shape[0])
        scores, explained = pca_scores(vals, vecs, n_comp)
        diagnostics = list(self._diagnostics)
        for message in self._saturation(rms_spread(measured), np.stack(rec.norm_sq), times):
            if message not in diagnostics:
                diagnostics.append(message)
                warn(message)
        if len(times) < mcfg.min_trajectory_length:
            message = (
                f"only {len(times)} checkpoints, fewer than min_trajectory_length="
                f"{mcfg.min_trajectory_length}: the exponent rests on few points"
            )
            diagnostics.append(message)
            warn(message)
        results = AnalysisResults(
            convergence_ratio=ratio,
            lyapunov=lam,
            behavior="convergent" if ratio < mcfg.convergence_threshold else "divergent",
            spread_evolution=spread,
            pca_trajectories=scores.reshape(len(times), n, -1),
            pca_explained_variance=explained,
            effective_dimensionality=participation_ratio(vals),
            trajectory_metrics=self._trajectory_metrics(times, training_metrics),
            n_trajectories=n,
            n_checkpoints=len(times),
            n_parameters=rec.n_params,
            checkpoint_times=times,
            local_lyapunov=local,
            local_lyapunov_ci=local_ci,
            lyapunov_ci=ci,
            pairwise_distances=np.sqrt(pair_sq),
            renormalized=cfg.renormalize,
            pca_method=rec.method,
            gradient_norms=np.stack(rec.grad_norms) if rec.grad_norms else None,
            diagnostics=diagnostics,
            visualization_config=self._visualization_config,
        )
        logger.info(
            "stability: ratio=%.4g lyapunov=%.4g [%.3g, %.3g] %s, effective dim %.3g (%s)",
            ratio,
            lam,
            ci[0],
            ci[1],
            results.behavior,
            results.effective_dimensionality,
            rec.method,
        )
        self._emit(results)
        return results

    def _saturation(
        self, measured: NDArray[np.float64], norm_sq: NDArray[np.float64], times: NDArray[np.float64]
    ) -> list[str]:
        """Warn when the measured spread is no longer small compared with the weights."""
        weight = np.sqrt(norm_sq.mean(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(weight > 0, measured / weight, 0.0)
        k = int(np.argmax(rel))
        if rel[k] <= _SATURATION_LEVEL:
            return []
        fix = (
            "record more often (renormalisation happens at every checkpoint)"
            if self._config.renormalize
            else "use renormalize=True or a smaller perturbation_scale"
        )
        return [
            f"the spread reached {rel[k]:.2g} of the weight norm at t={times[k]:g}: the perturbation is no "
            f"longer small, the spread saturates and the exponent underestimates the growth rate; {fix}"
        ]

    def _trajectory_metrics(
        self, times: NDArray[np.float64], training_metrics: Sequence[dict[str, Any]] | None
    ) -> list[TrajectoryMetrics]:
        assert self._recorder is not None
        n = self._config.n_trajectories
        steps = np.stack(self._recorder.step_sq) if self._recorder.step_sq else np.zeros((0, n))
        length, speed, speed_sd = path_statistics(steps, times)
        out = []
        for i in range(n):
            tm = TrajectoryMetrics(
                trajectory_id=i,
                path_length=float(length[i]),
                velocity_mean=float(speed[i]),
                velocity_std=float(speed_sd[i]),
            )
            if training_metrics is not None and i < len(training_metrics) and training_metrics[i]:
                history = training_metrics[i]
                tm.final_loss = _last_value(history, ("loss",))
                tm.final_accuracy = _last_value(history, ("accuracy", "test_acc"))
            out.append(tm)
        return out

    def _emit(self, results: AnalysisResults) -> None:
        """One `StabilityMetrics` per checkpoint through the record pipeline to the sinks, then wait for
        them (up to the sinks' ``close_timeout``). A sink that fails is reported in
        ``results.diagnostics``, not raised; its records are spilled and retried in the background."""
        if self._pipeline is None:
            return
        if self._closed:
            self._report(results, "the analyzer was closed: these results were not written to its sinks")
            return
        self._pipeline.open(self._describe())
        for record in _checkpoint_records(results):
            self._pipeline.publish(record)
        if self._pipeline.flush():
            return
        problems = self._pipeline.sink_problems() or ["a sink did not confirm its records in time"]
        for problem in problems:
            self._report(
                results,
                f"{problem}; the analysis is complete, only its records are late (retried until close(); "
                "what is still undelivered then stays in the spill file, for `stabwatch replay`)",
            )

    @staticmethod
    def _report(results: AnalysisResults, message: str) -> None:
        logger.warning(message)
        results.diagnostics.append(message)

    def _describe(self) -> dict[str, str]:
        """The run's configuration, logged as parameters by tracker sinks."""
        from stabwatch import __version__

        params = {
            "version": __version__,
            "frontend": "stabwatch.analysis.StabilityAnalyzer",
            "model": type(self._base_model).__name__,
        }
        params.update({name: str(value) for name, value in self._config.to_dict().items()})
        return params


def _checkpoint_records(results: AnalysisResults) -> list[StabilityMetrics]:
    """One record per checkpoint, all values in ``extra`` under ``analysis/`` keys.

    ``step`` is the checkpoint time (epochs, or `record_checkpoint` calls); ``analysis/spread`` is
    ``s(t)``; ``analysis/lyapunov`` is ``log(s(t)/s(t_0)) / (t - t_0)`` (from the second checkpoint on);
    ``analysis/lyapunov_local`` the local exponent of the window ending there (from the ``w``-th
    checkpoint on, ``w`` = `MetricsConfig.lyapunov_window`). Both exponents are in nats per unit of
    checkpoint time (per epoch), not per optimizer step, so they never go into the record's
    ``lyapunov`` field (``shadow/lyapunov``, per step): the alert rules would read a per-epoch value
    against their per-step ``chaotic`` threshold.
    """
    records = []
    s0 = results.spread_evolution[0]
    t0 = results.checkpoint_times[0]
    w = results.lyapunov_window
    for k, t in enumerate(results.checkpoint_times):
        extra = {"analysis/spread": float(results.spread_evolution[k])}
        if k > 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                extra["analysis/lyapunov"] = float(np.log(results.spread_evolution[k] / s0) / (t - t0))
        if k >= w:
            extra["analysis/lyapunov_local"] = float(results.local_lyapunov[k - w])
        records.append(StabilityMetrics(step=round(float(t)), extra=extra))
    return records
