"""Alert rules and the engine that runs them on each record."""

from stabwatch.alerts.engine import AlertEngine, NonFiniteRule, default_rules

__all__ = ["AlertEngine", "NonFiniteRule", "default_rules"]
