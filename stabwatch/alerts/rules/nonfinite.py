"""`NonFiniteRule`: a NaN or ±inf appeared (in the loss, a gradient, an activation, or any metric)."""

from __future__ import annotations

import math
from typing import Any, cast

from stabwatch.alerts.base import RecordView, Rule, Verdict, scan_check
from stabwatch.metrics import Alert, AlertReason, Severity
from stabwatch.numeric import fmt

__all__ = ["NonFiniteRule"]

_SUGGESTION = (
    "lower the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_), check the data and the "
    "loss for log(0) / division by zero near the named layer, use a smaller init scale; "
    "torch.autograd.set_detect_anomaly(True) finds the op"
)


class NonFiniteRule(Rule):
    """Critical alert when a value is not finite.

    Bound to ``"nonfinite"`` (the default) it reads the record's ``nonfinite`` flag and names where the
    NaN/inf was first seen (``nonfinite_source``: the first module in execution order, ``"loss"`` or
    ``"gradients"``); bound to any other metric it alerts when that metric is NaN or ±inf. A run that
    stays non-finite alerts once; it is reported ``recovered`` after ``clear_after`` finite records.

    Example:
        >>> rule = NonFiniteRule("loss")
        >>> [(a.step, a.reason.value) for s, v in enumerate([1.0, float("nan"), float("nan"), 0.9])
        ...  if (a := rule.update(s, v))]
        [(1, 'non_finite'), (3, 'recovered')]
    """

    default_reason = AlertReason.NON_FINITE
    default_name = "non_finite"
    accepts_nonfinite = True

    def __init__(self, metric: str = "nonfinite", **kwargs: Any) -> None:
        kwargs.setdefault("name", "non_finite" if metric == "nonfinite" else None)
        kwargs.setdefault("severity", Severity.CRITICAL)
        kwargs.setdefault("suggestion", _SUGGESTION)
        super().__init__(metric, **kwargs)
        self._flag = self.binding.kind == "field" and self.binding.field == "nonfinite"

    _check = scan_check

    def _scan(self, state: Any, step: int, value: float, active: bool, full: bool) -> Verdict | bool:
        if self._flag:
            return _flag_verdict(value)
        if math.isfinite(value):
            if not active and not full:
                return False  # calm, outside an episode
            return Verdict(False, value, f"finite again ({fmt(value)})")
        return Verdict(True, value, f"is {value}")

    def subject(self, layer: str | None) -> str:
        return "" if self._flag else super().subject(layer)

    def observe(self, view: RecordView) -> list[Alert]:
        if not self._flag:
            return super().observe(view)
        record = view.record
        if record.nonfinite is None:
            return []
        where = record.nonfinite_source
        s = self._stream(None)
        verdict = cast(Verdict, self._check(s.det, record.step, 1.0 if record.nonfinite else 0.0, s.active))
        if verdict.triggered:
            loss = record.loss
            extra = f" (loss = {loss})" if loss is not None and not math.isfinite(loss) else ""
            grad = record.grad_norm
            extra += f" (grad_norm = {grad})" if grad is not None and not math.isfinite(grad) else ""
            verdict = verdict._replace(
                value=loss if loss is not None and not math.isfinite(loss) else math.nan,
                detail=f"non-finite values first seen in {where or 'the record'}{extra}",
            )
        layer = where if where not in (None, "loss", "gradients") else None
        alert = self._advance(s, record.step, verdict, None)
        if alert is None:
            return []
        if layer is not None and alert.reason is not AlertReason.RECOVERED:
            alert = alert.model_copy(update={"layer": layer})
        return [alert]


def _flag_verdict(value: float) -> Verdict:
    """The verdict on the record's ``nonfinite`` flag (1.0 or 0.0); `observe` words the alert."""
    return Verdict(bool(value), math.nan, "" if value else "all values finite again")
