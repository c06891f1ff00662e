r"""deep-lyapunov's ``tracking`` module: perturbed copies of a model and weight snapshots.

Change ``from deep_lyapunov.tracking import ...`` to ``from stabwatch.analysis.tracking import ...``; the
names and arguments are deep-lyapunov's. The definitions are those `StabilityAnalyzer` uses:

* `apply_perturbation` adds ``scale * sigma(W) * xi`` to every trainable tensor ``W``, ``xi ~ N(0, I)``,
  ``sigma(W)`` the tensor's standard deviation (its RMS for a one-element or constant tensor, where
  deep-lyapunov's NaN standard deviation made the weights NaN; 0.01 for an all-zero tensor). With a
  ``seed`` the noise comes from a private generator, so the caller's random stream is left alone
  (deep-lyapunov re-seeded the global one); on the CPU the numbers are deep-lyapunov's.
* `create_perturbed_copies` makes the replicas `StabilityAnalyzer` starts from: copy ``i`` perturbed
  with seed ``base_seed + i``.
* `TrajectoryTracker` keeps flattened snapshots of a model's trainable parameters; its statistics are
  in float64, speeds per `capture` call (per epoch when called once per epoch), and a gradient snapshot
  is kept for every weight snapshot (NaN where no gradient existed), so the two stay row-aligned.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from stabwatch.analysis.tracking import create_perturbed_copies
    >>> models = create_perturbed_copies(nn.Linear(4, 2), n_copies=3, scale=0.01)
    >>> [bool(torch.equal(models[0].weight, m.weight)) for m in models]
    [True, False, False]
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from stabwatch.analysis._log import analysis_logger
from stabwatch.analysis._replicas import perturb_parameters, tracked_parameters
from stabwatch.analysis._stats import path_statistics
from stabwatch.errors import ConfigError, InputError, StabwatchError

__all__ = ["TrajectoryTracker", "apply_perturbation", "create_perturbed_copies"]

logger = analysis_logger()


def _check_model(model: object, where: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_scale(scale: object, where: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ConfigError(f"{where}: scale must be a finite number (a fraction of each tensor's std), got {scale!r}")
    if scale < 0:
        raise ConfigError(f"{where}: scale must be >= 0 (a fraction of each tensor's std), got {scale!r}")
    return float(scale)


def _check_int(value: object, name: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def apply_perturbation(model: nn.Module, scale: float = 0.01, seed: int | None = None) -> None:
    r"""Perturb every trainable parameter of ``model`` in place, relative to its own spread.

    .. math:: W \leftarrow W + \text{scale}\cdot\sigma(W)\cdot\xi, \qquad \xi \sim \mathcal N(0, I)

    ``sigma(W)`` is the tensor's standard deviation; its RMS when the tensor has a single value (one
    element, or all equal); 0.01 when it is all zeros. Noise is drawn on the CPU, tensor by tensor in
    registration order, and added in float32 (float64 for float64 tensors).

    Args:
        model: modified in place; parameters with ``requires_grad=False`` are left alone.
        scale: ``scale``, a fraction of each tensor's standard deviation (default 1%).
        seed: seed of a private `torch.Generator`: reproducible, and the global random stream is not
            touched (deep-lyapunov called ``torch.manual_seed(seed)``; the noise is the same on the
            CPU). ``None``: draw from torch's global generator.

    Raises:
        ConfigError: a model that is not an ``nn.Module``, a negative or non-finite ``scale``, a
            ``seed`` that is not an int.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(10, 5)
        >>> before = model.weight.detach().clone()
        >>> apply_perturbation(model, scale=0.01, seed=42)
        >>> change = (model.weight.detach() - before).std() / before.std()
        >>> 0.005 < float(change) < 0.02
        True
    """
    where = "apply_perturbation"
    _check_model(model, where)
    scale = _check_scale(scale, where)
    generator = None
    if seed is not None:
        seed = _check_int(seed, "seed", where, minimum=-(2**63))
        generator = torch.Generator().manual_seed(seed)
    perturb_parameters(model, scale, generator)


def create_perturbed_copies(
    model: nn.Module,
    n_copies: int,
    scale: float = 0.01,
    base_seed: int = 42,
    include_original: bool = True,
) -> list[nn.Module]:
    """Deep copies of ``model``, copy ``i`` perturbed by `apply_perturbation` with seed ``base_seed + i``.

    These are the replicas ``StabilityAnalyzer(model, perturbation_scale=scale, n_trajectories=n_copies,
    seed=base_seed)`` starts from. ``model`` is not modified and the global random stream is not
    touched.

    Args:
        model: the model to copy (``copy.deepcopy``: parameters, buffers and train/eval mode).
        n_copies: how many copies to return.
        scale: perturbation size, a fraction of each tensor's standard deviation.
        base_seed: copy ``i`` uses seed ``base_seed + i``.
        include_original: the first copy is left unperturbed (the reference trajectory).

    Returns:
        ``n_copies`` models, on the device of ``model``.

    Raises:
        ConfigError: bad arguments (a non-module, ``n_copies < 1``, a negative ``scale``).
        StabwatchError: the model cannot be deep-copied.

    Example:
        >>> from torch import nn
        >>> base_model = nn.Sequential(nn.Linear(10, 5), nn.ReLU())
        >>> models = create_perturbed_copies(base_model, n_copies=5)
        >>> len(models)
        5
    """
    where = "create_perturbed_copies"
    _check_model(model, where)
    n_copies = _check_int(n_copies, "n_copies", where, minimum=1)
    scale = _check_scale(scale, where)
    base_seed = _check_int(base_seed, "base_seed", where, minimum=-(2**63))
    copies = []
    for i in range(n_copies):
        try:
            replica = copy.deepcopy(model)
        except Exception as exc:  # pragma: no cover - depends on exotic user models
            raise StabwatchError(f"{where}: the model cannot be copied with copy.deepcopy: {exc}") from exc
        if i > 0 or not include_original:
            perturb_parameters(replica, scale, torch.Generator().manual_seed(base_seed + i))
        copies.append(replica)
    logger.debug("created %d copies (scale=%g, include_original=%s)", n_copies, scale, include_original)
    return copies


def _snapshot_dtype(dtypes: set[torch.dtype]) -> np.dtype:
    """float64 if any tracked tensor is float64, else float32 (exact for float16 and bfloat16 too)."""
    return np.dtype(np.float64) if torch.float64 in dtypes else np.dtype(np.float32)


class TrajectoryTracker:
    """Snapshots of one model's trainable parameters, taken during training.

    Call `capture` after every epoch (or step); every ``record_interval``-th call keeps the flattened
    weights (and, with ``track_gradients``, the gradients). Memory: one ``P``-vector per snapshot.

    Args:
        model: the model to track (read, never modified).
        track_gradients: also keep the gradients at every snapshot.
        record_interval: keep every ``r``-th call of `capture` (the ``r``-th, ``2r``-th, ...).

    Raises:
        ConfigError: a model that is not an ``nn.Module``, ``record_interval < 1``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1)
        >>> tracker = TrajectoryTracker(model)
        >>> for epoch in range(4):
        ...     with torch.no_grad():
        ...         model.bias += 1.0  # one "epoch" of training moves the bias by 1
        ...     tracker.capture()
        >>> tracker.get_trajectory().shape
        (4, 4)
        >>> round(tracker.get_statistics()["path_length"], 6)  # three steps of length 1 (float32 weights)
        3.0
    """

    def __init__(self, model: nn.Module, track_gradients: bool = False, record_interval: int = 1) -> None:
        self._model = _check_model(model, "TrajectoryTracker")
        self._track_gradients = bool(track_gradients)
        self._record_interval = _check_int(record_interval, "record_interval", "TrajectoryTracker", minimum=1)
        tracked = tracked_parameters(model)
        self._n_params = sum(p.numel() for _, p in tracked)
        self._dtype = _snapshot_dtype({p.dtype for _, p in tracked})
        self._weights: list[NDArray[np.floating]] = []
        self._gradients: list[NDArray[np.floating]] = []
        self._times: list[int] = []
        self._capture_count = 0

    @property
    def model(self) -> nn.Module:
        """The tracked model."""
        return self._model

    @property
    def n_snapshots(self) -> int:
        """Number of snapshots kept."""
        return len(self._weights)

    @property
    def n_parameters(self) -> int:
        """``P``, the number of trainable parameters (shared ones counted once)."""
        return self._n_params

    def _flat(self, tensors: Sequence[torch.Tensor]) -> NDArray[np.floating]:
        work = torch.float64 if self._dtype == np.float64 else torch.float32
        return torch.cat([t.detach().reshape(-1).to("cpu", work) for t in tensors]).numpy()

    def capture(self) -> None:
        """Count one call; on every ``record_interval``-th, keep the weights (and gradients).

        A parameter without a gradient counts as zero in the gradient snapshot; a snapshot at which no
        parameter has one is a row of NaN (deep-lyapunov skipped it, which shifted later rows).

        Raises:
            InputError: the number of trainable parameters changed since the tracker was made.
        """
        self._capture_count += 1
        if self._capture_count % self._record_interval:
            return
        params = [p for _, p in tracked_parameters(self._model)]
        total = sum(p.numel() for p in params)
        if total != self._n_params:
            raise InputError(
                f"TrajectoryTracker.capture(): the model now has {total:,} trainable parameters, "
                f"{self._n_params:,} when the tracker was made (requires_grad changed, or modules were "
                "added); make a new TrajectoryTracker for the new set"
            )
        self._weights.append(self._flat(params))
        self._times.append(self._capture_count)
        if self._track_gradients:
            if any(p.grad is not None for p in params):
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                self._gradients.append(self._flat(grads))
            else:
                self._gradients.append(np.full(self._n_params, np.nan, dtype=self._dtype))

    def get_trajectory(self) -> NDArray[np.floating]:
        """The snapshots, ``[n_snapshots, n_params]`` (float32, or float64 for a float64 model).

        Raises:
            InputError: (also a `ValueError`, as in deep-lyapunov) before the first snapshot.
        """
        if not self._weights:
            raise InputError("TrajectoryTracker: no snapshots captured; call capture() during training")
        return np.stack(self._weights)

    def get_gradient_trajectory(self) -> NDArray[np.floating] | None:
        """The gradient snapshots, ``[n_snapshots, n_params]``, row ``k`` taken with weight snapshot ``k``
        (NaN where no gradient existed); None without ``track_gradients`` or if no gradient was ever seen.
        """
        if not self._gradients or all(np.isnan(g).all() for g in self._gradients):
            return None
        return np.stack(self._gradients)

    def get_latest_weights(self) -> NDArray[np.floating] | None:
        """The last snapshot, ``[n_params]``, or None before the first."""
        return self._weights[-1] if self._weights else None

    def reset(self) -> None:
        """Forget every snapshot and restart the call count."""
        self._weights.clear()
        self._gradients.clear()
        self._times.clear()
        self._capture_count = 0

    def get_statistics(self) -> dict[str, float]:
        r"""Path length and speed of the tracked weights (float64).

        .. math::
            L = \sum_k \lVert w_{k+1} - w_k\rVert, \qquad
            v_k = \lVert w_{k+1} - w_k\rVert / (c_{k+1} - c_k)

        with ``c_k`` the `capture` call of snapshot ``k``: speeds per call, so per epoch when `capture`
        runs once per epoch, whatever ``record_interval`` (deep-lyapunov divided by snapshots instead;
        the same with ``record_interval=1``). As `TrajectoryMetrics` of the analyzer.

        Returns:
            ``{"path_length", "velocity_mean", "velocity_std"}`` (population std); zeros with fewer
            than two snapshots.
        """
        if len(self._weights) < 2:
            return {"path_length": 0.0, "velocity_mean": 0.0, "velocity_std": 0.0}
        steps = np.empty((len(self._weights) - 1, 1))
        for k in range(steps.shape[0]):
            d = self._weights[k + 1].astype(np.float64) - self._weights[k].astype(np.float64)
            steps[k, 0] = float(d @ d)
        length, speed, speed_sd = path_statistics(steps, np.asarray(self._times, dtype=np.float64))
        return {"path_length": float(length[0]), "velocity_mean": float(speed[0]), "velocity_std": float(speed_sd[0])}
