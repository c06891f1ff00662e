"""Drop-in replacement for the hand-written SNN stability monitors many projects carry.

Such monitors share one shape: a ``StabilityMonitor`` with ``compute(model, lyapunov=None, spikes=None,
membrane=None, compute_sv=False)`` returning a ``StabilityMetrics`` dataclass, ``get_trends()`` and
``diagnose()``, plus module functions ``compute_spectral_radius(W)`` and ``analyze_weight_spectrum(model)``.
Code written against them runs with its import changed::

    from stabwatch.compat import StabilityMetrics, StabilityMonitor, analyze_weight_spectrum, compute_spectral_radius

What stays: `compute` returns a `StabilityMetrics` dataclass with the same fields, defaults, ``to_dict()``
and ``str()``; the spike statistics are computed with the same float32 operations, so a neuron exactly at
a threshold is classified the same way; `get_trends` is the same 10-record comparison with the same
words, and `diagnose` prints the same lines (Lyapunov regime, gradient norm, firing rate).

What is added inside:

* `compute` is a thin front-end over `stabwatch.pipeline.RecordPipeline`, the record path `stabwatch.Monitor`
  uses: its device tensors reach the host in one copy (one ``cat``, then ``tolist``), become a
  `stabwatch.StabilityMetrics` record (``metrics.record``), run through stabwatch's alert rules and, with
  ``sinks=``, are written by the pipeline's background writers (a tracker that is down gets its records
  spilled to disk and retried);
* the Lyapunov exponent passed to `compute` is the caller's own estimate, so it is filed under its own key
  ``compat/lyapunov`` (``record.extra["compat/lyapunov"]``), never under ``shadow/lyapunov`` (the exponent
  of training measured by `stabwatch.Shadow`);
* one host transfer per call (the hand-written versions call ``.item()`` per parameter and copy every
  gradient to the CPU for its SVD): the per-parameter gradient norms (one ``torch._foreach_norm``) come
  over in that copy and are combined on the host as the hand-written versions combine them, so
  ``grad_norm`` is the same float; singular values are computed on the gradients' device, same-shape
  gradients as one batch (the math is `stabwatch.functional`'s, shared with the collectors); on the
  CPU, where reading a value costs no sync, values are read where they are and the statistics that need
  no kernel are taken on the host (dead / saturated counts, the std of a few firing rates, the condition
  number of a spectrum), with the same float32 / float64 operations, so the numbers are the same bits;
* the smallest singular value of a gradient is the smallest *non-zero* one (above the
  ``sigma_1 * max(m, n) * eps`` rank tolerance) and the condition number is taken over those: a batch of
  ``B`` samples gives a rank-``B`` gradient whose other singular values are round-off, and
  ``s_max / (s_min + 1e-12)`` of round-off is noise of order 1e5-1e12;
* `diagnose` adds, below the reference's lines, stabwatch's likely causes of the alerts raised over the
  kept records, with what to try.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from stabwatch.collectors.base import Readout, weight_layer_name
from stabwatch.errors import ConfigError, StabwatchError
from stabwatch.functional.spectral import (
    group_matrices,
    randomized_singular_values,
    spectral_radius,
    spectrum_summary,
    spectrum_summary_rows,
)
from stabwatch.metrics import Alert, AlertReason
from stabwatch.metrics import StabilityMetrics as Record
from stabwatch.numeric import round32
from stabwatch.pipeline import RecordPipeline, sink_list

__all__ = ["LYAPUNOV_KEY", "StabilityMetrics", "StabilityMonitor", "analyze_weight_spectrum", "compute_spectral_radius"]

#: the layer name under which a single spike / membrane tensor is reported
NETWORK = "network"
#: the key (``record.extra``, ``to_dict()``, sinks) of the Lyapunov exponent passed to `StabilityMonitor.compute`
LYAPUNOV_KEY = "compat/lyapunov"
#: matrices with more elements than this get a randomized top-k instead of an exact SVD (the
#: hand-written monitors switch to ``torch.svd_lowrank`` at the same size)
_EXACT_SVD_MAX_ELEMENTS = 1_000_000
_FIRING_FIELDS = ("firing_rate_mean", "firing_rate_std", "dead_neuron_frac", "saturated_neuron_frac")
_MEMBRANE_FIELDS = ("membrane_mean", "membrane_std")
_SV_FIELDS = ("grad_max_sv", "grad_min_sv", "grad_condition")
#: the fields of `StabilityMetrics` that are fields of the stabwatch record too, in the dataclass's order
_RECORD_FIELDS = ("grad_norm", *_SV_FIELDS, *_FIRING_FIELDS, *_MEMBRANE_FIELDS)
#: `StabilityMonitor.compute`'s ``(field, layer)`` entries of the pooled (layer ``None``) and the single-tensor
#: (layer `NETWORK`) firing and membrane values, made once
_ENTRIES = {
    (fields, layer): [(name, layer) for name in fields]
    for fields in (_FIRING_FIELDS, _MEMBRANE_FIELDS)
    for layer in (None, NETWORK)
}
#: the default rules that watch what `StabilityMonitor.compute` records (the others would never be fed)
_RULES = (
    "non_finite",
    "grad_explode",
    "grad_rising",
    "grad_vanish",
    "grad_tiny",
    "spiking_dead",
    "spiking_saturated",
    "silent_layer",
    "spiking_rate_falling",
    "spiking_rate_high",
    "membrane_above_threshold",
)


@dataclasses.dataclass
class StabilityMetrics:
    """What `StabilityMonitor.compute` returns: the hand-written monitors' record, field for field.

    Every field is ``None`` unless computed; ``to_dict()`` gives the computed ones by field name and
    ``str()`` the one-line summary (``λ``, ``∇``, firing rate ± std, dead and saturated fractions in %).
    The stabwatch record of the same call (alerts, per-layer values, flat keys for sinks) is `record`.

    Example:
        >>> m = StabilityMetrics(grad_norm=0.5, firing_rate_mean=0.2, firing_rate_std=0.05, dead_neuron_frac=0.125)
        >>> print(m)
        ∇=0.5000 | fr=0.200±0.050 | dead=12.5%
        >>> m.to_dict()
        {'grad_norm': 0.5, 'firing_rate_mean': 0.2, 'firing_rate_std': 0.05, 'dead_neuron_frac': 0.125}
        >>> StabilityMetrics().to_dict(), m.record is None
        ({}, True)
    """

    lyapunov: float | None = None
    grad_norm: float | None = None
    grad_max_sv: float | None = None
    grad_min_sv: float | None = None
    grad_condition: float | None = None
    firing_rate_mean: float | None = None
    firing_rate_std: float | None = None
    dead_neuron_frac: float | None = None
    saturated_neuron_frac: float | None = None
    membrane_mean: float | None = None
    membrane_std: float | None = None

    @property
    def record(self) -> Record | None:
        """The `stabwatch.StabilityMetrics` record of the `compute` call that made this (``None`` when built
        by hand): ``step``, ``alerts``, per-layer values in ``layers``, the flat keys of ``to_dict()``."""
        return self.__dict__.get("_record")

    def to_dict(self) -> dict[str, float]:
        """``{field name: value}`` of the computed fields (``None`` ones left out)."""
        out: dict[str, float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    def __str__(self) -> str:
        parts = []
        if self.lyapunov is not None:
            parts.append(f"λ={self.lyapunov:.4f}")
        if self.grad_norm is not None:
            parts.append(f"∇={self.grad_norm:.4f}")
        if self.firing_rate_mean is not None:
            parts.append(f"fr={self.firing_rate_mean:.3f}±{self.firing_rate_std:.3f}")
        if self.dead_neuron_frac is not None:
            parts.append(f"dead={self.dead_neuron_frac:.1%}")
        if self.saturated_neuron_frac is not None:
            parts.append(f"sat={self.saturated_neuron_frac:.1%}")
        return " | ".join(parts)


class _SVGroup(NamedTuple):
    """Singular values of a group of same-shape 2-D gradients, on their device."""

    positions: list[int]  # the gradients' positions among the 2-D gradients, in parameter order
    names: list[str]  # the parameters' names
    top: torch.Tensor  # [b, k] leading singular values
    s_min: torch.Tensor | None  # [b] smallest non-zero singular value (None: a randomized top-k, not exact)
    kappa: torch.Tensor | None  # [b] condition number over the non-zero ones (None when not exact)


#: one 2-D gradient's spectrum on the host: (parameter name, top-k values, s_min, kappa); None when not exact
_SVRow = tuple[str, list[float], float | None, float | None]


def _sv_chunks(groups: Sequence[_SVGroup]) -> list[torch.Tensor]:
    """The groups' values as 1-D tensors for the one host copy; `_sv_rows` reads them back."""
    chunks: list[torch.Tensor] = []
    for g in groups:
        chunks.append(g.top.reshape(-1))
        if g.s_min is not None and g.kappa is not None:
            chunks += [g.s_min, g.kappa]
    return chunks


def _sv_rows(groups: Sequence[_SVGroup], host: Sequence[float]) -> list[_SVRow]:
    """The host values of `_sv_chunks` as one row per gradient, in parameter order."""
    rows: dict[int, _SVRow] = {}
    pos = 0
    for g in groups:
        b, k = g.top.shape
        tops = host[pos : pos + b * k]
        pos += b * k
        mins: Sequence[float | None] = [None] * b
        kappas: Sequence[float | None] = mins
        if g.s_min is not None:
            mins, kappas = host[pos : pos + b], host[pos + b : pos + 2 * b]
            pos += 2 * b
        for j, i in enumerate(g.positions):
            rows[i] = (g.names[j], list(tops[j * k : (j + 1) * k]), mins[j], kappas[j])
    return [rows[i] for i in sorted(rows)]


def _aggregate_sv(rows: Sequence[_SVRow]) -> tuple[float, float, float] | None:
    """``(max sigma_1, min non-zero sigma, mean condition number)`` over layers; randomized spectra (no
    s_min, kappa) and NaN ones (non-finite gradients) left out of the last two; ``None``: no layer."""
    if not rows:
        return None
    mins = [r[2] for r in rows if r[2] is not None and not math.isnan(r[2])]
    kappas = [r[3] for r in rows if r[3] is not None and not math.isnan(r[3])]
    return (
        max(r[1][0] for r in rows),
        min(mins) if mins else float("inf"),
        sum(kappas) / len(kappas) if kappas else float("nan"),
    )


def _total_norm(norms: Sequence[float]) -> float:
    """``sqrt(sum_p ||g_p||^2)`` of per-parameter norms, summed in order in Python floats (float64) as the
    hand-written monitors do (0.0 without norms)."""
    total = 0.0
    for n in norms:
        total += n**2
    return float(total**0.5)


def _host_scalar(value: torch.Tensor | float) -> torch.Tensor | float:
    """A scalar (or a tensor's first element) as a host float, or as a 1-element tensor on its
    accelerator (read in the call's one copy, without a device sync of its own)."""
    if isinstance(value, torch.Tensor):
        if value.is_cpu and value.ndim == 0:
            return float(value.item())
        t = value.detach().reshape(-1)[:1]
        if t.numel() == 0:
            raise StabwatchError("StabilityMonitor.compute: lyapunov is an empty tensor")
        return t if t.device.type != "cpu" else float(t[0])
    return float(value)


def _one_copy(chunks: Sequence[torch.Tensor]) -> list[float]:
    """1-D tensors to the host as floats: one ``cat`` (dtypes promoted, exactly) and one copy of the
    first tensor's device (others are moved there first)."""
    device = chunks[0].device
    if any(c.device != device for c in chunks):
        chunks = [c.to(device) for c in chunks]
    flat = torch.cat(list(chunks))
    return (flat if flat.device.type == "cpu" else flat.cpu()).tolist()


#: a part of `StabilityMonitor.compute`'s values: host floats already, or a 1-D tensor for the one copy
_Part = torch.Tensor | list[float]


def _gather(parts: Sequence[_Part]) -> list[float]:
    """The parts' values on the host, flat and in order: lists as they are, CPU tensors read in place
    (no copy to make), accelerator tensors in one copy (`_one_copy`: one ``cat``, one ``tolist``)."""
    device = [p for p in parts if isinstance(p, torch.Tensor) and not p.is_cpu]
    copied = iter(_one_copy(device)) if device else iter(())
    out: list[float] = []
    for p in parts:
        if not isinstance(p, torch.Tensor):
            out += p
        elif p.is_cpu:
            out += p.tolist()
        else:
            out += itertools.islice(copied, p.numel())
    return out


def _to_host(values: Sequence[torch.Tensor]) -> list[float]:
    """Scalars / vectors to the host, flat, in the pipeline's one copy per device (`Readout.sync`).

    For the methods that answer with plain numbers (`StabilityMonitor.compute_firing_stats` ...);
    `StabilityMonitor.compute` uses `_one_copy` on its own chunks instead.
    """
    readout = Readout()
    for i, v in enumerate(values):
        readout.add_internal(str(i), v.reshape(-1))
    return readout.sync()


def _neuron_rates(spikes: torch.Tensor) -> torch.Tensor:
    """Firing rate of every neuron, float32, with the hand-written monitors' operations and order.

    ``[B, T, H]``: mean over time, then over the batch; ``[T, H]``: mean over time; ``[H]``: the rates
    themselves; more dims are ``[B, T, *features]`` (each feature position a neuron). The same float32
    operations as the reference make the same roundings, so a rate at a threshold compares the same way.
    """
    if spikes.ndim == 0:
        raise StabwatchError("StabilityMonitor: spikes must have at least one dim, got a 0-d tensor")
    s = spikes.detach()
    if s.dtype != torch.float32:
        s = s.float()
    if s.ndim == 1:
        return s
    if s.ndim == 2:
        return s.mean(dim=0)
    rates = s.mean(dim=1).mean(dim=0)
    return rates.reshape(-1) if rates.ndim > 1 else rates


def _firing_vector(rates: torch.Tensor, dead: float, saturated: float) -> torch.Tensor:
    """``[mean, std, dead fraction, saturated fraction]`` of float32 rates, compared in float32 as the
    hand-written monitors do (``rates < dead``: the threshold is rounded to float32)."""
    return torch.stack([rates.mean(), rates.std(), (rates < dead).float().mean(), (rates > saturated).float().mean()])


#: `_firing_host` counts dead and saturated neurons on the host below this many rates (the float32 sum of
#: 0/1 flags is exact up to 2**24, so ``count / n`` rounded to float32 is the float32 mean, bit for bit)
_HOST_COUNT_MAX = 1 << 24


def _fraction32(count: int, n: int) -> float:
    """``count / n`` rounded to float32: the float32 mean of ``n`` 0/1 flags of which ``count`` are 1
    (their float32 sum is exact, and a float64 quotient rounded to float32 is the float32 quotient)."""
    return float(np.float32(count / n))


#: `_few_firing_stats` replays torch's CPU ``std()`` up to this many values (beyond, the kernel is cheaper)
_FEW = 64
#: where `_few_firing_stats` is the same arithmetic as torch's kernel: x86-64, whose baseline build of the
#: kernel has no fused multiply-add (an ARM build may fuse ``sum += d * d`` and round differently)
_REPLAY_STD = platform.machine().lower() in ("x86_64", "amd64")


def _few_firing_stats(values: list[float], mean: float, low: float, high: float) -> tuple[float, int, int]:
    """``(std, below low, above high)`` of a few float32 rates in one pass; the std as torch's CPU ``std()``
    computes it, bit for bit: the float32 mean (`mean`, what ``std()`` computes first) in float64,
    ``sum (x - mean)^2`` accumulated in order in float64, ``sqrt(sum / (n - 1))`` rounded to float32.
    Costs a few us instead of a ~10 us kernel. ``low < high`` (the thresholds, as float32 values)."""
    total = 0.0
    n_low = n_high = 0
    for x in values:
        d = x - mean
        total += d * d
        if x < low:
            n_low += 1
        elif x > high:
            n_high += 1
    return round32(math.sqrt(total / (len(values) - 1))), n_low, n_high


def _firing_host(rates: torch.Tensor, dead: float, saturated: float) -> list[float]:
    """`_firing_vector` of CPU rates as host floats, the same bits: the mean by the same torch reduction,
    the std by the same (or, for a few contiguous rates, `_few_firing_stats`), the dead and saturated
    fractions counted on the host (float32 comparisons against the float32-rounded thresholds, as
    ``rates < dead`` does) instead of six kernels."""
    n = rates.numel()
    if n == 0 or n >= _HOST_COUNT_MAX:
        return _firing_vector(rates, dead, saturated).tolist()
    mean = rates.mean().item()
    low, high = float(np.float32(dead)), float(np.float32(saturated))  # float32 values, compared exactly
    if _REPLAY_STD and 2 <= n <= _FEW and low < high and rates.is_contiguous() and math.isfinite(mean):
        std, n_low, n_high = _few_firing_stats(rates.tolist(), mean, low, high)
    else:
        r = rates.numpy()
        std = rates.std().item()
        n_low = int(np.count_nonzero(r < low))
        n_high = int(np.count_nonzero(r > high))
    return [mean, std, _fraction32(n_low, n), _fraction32(n_high, n)]


#: `_mean_std` takes the one-pass route while ``E[v^2] / var(v)`` stays below this (its float32 sums then
#: give the std to ~1e-7 relative); a membrane far from zero relative to its spread gets the two-pass ``std``
_ONE_PASS_MAX_RATIO = 10.0
#: below this many elements the two reductions of ``mean()`` and ``std()`` cost less than the host reads
_ONE_PASS_MIN_SIZE = 1 << 16


def _mean_std(v: torch.Tensor) -> _Part:
    """``[mean, std]`` (unbiased) of all elements of ``v``: host floats on the CPU (``v``'s dtype's
    values, or float64 on the one-pass route), else a tensor in ``v``'s dtype on its device.

    On the CPU, float32/float64, from `_ONE_PASS_MIN_SIZE` elements: one pass of two cascaded sums,
    ``sum v`` and ``sum v^2`` (about 2.5x faster than ``mean()`` plus ``std()``), unless ``E[v^2] / var``
    is above `_ONE_PASS_MAX_RATIO`, where ``E[v^2] - mean^2`` would lose digits and the two-pass ``std()``
    is used. Reading the two sums costs no device sync on the CPU. Elsewhere: ``mean()`` and ``std()``,
    the hand-written monitors' operations, kept on the device.
    """
    n = v.numel()
    if not v.is_cpu:
        return torch.stack([v.mean(), v.std()])
    if v.dtype not in (torch.float32, torch.float64) or n < _ONE_PASS_MIN_SIZE:
        return [float(v.mean()), float(v.std())]
    mean = float(v.sum()) / n
    ms = float(v.square().sum()) / n
    var = (ms - mean * mean) * n / (n - 1)
    if not (var > 0 and ms <= _ONE_PASS_MAX_RATIO * var):  # cancellation, zero spread, NaN or inf
        return [mean, float(v.std())]
    return [mean, var**0.5]


def _as_tensor(part: _Part, device: torch.device) -> torch.Tensor:
    """A part as a float64 tensor on ``device`` (exact: every part's values are float64 numbers)."""
    if isinstance(part, torch.Tensor):
        return part.to(device, torch.float64)
    return torch.tensor(part, dtype=torch.float64, device=device)


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
    """The default rules that watch what `compute` records (fresh instances)."""
    from stabwatch.alerts import default_rules

    return [rule for rule in default_rules() if rule.name in _RULES]


#: a warning of `StabilityMonitor.get_trends` -> (what it means, what to try); `diagnose` states it as a
#: cause when no stabwatch rule raised an alert of one of these reasons over the same records
_TREND_CAUSES: dict[str, tuple[str, str, frozenset[AlertReason]]] = {
    "⚠️ INCREASING (becoming unstable)": (
        "the Lyapunov exponent you pass rose: the last 10 values average more than 0.1 above the first 10",
        "increase the Lyapunov regulariser (lambda_reg) or lower the learning rate",
        frozenset({AlertReason.CHAOTIC_TRAINING}),
    ),
    "⚠️ EXPLODING": (
        "the gradient norm grew: the last 10 records average more than 10× the first 10",
        "lower the learning rate; clip the gradient norm (torch.nn.utils.clip_grad_norm_)",
        frozenset({AlertReason.EXPLODING_GRADIENT, AlertReason.NON_FINITE}),
    ),
    "⚠️ VANISHING": (
        "the gradient norm collapsed: the last 10 records average less than 1/10 of the first 10",
        "look for silent spiking layers (no spike, no surrogate gradient); widen the surrogate gradient, "
        "lower the firing thresholds or rescale the inputs",
        frozenset({AlertReason.VANISHING_GRADIENT, AlertReason.SILENT_LAYER}),
    ),
    "⚠️ DEAD NETWORK": (
        "the network stopped firing: the mean firing rate of the last 10 records is below 0.01",
        "lower the firing thresholds, raise the input gain or the initial weights, or add a firing-rate "
        "regulariser that pulls rates up",
        frozenset({AlertReason.DEAD_NEURONS, AlertReason.SILENT_LAYER}),
    ),
    "⚠️ SATURATED": (
        "the network fires almost always: the mean firing rate of the last 10 records is above 0.8",
        "raise the firing thresholds, lower the input gain or the weights, or add a firing-rate regulariser",
        frozenset({AlertReason.SATURATED_NEURONS}),
    ),
}


class StabilityMonitor:
    """Stability metrics of an SNN per training step, with the API of the common hand-written monitors.

    Call `compute` after ``loss.backward()``; every call returns a `StabilityMetrics` (the hand-written
    monitors' record) and makes one stabwatch record through a `stabwatch.pipeline.RecordPipeline`: fed to
    stabwatch's alert rules, kept (the last ``history_size``) and, with ``sinks=``, written by the
    pipeline's background writers. A neuron is dead when its firing rate is below ``dead_threshold`` and
    saturated above ``saturated_threshold``, compared in float32 as the hand-written monitors do.

    Args:
        dead_threshold: firing rate below which a neuron is dead.
        saturated_threshold: firing rate above which a neuron is saturated.
        history_size: records (and history values) kept for trends.
        rules: alert rules (default: the `stabwatch.alerts.default_rules` that watch gradient norms,
            singular values and spiking layers).
        log_alerts: log alerts as they fire (logger ``stabwatch.alerts``).
        sinks: where records also go: a sink or a list of sinks (`stabwatch.sinks`, e.g.
            ``JsonlSink("run.jsonl")`` or ``MlflowSink(...)``). Call `close` (or use ``with``) at the end.

    Attributes:
        lyap_history / grad_history / fr_history: the last ``history_size`` Lyapunov exponents, gradient
            norms and mean firing rates, as in the hand-written monitors.
        records: the last ``history_size`` stabwatch records; alerts: every alert raised so far.

    Raises:
        StabwatchError: (a `stabwatch.errors.ConfigError`) a threshold, ``history_size`` or ``sinks``
            that is not valid.

    Example:
        >>> import torch
        >>> from stabwatch.compat import StabilityMonitor
        >>> model = torch.nn.Linear(3, 2); model(torch.ones(4, 3)).sum().backward()
        >>> mon = StabilityMonitor()
        >>> m = mon.compute(model, lyapunov=0.25, spikes=torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        >>> print(m)
        λ=0.2500 | ∇=11.3137 | fr=0.500±0.707 | dead=50.0% | sat=50.0%
        >>> m.record.step, m.record.to_dict()["compat/lyapunov"]
        (0, 0.25)
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

        self.dead_threshold = dead_threshold
        self.saturated_threshold = saturated_threshold
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
    def records(self) -> collections.deque[Record]:
        """The last ``history_size`` stabwatch records `compute` made."""
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
    def _grad_norms(model: nn.Module) -> _Part:
        """``||g_p||`` of every gradient, each in the gradient's precision (the hand-written monitors'
        ``p.grad.norm(2)``; one ``torch._foreach_norm`` when all gradients share a device and dtype):
        host floats when every gradient is on the CPU, else 1-D on the first gradient's device with no
        host sync. `_total_norm` combines them on the host."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            first = next(model.parameters(), None)
            return [] if first is None or first.is_cpu else torch.zeros(0, device=first.device)
        dtype = grads[0].dtype
        if any(g.requires_grad for g in grads):  # gradients of a create_graph backward
            grads = [g.detach() for g in grads]
        if all(g.is_cpu for g in grads):
            if all(g.dtype == dtype for g in grads):
                norms = torch._foreach_norm(grads, 2.0)
                return [n.item() for n in norms] if len(norms) <= 16 else torch.stack(norms).tolist()
            return [torch.linalg.vector_norm(g).item() for g in grads]
        device = grads[0].device
        if all(g.device == device and g.dtype == dtype for g in grads):
            return torch.stack(torch._foreach_norm(grads, 2.0))
        # gradients on several devices or in several dtypes: each norm moved to the first device
        return torch.stack([torch.linalg.vector_norm(g).to(device, torch.float64) for g in grads])

    def _spectra(
        self, model: nn.Module, top_k: int, norms: Sequence[float] | None = None
    ) -> tuple[list[torch.Tensor], Callable[[Sequence[float]], list[_SVRow]]]:
        """Singular values of every 2-D gradient: ``(chunks, rows)``, the tensors for the one host copy
        and the function that turns their host values into one `_SVRow` per gradient (parameter order).

        Same-shape gradients run as one batch: exact (`stabwatch.functional.spectrum_summary`) up to
        ``_EXACT_SVD_MAX_ELEMENTS`` elements, a randomized top-k above
        (`stabwatch.functional.randomized_singular_values`). On the CPU the rows are made at once
        (`stabwatch.functional.spectrum_summary_rows`, the same numbers) and there is nothing to copy.

        ``norms``: the host gradient norms of `_grad_norms` for this model, if the caller has them: a
        finite norm means a finite gradient, so those matrices skip the NaN/Inf check.
        """
        named: list[tuple[str, torch.Tensor]] = []
        finite: list[bool] = []
        k = 0  # position among the parameters with a gradient (the order of `_grad_norms`)
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            if p.ndim == 2 and min(p.shape) > 0:
                named.append((name, p.grad.detach()))
                finite.append(norms is not None and math.isfinite(norms[k]))
            k += 1
        small = [i for i, (_, g) in enumerate(named) if g.numel() <= _EXACT_SVD_MAX_ELEMENTS]
        on_cpu = all(g.is_cpu for _, g in named)
        groups: list[_SVGroup] = []
        rows: dict[int, _SVRow] = {}
        with torch.no_grad():
            for idx, stack in group_matrices([named[i][1] for i in small]):
                index = [small[k] for k in idx]
                if on_cpu:
                    summaries = spectrum_summary_rows(stack, top_k, assume_finite=all(finite[i] for i in index))
                    for i, (values, low, _, cond) in zip(index, summaries, strict=True):
                        rows[i] = (named[i][0], values, low, cond)
                else:
                    top, s_min, _, kappa = spectrum_summary(stack, top_k)
                    groups.append(_SVGroup(index, [named[i][0] for i in index], top, s_min, kappa))
            exact = set(small)
            for i, (name, g) in enumerate(named):
                if i not in exact:
                    leading, _ = randomized_singular_values(g, top_k, generator=self._generator)
                    if on_cpu:
                        rows[i] = (name, leading.tolist(), None, None)
                    else:
                        groups.append(_SVGroup([i], [name], leading[None], None, None))
        if on_cpu:
            ordered = [rows[i] for i in range(len(named))]
            return [], lambda host: ordered
        return _sv_chunks(groups), lambda host: _sv_rows(groups, host)

    def _sv_host_rows(self, model: nn.Module, top_k: int) -> list[_SVRow]:
        """`_spectra`'s rows, read with their own host copy (for the methods that answer at once)."""
        chunks, rows = self._spectra(model, top_k)
        return rows(_to_host(chunks) if chunks else [])

    def _firing(self, spikes: dict[str, torch.Tensor]) -> tuple[list[_Part] | None, _Part]:
        """Per-tensor (``None`` for one tensor) and pooled ``[mean, std, dead, saturated]`` firing
        statistics: host floats when the spikes are on the CPU (`_firing_host`), else device tensors."""
        rates = [_neuron_rates(t) for t in spikes.values()]
        d, s = self.dead_threshold, self.saturated_threshold
        if all(r.is_cpu for r in rates):
            pooled = _firing_host(rates[0] if len(rates) == 1 else torch.cat(rates), d, s)
            return (None if len(rates) == 1 else [_firing_host(r, d, s) for r in rates]), pooled
        if len(rates) == 1:
            return None, _firing_vector(rates[0], d, s)
        device = rates[0].device
        per = torch.stack([_firing_vector(r, d, s).to(device) for r in rates])
        return [per.reshape(-1)], _firing_vector(torch.cat([r.to(device) for r in rates]), d, s)

    @staticmethod
    def _membrane(membrane: dict[str, torch.Tensor]) -> tuple[list[_Part] | None, _Part]:
        """Per-tensor (``None`` for one tensor) and pooled ``[mean, std]`` of the membrane potentials
        (host floats for CPU tensors, see `_mean_std`).

        One tensor: its ``mean()`` and ``std()``, the hand-written monitors' operations. Several: each
        tensor's, and the pooled ones combined exactly from ``(n, mean, std)`` in float64.
        """
        values = [v.detach() for v in membrane.values()]
        if len(values) == 1:
            return None, _mean_std(values[0])
        device = values[0].device
        per = torch.stack([_as_tensor(_mean_std(v), device) for v in values])
        n = torch.tensor([float(v.numel()) for v in values], dtype=torch.float64, device=device)
        total = n.sum()
        mean = (n * per[:, 0]).sum() / total
        m2 = ((n - 1) * per[:, 1].nan_to_num().square() + n * (per[:, 0] - mean).square()).sum()
        return [per.reshape(-1)], torch.stack([mean, (m2 / (total - 1)).sqrt()])

    # the hand-written monitors' methods -----------------------------------------------------------
    def compute_gradient_norm(self, model: nn.Module) -> float:
        """Global L2 norm of all gradients, ``sqrt(sum_p ||g_p||^2)`` (0.0 without gradients)."""
        with torch.no_grad():
            return _total_norm(_gather([self._grad_norms(model)]))

    def compute_gradient_singular_values(self, model: nn.Module, top_k: int = 5) -> dict[str, tuple[np.ndarray, float]]:
        """Singular values of every 2-D weight gradient.

        Returns:
            ``{parameter name: (top_k largest singular values, condition number)}``; the condition
            number is ``s_max / s_min`` over the non-zero singular values (NaN for matrices above 1e6
            elements, whose top-k come from a randomized SVD).
        """
        rows = self._sv_host_rows(model, top_k)
        return {name: (np.asarray(top), float("nan") if kappa is None else kappa) for name, top, _, kappa in rows}

    def get_aggregate_gradient_sv(self, model: nn.Module) -> tuple[float, float, float]:
        """``(max singular value, min non-zero singular value, mean condition number)`` over layers.

        ``(0.0, 0.0, 1.0)`` when no 2-D parameter has a gradient.
        """
        stats = _aggregate_sv(self._sv_host_rows(model, 5))
        return (0.0, 0.0, 1.0) if stats is None else stats

    def compute_firing_stats(self, spikes: torch.Tensor) -> tuple[float, float, float, float]:
        """``(mean rate, std over neurons, dead fraction, saturated fraction)`` of one spike tensor.

        Args:
            spikes: ``[B, T, H]`` (more dims: ``[B, T, *features]``), ``[T, H]`` or ``[H]`` (rates);
                values 0/1 (graded spikes count by value).
        """
        with torch.no_grad():
            a, b, c, d = _gather([self._firing({NETWORK: spikes})[1]])
        return a, b, c, d

    def compute_membrane_stats(self, membrane: torch.Tensor) -> tuple[float, float]:
        """``(mean, std)`` of a membrane-potential tensor over all its elements."""
        with torch.no_grad():
            a, b = _gather([self._membrane({NETWORK: membrane})[1]])
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
            lyapunov: your Lyapunov-exponent estimate (e.g. from the forward pass); recorded under
                ``compat/lyapunov``.
            spikes: recorded spikes (layouts in `compute_firing_stats`), or ``{layer: spikes}``.
            membrane: recorded membrane potentials, or ``{layer: membrane}``.
            compute_sv: also compute gradient singular values (the expensive part).

        Returns:
            The `StabilityMetrics` of this call; ``metrics.record`` is the stabwatch record (alerts it
            raised in ``record.alerts``), also queued to the ``sinks``.
        """
        spike_map = _named(spikes, "spikes") if spikes is not None else {}
        mem_map = _named(membrane, "membrane") if membrane is not None else {}
        fields_: dict[str, Any] = {}
        layers: dict[str, dict[str, float]] = {}
        extra: dict[str, float] = {}
        entries: list[tuple[str, str | None]] = []  # (field or extra key, layer) of each value after the norms
        # no autograd context needed (~3 us a call): every tensor read here is detached first
        norms = self._grad_norms(model)
        host_norms = norms if isinstance(norms, list) else None
        sv_chunks, sv_rows = self._spectra(model, 5, host_norms) if compute_sv else ([], None)
        parts: list[_Part] = [norms, *sv_chunks]
        if lyapunov is not None:
            lyap = _host_scalar(lyapunov)
            if isinstance(lyap, torch.Tensor):
                entries.append((LYAPUNOV_KEY, None))
                parts.append(lyap)
            else:
                extra[LYAPUNOV_KEY] = lyap
        for fields, values in ((_FIRING_FIELDS, spike_map), (_MEMBRANE_FIELDS, mem_map)):
            if not values:
                continue
            per, pooled = (self._firing if fields is _FIRING_FIELDS else self._membrane)(values)
            entries += _ENTRIES[fields, None]
            parts.append(pooled)
            if per is None:  # one tensor: its layer's values are the pooled ones
                entries += _ENTRIES[fields, NETWORK]
                parts.append(pooled)
            else:
                entries += [(name, layer) for layer in values for name in fields]
                parts += per
        host = _gather(parts)  # CPU values read in place, accelerator ones in one copy
        n_norms, n_sv = len(norms), sum(c.numel() for c in sv_chunks)
        fields_["grad_norm"] = _total_norm(host[:n_norms])
        rows = sv_rows(host[n_norms : n_norms + n_sv]) if sv_rows is not None else []
        stats = _aggregate_sv(rows)
        if stats is not None:  # the mean condition number, as the hand-written monitors report it
            fields_.update(zip(_SV_FIELDS, stats))
            for name, top, s_min, kappa in rows:  # per layer: sigma_1 and, for exact spectra, s_min and kappa
                layer = layers.setdefault(weight_layer_name(name), {})
                layer["grad_max_sv"] = top[0]
                if s_min is not None and kappa is not None:
                    layer["grad_min_sv"], layer["grad_condition"] = s_min, kappa
        for (name, where), value in zip(entries, host[n_norms + n_sv :], strict=True):
            if name == LYAPUNOV_KEY:
                extra[name] = value
            elif where is None:
                fields_[name] = value
            else:
                layers.setdefault(where, {})[name] = value
        grad_norm = fields_["grad_norm"]
        if not math.isfinite(grad_norm):  # a NaN/inf gradient: the `non_finite` rule's critical alert
            fields_["nonfinite"], fields_["nonfinite_source"] = True, "gradients"
        pipe = self._pipeline
        # validated (~5 us; pydantic's model_construct is slower here: it resolves every default per call)
        record = pipe.publish(Record(step=pipe.step, layers=layers, extra=extra, **fields_))
        pipe.step += 1
        self.alerts.extend(record.alerts)
        out = StabilityMetrics(extra.get(LYAPUNOV_KEY), *map(fields_.get, _RECORD_FIELDS))  # the fields' order
        out.__dict__["_record"] = record
        for history, latest in (
            (self.lyap_history, out.lyapunov),
            (self.grad_history, out.grad_norm),
            (self.fr_history, out.firing_rate_mean),
        ):
            if latest is not None:
                history.append(latest)
                if len(history) > self.history_size:
                    del history[0]
        return out

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

    # what a person reads --------------------------------------------------------------------------
    def get_trends(self) -> dict[str, str]:
        """Trend of each watched quantity, as the hand-written monitors compute it.

        A key appears once its history has 10 values; the mean of the last 10 values is compared with the
        mean of the first 10 kept:

        * ``"lyapunov"``: ``"⚠️ INCREASING (becoming unstable)"`` (up by more than 0.1),
          ``"✓ DECREASING (stabilizing)"`` (down by more than 0.1) or ``"→ STABLE"``;
        * ``"gradients"``: ``"⚠️ EXPLODING"`` (ratio above 10), ``"⚠️ VANISHING"`` (below 0.1) or
          ``"✓ STABLE"``;
        * ``"firing"`` (the last 10 mean rates only): ``"⚠️ DEAD NETWORK"`` (below 0.01),
          ``"⚠️ SATURATED"`` (above 0.8) or ``"✓ HEALTHY"``.
        """
        trends: dict[str, str] = {}
        if len(self.lyap_history) >= 10:
            recent = np.mean(self.lyap_history[-10:])
            older = np.mean(self.lyap_history[:10])
            if recent > older + 0.1:
                trends["lyapunov"] = "⚠️ INCREASING (becoming unstable)"
            elif recent < older - 0.1:
                trends["lyapunov"] = "✓ DECREASING (stabilizing)"
            else:
                trends["lyapunov"] = "→ STABLE"
        if len(self.grad_history) >= 10:
            ratio = np.mean(self.grad_history[-10:]) / (np.mean(self.grad_history[:10]) + 1e-8)
            if ratio > 10:
                trends["gradients"] = "⚠️ EXPLODING"
            elif ratio < 0.1:
                trends["gradients"] = "⚠️ VANISHING"
            else:
                trends["gradients"] = "✓ STABLE"
        if len(self.fr_history) >= 10:
            recent = np.mean(self.fr_history[-10:])
            if recent < 0.01:
                trends["firing"] = "⚠️ DEAD NETWORK"
            elif recent > 0.8:
                trends["firing"] = "⚠️ SATURATED"
            else:
                trends["firing"] = "✓ HEALTHY"
        return trends

    def diagnose(self) -> str:
        """The hand-written monitors' summary, then stabwatch's likely causes and what to try.

        The first lines are the hand-written monitors' own: the Lyapunov exponent averaged over the last
        20 values with its regime (above 0.5 chaotic, below -0.5 over-stable, else the edge of chaos)
        and its suggestion, the gradient norm's average and maximum over the last 20, the mean firing
        rate, each with its `get_trends` word (the same dict, so the two never disagree). Below, under
        ``--- stabwatch ---``: the likely causes of the alerts raised over the kept records (the same
        history), each with its evidence and what to try; a `get_trends` warning that no rule raised an
        alert for is stated as a cause too, so the two parts never disagree either.
        """
        trends = self.get_trends()
        lines = ["=== Stability Diagnosis ==="]
        if self.lyap_history:
            avg_lyap = np.mean(self.lyap_history[-20:])
            lines.append(f"Lyapunov exponent: {avg_lyap:.4f}")
            if avg_lyap > 0.5:
                lines.append(" → Network is CHAOTIC (trajectories diverge quickly)")
                lines.append(" → Suggestion: Increase lambda_reg or decrease learning rate")
            elif avg_lyap < -0.5:
                lines.append(" → Network is OVER-STABLE (trajectories collapse)")
                lines.append(" → Suggestion: May lose expressiveness, consider reducing regularization")
            else:
                lines.append(" → Network is at EDGE OF CHAOS (good for learning)")
        if self.grad_history:
            avg_grad = np.mean(self.grad_history[-20:])
            max_grad = max(self.grad_history[-20:])
            lines.append(f"Gradient norm: avg={avg_grad:.4f}, max={max_grad:.4f}")
            if "gradients" in trends:
                lines.append(f" → {trends['gradients']}")
        if self.fr_history:
            avg_fr = np.mean(self.fr_history[-20:])
            lines.append(f"Firing rate: {avg_fr:.4f}")
            if "firing" in trends:
                lines.append(f" → {trends['firing']}")
        return "\n".join(lines + self._stabwatch_lines(trends))

    def _stabwatch_lines(self, trends: dict[str, str]) -> list[str]:
        """stabwatch's part of `diagnose`: causes and suggestions from the alerts of the kept records."""
        from stabwatch.diagnosis import analyse

        records = list(self.records)
        if not records:
            return []
        alerts = [a for r in records for a in r.alerts if a.reason is not AlertReason.RECOVERED]
        span = f"steps {records[0].step}-{records[-1].step}" if len(records) > 1 else f"step {records[0].step}"
        lines = ["", f"--- stabwatch: {len(alerts)} alert(s) over the last {len(records)} records ({span}) ---"]
        causes = [(c.title, c.evidence, c.actions) for c in analyse(records, alerts).causes]
        seen = {a.reason for a in alerts}
        for word in trends.values():
            if word in _TREND_CAUSES and not (_TREND_CAUSES[word][2] & seen):
                meaning, action, _ = _TREND_CAUSES[word]
                causes.append((meaning, [f"get_trends: {word}"], [action]))
        if not causes:
            lines.append("likely causes: none — no sign of instability in these records.")
            return lines
        lines.append("likely causes (most likely first):")
        for i, (title, evidence, actions) in enumerate(causes, 1):
            lines.append(f"  {i}. {title}")
            lines.append(f"     evidence: {'; '.join(evidence)}")
            lines += [f"     try: {action}" for action in actions]
        return lines


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
