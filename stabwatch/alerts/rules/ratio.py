"""`RatioRule`: the value is many times its trailing-window median."""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any, Literal

from stabwatch.alerts.base import Rule, Verdict, Window, check_floor, describe_span, scan_check
from stabwatch.errors import ConfigError, check_choice, check_int, check_positive
from stabwatch.metrics import AlertReason
from stabwatch.numeric import fmt

__all__ = ["RatioRule"]


class _RatioState:
    __slots__ = ("excluded", "window")

    def __init__(self, size: int) -> None:
        self.window = Window(size)
        self.excluded = 0


class RatioRule(Rule):
    r"""Alert when a value is ``factor`` times its trailing median (``direction="up"``) or ``factor``
    times smaller (``"down"``).

    .. math:: r_t = x_t / \operatorname{median}(x_{t-w}, \dots, x_{t-1}), \quad
              \text{alert if } r_t \ge f \;(\text{up}) \text{ or } r_t \le 1/f \;(\text{down})

    The median is robust: a few outliers in the window do not move it. Values that trigger are kept out
    of the window (so a spike does not become its own baseline) until an episode has lasted a full
    window, after which the window adapts to the new level. Nothing is judged until the window holds
    ``min_history`` values. Windows count observations (records carrying the metric), not steps.

    A ratio of two tiny numbers is not an explosion: with ``floor`` set and ``direction="up"``, a value
    below ``floor`` never triggers, whatever its ratio, and it joins the window as a normal value (a layer
    whose gradient creeps from 1e-6 to 1e-3 is judged against its new level, not the old one). With
    ``direction="down"`` the floor is on the level fallen from: a fall is judged only while the trailing
    median is at least ``floor`` (a firing rate falling from 0.002 to 0.0008 is not news; from 0.1 to 0.04
    it is).

    Args:
        metric: the bound metric.
        factor: the ratio that alerts (> 1).
        window: trailing-window length in observations.
        min_history: values needed before the first judgement (the warm-up).
        direction: ``"up"`` or ``"down"``.
        instant_factor: a ratio that alerts at once even when ``patience > 1`` (e.g. ``factor=10,
            patience=2, instant_factor=50``: 10× on two consecutive values, or 50× once).
        floor: absolute floor: with ``direction="up"`` values below it never trigger; with ``"down"`` a
            fall from a median below it does not. ``None``: no floor.
        **kwargs: `Rule` options.

    Example:
        >>> rule = RatioRule("grad_norm", factor=10, window=50, min_history=5)
        >>> alerts = [rule.update(s, v) for s, v in enumerate([2.9e3] * 10 + [3.2e4])]
        >>> alerts[-1].message
        'grad_norm 3.2e+04 is 11× its 10-step median 2900'
    """

    default_reason = AlertReason.SPIKE
    default_name = "ratio"

    def __init__(
        self,
        metric: str,
        *,
        factor: float = 10.0,
        window: int = 50,
        min_history: int = 10,
        direction: Literal["up", "down"] = "up",
        instant_factor: float | None = None,
        floor: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, **kwargs)
        self.factor = check_positive(factor, "RatioRule.factor")
        if self.factor <= 1:
            raise ConfigError(f"RatioRule.factor: expected a number > 1, got {factor!r}")
        self.window = check_int(window, "RatioRule.window")
        self.min_history = check_int(min_history, "RatioRule.min_history")
        if self.min_history > self.window:
            raise ConfigError(f"RatioRule.min_history ({min_history}) must be <= window ({window})")
        self.direction = check_choice(direction, "RatioRule.direction", ("up", "down"))
        self.instant_factor = (
            None if instant_factor is None else check_positive(instant_factor, "RatioRule.instant_factor")
        )
        if self.instant_factor is not None and self.instant_factor < self.factor:
            raise ConfigError(f"RatioRule.instant_factor ({instant_factor}) must be >= factor ({factor})")
        self.floor = check_floor(floor, "RatioRule.floor")

    def _new_state(self) -> _RatioState:
        return _RatioState(self.window)

    _check = scan_check

    def _scan(self, state: _RatioState, step: int, value: float, active: bool, full: bool) -> Verdict | bool | None:
        w = state.window
        values, ordered = w.values, w.sorted
        n = len(values)
        if n < self.min_history:
            w.push(step, value)
            return None
        mid = n // 2  # `Window.median`, inlined
        med = ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
        up = self.direction == "up"
        if up:
            floor = self.floor
            triggered = med > 0 and value >= self.factor * med and (floor is None or value >= floor)
        else:
            floor = self.floor
            triggered = med > 0 and value <= med / self.factor and (floor is None or med >= floor)
        if not triggered and not active and not full:  # calm, outside an episode: the fast path
            state.excluded = 0
            values.append(value)  # `Window.push`, inlined
            w.steps.append(step)
            insort(ordered, value)
            if n >= w.size:
                del ordered[bisect_left(ordered, values.popleft())]
                w.steps.popleft()
            return False
        span = w.span()
        if up:  # noqa: SIM108 - two conditionals in one line are harder to read
            magnitude = value / med if med > 0 else float("inf")
        else:
            magnitude = med / value if value > 0 else float("inf")

        def detail() -> str:
            desc = describe_span(*span)
            if triggered:
                below = "" if up else " below"
                return f"{fmt(value)} is {fmt(magnitude, 3)}×{below} its {desc} median {fmt(med)}"
            if up:
                return f"back to {fmt(value)}, {fmt(magnitude, 3)}× its {desc} median {fmt(med)}"
            return f"back to {fmt(value)}, its {desc} median is {fmt(med)}"

        if not triggered:
            state.excluded = 0
            w.push(step, value)
        elif state.excluded < self.window:
            state.excluded += 1  # a spike is not its own baseline...
        else:
            w.push(step, value)  # ...until it has lasted a full window: then the level is the new normal
        urgent = triggered and self.instant_factor is not None and magnitude >= self.instant_factor
        return Verdict(triggered, value, detail, urgent)

    def _absorb(self, state: _RatioState, step: int, value: float) -> None:
        w = state.window
        if not w.steps or w.steps[-1] != step:  # not pushed already (an episode longer than the window)
            w.push(step, value)
        state.excluded = 0

    def _dump_state(self, state: _RatioState) -> dict[str, Any]:
        return {"window": state.window.state(), "excluded": state.excluded}

    def _load_state(self, data: dict[str, Any]) -> _RatioState:
        st = _RatioState(self.window)
        st.window = Window.from_state(self.window, data["window"])
        st.excluded = int(data["excluded"])
        return st
