"""The exception types stabwatch raises, and the checks that raise them on bad input.

Every failure on bad input is a `StabwatchError`; a wrong setting is its subclass `ConfigError` (also a
`ValueError`), whose message names the field, the value given and what is allowed. The checks below
(`check_int`, `check_positive`, `check_number`, `check_choice`, `validated`) are how every part of the
package validates a setting, so the wording is the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ConfigError",
    "InputError",
    "InstabilityError",
    "MissingExtraError",
    "StabwatchError",
    "check_choice",
    "check_int",
    "check_number",
    "check_positive",
    "describe_validation_error",
    "validated",
]


class StabwatchError(Exception):
    """Raised when stabwatch is misconfigured or cannot do what was asked.

    The message always says what was wrong and how to fix it (the field, the allowed values, the
    module path or the tensor shapes involved).
    """


class ConfigError(StabwatchError, ValueError):
    """A configuration value is wrong: the message names the field, what was given and what is allowed.

    Also a `ValueError`, so ``except ValueError`` written for pydantic-style validation keeps working.
    """


class InputError(StabwatchError, ValueError):
    """A tensor or value passed to a function has the wrong shape, length or content (the message says
    which and what was expected). Also a `ValueError`."""


class MissingExtraError(StabwatchError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install stabwatch[extra]``."""


def check_int(value: Any, field: str, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else a `ConfigError` naming ``field``.

    Example:
        >>> check_int(3, "window")
        3
        >>> check_int(0, "RatioRule.window")
        Traceback (most recent call last):
        ...
        stabwatch.errors.ConfigError: RatioRule.window: expected an int >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field}: expected an int >= {minimum}, got {value!r}")
    return value


def check_positive(value: Any, field: str, allow_zero: bool = False) -> float:
    """``float(value)`` if it is a finite number ``> 0`` (``>= 0`` with ``allow_zero``), else a `ConfigError`.

    Example:
        >>> check_positive("2.5", "factor"), check_positive(0, "cooldown", allow_zero=True)
        (2.5, 0.0)
    """
    v = _float(value, field, "a number")
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{field}: expected a finite number >{'=' if allow_zero else ''} 0, got {value!r}")
    return v


def check_number(value: Any, field: str) -> float | None:
    """``None`` or ``float(value)``; anything that is not a number is a `ConfigError` naming ``field``."""
    return None if value is None else _float(value, field, "a number or None")


def check_choice(value: Any, field: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a `ConfigError` listing them.

    Example:
        >>> check_choice("sideways", "TrendRule.direction", ("rising", "falling"))
        Traceback (most recent call last):
        ...
        stabwatch.errors.ConfigError: TrendRule.direction: expected 'rising' or 'falling', got 'sideways'
    """
    if value not in choices:
        shown = [repr(c) for c in choices]
        allowed = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
        raise ConfigError(f"{field}: expected {allowed}, got {value!r}")
    return value


def _float(value: Any, field: str, expected: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected {expected}, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: expected {expected}, got {value!r}") from None


def validated(model: type[Any], where: str, /, **values: Any) -> Any:
    """Build the pydantic ``model`` from ``values``; a ``ValidationError`` becomes a `ConfigError`.

    The message starts with ``where`` (e.g. ``"Monitor"``) and lists each bad field with the value given
    and pydantic's explanation (which names the allowed values).

    Example:
        >>> from pydantic import BaseModel
        >>> class Opts(BaseModel):
        ...     period: int
        >>> validated(Opts, "Demo", period="often")
        Traceback (most recent call last):
        ...
        stabwatch.errors.ConfigError: Demo: period='often': Input should be a valid integer, ...
    """
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: Any) -> str:
    """One line per bad field of a pydantic ``ValidationError``: ``field=value: why``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "(value)"
        if err.get("type") == "missing":
            parts.append(f"{loc}: missing (a required field)")
            continue
        shown = repr(err.get("input"))
        if len(shown) > 60:
            shown = shown[:57] + "..."
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")  # our own validators' messages
        parts.append(f"{loc}={shown}: {msg}")
    return "; ".join(parts)


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
