"""What happens when alerts fire: logging, user callbacks, the opt-in ``InstabilityError``, and the
opt-in skip-step guard.

Delivery to trackers is not here: alerts are put into ``record.alerts`` before the record goes to the
sinks, and each sink delivers them its own way (wandb ``run.alert``, MLflow tags, TensorBoard text).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from stabwatch.alerts.base import Window as _Window
from stabwatch.errors import ConfigError, InstabilityError
from stabwatch.errors import check_int as _positive_int
from stabwatch.errors import check_positive as _positive_float
from stabwatch.functional.gradients import squared_norms
from stabwatch.metrics import Alert, AlertReason, Severity
from stabwatch.numeric import fmt

__all__ = [
    "AlertCallbacks",
    "StepGuard",
    "instability_error",
    "log_alert",
    "parse_raise_on",
    "severity_rank",
]

log = logging.getLogger("stabwatch.alerts")

_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}
_LEVEL = {Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING, Severity.CRITICAL: logging.ERROR}


def severity_rank(severity: Severity | str) -> int:
    """0 for info, 1 for warning, 2 for critical."""
    return _RANK[Severity(severity)]


def log_alert(alert: Alert) -> None:
    """Log one alert on the ``stabwatch.alerts`` logger (info -> INFO, warning -> WARNING,
    critical -> ERROR), with the suggestion on a second line."""
    if not log.isEnabledFor(_LEVEL[alert.severity]):
        return
    text = f"stabwatch: {alert}"
    if alert.suggestion:
        text += f"\n  try: {alert.suggestion}"
    log.log(_LEVEL[alert.severity], text)


class AlertCallbacks:
    """User callbacks ``fn(alert)``, called for every alert; a callback that raises is logged once and
    training goes on (an `InstabilityError` raised by a callback is passed through: that is how a
    callback stops training on purpose)."""

    def __init__(self, callbacks: Callable[[Alert], Any] | Iterable[Callable[[Alert], Any]] | None = ()) -> None:
        if callbacks is None:
            callbacks = ()
        if not callable(callbacks) and not isinstance(callbacks, Iterable):
            raise ConfigError(f"on_alert: expected a callable fn(alert) or a list of them, got {callbacks!r}")
        items = [callbacks] if callable(callbacks) else list(callbacks)
        for i, cb in enumerate(items):
            if not callable(cb):
                raise ConfigError(f"on_alert[{i}]: expected a callable fn(alert), got {cb!r}")
        self.callbacks: list[Callable[[Alert], Any]] = items
        self._failed: set[int] = set()

    def add(self, callback: Callable[[Alert], Any]) -> None:
        if not callable(callback):
            raise ConfigError(f"on_alert: expected a callable fn(alert), got {callback!r}")
        self.callbacks.append(callback)

    def __call__(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            for i, cb in enumerate(self.callbacks):
                try:
                    cb(alert)
                except InstabilityError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a callback never kills training
                    if i not in self._failed:
                        self._failed.add(i)
                        log.warning(
                            "stabwatch: alert callback %r failed (%s: %s); further failures are not logged",
                            cb,
                            type(exc).__name__,
                            exc,
                        )


def parse_raise_on(value: Any) -> Severity | None:
    """``None``/``False`` (never raise), ``True`` (= ``"critical"``), ``"warning"`` or ``"critical"``."""
    if value is None or value is False:
        return None
    if value is True:
        return Severity.CRITICAL
    try:
        sev = Severity(value)
    except ValueError:
        sev = None
    if sev is None or sev is Severity.INFO:
        raise ConfigError(f"raise_on: expected None, True, 'warning' or 'critical', got {value!r}")
    return sev


def instability_error(alerts: Sequence[Alert], raise_on: Severity | None) -> InstabilityError | None:
    """The error to raise for these alerts under the ``raise_on`` policy, or ``None``."""
    if raise_on is None:
        return None
    bad = [
        a
        for a in alerts
        if a.reason is not AlertReason.RECOVERED and severity_rank(a.severity) >= severity_rank(raise_on)
    ]
    if not bad:
        return None
    lines = "\n".join(f"  {a}" + (f"\n    try: {a.suggestion}" if a.suggestion else "") for a in bad)
    return InstabilityError(
        f"training stopped at step {bad[0].step} by {len(bad)} alert(s) at or above "
        f"{raise_on.value!r} (Monitor(raise_on=...)):\n{lines}",
        alerts=bad,
        step=bad[0].step,
    )


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


class StepGuard:
    r"""Opt-in guard that turns an optimizer step into a no-op when its gradients are bad.

    In the optimizer's pre-step hook it computes the global gradient norm
    :math:`\|g\| = \sqrt{\sum_p \|g_p\|^2}` (one fused reduction, one host sync per step) and decides to
    skip when

    * ``nonfinite``: :math:`\|g\|` is NaN or inf (some gradient element is), or
    * ``spikes``: :math:`\|g\| \ge` ``factor`` × the median of the last ``window`` accepted norms
      (after ``warmup`` accepted steps).

    To skip, it snapshots every parameter, the optimizer's per-parameter state and its param-group
    settings before the step runs, lets the step run, and copies the snapshot back in place right after
    it (before any collector reads the update): parameters and optimizer state are bit-for-bit what they
    were, as if ``optimizer.step()`` had not been called. Nothing is copied on steps that are not
    skipped. A sustained rise is not a spike: after ``max_consecutive`` skipped spikes in a row the next
    step is applied and enters the window (non-finite steps are always skipped).

    Each skipped step adds a warning alert (rule ``skip_step``) to the next record.

    Args:
        factor: spike ratio against the window median.
        window: accepted norms kept for the median.
        warmup: accepted steps before spikes are judged.
        nonfinite: skip steps with non-finite gradients.
        spikes: skip spiking steps.
        max_consecutive: spiking steps skipped in a row before the guard gives in.

    Example:
        >>> import torch, stabwatch as sw
        >>> model = torch.nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> before = model.weight.detach().clone()
        >>> with sw.Monitor(model, opt, guard=True, preset="cheap") as mon:
        ...     model(torch.tensor([[float("nan"), 1.0, 1.0]])).sum().backward(); opt.step()
        ...     rec = mon.step()
        >>> torch.equal(model.weight, before), [a.rule for a in rec.alerts]
        (True, ['skip_step', 'non_finite'])
    """

    def __init__(
        self,
        factor: float = 10.0,
        window: int = 50,
        warmup: int = 10,
        nonfinite: bool = True,
        spikes: bool = True,
        max_consecutive: int = 3,
        **unknown: Any,
    ) -> None:
        if unknown:
            allowed = "factor, window, warmup, nonfinite, spikes, max_consecutive"
            raise ConfigError(f"StepGuard: unknown option(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
        self.factor = _positive_float(factor, "StepGuard.factor")
        if self.factor <= 1:
            raise ConfigError(f"StepGuard.factor: expected a number > 1, got {factor!r}")
        self.window = _positive_int(window, "StepGuard.window")
        self.warmup = _positive_int(warmup, "StepGuard.warmup")
        if self.warmup > self.window:
            raise ConfigError(f"StepGuard.warmup ({warmup}) must be <= window ({window})")
        self.nonfinite = bool(nonfinite)
        self.spikes = bool(spikes)
        self.max_consecutive = _positive_int(max_consecutive, "StepGuard.max_consecutive", minimum=0)
        self.optimizer: torch.optim.Optimizer | None = None
        self._norms = _Window(self.window)
        self._in_a_row = 0
        self._snapshot: tuple[Any, ...] | None = None
        self._pending: list[Alert] = []
        #: steps whose update was undone
        self.skipped: list[int] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def detach(self) -> None:
        self.optimizer = None
        self._snapshot = None

    # decision ---------------------------------------------------------------------------------------
    def _grad_norm(self, grad_scale: torch.Tensor | None = None) -> float | None:
        assert self.optimizer is not None
        grads = [p.grad.detach() for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        with torch.no_grad():
            total = squared_norms(grads).sum().sqrt()
            if grad_scale is not None:  # still multiplied by GradScaler's scale (fused optimizers)
                total = total / grad_scale.to(total.device, total.dtype)
        return float(total.item())

    def decide(self, norm: float | None, step: int = 0) -> str | None:
        """Why the step with this gradient norm should be skipped (``None``: apply it). Updates the window."""
        if norm is None:
            return None
        if not math.isfinite(norm):
            return f"gradients are non-finite (grad_norm = {norm})" if self.nonfinite else None
        if self.spikes and len(self._norms) >= self.warmup:
            med = self._norms.median()
            if med > 0 and norm >= self.factor * med:
                if self._in_a_row < self.max_consecutive:
                    self._in_a_row += 1
                    return f"grad_norm {fmt(norm)} is {norm / med:.3g}× its {self._norms.describe()} median {fmt(med)}"
                log.warning(
                    "stabwatch: skip-step guard applied a spiking step after %d skipped in a row "
                    "(grad_norm %s vs median %s): treating it as the new level",
                    self._in_a_row,
                    fmt(norm),
                    fmt(med),
                )
        self._in_a_row = 0
        self._norms.push(step, norm)
        return None

    # the hooks --------------------------------------------------------------------------------------
    def before_step(self, step: int, grad_scale: torch.Tensor | None = None) -> None:
        """Called when the step's gradients are final (`RecordPipeline.gradients_ready`): decide, and
        snapshot when skipping. ``grad_scale``: the factor the gradients are still multiplied by."""
        self._snapshot = None
        if self.optimizer is None:
            return
        norm = self._grad_norm(grad_scale)
        why = self.decide(norm, step)
        if why is None:
            return
        opt = self.optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        with torch.no_grad():
            saved_params = [p.detach().clone() for p in params]
        saved_state = {id(p): {k: _clone(v) for k, v in opt.state[p].items()} for p in params if p in opt.state}
        saved_groups = [{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self._snapshot = (step, why, norm, params, saved_params, saved_state, saved_groups)

    def after_step(self) -> None:
        """Called in the optimizer's post-step hook, before the collectors: undo a skipped step."""
        if self._snapshot is None or self.optimizer is None:
            return
        step, why, norm, params, saved_params, saved_state, saved_groups = self._snapshot
        self._snapshot = None
        opt = self.optimizer
        with torch.no_grad():
            for p, saved in zip(params, saved_params, strict=True):
                p.copy_(saved)
            for p in params:
                before = saved_state.get(id(p))
                if before is None:
                    if p in opt.state:
                        del opt.state[p]
                    continue
                now = opt.state[p]
                for key in list(now):
                    if key not in before:
                        del now[key]
                for key, value in before.items():
                    cur = now.get(key)
                    if (
                        isinstance(value, torch.Tensor)
                        and isinstance(cur, torch.Tensor)
                        and cur.shape == value.shape
                        and cur.dtype == value.dtype
                    ):
                        cur.copy_(value)
                    else:
                        now[key] = value
        for group, saved in zip(opt.param_groups, saved_groups, strict=True):
            for key, value in saved.items():
                cur = group.get(key)
                if isinstance(value, torch.Tensor) and isinstance(cur, torch.Tensor) and cur.shape == value.shape:
                    with torch.no_grad():
                        cur.copy_(value)
                else:
                    group[key] = value
        self.skipped.append(step)
        nonfinite = norm is None or not math.isfinite(norm)
        self._pending.append(
            Alert(
                rule="skip_step",
                reason=AlertReason.NON_FINITE if nonfinite else AlertReason.EXPLODING_GRADIENT,
                severity=Severity.WARNING,
                step=step,
                metric="grad_norm",
                value=norm,
                message=f"optimizer step skipped: {why}; parameters and optimizer state restored",
                suggestion=("frequent skips mean the run is unstable: lower the learning rate or clip gradients"),
            )
        )

    def pop_alerts(self) -> list[Alert]:
        out, self._pending = self._pending, []
        return out

    # state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"norms": self._norms.state(), "in_a_row": self._in_a_row, "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._norms = _Window.from_state(self.window, state["norms"])
        self._in_a_row = int(state["in_a_row"])
        self.skipped = [int(s) for s in state["skipped"]]

    def __repr__(self) -> str:
        return f"StepGuard(factor={self.factor}, window={self.window}, skipped={len(self.skipped)})"
