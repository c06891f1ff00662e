"""`AllOf` / `AnyOf`: combine the conditions of several rules into one alert."""

from __future__ import annotations

from typing import Any

from stabwatch.alerts.base import Binding, RecordView, Rule, Verdict
from stabwatch.errors import ConfigError, StabwatchError
from stabwatch.metrics import Alert, AlertReason

__all__ = ["AllOf", "AnyOf"]


class _Combination(Rule):
    default_reason = AlertReason.CUSTOM
    _word = "and"

    def __init__(self, *rules: Rule, name: str | None = None, **kwargs: Any) -> None:
        if len(rules) < 2 or not all(isinstance(r, Rule) for r in rules):
            raise ConfigError(f"{type(self).__name__}: expected two or more rules, got {rules!r}")
        self.children = list(rules)
        label = f" {self._word} ".join(r.name for r in rules)
        super().__init__(label, name=name or f"{type(self).__name__}({label})", **kwargs)

    def _bind(self, metric: str) -> Binding:  # the children carry the bindings
        return None  # type: ignore[return-value]

    @property
    def label(self) -> str:
        return f" {self._word} ".join(r.label for r in self.children)

    def subject(self, layer: str | None) -> str:
        return ""

    def _combine(self, results: list[list[tuple[str | None, Verdict]]]) -> Verdict | None:
        raise NotImplementedError

    def observe(self, view: RecordView) -> list[Alert]:
        results = [child.verdicts(view) for child in self.children]
        verdict = self._combine(results)
        if verdict is None:
            return []
        layers = {layer for per in results for layer, v in per if v.triggered}
        layer = next(iter(layers)) if len(layers) == 1 else None
        alert = self._advance(self._stream(None), view.record.step, verdict, layer)
        return [alert] if alert is not None else []

    def update(self, step: int, value: Any, layer: str | None = None) -> Alert | None:
        raise StabwatchError(
            f"{type(self).__name__} combines record metrics; feed it records through AlertEngine.evaluate"
        )

    @staticmethod
    def _describe(child: Rule, layer: str | None, v: Verdict) -> str:
        return child._message(layer, v.text)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["children"] = [c.state_dict() for c in self.children]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for child, s in zip(self.children, state["children"], strict=True):
            child.load_state_dict(s)

    def reset(self) -> None:
        super().reset()
        for c in self.children:
            c.reset()


class AllOf(_Combination):
    """Alert when every child rule's condition holds at the same record (for a per-layer child: in at
    least one layer).

    The children are used as detectors only (their windows advance; their own patience, cooldown and
    recovery are not used); the combination has its own lifecycle options. A record on which some child
    has no value (not scheduled) is skipped.

    Example:
        >>> from stabwatch.alerts.rules.ratio import RatioRule
        >>> from stabwatch.alerts.base import RecordView
        >>> from stabwatch.metrics import StabilityMetrics
        >>> both = AllOf(RatioRule("grad_norm", factor=5, min_history=3),
        ...              RatioRule("loss", factor=2, min_history=3), name="blowup")
        >>> recs = [StabilityMetrics(step=s, loss=1.0, grad_norm=1.0) for s in range(3)]
        >>> recs.append(StabilityMetrics(step=3, loss=1.0, grad_norm=9.0))   # grad only: quiet
        >>> recs.append(StabilityMetrics(step=4, loss=3.0, grad_norm=9.0))   # both: alert
        >>> [a.step for r in recs for a in both.observe(RecordView(r))]
        [4]
    """

    default_name = "all_of"
    _word = "and"

    def _combine(self, results: list[list[tuple[str | None, Verdict]]]) -> Verdict | None:
        if any(not per for per in results):
            return None
        firing = [next(((layer, v) for layer, v in per if v.triggered), None) for per in results]
        if all(f is not None for f in firing):
            parts = [self._describe(c, f[0], f[1]) for c, f in zip(self.children, firing) if f is not None]
            return Verdict(True, firing[0][1].value, " and ".join(parts))  # type: ignore[index]
        calm = [self._describe(c, per[0][0], per[0][1]) for c, per in zip(self.children, results)]
        return Verdict(False, results[0][0][1].value, "; ".join(calm))


class AnyOf(_Combination):
    """Alert when at least one child rule's condition holds (one alert for the group, not one per
    child). Records on which no child has a value are skipped.
    """

    default_name = "any_of"
    _word = "or"

    def _combine(self, results: list[list[tuple[str | None, Verdict]]]) -> Verdict | None:
        present = [(c, per) for c, per in zip(self.children, results) if per]
        if not present:
            return None
        firing = [(c, layer, v) for c, per in present for layer, v in per if v.triggered]
        if firing:
            return Verdict(True, firing[0][2].value, " and ".join(self._describe(c, ly, v) for c, ly, v in firing))
        calm = "; ".join(self._describe(c, per[0][0], per[0][1]) for c, per in present)
        return Verdict(False, present[0][1][0][1].value, calm)
