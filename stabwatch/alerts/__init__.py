"""Alert rules and the engine that runs them on each record.

Rules are fed plain values (``rule.update(step, value) -> Alert | None``), one module per rule type in
`stabwatch.alerts.rules`; `AlertEngine` binds them to record fields and runs them on each record;
`default_rules` is the documented default set; `stabwatch.alerts.actions` holds what alerts trigger
(logging, callbacks, the opt-in `InstabilityError` and skip-step guard).
"""

from stabwatch.alerts.actions import StepGuard
from stabwatch.alerts.base import Binding, Rule, Verdict
from stabwatch.alerts.defaults import default_rules
from stabwatch.alerts.engine import AlertEngine
from stabwatch.alerts.rules import (
    AllOf,
    AnyOf,
    NonFiniteRule,
    RatioRule,
    SpikeRule,
    SustainedRule,
    ThresholdRule,
    TrendRule,
)

__all__ = [
    "AlertEngine",
    "AllOf",
    "AnyOf",
    "Binding",
    "NonFiniteRule",
    "RatioRule",
    "Rule",
    "SpikeRule",
    "StepGuard",
    "SustainedRule",
    "ThresholdRule",
    "TrendRule",
    "Verdict",
    "default_rules",
]
