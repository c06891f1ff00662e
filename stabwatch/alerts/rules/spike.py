"""`SpikeRule`: a robust z-score spike detector (median/MAD or EWMA), with warm-up."""

from __future__ import annotations

import math
from typing import Any, Literal

from stabwatch.alerts.base import Rule, Verdict, Window, check_floor, describe_span, scan_check
from stabwatch.errors import ConfigError, check_choice, check_int, check_positive
from stabwatch.metrics import AlertReason
from stabwatch.numeric import fmt

__all__ = ["SpikeRule"]

#: 1 / Phi^-1(3/4): makes the MAD a consistent estimate of the standard deviation for Gaussian data
MAD_TO_SIGMA = 1.482602218505602


class _SpikeState:
    __slots__ = ("excluded", "mean", "n", "var", "window")

    def __init__(self, size: int | None) -> None:
        self.window = Window(size) if size is not None else None
        self.mean = 0.0
        self.var = 0.0
        self.n = 0
        self.excluded = 0


class SpikeRule(Rule):
    r"""Alert when a value is an outlier against its recent history, by a robust z-score.

    The value is first transformed, :math:`y = \ln x` when ``log=True`` (the natural scale of losses and
    norms, whose noise is multiplicative; non-positive values are skipped) or :math:`y = x`. Then

    * ``method="mad"``: :math:`z = (y - m) / \max(1.4826\,\mathrm{MAD}, s_{min})` with :math:`m` the
      median and MAD the median absolute deviation of the last ``window`` values (Hampel's identifier;
      1.4826 makes MAD estimate σ for Gaussian noise);
    * ``method="ewma"``: :math:`z = (y - \mu) / \max(\sigma, s_{min})` with an exponentially weighted
      mean and variance, :math:`\mu \leftarrow \mu + \alpha (y - \mu)`,
      :math:`\sigma^2 \leftarrow (1-\alpha)(\sigma^2 + \alpha (y-\mu)^2)`, :math:`\alpha = 2/(w+1)`
      (averaging with weight ``1/n`` during the warm-up). O(1) per value.

    It alerts when :math:`z \ge` ``z`` (``direction="up"``; ``"down"``: :math:`z \le -z`; ``"both"``)
    **and**, when ``min_ratio`` is set, the value is at least ``min_ratio`` times the baseline
    (:math:`e^m` or :math:`e^\mu` on log scale) — a practical-size floor so a run whose metric became
    almost constant does not alert on tiny wiggles. With ``floor`` set, an upward outlier below that
    absolute level never triggers (a relative jump of a tiny value is not a spike). Outliers are kept
    out of the baseline until an episode has lasted a full window. No judgement during the first
    ``warmup`` values.

    Args:
        metric: the bound metric.
        z: robust z-score threshold.
        window: history length in observations (MAD window; EWMA span).
        warmup: values seen before the first judgement.
        method: ``"mad"`` or ``"ewma"``.
        log: judge ``ln(value)``.
        direction: ``"up"``, ``"down"`` or ``"both"``.
        min_ratio: also require ``value >= min_ratio * baseline`` (up) / ``<= baseline / min_ratio``
            (down); ``None`` to rely on the z-score alone.
        min_scale: floor of the scale estimate, in the transformed units.
        instant_z: a z-score that alerts at once even when ``patience > 1``.
        floor: absolute floor of an upward spike: a value below it never triggers as one.
        **kwargs: `Rule` options.

    Example:
        >>> import math
        >>> rule = SpikeRule("loss", z=6, window=50, warmup=20, min_ratio=2)
        >>> noisy = [1.0 + 0.05 * math.sin(1.7 * i) for i in range(40)]
        >>> [(a.step, a.reason.value) for s, v in enumerate(noisy + [3.0, 1.0])
        ...  if (a := rule.update(s, v))]
        [(40, 'spike'), (41, 'recovered')]
    """

    default_reason = AlertReason.SPIKE
    default_name = "spike"

    def __init__(
        self,
        metric: str,
        *,
        z: float = 6.0,
        window: int = 100,
        warmup: int = 20,
        method: Literal["mad", "ewma"] = "mad",
        log: bool = True,
        direction: Literal["up", "down", "both"] = "up",
        min_ratio: float | None = None,
        min_scale: float = 1e-3,
        instant_z: float | None = None,
        floor: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, **kwargs)
        self.z = check_positive(z, "SpikeRule.z")
        self.window = check_int(window, "SpikeRule.window", minimum=2)
        self.warmup = check_int(warmup, "SpikeRule.warmup", minimum=2)
        self.method = check_choice(method, "SpikeRule.method", ("mad", "ewma"))
        self.direction = check_choice(direction, "SpikeRule.direction", ("up", "down", "both"))
        if method == "mad" and self.warmup > self.window:
            raise ConfigError(f"SpikeRule.warmup ({warmup}) must be <= window ({window}) with method='mad'")
        self.log = bool(log)
        self.min_ratio = None if min_ratio is None else check_positive(min_ratio, "SpikeRule.min_ratio")
        if self.min_ratio is not None and self.min_ratio < 1:
            raise ConfigError(f"SpikeRule.min_ratio: expected a number >= 1, got {min_ratio!r}")
        self.min_scale = check_positive(min_scale, "SpikeRule.min_scale")
        self.alpha = 2.0 / (self.window + 1.0)
        self.instant_z = None if instant_z is None else check_positive(instant_z, "SpikeRule.instant_z")
        if self.instant_z is not None and self.instant_z < self.z:
            raise ConfigError(f"SpikeRule.instant_z ({instant_z}) must be >= z ({z})")
        self.floor = check_floor(floor, "SpikeRule.floor")

    def _new_state(self) -> _SpikeState:
        return _SpikeState(self.window if self.method == "mad" else None)

    def _accept(self, st: _SpikeState, step: int, y: float) -> None:
        st.n += 1
        if st.window is not None:
            st.window.push(step, y)
            return
        a = max(self.alpha, 1.0 / st.n)
        diff = y - st.mean
        st.mean += a * diff
        st.var = (1.0 - a) * (st.var + a * diff * diff)

    _check = scan_check

    def _scan(self, st: _SpikeState, step: int, value: float, active: bool, full: bool) -> Verdict | bool | None:
        if not self.log:
            y = value
        elif value > 0:  # log scale: ln(value); a value <= 0 is skipped
            y = math.log(value)
        else:
            return None
        if st.n < self.warmup:
            self._accept(st, step, y)
            return None
        span = None
        w = st.window
        if w is not None:
            center = w.median()
            scale = MAD_TO_SIGMA * w.mad(center)
        else:
            center, scale = st.mean, math.sqrt(st.var)
        scale = max(scale, self.min_scale)
        z = (y - center) / scale
        base = math.exp(center) if self.log else center
        direction = self.direction
        up = (
            z >= self.z
            and (self.min_ratio is None or value >= self.min_ratio * base)
            and (self.floor is None or value >= self.floor)
        )
        down = z <= -self.z and (self.min_ratio is None or value * self.min_ratio <= base)
        triggered = (up and direction in ("up", "both")) or (down and direction in ("down", "both"))
        if not triggered and not active and not full:  # calm, outside an episode
            st.excluded = 0
            self._accept(st, step, y)
            return False
        if w is not None:
            span = w.span()
        log = self.log
        window = self.window

        def detail() -> str:
            desc = f"{describe_span(*span)} median" if span is not None else f"EWMA (span {window})"
            if not triggered:
                return f"back to {fmt(value)} ({z:+.1f}σ vs its {desc} {fmt(base)})"
            scale_txt = "log scale" if log else "linear scale"
            ratio = f", {fmt(value / base, 3)}× the baseline" if log or base > 0 else ""
            return f"{fmt(value)} is a {z:+.1f}σ outlier vs its {desc} {fmt(base)} ({scale_txt}{ratio})"

        if not triggered:
            st.excluded = 0
            self._accept(st, step, y)
        elif st.excluded < self.window:
            st.excluded += 1
        else:
            self._accept(st, step, y)
        urgent = triggered and self.instant_z is not None and abs(z) >= self.instant_z
        return Verdict(triggered, value, detail, urgent)

    def _dump_state(self, st: _SpikeState) -> dict[str, Any]:
        return {
            "window": st.window.state() if st.window is not None else None,
            "mean": st.mean,
            "var": st.var,
            "n": st.n,
            "excluded": st.excluded,
        }

    def _load_state(self, data: dict[str, Any]) -> _SpikeState:
        st = _SpikeState(None)
        if data["window"] is not None:
            st.window = Window.from_state(self.window, data["window"])
        st.mean, st.var = float(data["mean"]), float(data["var"])
        st.n, st.excluded = int(data["n"]), int(data["excluded"])
        return st
