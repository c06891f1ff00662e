"""Per-layer key policy: which per-layer keys a tracker sink sends.

A model with 200 layers and six per-layer quantities makes 1200 keys per record — more than a
tracker's UI handles well (MLflow takes at most 1000 metrics per request, W&B slows down past a few
thousand series). `LayerKeyPolicy` selects what is sent; the keys themselves still come only from
`StabilityMetrics.to_dict` / `metric_key` and are never rewritten.

Modes, applied per quantity (``grad_norm``, ``update_ratio``, ...) over the L layers that report it:

* ``"all"`` — every per-layer key.
* ``"top_k"`` — the ``k`` layers with the largest value, ``family_layers/metric/<layer>``.
* ``"quantiles"`` — summaries across layers instead of the layers: for each ``q`` in `quantiles`,
  ``family_layers/metric/layers:p<100q>`` holding the linear-interpolated quantile
  ``x_(i) + (h - i)(x_(i+1) - x_(i))`` with ``h = q (L - 1)`` over the sorted finite values
  (``layers:min`` for q = 0, ``layers:max`` for q = 1).
* ``"none"`` — no per-layer keys (global keys only).
* ``"auto"`` (default) — ``"all"`` for a quantity reported by at most `max_layers` layers, else
  ``"quantiles"`` plus ``"top_k"``. The choice depends only on the model, so it does not flip
  from step to step.

Whatever the mode, a layer whose value is NaN or ±inf is always sent under its own key: a
non-finite value is a finding, and the layer name is the point.

The summaries are keys of the per-layer scheme (`metric_key` with the "layer" ``layers:p50``), so they
keep the scheme prefix-free: ``grad_layers/norm/layers:p50`` sits beside ``grad_layers/norm/<layer>``,
never below the global ``grad/norm``.

Example:
    >>> from stabwatch.metrics import StabilityMetrics
    >>> rec = StabilityMetrics(step=0, grad_norm=3.0,
    ...                        layers={f"l{i}": {"grad_norm": float(i)} for i in range(5)})
    >>> sorted(LayerKeyPolicy("top_k", k=2).select(rec))
    ['grad/norm', 'grad_layers/norm/l3', 'grad_layers/norm/l4']
    >>> LayerKeyPolicy("quantiles", quantiles=(0.0, 0.5, 1.0)).select(rec)["grad_layers/norm/layers:p50"]
    2.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from stabwatch.errors import ConfigError
from stabwatch.metrics import FIELD_KEYS, StabilityMetrics, metric_key

__all__ = ["LayerKeyPolicy", "resolve_policy"]

Mode = Literal["auto", "all", "top_k", "quantiles", "none"]
_MODES = ("auto", "all", "top_k", "quantiles", "none")


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default ``method="linear"``) of sorted values."""
    h = q * (len(sorted_values) - 1)
    i = math.floor(h)
    if i + 1 >= len(sorted_values):
        return float(sorted_values[-1])
    return float(sorted_values[i] + (h - i) * (sorted_values[i + 1] - sorted_values[i]))


def _quantile_name(q: float) -> str:
    if q == 0.0:
        return "layers:min"
    if q == 1.0:
        return "layers:max"
    return f"layers:p{100 * q:g}"


class LayerKeyPolicy:
    """Select which per-layer keys of a record a sink sends.

    Args:
        mode: ``"auto"``, ``"all"``, ``"top_k"``, ``"quantiles"`` or ``"none"`` (see the module
            docstring).
        k: layers kept per quantity by ``"top_k"`` (and by ``"auto"`` above `max_layers`).
        quantiles: the quantiles in [0, 1] sent by ``"quantiles"``.
        max_layers: ``"auto"`` sends every layer of a quantity reported by at most this many layers.
    """

    def __init__(
        self,
        mode: Mode = "auto",
        *,
        k: int = 5,
        quantiles: Sequence[float] = (0.0, 0.5, 0.9, 1.0),
        max_layers: int = 64,
    ) -> None:
        if mode not in _MODES:
            raise ConfigError(f"LayerKeyPolicy mode={mode!r}: expected one of {', '.join(map(repr, _MODES))}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"LayerKeyPolicy k={k!r}: expected a positive int")
        try:
            qs = tuple(float(q) for q in quantiles)
        except (TypeError, ValueError):
            qs = ()
        if not qs or any(not 0.0 <= q <= 1.0 for q in qs):
            raise ConfigError(
                f"LayerKeyPolicy quantiles={quantiles!r}: expected a non-empty sequence of numbers in [0, 1]"
            )
        if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 0:
            raise ConfigError(f"LayerKeyPolicy max_layers={max_layers!r}: expected an int >= 0")
        self.mode: Mode = mode
        self.k = k
        self.quantiles = qs
        self.max_layers = max_layers

    def __repr__(self) -> str:
        return f"LayerKeyPolicy({self.mode!r}, k={self.k}, quantiles={self.quantiles}, max_layers={self.max_layers})"

    def select(self, record: StabilityMetrics) -> dict[str, float]:
        """The ``{key: value}`` a sink sends for `record`: global keys plus the selected layer keys."""
        flat = record.to_dict()
        if self.mode == "all" or not record.layers:
            return flat
        by_field: dict[str, list[tuple[str, float]]] = {}
        for layer, values in record.layers.items():
            for field, value in values.items():
                by_field.setdefault(field, []).append((layer, float(value)))
        for field, pairs in by_field.items():
            base = FIELD_KEYS.get(field, field)
            mode = self.mode
            if mode == "auto":
                if len(pairs) <= self.max_layers:
                    continue
                mode = "quantiles"
            keep: set[str] = {layer for layer, v in pairs if not math.isfinite(v)}
            finite = sorted(v for _, v in pairs if math.isfinite(v))
            if mode == "top_k" or (self.mode == "auto" and mode == "quantiles"):
                ranked = sorted((p for p in pairs if math.isfinite(p[1])), key=lambda p: p[1], reverse=True)
                keep.update(layer for layer, _ in ranked[: self.k])
            if mode == "quantiles" and finite:
                for q in self.quantiles:
                    flat[metric_key(base, _quantile_name(q))] = _quantile(finite, q)
            for layer, _ in pairs:
                if layer not in keep:
                    flat.pop(metric_key(base, layer), None)
        return flat


def resolve_policy(spec: LayerKeyPolicy | str | None) -> LayerKeyPolicy:
    """A `LayerKeyPolicy` from a policy, a mode name, or ``None`` (the default ``"auto"``).

    Raises:
        ConfigError: anything else (the message lists the mode names).
    """
    if spec is None:
        return LayerKeyPolicy()
    if isinstance(spec, LayerKeyPolicy):
        return spec
    if isinstance(spec, str) and spec in _MODES:
        return LayerKeyPolicy(spec)  # type: ignore[arg-type]
    modes = ", ".join(map(repr, _MODES))
    raise ConfigError(f"layer_keys={spec!r}: expected a LayerKeyPolicy or one of {modes}")
