"""Rule types, one per module; each is fed plain values (``rule.update(step, value)``)."""

from stabwatch.alerts.rules.combine import AllOf, AnyOf
from stabwatch.alerts.rules.nonfinite import NonFiniteRule
from stabwatch.alerts.rules.ratio import RatioRule
from stabwatch.alerts.rules.spike import SpikeRule
from stabwatch.alerts.rules.sustained import SustainedRule
from stabwatch.alerts.rules.threshold import ThresholdRule
from stabwatch.alerts.rules.trend import TrendRule

__all__ = [
    "AllOf",
    "AnyOf",
    "NonFiniteRule",
    "RatioRule",
    "SpikeRule",
    "SustainedRule",
    "ThresholdRule",
    "TrendRule",
]
