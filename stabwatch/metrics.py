"""`StabilityMetrics`: the one record every part of stabwatch speaks.

A `Monitor` emits one record per emitted step; sinks write it, alert rules read it, the analyzers and the
CLI read it back from JSONL. Every value is a plain Python float (never a tensor), so a record is cheap to
keep, serialise and ship to another thread.

Flat keys (`StabilityMetrics.to_dict`) are made in exactly one place, `metric_key`, as ``family/metric``
for a global value and ``family/metric/<module.path>`` for a per-layer value. The characters are the
ones every supported tracker accepts (MLflow is the strictest: letters, digits, ``_ - . / space :``).

Non-finite values: a NaN or ±inf is a *finding* (the run blew up), so it is kept, never dropped. In JSON
they are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (standard JSON has no
literal for them) and read back as floats.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "FIELD_KEYS",
    "Alert",
    "AlertReason",
    "Severity",
    "StabilityMetrics",
    "metric_key",
]


class Severity(str, Enum):
    """How bad an alert is."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class AlertReason(str, Enum):
    """Why an alert fired: a closed set, so code can branch on it (the `message` carries the numbers)."""

    EXPLODING_GRADIENT = "exploding_gradient"
    VANISHING_GRADIENT = "vanishing_gradient"
    LOSS_SPIKE = "loss_spike"
    NON_FINITE = "non_finite"
    CHAOTIC_TRAINING = "chaotic_training"
    COLLAPSE = "collapse"
    SPECTRAL_RADIUS = "spectral_radius"
    ILL_CONDITIONED = "ill_conditioned"
    UPDATE_RATIO = "update_ratio"
    DEAD_NEURONS = "dead_neurons"
    SATURATED_NEURONS = "saturated_neurons"
    SILENT_LAYER = "silent_layer"
    THRESHOLD = "threshold"
    SPIKE = "spike"
    TREND = "trend"
    RECOVERED = "recovered"
    CUSTOM = "custom"


class Alert(BaseModel):
    """One alert: what fired, where, with the numbers that made it fire and what to try.

    Example:
        >>> a = Alert(rule="grad_explode", reason=AlertReason.EXPLODING_GRADIENT,
        ...           severity=Severity.CRITICAL, step=12, metric="grad_norm", value=3.2e4,
        ...           message="grad_norm 3.2e+04 is 11x its 50-step median 2.9e+03")
        >>> a.severity.value
        'critical'
    """

    model_config = ConfigDict(ser_json_inf_nan="strings", frozen=True)

    rule: str
    reason: AlertReason
    severity: Severity
    step: int
    metric: str
    layer: str | None = None
    value: float | None = None
    message: str
    suggestion: str = ""

    def __str__(self) -> str:
        where = f" [{self.layer}]" if self.layer else ""
        return f"[{self.severity.value}] step {self.step} {self.rule}{where}: {self.message}"


#: Record field -> flat key (``family/metric``). Per-layer values of the same quantity use the same key
#: with ``/<module.path>`` appended. The one table that names keys; sinks never rewrite them.
FIELD_KEYS: dict[str, str] = {
    "loss": "loss/value",
    "grad_norm": "grad/norm",
    "grad_max_sv": "grad/max_sv",
    "grad_min_sv": "grad/min_sv",
    "grad_condition": "grad/condition",
    "grad_rank": "grad/rank",
    "update_ratio": "update/ratio",
    "update_norm": "update/norm",
    "weight_norm": "weight/norm",
    "spectral_norm": "weight/spectral_norm",
    "spectral_radius": "weight/spectral_radius",
    "activation_mean": "activation/mean",
    "activation_std": "activation/std",
    "dead_frac": "activation/dead_frac",
    "saturated_frac": "activation/saturated_frac",
    "firing_rate_mean": "spiking/firing_rate_mean",
    "firing_rate_std": "spiking/firing_rate_std",
    "dead_neuron_frac": "spiking/dead_neuron_frac",
    "saturated_neuron_frac": "spiking/saturated_neuron_frac",
    "membrane_mean": "spiking/membrane_mean",
    "membrane_std": "spiking/membrane_std",
    "membrane_threshold_distance": "spiking/membrane_threshold_distance",
    "lyapunov": "shadow/lyapunov",
    "lyapunov_local": "shadow/lyapunov_local",
    "shadow_divergence": "shadow/divergence",
    "nonfinite": "nonfinite/any",
    "overhead_ms": "monitor/overhead_ms",
}

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
_MAX_KEY_LEN = 250


def metric_key(family_metric: str, layer: str | None = None) -> str:
    """Build the flat key for a metric, optionally for one layer.

    Characters outside ``[A-Za-z0-9_-. :/]`` become ``_``; empty path segments are dropped; keys longer
    than 250 characters (MLflow's limit) keep their head and a hash of the rest.

    Args:
        family_metric: ``family/metric``, e.g. ``"grad/norm"``.
        layer: a module path such as ``"encoder.0"``, or ``None`` for a global value.

    Returns:
        ``family/metric`` or ``family/metric/<layer>``.

    Example:
        >>> metric_key("grad/norm", "blocks.0.attn")
        'grad/norm/blocks.0.attn'
        >>> metric_key("grad/norm", "weird[name]")
        'grad/norm/weird_name_'
    """
    raw = family_metric if layer is None else f"{family_metric}/{layer}"
    key = "/".join(part for part in _BAD_KEY_CHARS.sub("_", raw).split("/") if part.strip())
    if len(key) > _MAX_KEY_LEN:
        import hashlib

        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        key = f"{key[: _MAX_KEY_LEN - 11]}~{digest}"
    return key


def _fmt(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.4g}"


class StabilityMetrics(BaseModel):
    """The per-step stability record.

    Every metric field is ``None`` when it was not computed at this step (its family is off or not
    scheduled) or when computing it failed (the failure is logged once). Per-layer values live in
    `layers` as ``{module_path: {field_name: value}}`` using the same field names as the globals.

    Which gradient is measured: the gradients as the optimizer sees them, read in an optimizer
    *pre-step* hook — after gradient accumulation, after AMP unscaling (``GradScaler.step`` unscales
    before it calls ``optimizer.step``) and after any clipping the user applied before ``step()``.
    `grad_source` says so per record: ``"optimizer_pre_step"``, or ``"monitor_step"`` when no optimizer
    step ran since the last record (then ``.grad`` is read when `Monitor.step` is called).

    Attributes:
        step: optimizer-step index (0-based) this record describes.
        loss: the loss passed to `Monitor.step`.
        grad_norm: global L2 norm of all gradients, ``sqrt(sum_p ||g_p||^2)``.
        update_ratio: ``||theta_t - theta_{t-1}|| / ||theta_{t-1}||`` over all parameters.
        grad_max_sv / grad_min_sv / grad_condition: largest singular value of any 2-D weight gradient,
            smallest *non-zero* one, and the largest per-layer condition number ``s_max / s_min``.
        spectral_norm: largest weight spectral norm; spectral_radius: largest |eigenvalue| of the
            square (recurrent) weights.
        layers: per-layer values, ``{module_path: {field: value}}``.
        extra: further values keyed ``family/metric[/layer]`` (e.g. top-k singular values).
        alerts: alerts raised at this step.

    Example:
        >>> r = StabilityMetrics(step=3, loss=0.5, grad_norm=1.25, layers={"fc1": {"grad_norm": 1.0}})
        >>> r.to_dict()["grad/norm/fc1"]
        1.0
        >>> str(r)
        'step 3 | loss=0.5 | grad=1.25'
    """

    model_config = ConfigDict(ser_json_inf_nan="strings", extra="forbid")

    step: int = Field(ge=0)
    loss: float | None = None
    grad_norm: float | None = None
    grad_max_sv: float | None = None
    grad_min_sv: float | None = None
    grad_condition: float | None = None
    grad_rank: float | None = None
    update_ratio: float | None = None
    update_norm: float | None = None
    weight_norm: float | None = None
    spectral_norm: float | None = None
    spectral_radius: float | None = None
    activation_mean: float | None = None
    activation_std: float | None = None
    dead_frac: float | None = None
    saturated_frac: float | None = None
    firing_rate_mean: float | None = None
    firing_rate_std: float | None = None
    dead_neuron_frac: float | None = None
    saturated_neuron_frac: float | None = None
    membrane_mean: float | None = None
    membrane_std: float | None = None
    membrane_threshold_distance: float | None = None
    lyapunov: float | None = None
    lyapunov_local: float | None = None
    shadow_divergence: float | None = None
    nonfinite: bool | None = None
    nonfinite_source: str | None = None
    grad_source: str | None = None
    overhead_ms: float | None = None
    layers: dict[str, dict[str, float]] = Field(default_factory=dict)
    extra: dict[str, float] = Field(default_factory=dict)
    alerts: list[Alert] = Field(default_factory=list)

    def to_dict(self) -> dict[str, float]:
        """Flatten to ``{key: float}`` with keys from `metric_key` (``None`` values are left out).

        ``step`` is not a metric and is not included; ``nonfinite`` becomes 1.0 / 0.0.
        """
        out: dict[str, float] = {}
        for field, key in FIELD_KEYS.items():
            value = getattr(self, field)
            if value is not None:
                out[key] = float(value)
        for layer, values in self.layers.items():
            for field, value in values.items():
                out[metric_key(FIELD_KEYS.get(field, field), layer)] = float(value)
        for key, value in self.extra.items():
            out[metric_key(key)] = float(value)
        return out

    def __str__(self) -> str:
        parts = [f"step {self.step}"]
        short = (
            ("loss", "loss"),
            ("grad_norm", "grad"),
            ("update_ratio", "upd"),
            ("grad_condition", "cond"),
            ("spectral_norm", "sn"),
            ("spectral_radius", "rho"),
            ("firing_rate_mean", "fr"),
            ("dead_neuron_frac", "dead"),
            ("lyapunov", "lyap"),
        )
        for field, label in short:
            value = getattr(self, field)
            if value is not None:
                parts.append(f"{label}={_fmt(value)}")
        if self.nonfinite:
            parts.append(f"NON-FINITE@{self.nonfinite_source}")
        if self.alerts:
            parts.append(f"alerts={len(self.alerts)}")
        return " | ".join(parts)

    @classmethod
    def from_json_line(cls, line: str) -> StabilityMetrics:
        """Parse one JSONL line written by `JsonlSink` (non-finite strings become floats)."""
        return cls.model_validate_json(line)

    def to_json_line(self) -> str:
        """One line of strict JSON (non-finite floats as ``"NaN"``/``"Infinity"`` strings)."""
        return self.model_dump_json(exclude_none=True)

    def get(self, key: str) -> Any:
        """Value of a flat key (``family/metric[/layer]``) or ``None``."""
        return self.to_dict().get(key)
