"""Schedules: plain ``step -> bool`` functions deciding when a metric family runs."""

from __future__ import annotations

from collections.abc import Callable

from stabwatch.errors import ConfigError, check_int

__all__ = ["Schedule", "dense_start", "every", "make_schedule", "never"]

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


def dense_start(schedule: Schedule, steps: int) -> Schedule:
    """Run at every step ``0 .. steps - 1``, then as ``schedule`` says.

    A family measured every 10 steps sees a problem present from the start (a layer that never fires)
    only at step 10, 20, ...; measured densely at first, it sees it at step 0, and the rules that need a
    few values in a row (a window, a patience) decide within a few steps. Afterwards it costs what the
    period costs. A schedule that never runs stays off (``dense_start(never, 20)`` is `never`).

    Args:
        schedule: the schedule after the dense start (``every(10)``, any ``step -> bool``).
        steps: how many first steps run every step (0: ``schedule`` unchanged).

    Raises:
        ConfigError: ``steps`` is not an int >= 0 or ``schedule`` is not callable.

    Example:
        >>> [s for s in range(35) if dense_start(every(10), 4)(s)]
        [0, 1, 2, 3, 10, 20, 30]
    """
    check_int(steps, "dense_start.steps (the steps measured every step first)", minimum=0)
    if not callable(schedule):
        raise ConfigError(f"dense_start: schedule must be a callable step -> bool, got {schedule!r}")
    if steps == 0 or schedule is never:
        return schedule

    def _schedule(step: int) -> bool:
        return step < steps or bool(schedule(step))

    period = getattr(schedule, "period", None)
    if period is not None:
        _schedule.period = period  # type: ignore[attr-defined]
    _schedule.dense_steps = steps  # type: ignore[attr-defined]
    _schedule.__name__ = f"dense_start({period or getattr(schedule, '__name__', 'schedule')}, {steps})"
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
