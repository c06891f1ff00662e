"""The alert engine: feeds each record to its rules, collects their alerts, and acts on them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from stabwatch.alerts.actions import AlertCallbacks, log_alert
from stabwatch.alerts.base import RecordView, Rule, check_unique_names
from stabwatch.errors import ConfigError, InstabilityError, StabwatchError
from stabwatch.metrics import Alert, AlertReason, StabilityMetrics

__all__ = ["AlertEngine"]

log = logging.getLogger("stabwatch.alerts")


class _UnknownRuleError(StabwatchError, KeyError):
    """``engine[name]`` for a name the engine does not have (a `StabwatchError` and a `KeyError`)."""

    __str__ = StabwatchError.__str__  # the message as written, not KeyError's quoted repr


class AlertEngine:
    """Runs rules on each record: ``engine.evaluate(record) -> list[Alert]``.

    Each rule reads the values its metric binding selects from the record (rules skip metrics that
    were not computed at this step). The engine then logs every alert (logger ``stabwatch.alerts``) and
    calls the callbacks. A rule that raises is logged once and the others go on: alerting never stops
    training (only the opt-in ``Monitor(raise_on=...)`` does, after the record reached the sinks).

    Args:
        rules: `Rule` instances with unique names (see `stabwatch.alerts.default_rules`).
        callbacks: ``fn(alert)`` callables, called for every alert.
        log_alerts: log every alert on the ``stabwatch.alerts`` logger.

    Example:
        >>> from stabwatch.alerts import AlertEngine, RatioRule
        >>> from stabwatch.metrics import StabilityMetrics
        >>> engine = AlertEngine([RatioRule("grad_norm", factor=10, min_history=3)], log_alerts=False)
        >>> for s, g in enumerate([1.0, 1.2, 0.9, 15.0]):
        ...     fired = engine.evaluate(StabilityMetrics(step=s, grad_norm=g))
        >>> [str(a) for a in fired]
        ['[warning] step 3 ratio:grad_norm: grad_norm 15 is 15× its 3-step median 1']
    """

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        *,
        callbacks: Callable[[Alert], Any] | Iterable[Callable[[Alert], Any]] | None = (),
        log_alerts: bool = True,
    ) -> None:
        self._rules: list[Rule] = []
        self._watched: set[str] = set()
        self._order: list[int] = []
        for rule in rules:
            self.add(rule)
        self.callbacks = AlertCallbacks(callbacks)
        self.log_alerts = bool(log_alerts)
        self._failed: set[str] = set()
        #: rule name -> the last step it ended an episode, for the rules some rule's ``suppressed_by`` names
        self._recent: dict[str, int] = {}
        #: an `InstabilityError` a callback raised during the last `evaluate` (the `Monitor` raises it
        #: after the record has reached the sinks)
        self.stop_error: InstabilityError | None = None

    # the rule set ---------------------------------------------------------------------------------
    def add(self, rule: Rule) -> AlertEngine:
        """Add a rule (its name must be new)."""
        if not isinstance(rule, Rule):
            raise ConfigError(f"AlertEngine: expected a stabwatch.alerts Rule, got {type(rule).__name__} ({rule!r})")
        check_unique_names([*self._rules, rule])
        for r in [rule, *getattr(rule, "children", [])]:
            if r.binding is not None:
                r.binding.validate()
        self._rules.append(rule)
        self._reorder()
        return self

    def _reorder(self) -> None:
        """Evaluate the rules some rule's ``suppressed_by`` names first, so a suppression takes effect on the
        record that ends their episode (alerts are still returned in the rules' order)."""
        self._watched = {n for r in self._rules for n in r.suppressed_by}
        first = [i for i, r in enumerate(self._rules) if r.name in self._watched]
        self._order = first + [i for i, r in enumerate(self._rules) if r.name not in self._watched]

    def remove(self, name: str) -> Rule:
        """Remove and return the rule called ``name``."""
        rule = self[name]
        self._rules.remove(rule)
        self._reorder()
        return rule

    @property
    def rules(self) -> list[Rule]:
        return list(self._rules)

    def __getitem__(self, name: str) -> Rule:
        for rule in self._rules:
            if rule.name == name:
                return rule
        names = ", ".join(r.name for r in self._rules)
        raise _UnknownRuleError(f"AlertEngine: no alert rule named {name!r}; rules: {names}")

    def __iter__(self) -> Iterator[Rule]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    # evaluation -----------------------------------------------------------------------------------
    def evaluate(self, record: StabilityMetrics, extra: Sequence[Alert] = ()) -> list[Alert]:
        """Run every rule on ``record``; log and call back the alerts (``extra`` ones, e.g. from the
        skip-step guard, first). Returns them; the caller puts them in ``record.alerts``.

        A callback that raises `InstabilityError` (to stop training on purpose) does not stop the
        evaluation: the error is kept in `stop_error` for the caller to raise.
        """
        self.stop_error = None
        view = RecordView(record, self._recent)
        fired: list[Alert] = list(extra)
        watched = self._watched
        rules = self._rules
        by_rule: list[list[Alert]] | None = [[] for _ in rules] if watched else None
        for i in self._order if watched else range(len(rules)):
            rule = rules[i]
            try:
                alerts = rule.observe(view)
                if by_rule is None:
                    if alerts:
                        fired += alerts
                    continue
                by_rule[i] = alerts
                if rule.name in watched and any(a.reason is AlertReason.RECOVERED for a in alerts):
                    self._recent[rule.name] = record.step
            except Exception as exc:  # noqa: BLE001 - a broken rule never kills training
                if rule.name not in self._failed:
                    self._failed.add(rule.name)
                    log.warning(
                        "stabwatch: alert rule %r failed at step %d (%s: %s); it is skipped on this "
                        "record, further failures are not logged",
                        rule.name,
                        record.step,
                        type(exc).__name__,
                        exc,
                    )
        if by_rule is not None:
            for alerts in by_rule:
                fired += alerts
        self.dispatch(fired)
        return fired

    def dispatch(self, alerts: Sequence[Alert]) -> None:
        """Log the alerts and call the callbacks (a callback's `InstabilityError` goes to `stop_error`)."""
        if not alerts:
            return
        if self.log_alerts:
            for alert in alerts:
                log_alert(alert)
        try:
            self.callbacks(alerts)
        except InstabilityError as exc:
            self.stop_error = exc

    def run(self, records: Iterable[StabilityMetrics]) -> list[Alert]:
        """Evaluate a sequence of records (e.g. read back from JSONL) and return all alerts (a callback's
        `InstabilityError` is raised after the record that caused it)."""
        out: list[Alert] = []
        for record in records:
            out.extend(self.evaluate(record))
            if self.stop_error is not None:
                raise self.stop_error
        return out

    # state ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._recent.clear()
        for rule in self._rules:
            rule.reset()

    def state_dict(self) -> dict[str, Any]:
        """Every rule's windows and episode state, keyed by rule name (plain Python values), and the last
        step each rule named in a ``suppressed_by`` ended an episode."""
        return {
            "version": 1,
            "rules": {rule.name: rule.state_dict() for rule in self._rules},
            "recent": dict(self._recent),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output. Rules absent from ``state`` start fresh; state for rules this
        engine does not have is ignored (both logged), so a resumed run may change its rule set."""
        saved = state.get("rules")
        if not isinstance(saved, dict):
            raise StabwatchError(
                "AlertEngine.load_state_dict: expected {'version': 1, 'rules': {name: state}}, "
                f"got keys {sorted(state) if isinstance(state, dict) else type(state).__name__}"
            )
        names = {r.name for r in self._rules}
        recent = state.get("recent", {})
        self._recent.clear()
        if isinstance(recent, dict):
            self._recent.update({str(k): int(v) for k, v in recent.items()})
        unknown = sorted(set(saved) - names)
        if unknown:
            log.info("stabwatch: alert state for unknown rule(s) ignored: %s", ", ".join(unknown))
        for rule in self._rules:
            if rule.name in saved:
                rule.load_state_dict(saved[rule.name])
            else:
                rule.reset()
                log.info("stabwatch: alert rule %r has no saved state; it starts fresh", rule.name)

    def __repr__(self) -> str:
        return f"AlertEngine({len(self._rules)} rules: {', '.join(r.name for r in self._rules)})"
