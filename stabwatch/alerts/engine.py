"""The alert engine: feeds each record to its rules and collects the alerts they raise."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics

__all__ = ["AlertEngine", "NonFiniteRule", "default_rules"]


class NonFiniteRule:
    """Critical alert when a record reports a NaN/Inf (loss, gradient or activation), naming the layer."""

    name = "non_finite"

    def __init__(self, cooldown: int = 50) -> None:
        self.cooldown = cooldown
        self._last: int | None = None

    def evaluate(self, record: StabilityMetrics) -> list[Alert]:
        if not record.nonfinite:
            return []
        if self._last is not None and record.step - self._last < self.cooldown:
            return []
        self._last = record.step
        where = record.nonfinite_source
        loss = "" if record.loss is None or math.isfinite(record.loss) else f" (loss={record.loss})"
        return [
            Alert(
                rule=self.name,
                reason=AlertReason.NON_FINITE,
                severity=Severity.CRITICAL,
                step=record.step,
                metric="nonfinite",
                layer=where if where not in (None, "loss", "gradients") else None,
                value=float("nan"),
                message=f"non-finite values first seen in {where}{loss}",
                suggestion="lower the learning rate, clip gradients, check the data and the loss for "
                "log(0)/division by zero; enable anomaly detection to find the op",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"last": self._last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last = state["last"]


class AlertEngine:
    """Runs rules on each record: ``engine.evaluate(record) -> list[Alert]``."""

    def __init__(self, rules: Iterable[Any]) -> None:
        self.rules = list(rules)

    def evaluate(self, record: StabilityMetrics) -> list[Alert]:
        out: list[Alert] = []
        for rule in self.rules:
            out.extend(rule.evaluate(record))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rules": [r.state_dict() for r in self.rules]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for rule, s in zip(self.rules, state["rules"], strict=True):
            rule.load_state_dict(s)


def default_rules() -> list[Any]:
    """The default rule set."""
    return [NonFiniteRule()]
