"""`AnalyzerConfig`: every setting of a perturbation-trajectory analysis, validated once."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from stabwatch.errors import ConfigError

__all__ = ["AnalyzerConfig"]

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class AnalyzerConfig:
    """Settings of a `StabilityAnalyzer` (the first eight match ``deep_lyapunov.AnalyzerConfig``).

    Attributes:
        perturbation_scale: size of the initial perturbation, relative to each tensor's spread: replica
            ``i`` starts at ``theta_i = theta + scale * sigma(W) * xi`` per trainable tensor ``W``, with
            ``xi ~ N(0, I)`` and ``sigma(W)`` the tensor's standard deviation (its RMS when it has one
            element or no spread, 0.01 when it is all zeros).
        n_trajectories: number of replicas ``N``, counting the unperturbed copy (replica 0).
        n_pca_components: number of principal components kept in `AnalysisResults.pca_trajectories`.
        track_gradients: also record each replica's global gradient norm at every checkpoint.
        record_interval: record every ``r``-th epoch (or `record_checkpoint` call). The initial and
            the final state are always recorded.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        seed: seed of the perturbations and of the data order / dropout noise shared by the replicas.
        verbose: show a progress bar over replicas and epochs.
        renormalize: Benettin renormalisation: after every checkpoint each perturbed replica is pulled
            back towards replica 0 to its initial distance, ``theta_i <- theta_0 + (d_i(0)/d_i(t))
            (theta_i - theta_0)``, and ``log(d_i(t)/d_i(0))`` is accumulated, so the exponent keeps
            measuring the linearised growth instead of saturating.
        same_data_order: feed every replica the same batches in the same order with the same dropout
            noise (the default). ``False`` gives each replica its own shuffling and noise, which then
            adds to the measured divergence.
        projection_dim: ``k``, the size of the random projection kept per checkpoint once the exact
            trajectories exceed `max_exact_bytes`.
        max_exact_bytes: memory allowed for keeping whole trajectories (exact PCA / effective
            dimensionality). Past it, every checkpoint is kept as a ``k``-dimensional projection:
            memory ``O(N*T*k)`` instead of ``O(N*T*P)``. ``0`` always projects.

    Raises:
        ConfigError: (a `StabwatchError` and a `ValueError`) when a value is out of range or a keyword is
            not a setting; the message names the field and what is allowed.

    Example:
        >>> AnalyzerConfig(n_trajectories=3).perturbation_scale
        0.01
    """

    perturbation_scale: float = 0.01
    n_trajectories: int = 5
    n_pca_components: int = 10
    track_gradients: bool = False
    record_interval: int = 1
    device: str = "auto"
    seed: int = 42
    verbose: bool = True
    renormalize: bool = False
    same_data_order: bool = True
    projection_dim: int = 1024
    max_exact_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        scale = self.perturbation_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConfigError(f"perturbation_scale must be a finite positive number, got {scale!r}")
        if scale <= 0:
            raise ConfigError(f"perturbation_scale must be positive, got {scale!r} (try 0.01)")
        self._check_int("n_trajectories", 2, "at least 2 replicas are needed to measure a spread")
        self._check_int("n_pca_components", 1)
        self._check_int("record_interval", 1)
        self._check_int("projection_dim", 1)
        self._check_int("max_exact_bytes", 0, "0 always uses the random projection")
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        device = str(self.device)
        if not _DEVICE_RE.match(device):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        self.device = device
        for name in ("track_gradients", "verbose", "renormalize", "same_data_order"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def _check_int(self, name: str, minimum: int, hint: str = "") -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < minimum:
            extra = f" ({hint})" if hint else ""
            raise ConfigError(f"{name} must be at least {minimum}, got {value!r}{extra}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (for reports and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class UnknownSettingError(ConfigError, TypeError):
    """A keyword that is not a setting: a `ConfigError`, and the `TypeError` a dataclass raised for it (as
    deep-lyapunov's ``AnalyzerConfig`` does), so ``except TypeError`` keeps working."""


def _refuse_unknown_keywords(init: Any) -> Any:
    """Wrap the dataclass ``__init__`` so that a misspelt setting is a `ConfigError` listing the settings
    (not the bare ``TypeError`` Python raises for an unexpected keyword)."""
    names = [f.name for f in fields(AnalyzerConfig)]

    @functools.wraps(init)
    def __init__(self: AnalyzerConfig, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(names))
        if unknown or len(args) > len(names):
            given = f"unknown setting(s) {', '.join(unknown)}" if unknown else f"{len(args)} positional settings"
            raise UnknownSettingError(f"AnalyzerConfig: {given}; the settings are {', '.join(names)}")
        init(self, *args, **kwargs)

    return __init__


AnalyzerConfig.__init__ = _refuse_unknown_keywords(AnalyzerConfig.__init__)  # type: ignore[method-assign]
