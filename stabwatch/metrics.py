"""`StabilityMetrics`: the one record every part of stabwatch speaks.

A `Monitor` emits one record per emitted step; sinks write it, alert rules read it, the analyzers and the
CLI read it back from JSONL. Every value is a plain Python float (never a tensor), so a record is cheap to
keep, serialise and ship to another thread.

Flat keys (`StabilityMetrics.to_dict`) are made in exactly one place, `metric_key`:

* a global value is ``<family>/<metric>`` (``grad/norm``, ``grad_sv/max``, ``update/weight_norm``);
* a per-layer value is ``<family>_layers/<metric>/<module.path>`` (``grad_layers/norm/encoder.0``);
  the layer-key policy's summaries sit beside the layers (``grad_layers/norm/layers:p50``).

``<family>`` is the collector family that computes the value (its module in `stabwatch.collectors`, its
key in ``Monitor(every={...})``). The scheme is prefix-free: no key is a path prefix of another (no key
``K`` with another key starting with ``K + "/"``), which MLflow's file store needs (a key is a file, so
it cannot also be a folder) and which keeps a grouping UI (W&B sections are the first path segment) from
burying the headline charts under hundreds of per-layer ones. It holds by construction: globals have
two segments and a first segment that never ends in ``_layers``; per-layer keys have three segments,
the first ending in ``_layers``, and the module path is one segment (a ``/`` in it becomes ``_``). The
characters are the ones every supported tracker accepts (MLflow is the strictest: letters, digits,
``_ - . / space :``).

Non-finite values: a NaN or ±inf is a *finding* (the run blew up), so it is kept, never dropped. In JSON
they are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (standard JSON has no
literal for them) and read back as floats.
"""

from __future__ import annotations

import functools
import re
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stabwatch.errors import InputError, describe_validation_error
from stabwatch.numeric import fmt

__all__ = [
    "FIELD_KEYS",
    "LAYERS_SUFFIX",
    "Alert",
    "AlertReason",
    "Severity",
    "StabilityMetrics",
    "metric_key",
    "parse_key",
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


class _Checked(BaseModel):
    """A pydantic model whose invalid input raises `stabwatch.errors.InputError` (a `StabwatchError`)."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InputError(f"{type(self).__name__}: {describe_validation_error(exc)}") from None


class Alert(_Checked):
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


#: Record field -> global flat key ``<family>/<metric>``, where ``<family>`` is the collector family that
#: computes the field. Per-layer values of the same field go to ``<family>_layers/<metric>/<module.path>``
#: (`metric_key`). The one table that names keys; sinks never rewrite them.
FIELD_KEYS: dict[str, str] = {
    "loss": "loss/value",
    "grad_norm": "grad/norm",
    "grad_max_sv": "grad_sv/max",
    "grad_min_sv": "grad_sv/min",
    "grad_condition": "grad_sv/condition",
    "grad_rank": "grad_sv/rank",
    "update_ratio": "update/ratio",
    "update_norm": "update/norm",
    "weight_norm": "update/weight_norm",
    "spectral_norm": "weight/spectral_norm",
    "spectral_radius": "weight/spectral_radius",
    "activation_mean": "activation/mean",
    "activation_std": "activation/std",
    "activation_batch_std": "activation/batch_std",
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

#: The first segment of a per-layer key is the family plus this suffix (``grad`` -> ``grad_layers``).
LAYERS_SUFFIX = "_layers"

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
_MAX_KEY_LEN = 250


def _segment(text: str) -> str:
    """One path segment: tracker-safe characters, no ``/``, no surrounding spaces, never ``.``/``..``."""
    seg = _BAD_KEY_CHARS.sub("_", text).replace("/", "_").strip()
    return "_" * len(seg) if seg and not seg.strip(".") else seg


@functools.lru_cache(maxsize=1 << 16)
def metric_key(name: str, layer: str | None = None) -> str:
    """Build the flat key of a metric, global or for one layer (the only function that makes keys).

    Characters outside ``[A-Za-z0-9_-. :/]`` become ``_``; a layer is one segment (a ``/`` in a module
    name becomes ``_``); keys longer than 250 characters (MLflow's limit) keep their head and a hash
    of the whole. The result is prefix-free across all keys (see the module docstring): a global key
    always has two segments (a bare ``name`` gets ``/value``, further segments are joined with ``_``,
    and a family ending in ``_layers`` gets a trailing ``_``); a per-layer key always has three.

    Args:
        name: ``family/metric``, e.g. ``"grad/norm"`` or ``"grad_sv/top1"``.
        layer: a module path such as ``"encoder.0"``, or ``None`` for a global value.

    Returns:
        ``family/metric`` or ``family_layers/metric/<layer>``.

    Example:
        >>> metric_key("grad/norm")
        'grad/norm'
        >>> metric_key("grad/norm", "blocks.0.attn")
        'grad_layers/norm/blocks.0.attn'
        >>> metric_key("grad_sv/top1", "weird[name]/x")
        'grad_sv_layers/top1/weird_name__x'
    """
    parts = [seg for seg in (_segment(p) for p in name.split("/")) if seg]
    family = parts[0] if parts else "extra"
    metric = "_".join(parts[1:]) or "value"
    if layer is None:
        if family.endswith(LAYERS_SUFFIX):
            family += "_"  # the suffix is reserved for per-layer keys
        key = f"{family}/{metric}"
    else:
        key = f"{family}{LAYERS_SUFFIX}/{metric}/{_segment(layer) or '_'}"
    if len(key) > _MAX_KEY_LEN:
        import hashlib

        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        key = f"{key[: _MAX_KEY_LEN - 11]}-{digest}"
    return key


def parse_key(key: str) -> tuple[str, str | None]:
    """Split a flat key into ``(family/metric, layer or None)``: the inverse of `metric_key`.

    Also accepts the raw ``family/metric/<layer>`` form that `StabilityMetrics.extra` uses.

    Example:
        >>> parse_key("grad_layers/norm/encoder.0")
        ('grad/norm', 'encoder.0')
        >>> parse_key("grad/norm"), parse_key("grad_sv/top1/fc1")
        (('grad/norm', None), ('grad_sv/top1', 'fc1'))
    """
    parts = key.split("/", 2)
    if len(parts) < 3:
        return key, None
    family, metric, layer = parts
    if family.endswith(LAYERS_SUFFIX):
        family = family[: -len(LAYERS_SUFFIX)]
    return f"{family}/{metric}", layer


class StabilityMetrics(_Checked):
    """The per-step stability record.

    Every metric field is ``None`` when it was not computed at this step (its family is off or not
    scheduled) or when computing it failed (the failure is logged once). Per-layer values live in
    `layers` as ``{module_path: {field_name: value}}`` using the same field names as the globals.

    Which gradient is measured: the gradients the optimizer uses in the step — after gradient
    accumulation, after AMP unscaling (a fused optimizer that ``GradScaler`` hands scaled gradients has
    the scale divided out) and after any clipping applied before ``step()``; for
    ``optimizer.step(closure)`` (LBFGS, Lightning) those of the closure's first call in that step.
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
        extra: further values keyed ``family/metric`` or ``family/metric/<layer>`` (e.g. the top-k
            singular values ``grad_sv/top1/<layer>``); `to_dict` maps them to the same key scheme.
        alerts: alerts raised at this step.

    Example:
        >>> r = StabilityMetrics(step=3, loss=0.5, grad_norm=1.25, layers={"fc1": {"grad_norm": 1.0}})
        >>> r.to_dict()["grad_layers/norm/fc1"]
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
    activation_batch_std: float | None = None
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

        Globals are ``family/metric``, per-layer values ``family_layers/metric/<layer>``, and an `extra`
        entry ``family/metric/<layer>`` is a per-layer value too. ``step`` is not a metric and is not
        included; ``nonfinite`` becomes 1.0 / 0.0.
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
            out[metric_key(*parse_key(key))] = float(value)
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
                parts.append(f"{label}={fmt(value)}")
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
        """Value of a flat key (``family/metric`` or ``family_layers/metric/<layer>``) or ``None``.

        The raw ``family/metric/<layer>`` form of `extra` is accepted too.
        """
        return self.to_dict().get(metric_key(*parse_key(key)))
