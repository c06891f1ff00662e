"""`SustainedRule`: a condition that holds for ``patience`` of the last ``within`` observations."""

from __future__ import annotations

import collections
from typing import Any

from stabwatch.alerts.base import Rule, Verdict, scan_check
from stabwatch.errors import ConfigError, check_int, check_number
from stabwatch.metrics import AlertReason
from stabwatch.numeric import fmt

__all__ = ["SustainedRule"]


class _SustainedState:
    __slots__ = ("count", "hits", "since", "values")

    def __init__(self, size: int) -> None:
        self.hits: collections.deque[bool] = collections.deque(maxlen=size)
        self.values: collections.deque[float] = collections.deque(maxlen=size)
        self.count = 0  # sum(hits), kept as values come and go
        self.since: int | None = None  # the step the current unbroken run of hits began (for `min_steps`)

    def push(self, hit: bool, value: float) -> None:
        if len(self.hits) == self.hits.maxlen and self.hits[0]:
            self.count -= 1
        self.hits.append(hit)
        self.values.append(value)
        self.count += hit


class SustainedRule(Rule):
    """Alert when ``value > above`` (or ``< below``) in at least ``patience`` of the last ``within``
    observations (``within = patience``: that many in a row).

    For noisy estimates whose sign matters more than any single value, such as a Lyapunov exponent
    whose running estimate wanders around 0: one positive value is noise, a positive value held over
    many measurements is a finding. The episode ends when fewer than ``patience`` of the last
    ``within`` values satisfy the condition. With ``min_steps``, the condition must also have held without
    a break for that many *steps* (a span of the run, whatever the schedule): a spiking readout silent for
    a few steps at the start of training, then firing, is not a dead layer.

    Args:
        metric: the bound metric.
        above / below: the condition (exactly one).
        patience: how many observations must satisfy it.
        within: out of how many recent observations (>= patience; default patience).
        min_steps: steps the condition must have held without a break (0: no such requirement).
        **kwargs: `Rule` options (``severity``, ``cooldown``, ...).

    Example:
        >>> rule = SustainedRule("lyapunov", above=0.0, patience=3, within=4)
        >>> values = [0.1, -0.1, 0.2, 0.1, -0.2, -0.3, -0.1]
        >>> [(a.step, a.reason.value) for s, v in enumerate(values) if (a := rule.update(s, v))]
        [(3, 'threshold'), (4, 'recovered')]
    """

    default_reason = AlertReason.THRESHOLD
    default_name = "sustained"

    def __init__(
        self,
        metric: str,
        *,
        above: float | None = None,
        below: float | None = None,
        patience: int = 5,
        within: int | None = None,
        min_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        if "clear_after" not in kwargs:
            kwargs["clear_after"] = 1
        super().__init__(metric, **kwargs)
        self.above = check_number(above, "SustainedRule.above")
        self.below = check_number(below, "SustainedRule.below")
        if (self.above is None) == (self.below is None):
            raise ConfigError(f"SustainedRule({metric!r}).above/below: give exactly one of above= / below=")
        self.k = check_int(patience, "SustainedRule.patience")
        self.n = check_int(within if within is not None else patience, "SustainedRule.within")
        if self.n < self.k:
            raise ConfigError(f"SustainedRule.within ({within}) must be >= patience ({patience})")
        self.min_steps = check_int(min_steps, "SustainedRule.min_steps", minimum=0)

    def _new_state(self) -> _SustainedState:
        return _SustainedState(self.n)

    _check = scan_check

    def _scan(self, st: _SustainedState, step: int, value: float, active: bool, full: bool) -> Verdict | bool | None:
        above = self.above
        hit = value > above if above is not None else value < self.below  # type: ignore[operator]
        hits = st.hits
        n = len(hits)
        if n == self.n and hits[0]:  # `_SustainedState.push`, inlined (the deques' maxlen is `self.n`)
            st.count -= 1
        hits.append(hit)  # a bool: a comparison of two floats
        st.values.append(value)
        count = st.count = st.count + hit
        min_steps = self.min_steps
        if min_steps:
            if not hit:
                st.since = None
            elif st.since is None:
                st.since = step
        k = self.k
        if n < k - 1:  # fewer than `patience` values so far (n is the count before this one)
            return None
        held = count >= k
        if min_steps and held:
            since = st.since
            held = since is not None and step - since >= min_steps
        if not held and not active and not full:
            return False  # calm, outside an episode
        n = len(hits)
        below, values, since = self.below, st.values, st.since if min_steps else None

        def detail() -> str:
            cond = f"> {fmt(above)}" if above is not None else f"< {fmt(below)}"  # type: ignore[arg-type]
            mean = sum(values) / len(values)
            held_since = f", since step {since}" if since is not None else ""
            return f"{cond} in {count} of the last {n} values (mean {fmt(mean)}, last {fmt(value)}{held_since})"

        return Verdict(held, value, detail)

    def _dump_state(self, st: _SustainedState) -> dict[str, Any]:
        out: dict[str, Any] = {"hits": list(st.hits), "values": list(st.values)}
        if self.min_steps:
            out["since"] = st.since
        return out

    def _load_state(self, data: dict[str, Any]) -> _SustainedState:
        st = _SustainedState(self.n)
        for h, v in zip(data["hits"], data["values"], strict=True):
            st.push(bool(h), float(v))
        since = data.get("since")
        st.since = None if since is None else int(since)
        return st
