"""Drop-in replacement for the hand-written SNN stability monitors many projects carry.

Such monitors share one shape: a ``StabilityMonitor`` with ``compute(model, lyapunov=None, spikes=None,
membrane=None, compute_sv=False)``, ``get_trends()`` and ``diagnose()``, plus module functions
``compute_spectral_radius(W)`` and ``analyze_weight_spectrum(model)``. Code written against them runs
with its import changed::

    from stabwatch.compat import StabilityMonitor, analyze_weight_spectrum, compute_spectral_radius

What is different inside:

* `compute` is a thin front-end over `stabwatch.pipeline.RecordPipeline`, the record path `stabwatch.Monitor`
  uses: its device tensors go into a `Readout`, reach the host in one copy, become a record, run
  through the alert rules and, with ``sinks=``, are written by the pipeline's background writers
  (a tracker that is down gets its records spilled to disk and retried);
* one host transfer per call (the hand-written versions call ``.item()`` per parameter and copy every
  gradient to the CPU for its SVD); gradient norms are one fused reduction, singular values are
  computed on the gradients' device, same-shape gradients as one batch (the math is
  `stabwatch.functional`'s, shared with the collectors);
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
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from stabwatch.collectors.base import Readout, weight_layer_name
from stabwatch.errors import ConfigError, StabwatchError
from stabwatch.functional.gradients import gradient_norm
from stabwatch.functional.spectral import (
    group_matrices,
    randomized_singular_values,
    spectral_radius,
    spectrum_summary,
)
from stabwatch.functional.spiking import (
    firing_rates,
    firing_statistics,
    layer_firing_statistics,
    membrane_moments,
    membrane_statistics,
    pooled_membrane_statistics,
    spike_counts,
)
from stabwatch.metrics import Alert, AlertReason, StabilityMetrics
from stabwatch.pipeline import RecordPipeline, sink_list

__all__ = ["StabilityMonitor", "analyze_weight_spectrum", "compute_spectral_radius"]

#: the layer name under which a single spike / membrane tensor is reported
NETWORK = "network"
#: matrices with more elements than this get a randomized top-k instead of an exact SVD (the
#: hand-written monitors switch to ``torch.svd_lowrank`` at the same size)
_EXACT_SVD_MAX_ELEMENTS = 1_000_000
_FIRING_FIELDS = ("firing_rate_mean", "firing_rate_std", "dead_neuron_frac", "saturated_neuron_frac")
_SPIKING_FIELDS = set(_FIRING_FIELDS)
_SV_FIELDS = ("grad_max_sv", "grad_min_sv", "grad_condition")


class _GradSV(NamedTuple):
    """Singular values of one 2-D gradient, on its device."""

    name: str  # the parameter's name
    top: torch.Tensor  # [k] leading singular values
    s_min: torch.Tensor  # 0-d smallest non-zero singular value (NaN when not exact)
    kappa: torch.Tensor  # 0-d condition number over the non-zero ones (NaN when not exact)
    exact: bool  # False: the top-k of a randomized SVD, no s_min / kappa


def _to_host(values: Sequence[torch.Tensor]) -> list[float]:
    """Scalars / vectors to the host, flat, in the pipeline's one copy per device (`Readout.sync`).

    For the methods that answer with plain numbers (`StabilityMonitor.compute_firing_stats` ...);
    `StabilityMonitor.compute` fills a `Readout` with named entries instead.
    """
    readout = Readout()
    for i, v in enumerate(values):
        readout.add_internal(str(i), v.reshape(-1))
    return readout.sync()


def _on(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A scalar (or a tensor's first element) as float64 on ``device``, without a device sync.

    A host number is written on the device by a fill kernel; a tensor on another accelerator stays
    where it is (the readout copies each device once).
    """
    if isinstance(value, torch.Tensor):
        t = value.detach().reshape(-1)[:1].to(torch.float64)
        if t.device == device or t.device.type != "cpu":
            return t
        value = float(t.item())  # a host tensor: reading it costs no device sync
    return torch.full((1,), float(value), dtype=torch.float64, device=device)


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

    Call `compute` after ``loss.backward()``; every call makes one `StabilityMetrics` record through a
    `stabwatch.pipeline.RecordPipeline`: the record is fed to stabwatch's alert rules, kept (the last
    ``history_size``) and, with ``sinks=``, written by the pipeline's background writers. Firing
    statistics follow `stabwatch.functional.spiking` (a neuron is dead below ``dead_threshold``,
    saturated above ``saturated_threshold``).

    Args:
        dead_threshold: firing rate below which a neuron is dead.
        saturated_threshold: firing rate above which a neuron is saturated.
        history_size: records (and history values) kept for trends.
        rules: alert rules (default: `stabwatch.alerts.default_rules` plus Lyapunov trend rules).
        log_alerts: log alerts as they fire (logger ``stabwatch.alerts``).
        sinks: where records also go: a sink or a list of sinks (`stabwatch.sinks`, e.g.
            ``JsonlSink("run.jsonl")`` or ``MlflowSink(...)``). Call `close` (or use ``with``) at the end.

    Attributes:
        lyap_history / grad_history / fr_history: the last ``history_size`` Lyapunov exponents, gradient
            norms and mean firing rates, as in the hand-written monitors.
        records: the last ``history_size`` records; alerts: every alert raised so far.

    Raises:
        StabwatchError: (a `stabwatch.errors.ConfigError`) a threshold, ``history_size`` or ``sinks``
            that is not valid.

    Example:
        >>> import torch
        >>> from stabwatch.compat import StabilityMonitor
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
        sinks: Any = None,
    ) -> None:
        for name, value in (("dead_threshold", dead_threshold), ("saturated_threshold", saturated_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"StabilityMonitor: {name} must be a number (a firing rate), got {value!r}")
        if not (0.0 <= dead_threshold < saturated_threshold):
            raise ConfigError(
                f"StabilityMonitor: need 0 <= dead_threshold < saturated_threshold, got "
                f"dead_threshold={dead_threshold}, saturated_threshold={saturated_threshold}"
            )
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
            raise ConfigError(f"StabilityMonitor: history_size must be a positive int, got {history_size!r}")
        from stabwatch.alerts import AlertEngine

        self.dead_threshold = float(dead_threshold)
        self.saturated_threshold = float(saturated_threshold)
        self.history_size = history_size
        self.engine = AlertEngine(_compat_rules() if rules is None else list(rules), log_alerts=log_alerts)
        self.sinks = sink_list(sinks, "StabilityMonitor")
        self.lyap_history: list[float] = []
        self.grad_history: list[float] = []
        self.fr_history: list[float] = []
        self.alerts: list[Alert] = []
        self._generator = torch.Generator().manual_seed(0)
        self._pipeline = RecordPipeline(sinks=self.sinks, engine=self.engine, max_records=history_size)
        self._pipeline.open(self._describe())

    @property
    def records(self) -> collections.deque[StabilityMetrics]:
        """The last ``history_size`` records `compute` made."""
        return self._pipeline.records

    def _describe(self) -> dict[str, str]:
        """The configuration tracker sinks log as parameters."""
        from stabwatch import __version__

        return {
            "version": __version__,
            "frontend": "stabwatch.compat.StabilityMonitor",
            "dead_threshold": str(self.dead_threshold),
            "saturated_threshold": str(self.saturated_threshold),
            "history_size": str(self.history_size),
            "rules": ",".join(rule.name for rule in self.engine),
        }

    # device-side pieces ---------------------------------------------------------------------------
    @staticmethod
    def _grad_norm(model: nn.Module) -> torch.Tensor:
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
        if grads:
            return gradient_norm(grads)[0]
        first = next(model.parameters(), None)
        return torch.zeros((), dtype=torch.float64, device=first.device if first is not None else "cpu")

    def _sv(self, model: nn.Module, top_k: int) -> list[_GradSV]:
        """Singular values of every 2-D gradient, in parameter order; same-shape gradients as one batch.

        Exact (`stabwatch.functional.spectrum_summary`) up to ``_EXACT_SVD_MAX_ELEMENTS`` elements, a
        randomized top-k above (`stabwatch.functional.randomized_singular_values`).
        """
        named = [
            (name, p.grad.detach())
            for name, p in model.named_parameters()
            if p.grad is not None and p.ndim == 2 and min(p.shape) > 0
        ]
        rows: dict[int, _GradSV] = {}
        small = [i for i, (_, g) in enumerate(named) if g.numel() <= _EXACT_SVD_MAX_ELEMENTS]
        with torch.no_grad():
            for idx, stack in group_matrices([named[i][1] for i in small]):
                top, s_min, _, kappa = spectrum_summary(stack, top_k)
                for j, i in enumerate(small[k] for k in idx):
                    rows[i] = _GradSV(named[i][0], top[j], s_min[j], kappa[j], True)
            for i, (name, g) in enumerate(named):
                if i not in rows:
                    top, _ = randomized_singular_values(g, top_k, generator=self._generator)
                    nan = torch.full((), float("nan"), dtype=top.dtype, device=top.device)
                    rows[i] = _GradSV(name, top, nan, nan, False)
        return [rows[i] for i in range(len(named))]

    @staticmethod
    def _aggregate_sv(rows: list[_GradSV]) -> torch.Tensor | None:
        """``[max sigma_1, min non-zero sigma, mean condition number]`` over layers (``None``: no layer)."""
        if not rows:
            return None
        dev = rows[0].top.device
        tops = torch.stack([r.top[0].to(dev, torch.float64) for r in rows])
        mins = torch.stack([r.s_min.to(dev, torch.float64) for r in rows])
        conds = torch.stack([r.kappa.to(dev, torch.float64) for r in rows])
        return torch.stack([tops.max(), mins.nan_to_num(nan=float("inf")).min(), conds.nanmean()])

    def _firing(self, spikes: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        counts, samples = [], []
        for t in spikes.values():
            c, n = spike_counts(*_spike_layout(t))
            counts.append(c)
            samples.append(n)
        return layer_firing_statistics(counts, samples, self.dead_threshold, self.saturated_threshold)

    @staticmethod
    def _membrane(membrane: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor ``[L, 3]`` and pooled ``[3]`` membrane statistics (`pooled_membrane_statistics`)."""
        device = next(iter(membrane.values())).device
        no_threshold = torch.full((1,), float("nan"), dtype=torch.float64, device=device)
        rows, counts = [], []
        for v in membrane.values():
            moments, _, n = membrane_moments(v)
            rows.append(torch.cat([moments.to(device, torch.float64), no_threshold]))
            counts.append(float(n))
        return pooled_membrane_statistics(torch.stack(rows), torch.tensor(counts, dtype=torch.float64, device=device))

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
        host = _to_host([torch.cat([r.top.reshape(-1), r.kappa.reshape(1).to(r.top.dtype)]) for r in rows])
        out: dict[str, tuple[np.ndarray, float]] = {}
        i = 0
        for r in rows:
            k = r.top.numel()
            out[r.name] = (np.asarray(host[i : i + k]), host[i + k])
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
            The `StabilityMetrics` record of this call (alerts it raised in ``record.alerts``); it is
            also queued to the ``sinks``.
        """
        spike_map = _named(spikes, "spikes") if spikes is not None else {}
        mem_map = _named(membrane, "membrane") if membrane is not None else {}
        readout = Readout()
        grad_norm = self._grad_norm(model)
        if lyapunov is not None:
            readout.add("lyapunov", _on(lyapunov, grad_norm.device))
        readout.add("grad_norm", grad_norm)
        if compute_sv:
            self._read_sv(readout, self._sv(model, 5))
        if spike_map:
            per, pooled = self._firing(spike_map)
            for j, field in enumerate(_FIRING_FIELDS):
                readout.add(field, pooled[j])
                readout.add_layers(field, list(spike_map), per[:, j])
        if mem_map:
            per, pooled = self._membrane(mem_map)
            for j, field in enumerate(("membrane_mean", "membrane_std")):
                readout.add(field, pooled[j])
                readout.add_layers(field, list(mem_map), per[:, j])
        pipe = self._pipeline
        record = pipe.publish(pipe.build(pipe.step, readout))
        pipe.step += 1
        self.alerts.extend(record.alerts)
        for history, value in (
            (self.lyap_history, record.lyapunov),
            (self.grad_history, record.grad_norm),
            (self.fr_history, record.firing_rate_mean),
        ):
            if value is not None:
                history.append(value)
                del history[: -self.history_size]
        return record

    def _read_sv(self, readout: Readout, rows: list[_GradSV]) -> None:
        """The aggregate into the record's fields (the mean condition number, as the hand-written monitors
        report it) and, per layer, sigma_1 and, for exact spectra, the smallest non-zero value and the
        condition number."""
        stats = self._aggregate_sv(rows)
        if stats is None:
            return
        for j, field in enumerate(_SV_FIELDS):
            readout.add(field, stats[j])
        dev = stats.device
        readout.add_layers(
            "grad_max_sv", [weight_layer_name(r.name) for r in rows], torch.stack([r.top[0].to(dev) for r in rows])
        )
        exact = [r for r in rows if r.exact]
        if exact:
            layers = [weight_layer_name(r.name) for r in exact]
            readout.add_layers("grad_min_sv", layers, torch.stack([r.s_min.to(dev) for r in exact]))
            readout.add_layers("grad_condition", layers, torch.stack([r.kappa.to(dev) for r in exact]))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record reached the sinks; ``False`` if one is still failing (its records are
        spilled to disk and retried)."""
        return self._pipeline.flush(timeout)

    def close(self) -> None:
        """Drain and close the sinks (what a failing one could not take stays in a spill file). Idempotent."""
        self._pipeline.close()

    def __enter__(self) -> StabilityMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
