"""The one exception type stabwatch raises."""

from __future__ import annotations

from typing import Any

__all__ = ["InstabilityError", "StabwatchError"]


class StabwatchError(Exception):
    """Raised when stabwatch is misconfigured or cannot do what was asked.

    The message always says what was wrong and how to fix it (the field, the allowed values, the
    module path or the tensor shapes involved).
    """


class InstabilityError(StabwatchError):
    """Raised by `Monitor.step` when an alert at or above ``raise_on`` severity fired (opt-in).

    The record (with its alerts) has already been written to every sink when this is raised, so the
    trackers show why training stopped.

    Attributes:
        alerts: the alerts that caused it.
        step: the step they fired at.
    """

    def __init__(self, message: str, alerts: list[Any] | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.alerts = list(alerts or [])
        self.step = step
