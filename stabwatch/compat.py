"""Drop-in replacement for the hand-written SNN stability monitors many projects carry.

Such monitors share one shape: a ``StabilityMonitor`` with ``compute(model, lyapunov=None, spikes=None,
membrane=None, compute_sv=False)``, ``get_trends()`` and ``diagnose()``, plus module functions
``compute_spectral_radius(W)`` and ``analyze_weight_spectrum(model)``. Code written against them runs
with its import changed::

    from stabwatch import StabilityMonitor
    from stabwatch.compat import analyze_weight_spectrum, compute_spectral_radius

What is different inside:

* one host transfer per call (the hand-written versions call ``.item()`` per parameter and copy every
  gradient to the CPU for its SVD); gradient norms are one fused reduction, singular values are
  computed on the gradients' device;
* `compute` returns a `stabwatch.StabilityMetrics` (same attribute names; ``to_dict()`` keys are
  stabwatch's ``family/metric`` keys, ``record.model_dump(exclude_none=True)`` gives field names);
* the smallest singular value of a gradient is the smallest *non-zero* one (above the
  ``sigma_1 * max(m, n) * eps`` rank tolerance) and the condition number is taken over those: a batch of
  ``B`` samples gives a rank-``B`` gradient whose other singular values are round-off, and
  ``s_max / (s_min + 1e-12)`` of round-off is noise of order 1e5-1e12;
* `get_trends` and `diagnose` answer from stabwatch's alert rules (`stabwatch.alerts.default_rules`
  plus two Lyapunov trend rules), fed every record `compute` makes; the spike statistics of one tensor
  are reported as the layer ``"network"`` so the per-layer spiking rules apply.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from stabwatch.errors import StabwatchError
from stabwatch.functional.gradients import gradient_norm
from stabwatch.functional.spectral import (
    condition_number,
    randomized_singular_values,
    singular_values,
    spectral_radius,
)
from stabwatch.functional.spiking import (
    firing_rates,
    firing_statistics,
    layer_firing_statistics,
    layer_membrane_statistics,
    membrane_moments,
    membrane_statistics,
    spike_counts,
)
from stabwatch.metrics import Alert, AlertReason, StabilityMetrics

__all__ = ["StabilityMonitor", "analyze_weight_spectrum", "compute_spectral_radius"]

#: the layer name under which a single spike / membrane tensor is reported
NETWORK = "network"
#: matrices with more elements than this get a randomized top-k instead of an exact SVD (the
#: hand-written monitors switch to ``torch.svd_lowrank`` at the same size)
_EXACT_SVD_MAX_ELEMENTS = 1_000_000
_SPIKING_FIELDS = {"firing_rate_mean", "firing_rate_std", "dead_neuron_frac", "saturated_neuron_frac"}


def _to_host(values: Sequence[torch.Tensor]) -> list[float]:
    """Move scalars / vectors to the host in one copy (per device) and return them flat."""
    if not values:
        return []
    flat = [v.detach().reshape(-1).to(torch.float64) for v in values]
    devices = {v.device for v in flat}
    if len(devices) > 1:
        flat = [v.cpu() for v in flat]
    return torch.cat(flat).cpu().tolist()


def _spike_layout(spikes: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """The hand-written monitors' spike layouts as (tensor, time_dim) for `spike_counts`.

    ``[B, T, H]`` (3-D, and ``[B, T, *features]`` for more dims) averages over batch and time; ``[T, H]``
    (2-D) over its first dim; a 1-D tensor is one rate per neuron.
    """
    if spikes.ndim == 0:
        raise StabwatchError("StabilityMonitor: spikes must have at least one dim, got a 0-d tensor")
    if spikes.ndim == 1:
        return spikes.unsqueeze(0), None
    if spikes.ndim == 2:
        return spikes, None
    return spikes, 1


def _named(value: torch.Tensor | Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {NETWORK: value}
    if isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    raise StabwatchError(
        f"StabilityMonitor.compute: {what} must be a tensor or a non-empty {{layer: tensor}} dict, "
        f"got {type(value).__name__}"
    )


def _compat_rules() -> list[Any]:
    from stabwatch.alerts import TrendRule, default_rules

    trend = {"window": 20, "min_change": 0.1, "min_t": 3.0, "log": False, "severity": "info"}
    return [
        *default_rules(),
        TrendRule(
            "lyapunov",
            direction="rising",
            name="lyapunov_rising",
            **trend,  # type: ignore[arg-type]
            suggestion="the Lyapunov exponent is rising: lower the learning rate or strengthen the "
            "Lyapunov regulariser",
        ),
        TrendRule(
            "lyapunov",
            direction="falling",
            name="lyapunov_falling",
            **trend,  # type: ignore[arg-type]
            suggestion="the Lyapunov exponent is falling: training is stabilising",
        ),
    ]


class StabilityMonitor:
    """Stability metrics of an SNN per training step, with the API of the common hand-written monitors.

    Call `compute` after ``loss.backward()``; every call makes one `StabilityMetrics` record, feeds it
    to stabwatch's alert rules and keeps it (the last ``history_size``). Firing statistics follow
    `stabwatch.functional.spiking` (a neuron is dead below ``dead_threshold``, saturated above
    ``saturated_threshold``).

    Args:
        dead_threshold: firing rate below which a neuron is dead.
        saturated_threshold: firing rate above which a neuron is saturated.
        history_size: records (and history values) kept for trends.
        rules: alert rules (default: `stabwatch.alerts.default_rules` plus Lyapunov trend rules).
        log_alerts: log alerts as they fire (logger ``stabwatch.alerts``).

    Attributes:
        lyap_history / grad_history / fr_history: the last ``history_size`` Lyapunov exponents, gradient
            norms and mean firing rates, as in the hand-written monitors.
        records: the last ``history_size`` records; alerts: every alert raised so far.

    Example:
        >>> import torch
        >>> from stabwatch import StabilityMonitor
        >>> model = torch.nn.Linear(3, 2); model(torch.ones(4, 3)).sum().backward()
        >>> mon = StabilityMonitor()
        >>> m = mon.compute(model, spikes=torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        >>> m.firing_rate_mean, m.dead_neuron_frac, m.saturated_neuron_frac
        (0.5, 0.5, 0.5)
        >>> round(m.grad_norm ** 2, 3)  # 6 weight and 2 bias gradients of 4 each
        128.0
    """

    def __init__(
        self,
        dead_threshold: float = 0.01,
        saturated_threshold: float = 0.9,
        history_size: int = 100,
        *,
        rules: Sequence[Any] | None = None,
        log_alerts: bool = False,
    ) -> None:
        if not (0.0 <= dead_threshold < saturated_threshold):
            raise StabwatchError(
                f"StabilityMonitor: need 0 <= dead_threshold < saturated_threshold, got "
                f"dead_threshold={dead_threshold}, saturated_threshold={saturated_threshold}"
            )
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
            raise StabwatchError(f"StabilityMonitor: history_size must be a positive int, got {history_size!r}")
        from stabwatch.alerts import AlertEngine

        self.dead_threshold = float(dead_threshold)
        self.saturated_threshold = float(saturated_threshold)
        self.history_size = history_size
        self.engine = AlertEngine(_compat_rules() if rules is None else list(rules), log_alerts=log_alerts)
        self.lyap_history: list[float] = []
        self.grad_history: list[float] = []
        self.fr_history: list[float] = []
        self.records: collections.deque[StabilityMetrics] = collections.deque(maxlen=history_size)
        self.alerts: list[Alert] = []
        self._step = 0
        self._generator = torch.Generator().manual_seed(0)

    # device-side pieces ---------------------------------------------------------------------------
    @staticmethod
    def _grad_norm(model: nn.Module) -> torch.Tensor:
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
        return gradient_norm(grads)[0] if grads else torch.zeros((), dtype=torch.float64)

    def _sv(self, model: nn.Module, top_k: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``[(name, top-k values, s_min, condition)]`` for every 2-D gradient, on its device."""
        out = []
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.grad is None or p.ndim != 2 or min(p.shape) == 0:
                    continue
                g = p.grad.detach()
                if g.numel() > _EXACT_SVD_MAX_ELEMENTS:
                    top, _ = randomized_singular_values(g, top_k, generator=self._generator)
                    nan = torch.full((), float("nan"), dtype=top.dtype, device=top.device)
                    out.append((name, top, nan, nan))
                    continue
                s = singular_values(g)
                s_min, _, kappa = condition_number(s, (g.shape[0], g.shape[1]))
                out.append((name, s[:top_k], s_min, kappa))
        return out

    def _firing(self, spikes: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        counts, samples = [], []
        for t in spikes.values():
            c, n = spike_counts(*_spike_layout(t))
            counts.append(c)
            samples.append(n)
        return layer_firing_statistics(counts, samples, self.dead_threshold, self.saturated_threshold)

    @staticmethod
    def _membrane(membrane: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor ``[L, 3]`` and pooled ``[3]`` membrane statistics (`layer_membrane_statistics`)."""
        rows, counts = [], []
        device = next(iter(membrane.values())).device
        for v in membrane.values():
            moments, _, n = membrane_moments(v)
            rows.append(
                torch.cat([moments.to(device, torch.float64), torch.zeros(1, dtype=torch.float64, device=device)])
            )
            counts.append(float(n))
        table = torch.stack(rows)
        n_t = torch.tensor(counts, dtype=torch.float64, device=device)
        return layer_membrane_statistics(table, n_t), layer_membrane_statistics(table.sum(0), n_t.sum())

    # the hand-written monitors' methods -----------------------------------------------------------
    def compute_gradient_norm(self, model: nn.Module) -> float:
        """Global L2 norm of all gradients, ``sqrt(sum_p ||g_p||^2)`` (0.0 without gradients)."""
        return _to_host([self._grad_norm(model)])[0]

    def compute_gradient_singular_values(self, model: nn.Module, top_k: int = 5) -> dict[str, tuple[np.ndarray, float]]:
        """Singular values of every 2-D weight gradient.

        Returns:
            ``{parameter name: (top_k largest singular values, condition number)}``; the condition
            number is ``s_max / s_min`` over the non-zero singular values (NaN for matrices above 1e6
            elements, whose top-k come from a randomized SVD).
        """
        rows = self._sv(model, top_k)
        host = _to_host([torch.cat([top.reshape(-1), kappa.reshape(1).to(top.dtype)]) for _, top, _, kappa in rows])
        out: dict[str, tuple[np.ndarray, float]] = {}
        i = 0
        for name, top, _, _ in rows:
            k = top.numel()
            out[name] = (np.asarray(host[i : i + k]), host[i + k])
            i += k + 1
        return out

    def get_aggregate_gradient_sv(self, model: nn.Module) -> tuple[float, float, float]:
        """``(max singular value, min non-zero singular value, mean condition number)`` over layers.

        ``(0.0, 0.0, 1.0)`` when no 2-D parameter has a gradient.
        """
        stats = self._aggregate_sv(self._sv(model, 5))
        if stats is None:
            return 0.0, 0.0, 1.0
        a, b, c = _to_host([stats])
        return a, b, c

    @staticmethod
    def _aggregate_sv(rows: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        if not rows:
            return None
        dev = rows[0][1].device
        tops = torch.stack([r[1][0].to(dev, torch.float64) for r in rows])
        mins = torch.stack([r[2].to(dev, torch.float64) for r in rows])
        conds = torch.stack([r[3].to(dev, torch.float64) for r in rows])
        return torch.stack([tops.max(), mins.nan_to_num(nan=float("inf")).min(), conds.nanmean()])

    def compute_firing_stats(self, spikes: torch.Tensor) -> tuple[float, float, float, float]:
        """``(mean rate, std over neurons, dead fraction, saturated fraction)`` of one spike tensor.

        Args:
            spikes: ``[B, T, H]`` (more dims: ``[B, T, *features]``), ``[T, H]`` or ``[H]`` (rates);
                values 0/1 (graded spikes count by value).
        """
        rates = firing_rates(*_spike_layout(spikes))
        a, b, c, d = _to_host([firing_statistics(rates, self.dead_threshold, self.saturated_threshold)])
        return a, b, c, d

    def compute_membrane_stats(self, membrane: torch.Tensor) -> tuple[float, float]:
        """``(mean, std)`` of a membrane-potential tensor over all its elements."""
        a, b = _to_host([membrane_statistics(membrane)[:2]])
        return a, b

    def compute(
        self,
        model: nn.Module,
        lyapunov: torch.Tensor | float | None = None,
        spikes: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        membrane: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        compute_sv: bool = False,
    ) -> StabilityMetrics:
        """Compute every available stability metric, in one device-to-host copy, and run the alert rules.

        Args:
            model: the SNN (for gradient norms / singular values; call after ``backward()``).
            lyapunov: a Lyapunov-exponent estimate from the forward pass.
            spikes: recorded spikes (layouts in `compute_firing_stats`), or ``{layer: spikes}``.
            membrane: recorded membrane potentials, or ``{layer: membrane}``.
            compute_sv: also compute gradient singular values (the expensive part).

        Returns:
            The `StabilityMetrics` record of this call (alerts it raised in ``record.alerts``).
        """
        pieces: list[torch.Tensor] = []
        if lyapunov is not None:
            pieces.append(torch.as_tensor(lyapunov, dtype=torch.float64).reshape(-1)[:1])
        pieces.append(self._grad_norm(model).reshape(1))
        sv_rows = self._sv(model, 5) if compute_sv else []
        sv_agg = self._aggregate_sv(sv_rows)
        if sv_agg is not None:
            pieces.append(sv_agg)
            for _, top, s_min, kappa in sv_rows:
                pieces.append(torch.stack([top[0].double(), s_min.double(), kappa.double()]))
        spike_map = _named(spikes, "spikes") if spikes is not None else {}
        if spike_map:
            per, pooled = self._firing(spike_map)
            pieces += [pooled, per.reshape(-1)]
        mem_map = _named(membrane, "membrane") if membrane is not None else {}
        if mem_map:
            mem_stats, mem_pooled = self._membrane(mem_map)
            pieces += [mem_pooled[:2], mem_stats[:, :2].reshape(-1)]
        values = iter(_to_host(pieces))

        fields: dict[str, Any] = {}
        layers: dict[str, dict[str, float]] = {}
        if lyapunov is not None:
            fields["lyapunov"] = next(values)
        fields["grad_norm"] = next(values)
        if sv_agg is not None:
            fields["grad_max_sv"], fields["grad_min_sv"], fields["grad_condition"] = (next(values) for _ in range(3))
            for name, *_ in sv_rows:
                layer = name[: -len(".weight")] if name.endswith(".weight") else name
                vals = dict(zip(("grad_max_sv", "grad_min_sv", "grad_condition"), (next(values) for _ in range(3))))
                layers.setdefault(layer, {}).update({k: v for k, v in vals.items() if v == v})  # drop NaN
        firing = ("firing_rate_mean", "firing_rate_std", "dead_neuron_frac", "saturated_neuron_frac")
        if spike_map:
            fields.update(zip(firing, (next(values) for _ in range(4))))
            for name in spike_map:
                layers.setdefault(name, {}).update(zip(firing, (next(values) for _ in range(4))))
        if mem_map:
            fields["membrane_mean"], fields["membrane_std"] = next(values), next(values)
            for name in mem_map:
                layers.setdefault(name, {}).update(membrane_mean=next(values), membrane_std=next(values))
        record = StabilityMetrics(step=self._step, layers=layers, **fields)
        self._step += 1

        fired = self.engine.evaluate(record)
        record.alerts.extend(fired)
        self.alerts.extend(fired)
        self.records.append(record)
        for history, value in (
            (self.lyap_history, record.lyapunov),
            (self.grad_history, record.grad_norm),
            (self.fr_history, record.firing_rate_mean),
        ):
            if value is not None:
                history.append(value)
                del history[: -self.history_size]
        return record

    # answers from the rule engine -----------------------------------------------------------------
    def _active(self) -> list[tuple[str | None, AlertReason, str]]:
        """``(bound field, reason, rule name)`` of every rule with a stream in an alert episode now."""
        out = []
        for rule in self.engine:
            if rule.active_layers():
                field = getattr(getattr(rule, "binding", None), "field", None)
                out.append((field, rule.reason, rule.name))
        return out

    def get_trends(self) -> dict[str, str]:
        """Trend of each watched quantity, from the alert rules' current episodes.

        Keys and words follow the hand-written monitors (a key appears once it has 10 values):

        * ``"lyapunov"``: ``"⚠️ INCREASING (becoming unstable)"`` (a significant rising trend),
          ``"✓ DECREASING (stabilizing)"``, ``"⚠️ CHAOTIC (positive for several records)"`` or
          ``"→ STABLE"``;
        * ``"gradients"``: ``"⚠️ EXPLODING"``, ``"⚠️ VANISHING"`` or ``"✓ STABLE"``;
        * ``"firing"``: ``"⚠️ DEAD NETWORK"`` (a dead or silent spiking layer), ``"⚠️ SATURATED"`` or
          ``"✓ HEALTHY"``.
        """
        active = self._active()

        def has(fields: set[str], *reasons: AlertReason, names: tuple[str, ...] = ()) -> bool:
            return any(f in fields and (r in reasons or n in names) for f, r, n in active if f is not None)

        trends: dict[str, str] = {}
        if len(self.lyap_history) >= 10:
            lyap = {"lyapunov"}
            if has(lyap, names=("lyapunov_rising",)):
                trends["lyapunov"] = "⚠️ INCREASING (becoming unstable)"
            elif has(lyap, AlertReason.CHAOTIC_TRAINING):
                trends["lyapunov"] = "⚠️ CHAOTIC (positive for several records)"
            elif has(lyap, names=("lyapunov_falling",)):
                trends["lyapunov"] = "✓ DECREASING (stabilizing)"
            else:
                trends["lyapunov"] = "→ STABLE"
        if len(self.grad_history) >= 10:
            grads = {"grad_norm"}
            if has(grads, AlertReason.EXPLODING_GRADIENT):
                trends["gradients"] = "⚠️ EXPLODING"
            elif has(grads, AlertReason.VANISHING_GRADIENT, AlertReason.SILENT_LAYER):
                trends["gradients"] = "⚠️ VANISHING"
            else:
                trends["gradients"] = "✓ STABLE"
        if len(self.fr_history) >= 10:
            if has(_SPIKING_FIELDS, AlertReason.DEAD_NEURONS, AlertReason.SILENT_LAYER):
                trends["firing"] = "⚠️ DEAD NETWORK"
            elif has(_SPIKING_FIELDS, AlertReason.SATURATED_NEURONS):
                trends["firing"] = "⚠️ SATURATED"
            else:
                trends["firing"] = "✓ HEALTHY"
        return trends

    def diagnose(self) -> str:
        """A readable summary: stabwatch's diagnosis of the kept records and the alerts raised."""
        from stabwatch.diagnosis import diagnose

        lines = ["=== Stability Diagnosis ==="]
        lines += [f"{key}: {value}" for key, value in self.get_trends().items()]
        lines.append(diagnose(list(self.records), list(self.alerts)))
        return "\n".join(lines)


def compute_spectral_radius(weight_matrix: torch.Tensor) -> float:
    """Spectral radius ``max |eigenvalue|`` of a square matrix, in float64 on its device.

    Raises:
        StabwatchError: the matrix is not square.

    Example:
        >>> round(compute_spectral_radius(torch.tensor([[0.0, -2.0], [2.0, 0.0]])), 12)  # eigenvalues ±2i
        2.0
    """
    w = weight_matrix.detach()
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise StabwatchError(f"compute_spectral_radius: needs a square 2-D matrix, got shape {tuple(w.shape)}")
    return _to_host([spectral_radius(w.double())])[0]


def analyze_weight_spectrum(model: nn.Module) -> dict[str, float]:
    """Spectral radius of every square 2-D weight (parameters with ``weight`` in their name).

    All radii are computed in float64 on the weights' device and copied to the host once.

    Returns:
        ``{parameter name: spectral radius}``.
    """
    names, radii = [], []
    for name, p in model.named_parameters():
        if "weight" in name and p.ndim == 2 and p.shape[0] == p.shape[1] and p.shape[0] > 0:
            names.append(name)
            radii.append(spectral_radius(p.detach().double()))
    return dict(zip(names, _to_host(radii)))
