"""Schedules: plain ``step -> bool`` functions deciding when a metric family runs."""

from __future__ import annotations

from collections.abc import Callable

from stabwatch.errors import ConfigError, check_int

__all__ = ["Schedule", "every", "make_schedule", "never"]

Schedule = Callable[[int], bool]


def every(n: int, offset: int = 0) -> Schedule:
    """Run at steps ``offset, offset + n, offset + 2n, ...``.

    Raises:
        ConfigError: ``n`` is not an int >= 1 or ``offset`` not an int >= 0.

    Example:
        >>> [s for s in range(10) if every(4)(s)]
        [0, 4, 8]
    """
    check_int(n, "every.n (the schedule period)")
    check_int(offset, "every.offset", minimum=0)

    def _schedule(step: int) -> bool:
        return step >= offset and (step - offset) % n == 0

    _schedule.period = n  # type: ignore[attr-defined]
    return _schedule


def never(step: int) -> bool:
    """A schedule that never runs (the family is off)."""
    return False


def make_schedule(spec: int | Schedule | None, field: str = "every") -> Schedule:
    """Turn a user's schedule spec into a schedule.

    Args:
        spec: ``None`` or ``0`` (off), a positive int period, or a callable ``step -> bool``.
        field: the name to quote in the error message.

    Raises:
        ConfigError: anything else (the message quotes ``field`` and what is allowed).
    """
    if spec is None or spec is False:
        return never
    if callable(spec):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise ConfigError(
            f"{field}: expected None/0 (off), a positive int period or a callable step -> bool, got {spec!r}"
        )
    if spec < 0:
        raise ConfigError(f"{field}: a schedule period must be >= 0 (0 = off), got {spec}")
    if spec == 0:
        return never
    return every(spec)
