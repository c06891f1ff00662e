"""`ThresholdRule`: the value is above (or below) a fixed level, with a separate clear level."""

from __future__ import annotations

from typing import Any

from stabwatch.alerts.base import Rule, Verdict, scan_check
from stabwatch.errors import ConfigError, check_number
from stabwatch.metrics import AlertReason
from stabwatch.numeric import fmt

__all__ = ["ThresholdRule"]


class ThresholdRule(Rule):
    """Alert when ``value > above`` or ``value < below``.

    Level hysteresis: with ``clear`` set, an episode that started above ``above`` lasts until the value
    drops to ``clear`` or below (``clear <= above``); one that started below ``below`` lasts until the
    value rises to ``clear`` or above (``clear >= below``). Without it the clear level is the threshold.

    Args:
        metric: the bound metric (see `stabwatch.alerts.base`).
        above / below: the levels (at least one).
        clear: the level that ends an episode (only with exactly one of ``above``/``below``).
        **kwargs: `Rule` options (name, severity, reason, suggestion, patience, cooldown, clear_after).

    Example:
        >>> rule = ThresholdRule("spectral_radius", above=1.0, clear=0.95, severity="warning")
        >>> [a.reason.value for s, v in enumerate([0.9, 1.02, 0.97, 0.94]) if (a := rule.update(s, v))]
        ['threshold', 'recovered']
    """

    default_reason = AlertReason.THRESHOLD
    default_name = "threshold"

    def __init__(
        self,
        metric: str,
        *,
        above: float | None = None,
        below: float | None = None,
        clear: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, **kwargs)
        self.above = check_number(above, "ThresholdRule.above")
        self.below = check_number(below, "ThresholdRule.below")
        self.clear = check_number(clear, "ThresholdRule.clear")
        if self.above is None and self.below is None:
            raise ConfigError(f"ThresholdRule({metric!r}).above/below: give above= and/or below=")
        if self.clear is not None:
            if (self.above is None) == (self.below is None):
                raise ConfigError(
                    f"ThresholdRule({metric!r}).clear: needs exactly one of above=/below= "
                    f"(got above={self.above}, below={self.below})"
                )
            if self.above is not None and self.clear > self.above:
                raise ConfigError(f"ThresholdRule({metric!r}).clear: {self.clear} must be <= above={self.above}")
            if self.below is not None and self.clear < self.below:
                raise ConfigError(f"ThresholdRule({metric!r}).clear: {self.clear} must be >= below={self.below}")

    _check = scan_check

    def _scan(self, state: Any, step: int, value: float, active: bool, full: bool) -> Verdict | bool:
        hi, lo = self.above, self.below
        if active and self.clear is not None:
            if hi is not None:
                hi = self.clear
            else:
                lo = self.clear
        if hi is not None and value > hi:
            return Verdict(True, value, lambda: f"{fmt(value)} > {fmt(hi)}")  # type: ignore[arg-type]
        if lo is not None and value < lo:
            return Verdict(True, value, lambda: f"{fmt(value)} < {fmt(lo)}")  # type: ignore[arg-type]
        if not active and not full:
            return False  # calm, outside an episode

        def detail() -> str:
            bounds = [f"<= {fmt(hi)}"] if hi is not None else []
            bounds += [f">= {fmt(lo)}"] if lo is not None else []
            return f"back to {fmt(value)} ({' and '.join(bounds)})"

        return Verdict(False, value, detail)
