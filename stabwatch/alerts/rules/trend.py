"""`TrendRule`: a significant rise (or fall) of the least-squares slope over a trailing window."""

from __future__ import annotations

import collections
import math
from typing import Any, Literal

from stabwatch.alerts.base import Rule, Verdict, check_floor, scan_check
from stabwatch.errors import ConfigError, check_choice, check_int, check_positive
from stabwatch.metrics import AlertReason
from stabwatch.numeric import fmt

__all__ = ["TrendRule", "fit_slope"]


def fit_slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    r"""Least-squares slope of ``ys`` against ``xs`` and its t-statistic.

    .. math:: b = \frac{S_{xy}}{S_{xx}}, \quad
              t = \frac{b}{\sqrt{\mathrm{SSE} / ((n-2)\,S_{xx})}}, \quad \mathrm{SSE} = S_{yy} - b\,S_{xy}

    with centred sums. ``t`` is ``inf`` for a perfect fit with non-zero slope, 0 with fewer than 3
    points or no spread in ``xs``.

    Example:
        >>> fit_slope([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0])
        (2.0, inf)
    """
    n = len(xs)
    if n < 3:
        return 0.0, 0.0
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, 0.0
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    b = sxy / sxx
    sse = max(syy - b * sxy, 0.0)
    if sse <= 1e-24 * max(syy, 1e-300):
        return b, (math.copysign(math.inf, b) if b != 0 else 0.0)
    return b, b / math.sqrt(sse / ((n - 2) * sxx))


class _TrendState:
    """The window plus running sums of x, y, x², xy, y² (x = step - x0), so each value costs O(1);
    the sums are recomputed from the window every ``size`` values to keep round-off from piling up.
    `TrendRule._scan` moves them, inlined: +x, +x*x ... for a new value, -x, -x*x ... for the one
    leaving the window (the same floating-point results as adding ``(±1.0 * x) * x``: a sign flip is
    exact, so states saved before this form resume identically)."""

    __slots__ = ("n_since", "steps", "sx", "sxx", "sxy", "sy", "syy", "values", "x0")

    def __init__(self, size: int) -> None:
        self.steps: collections.deque[int] = collections.deque()
        self.values: collections.deque[float] = collections.deque()
        self.x0 = 0
        self.sx = self.sy = self.sxx = self.sxy = self.syy = 0.0
        self.n_since = 0

    @property
    def sums(self) -> list[float]:
        return [self.sx, self.sy, self.sxx, self.sxy, self.syy]

    @sums.setter
    def sums(self, sums: list[float]) -> None:
        self.sx, self.sy, self.sxx, self.sxy, self.syy = sums

    def rebase(self) -> None:
        x0 = self.x0 = self.steps[0] if self.steps else 0
        sx = sy = sxx = sxy = syy = 0.0
        for step, y in zip(self.steps, self.values):
            x = float(step - x0)
            sx += x
            sy += y
            sxx += x * x
            sxy += x * y
            syy += y * y
        self.sx, self.sy, self.sxx, self.sxy, self.syy = sx, sy, sxx, sxy, syy
        self.n_since = 0

    def fit(self) -> tuple[float, float]:
        """Slope and its t-statistic (as `fit_slope`) from the running sums."""
        n = len(self.values)
        sx, sy, sxx, sxy, syy = self.sx, self.sy, self.sxx, self.sxy, self.syy
        cxx = sxx - sx * sx / n
        if n < 3 or cxx <= 0:
            return 0.0, 0.0
        cxy = sxy - sx * sy / n
        cyy = syy - sy * sy / n
        b = cxy / cxx
        sse = cyy - b * cxy
        if sse <= 1e-12 * max(cyy, 1e-300):  # a straight line, to round-off
            return b, (math.copysign(math.inf, b) if b != 0 else 0.0)
        return b, b / math.sqrt(sse / ((n - 2) * cxx))


class TrendRule(Rule):
    r"""Alert when a metric has been trending up (or down) over the last ``window`` observations.

    Fits :math:`y = a + b\,t` by least squares over the window, with :math:`y = \ln x` when ``log=True``
    (so a constant growth *rate* is a straight line) and :math:`t` the step. It alerts when the fitted
    change over the window, :math:`b\,(t_{last} - t_{first})`, is at least :math:`\ln` ``factor``
    (``log=True``) or ``min_change`` (``log=False``) in the watched direction, **and** the slope is
    significant, :math:`|t_b| \ge` ``min_t`` — both, so slow drift and noisy wiggles stay quiet. With
    ``floor`` set (``direction="rising"``), a rise that has not reached that absolute level yet (the
    latest value is below it) does not alert. Only full windows are judged. Cost: O(1) per value
    (running sums).

    Args:
        metric: the bound metric.
        window: observations in the fit.
        direction: ``"rising"`` or ``"falling"``.
        factor: fitted growth over the window that alerts, with ``log=True`` (> 1).
        min_change: fitted change over the window that alerts, with ``log=False``.
        min_t: slope t-statistic needed.
        log: fit ``ln(value)`` (non-positive values are skipped).
        floor: absolute floor (``direction="rising"``): no alert while the latest value is below it.
        **kwargs: `Rule` options.

    Example:
        >>> rule = TrendRule("grad_norm", window=20, factor=4, min_t=5)
        >>> hits = [a for s in range(60) if (a := rule.update(s, 1.0 if s < 30 else 1.1 ** (s - 30)))]
        >>> hits[0].step, hits[0].reason.value
        (44, 'trend')
    """

    default_reason = AlertReason.TREND
    default_name = "trend"

    def __init__(
        self,
        metric: str,
        *,
        window: int = 100,
        direction: Literal["rising", "falling"] = "rising",
        factor: float | None = 10.0,
        min_change: float | None = None,
        min_t: float = 5.0,
        log: bool = True,
        floor: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, **kwargs)
        self.window = check_int(window, "TrendRule.window", minimum=3)
        self.direction = check_choice(direction, "TrendRule.direction", ("rising", "falling"))
        self.log = bool(log)
        if self.log:
            if factor is None:
                raise ConfigError("TrendRule.factor: required with log=True (a number > 1)")
            self.factor = check_positive(factor, "TrendRule.factor")
            if self.factor <= 1:
                raise ConfigError(f"TrendRule.factor: expected a number > 1, got {factor!r}")
            self.threshold = math.log(self.factor)
        else:
            if min_change is None:
                raise ConfigError("TrendRule.min_change: required with log=False (a number > 0)")
            self.threshold = check_positive(min_change, "TrendRule.min_change")
        self.min_t = check_positive(min_t, "TrendRule.min_t")
        self.floor = check_floor(floor, "TrendRule.floor", upward=self.direction == "rising")

    def _new_state(self) -> _TrendState:
        return _TrendState(self.window)

    _check = scan_check

    def _scan(self, st: _TrendState, step: int, value: float, active: bool, full: bool) -> Verdict | bool | None:
        if not self.log:
            y = value
        elif value > 0:  # log scale: ln(value); a value <= 0 is skipped
            y = math.log(value)
        else:
            return None
        window = self.window
        # push the value (see `_TrendState`) and, on the fast path, fit the slope alone
        steps, values = st.steps, st.values
        steps.append(step)
        values.append(y)
        x0 = st.x0
        x = float(step - x0)
        sx, sy, sxx, sxy, syy = st.sx + x, st.sy + y, st.sxx + x * x, st.sxy + x * y, st.syy + y * y
        n = len(values)
        if n > window:
            x = float(steps.popleft() - x0)
            y = values.popleft()
            sx, sy, sxx, sxy, syy = sx - x, sy - y, sxx - x * x, sxy - x * y, syy - y * y
            n -= 1
        st.sx, st.sy, st.sxx, st.sxy, st.syy = sx, sy, sxx, sxy, syy
        st.n_since += 1
        if st.n_since >= window:
            st.rebase()
            sx, sy, sxx, sxy = st.sx, st.sy, st.sxx, st.sxy
        if n < window:
            return None
        sign = 1.0 if self.direction == "rising" else -1.0
        if not active and not full:
            cxx = sxx - sx * sx / n
            slope = 0.0 if n < 3 or cxx <= 0 else (sxy - sx * sy / n) / cxx
            if not sign * slope * (steps[-1] - steps[0]) >= self.threshold:
                return False  # the fitted change is too small: calm (no t-statistic needed), outside an episode
        slope, t = st.fit()
        change = slope * (st.steps[-1] - st.steps[0])
        triggered = (
            sign * change >= self.threshold and sign * t >= self.min_t and (self.floor is None or value >= self.floor)
        )
        if not triggered and not active and not full:
            return False
        first, last, log = st.steps[0], st.steps[-1], self.log

        def detail() -> str:
            span = f"steps {first}-{last}"
            verb = "rose" if change >= 0 else "fell"
            if log:
                ratio = math.exp(change)
                amount = f"{fmt(ratio if change >= 0 else 1 / ratio, 3)}×"
                text = f"{verb} {amount} over {span} (fitted ×{fmt(math.exp(slope))} per step, t = {t:.1f})"
            else:
                rate = fmt(slope, 3, signed=True)
                text = f"{verb} by {fmt(abs(change))} over {span} (fitted {rate} per step, t = {t:.1f})"
            return f"{text}; now {fmt(value)}" if triggered else f"no longer trending: {text}; now {fmt(value)}"

        return Verdict(triggered, value, detail)

    def _dump_state(self, st: _TrendState) -> dict[str, Any]:
        # the running sums and their origin too: recomputing them from the window rounds differently, and
        # a resumed run must judge (and word its messages) exactly as an uninterrupted one
        return {
            "steps": list(st.steps),
            "values": list(st.values),
            "x0": st.x0,
            "sums": list(st.sums),
            "n_since": st.n_since,
        }

    def _load_state(self, data: dict[str, Any]) -> _TrendState:
        st = _TrendState(self.window)
        st.steps.extend(int(s) for s in data["steps"])
        st.values.extend(float(v) for v in data["values"])
        if "sums" in data:
            st.x0 = int(data["x0"])
            st.sums = [float(v) for v in data["sums"]]
            st.n_since = int(data["n_since"])
        else:  # a state saved before the sums were kept
            st.rebase()
        return st
