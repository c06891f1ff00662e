"""The `Rule` base class: metric binding, per-stream state, and the alert lifecycle every rule shares.

A rule is a detector fed plain values, ``rule.update(step, value) -> Alert | None``. A subclass only
says *whether the condition holds* for one value (`Rule._check`, which also advances the detector's
window); the base class owns what turns a condition into alerts:

* **patience** — the condition must hold for ``patience`` consecutive observations before it alerts;
* **hysteresis** — a condition that persists alerts *once*; the stream is then *active* until the
  condition has been false for ``clear_after`` consecutive observations, when a ``recovered`` alert
  (severity info) reports the end of the episode;
* **cooldown** — at most one alert per stream every ``cooldown`` steps (a condition that flaps
  on/off inside the cooldown does not re-alert until it has passed);
* **per-layer streams** — a rule bound to ``"layers:<field>"`` keeps one independent state per module
  path; `Rule.update` takes ``layer=`` for that.

The built-in rule types implement `Rule._scan` instead (``_check = scan_check``): the same judgement,
with a shortcut for the common case of a calm value outside an episode, where no `Verdict` or message
is made (the engine runs every rule on every record; ``tests/alerts/test_rule_speed_equivalence.py``
holds them to the alerts they raised before the shortcut).

Missing values (``None``, the metric was not scheduled at this step) are skipped without touching any
state. Non-finite values are skipped too — they are the business of `NonFiniteRule`, so one NaN raises
one alert, not a cascade — except by rules that set ``accepts_nonfinite``.

Metric bindings (what `AlertEngine` feeds a rule with, see `Binding`):

* a record field name: ``"grad_norm"``, ``"loss"``, ``"lyapunov"`` ...;
* ``"layers:<field>"``: every layer's value of that field, one stream per layer;
* ``"layers_rel:<field>"``: every layer's value divided by the median over all layers at the same step
  (how far a layer is from the typical layer; needs at least 3 layers);
* ``"layers_ratio:<field>/<field>"``: every layer's ratio of two of its values, at the records that
  carry both (``"layers_ratio:grad_norm/weight_norm"``: a layer's gradient relative to its weights);
* a flat key as in `StabilityMetrics.to_dict`: ``family/metric`` or ``family_layers/metric/<layer>``
  (``"grad/norm"``, ``"grad_layers/norm/fc1"``, or an ``extra`` key such as ``"grad_sv_layers/top1/fc1"``).
"""

from __future__ import annotations

import bisect
import collections
import inspect
import math
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, NamedTuple

from stabwatch.errors import ConfigError, StabwatchError, check_choice, check_int, check_number
from stabwatch.metrics import FIELD_KEYS, Alert, AlertReason, Severity, StabilityMetrics, metric_key, parse_key
from stabwatch.numeric import median_sorted

__all__ = [
    "METRIC_FIELDS",
    "Binding",
    "RecordView",
    "Rule",
    "Verdict",
    "Window",
    "check_floor",
    "check_unique_names",
    "describe_span",
    "scan_check",
]

#: record fields a rule can bind to (metrics; not step / layers / extra / alerts / text fields)
METRIC_FIELDS: tuple[str, ...] = tuple(FIELD_KEYS)
_KEY_TO_FIELD = {key: field for field, key in FIELD_KEYS.items()}


class Verdict(NamedTuple):
    """What a detector says about one value.

    Attributes:
        triggered: the condition holds.
        value: the value that was judged.
        detail: the numbers, phrased to follow the metric name ("3.2e+04 is 11x its 50-step median
            2.9e+03"); used for the alert (when triggered) or the recovery message (when not). A
            zero-argument callable is accepted, so the text is only built when an alert needs it.
        urgent: the condition is so far past its threshold that the rule's ``patience`` is waived.
    """

    triggered: bool
    value: float
    detail: str | Callable[[], str]
    urgent: bool = False

    @property
    def text(self) -> str:
        """`detail` as a string."""
        return self.detail if isinstance(self.detail, str) else self.detail()


class RecordView:
    """A record plus a lazily built flat-key dict, shared by all rules evaluating one record (and its
    ``step`` and ``layers``, read once here: a field of a pydantic record costs several plain attributes)."""

    __slots__ = ("_flat", "layers", "recent", "record", "step")

    def __init__(self, record: StabilityMetrics, recent: dict[str, int] | None = None) -> None:
        self.record = record
        self.step = record.step
        self.layers = record.layers
        #: rule name -> the last step it ended an episode (kept by `AlertEngine`, for ``suppressed_by``)
        self.recent: dict[str, int] = {} if recent is None else recent
        self._flat: dict[str, float] | None = None

    def flat(self) -> dict[str, float]:
        if self._flat is None:
            self._flat = self.record.to_dict()
        return self._flat


class Binding:
    """Which values of a record a rule is fed (see the module docstring for the five forms).

    Raises:
        ConfigError: an unknown field name (the message lists the allowed ones).

    Example:
        >>> b = Binding("layers:grad_norm")
        >>> r = StabilityMetrics(step=0, grad_norm=2.0, layers={"fc1": {"grad_norm": 1.5}, "fc2": {}})
        >>> b.values(RecordView(r))
        [('fc1', 1.5)]
        >>> Binding("grad_layers/norm/fc1").values(RecordView(r))
        [('fc1', 1.5)]
    """

    __slots__ = ("denominator", "field", "kind", "layer", "numerator", "spec")

    def __init__(self, spec: str) -> None:
        if not isinstance(spec, str) or not spec:
            raise ConfigError(f"rule metric must be a non-empty string, got {spec!r}")
        self.spec = spec
        self.layer: str | None = None
        self.field: str | None = None
        self.numerator: str | None = None
        self.denominator: str | None = None
        if spec.startswith("layers_ratio:"):
            self.kind = "layers_ratio"
            num, _, den = spec[len("layers_ratio:") :].partition("/")
            if not den:
                raise ConfigError(f"rule metric {spec!r}: expected 'layers_ratio:<field>/<field>'")
            self.numerator = self._check_field(num, spec)
            self.denominator = self._check_field(den, spec)
            return
        for prefix, kind in (("layers_rel:", "layers_rel"), ("layers:", "layers")):
            if spec.startswith(prefix):
                self.kind = kind
                self.field = self._check_field(spec[len(prefix) :], spec)
                return
        if "/" in spec:
            self.kind = "key"
            name, self.layer = parse_key(spec)
            self.field = _KEY_TO_FIELD.get(name)
            return
        if spec in METRIC_FIELDS:
            self.kind = "field"
            self.field = spec
        else:  # a free label: fine for a rule fed by hand, refused by the engine (`validate`)
            self.kind = "label"

    def validate(self) -> None:
        """Raise unless the engine can feed this binding from records."""
        if self.kind == "label":
            self._check_field(self.spec, self.spec)

    @staticmethod
    def _check_field(name: str, spec: str) -> str:
        if name not in METRIC_FIELDS:
            raise ConfigError(
                f"rule metric {spec!r}: unknown field {name!r}; allowed fields: {', '.join(METRIC_FIELDS)} "
                "(or 'layers:<field>', 'layers_rel:<field>', 'layers_ratio:<field>/<field>', or a flat key "
                "'family/metric[/layer]')"
            )
        return name

    @property
    def per_layer(self) -> bool:
        return self.kind in ("layers", "layers_rel", "layers_ratio")

    @property
    def label(self) -> str:
        """The metric name put into alerts (``grad_norm`` for ``layers:grad_norm``)."""
        if self.kind == "layers_rel":
            return f"{self.field}/layer-median"
        if self.kind == "layers_ratio":
            return f"{self.numerator}/{self.denominator}"
        return self.field if self.kind in ("field", "layers") and self.field else self.spec

    def values(self, view: RecordView) -> list[tuple[str | None, Any]]:
        """``[(layer or None, value or None)]`` for one record."""
        record = view.record
        field = self.field
        kind = self.kind
        if kind == "field":
            return [(None, getattr(record, field))]  # type: ignore[arg-type]
        if kind == "layers":
            return [(layer, vals[field]) for layer, vals in record.layers.items() if field in vals]
        if kind == "label":
            return []
        if kind == "layers_ratio":
            num, den = self.numerator, self.denominator
            out: list[tuple[str | None, Any]] = []
            for layer, values in record.layers.items():
                a, b = values.get(num), values.get(den)  # type: ignore[arg-type]
                if a is not None and b is not None and b > 0 and math.isfinite(b):
                    out.append((layer, a / b))
            return out
        if self.kind == "layers_rel":
            pairs = [(layer, vals[field]) for layer, vals in record.layers.items() if field in vals]
            finite = sorted(abs(v) for _, v in pairs if math.isfinite(v))
            if len(finite) < 3:
                return []
            med = median_sorted(finite)
            if med <= 0:
                return []
            return [(layer, v / med) for layer, v in pairs]
        # flat key
        if field is not None:
            if self.layer is None:
                return [(None, getattr(record, field))]
            vals = record.layers.get(self.layer)
            if vals is not None and field in vals:
                return [(self.layer, vals[field])]
        value = record.extra.get(self.spec)
        if value is None:
            value = view.flat().get(metric_key(*parse_key(self.spec)))
        return [(self.layer, value)]


class _Stream:
    """Lifecycle state of one stream (the global value, or one layer) plus the detector's own state."""

    __slots__ = ("active", "calm", "det", "last_alert", "since", "streak")

    def __init__(self, det: Any) -> None:
        self.det = det
        self.active = False
        self.streak = 0
        self.calm = 0
        self.last_alert: int | None = None
        self.since: int | None = None


def describe_span(n: int, first: int, last: int) -> str:
    """``"50-step"`` when a window covers consecutive steps, else ``"20-value (steps a-b)"``."""
    return f"{n}-step" if last - first + 1 == n else f"{n}-value (steps {first}-{last})"


class Window:
    """The last ``size`` values with their steps, kept sorted too so the median costs O(1).

    Shared by the rules that compare a value with its recent history (`RatioRule`, `SpikeRule`) and by
    the skip-step guard.

    `push` is O(size) in the worst case (a `list` insert/delete, a memmove in C), which for the window
    sizes used here (<= a few hundred) is well under a microsecond per value.
    """

    __slots__ = ("size", "sorted", "steps", "values")

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: collections.deque[float] = collections.deque()
        self.steps: collections.deque[int] = collections.deque()
        self.sorted: list[float] = []

    def __len__(self) -> int:
        return len(self.values)

    def push(self, step: int, value: float) -> None:
        values, ordered = self.values, self.sorted
        values.append(value)
        self.steps.append(step)
        insort(ordered, value)
        if len(values) > self.size:
            old = values.popleft()
            self.steps.popleft()
            del ordered[bisect_left(ordered, old)]

    def median(self) -> float:
        s = self.sorted  # `median_sorted`, inlined: called for every value a ratio rule judges
        n = len(s)
        if n == 0:
            return math.nan
        mid = n // 2
        return float(s[mid]) if n % 2 else 0.5 * (s[mid - 1] + s[mid])

    def mad(self, center: float) -> float:
        """Median absolute deviation from ``center``, in O(log² n): the deviations below and above
        ``center`` are two sorted runs of the sorted window, and their k-th smallest is found by
        bisection instead of sorting all deviations on every value."""
        s = self.sorted
        n = len(s)
        if n == 0:
            return 0.0
        split = bisect.bisect_left(s, center)
        mid = n // 2
        kth = _kth_deviation
        if n % 2:
            return kth(s, split, center, mid)
        return 0.5 * (kth(s, split, center, mid - 1) + kth(s, split, center, mid))

    def span(self) -> tuple[int, int, int]:
        """``(n, first step, last step)``, for `describe_span`."""
        return len(self.values), self.steps[0], self.steps[-1]

    def describe(self) -> str:
        return describe_span(*self.span())

    def state(self) -> dict[str, Any]:
        return {"values": list(self.values), "steps": list(self.steps)}

    @classmethod
    def from_state(cls, size: int, state: dict[str, Any]) -> Window:
        w = cls(size)
        for step, value in zip(state["steps"], state["values"], strict=True):
            w.push(int(step), float(value))
        return w


def _kth_deviation(s: list[float], split: int, center: float, k: int) -> float:
    """The ``k``-th smallest (0-based) of ``|v - center|`` over the sorted list ``s``, ``split`` being
    where ``center`` would be inserted: ``center - s[split-1-i]`` and ``s[split+j] - center`` are
    both ascending, so the answer is the k-th of two sorted runs (bisect on how many come from the first)."""
    n_lo, n_hi = split, len(s) - split

    def lo(i: int) -> float:  # i-th smallest deviation below the center
        return center - s[split - 1 - i]

    def hi(j: int) -> float:  # j-th smallest deviation above it
        return s[split + j] - center

    # take i from the low run and k - i from the high run, with i in [max(0, k - n_hi), min(k, n_lo)]
    a, b = max(0, k + 1 - n_hi), min(k + 1, n_lo)
    while a < b:  # smallest i such that the (i)-th low deviation is not below the (k - i)-th high one
        i = (a + b) // 2
        if hi(k - i) > lo(i):
            a = i + 1
        else:
            b = i
    i = a  # i values come from the low run, k + 1 - i from the high run
    best_lo = lo(i - 1) if i > 0 else -math.inf
    best_hi = hi(k - i) if k - i >= 0 else -math.inf
    return max(best_lo, best_hi)


def check_floor(value: Any, field: str, upward: bool = True) -> float | None:
    """The ``floor=`` option of the relative rules: ``None`` or a finite number >= 0, and only for a rule
    that watches for values going up (``upward``)."""
    if value is None:
        return None
    v = check_number(value, field)
    if v is None or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{field}: expected None or a finite number >= 0, got {value!r}")
    if not upward:
        raise ConfigError(f"{field}: a floor (how high a value must be) only applies to a rule watching for a rise")
    return v


class Rule:
    """Base class of the alert rules (see the module docstring for the lifecycle).

    Args:
        metric: what the rule watches (a field, ``"layers:<field>"``, ``"layers_rel:<field>"`` or a flat
            key); a rule fed by hand through `update` may use any label (`AlertEngine` refuses a
            label that is not a record field, naming the allowed ones).
        name: the rule's name in alerts and in the engine's state (defaults to the class's default).
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        reason: the `AlertReason` put on alerts (defaults to the rule type's).
        suggestion: what to try, copied into every alert.
        patience: consecutive observations the condition must hold before the first alert (waived for
            an *urgent* verdict, e.g. a ratio past `RatioRule`'s ``instant_factor``).
        cooldown: minimum number of steps between two alerts of the same stream.
        clear_after: consecutive calm observations that end an episode.
        report_recovery: emit a ``recovered`` info alert when an episode ends.
        suppressed_by: names of other rules of the same `AlertEngine`: for ``suppress_for`` steps after one
            of them ended an episode (raised its ``recovered`` alert; the engine evaluates those rules
            first, so this holds from that very record), this rule's condition is taken as calm and the
            value joins the detector's history as a normal one. The default gradient-explosion rules use
            it: a gradient rising while silent spiking neurons start firing again is a recovery, not an
            explosion. Fed by hand (`update`), a rule is never suppressed.
        suppress_for: steps after the end of such an episode during which the suppression holds.

    Raises:
        ConfigError: an option out of range, or one the rule does not have (the message lists them).
    """

    #: the rule type's default reason and name
    default_reason: ClassVar[AlertReason] = AlertReason.CUSTOM
    default_name: ClassVar[str] = "rule"
    #: whether non-finite values reach `_check` (otherwise they are skipped)
    accepts_nonfinite: ClassVar[bool] = False
    #: the rule type judges values through `_scan` (its `_check` is `scan_check`) and keeps `Rule.update`:
    #: `observe` and `update` then take the fast path of `_feed` (set by `__init_subclass__`)
    _fast: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._fast = cls._check is scan_check and cls.update is Rule.update

    def __init__(
        self,
        metric: str,
        *,
        name: str | None = None,
        severity: Severity | str = Severity.WARNING,
        reason: AlertReason | str | None = None,
        suggestion: str = "",
        patience: int = 1,
        cooldown: int = 0,
        clear_after: int = 1,
        report_recovery: bool = True,
        suppressed_by: Iterable[str] = (),
        suppress_for: int = 100,
        **unknown: Any,
    ) -> None:
        kind = type(self).__name__
        if unknown:
            raise ConfigError(
                f"{kind}: unknown option(s) {', '.join(sorted(unknown))}; options: {', '.join(self._options())}"
            )
        self.binding = self._bind(metric)
        self.metric = metric
        self.name = str(name) if name else f"{self.default_name}:{metric}"
        self.severity = Severity(check_choice(severity, f"{kind}.severity", [v.value for v in Severity]))
        self.reason = (
            self.default_reason
            if reason is None
            else AlertReason(check_choice(reason, f"{kind}.reason", [v.value for v in AlertReason]))
        )
        self.suggestion = str(suggestion)
        self.patience = check_int(patience, f"{kind}.patience")
        self.cooldown = check_int(cooldown, f"{kind}.cooldown", minimum=0)
        self.clear_after = check_int(clear_after, f"{kind}.clear_after")
        self.report_recovery = bool(report_recovery)
        if isinstance(suppressed_by, str):
            suppressed_by = (suppressed_by,)
        self.suppressed_by: tuple[str, ...] = tuple(str(n) for n in suppressed_by)
        self.suppress_for = check_int(suppress_for, f"{kind}.suppress_for", minimum=0)
        self._streams: dict[str | None, _Stream] = {}

    @classmethod
    def _options(cls) -> list[str]:
        """The keyword options of this rule type (its own and `Rule`'s), for error messages."""
        names: list[str] = []
        for klass in (cls, Rule):
            params = inspect.signature(klass.__init__).parameters.values()
            names += [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in names]
        return names

    # --- what a subclass provides ------------------------------------------------------------------
    def _bind(self, metric: str) -> Binding:
        return Binding(metric)

    @property
    def label(self) -> str:
        """The metric name put into this rule's alerts."""
        return self.binding.label

    def _new_state(self) -> Any:
        """Fresh detector state for one stream."""
        return None

    def _check(self, state: Any, step: int, value: float, active: bool) -> Verdict | None:
        """Judge one value and advance the detector; ``None`` while warming up (no opinion)."""
        raise NotImplementedError

    def _scan(self, state: Any, step: int, value: float, active: bool, full: bool) -> Verdict | bool | None:
        """`_check` with a shortcut, for rule types whose ``_check`` is `scan_check`: with ``full`` false, a
        calm value outside an episode (``not active``) returns ``False`` instead of a `Verdict` (nobody
        reads its message: the lifecycle only resets the streak), saving the verdict and its text."""
        raise NotImplementedError

    def _dump_state(self, state: Any) -> Any:
        """Detector state as plain Python values (lists, dicts, floats, ints, str, None)."""
        return state

    def _load_state(self, data: Any) -> Any:
        return data

    # --- the lifecycle ------------------------------------------------------------------------------
    def _stream(self, layer: str | None) -> _Stream:
        s = self._streams.get(layer)
        if s is None:
            s = self._streams[layer] = _Stream(self._new_state())
        return s

    def _number(self, step: int, value: Any, layer: str | None) -> float:
        """``float(value)``, or an error naming the rule, the step and the layer."""
        try:
            return float(value)
        except (TypeError, ValueError):
            where = f" (layer {layer!r})" if layer is not None else ""
            raise StabwatchError(
                f"rule {self.name!r}: the value at step {step}{where} must be a number or None, got {value!r}"
            ) from None

    def _judge(self, step: int, value: Any, layer: str | None) -> tuple[_Stream, Verdict] | None:
        if value is None:
            return None
        # what records hold is a float already: no conversion (nor call) on the hot path
        v = value if type(value) is float else self._number(step, value, layer)
        if not self.accepts_nonfinite and not _isfinite(v):
            return None
        s = self._streams.get(layer)
        if s is None:
            s = self._stream(layer)
        verdict = self._check(s.det, step, v, s.active)
        return None if verdict is None else (s, verdict)

    def _feed(self, step: int, value: Any, layer: str | None) -> Alert | None:
        """`update` for a `_fast` rule type: `_judge` and `_advance` in one, through `_scan`."""
        v = value if type(value) is float else self._number(step, value, layer)
        if not _isfinite(v) and not self.accepts_nonfinite:
            return None
        s = self._streams.get(layer)
        if s is None:
            s = self._stream(layer)
        verdict = self._scan(s.det, step, v, s.active, False)
        if verdict is None:
            return None
        if verdict is False:  # calm outside an episode: all `_advance` would do is reset the streak
            s.streak = 0
            return None
        return self._advance(s, step, verdict, layer)  # type: ignore[arg-type]

    def _feed_list(self, step: int, value: Any, layer: str | None) -> list[Alert]:
        alert = self._feed(step, value, layer)
        return [] if alert is None else [alert]

    def check(self, step: int, value: Any, layer: str | None = None) -> Verdict | None:
        """Judge one value and advance the detector, without the alert lifecycle (used by `AllOf`)."""
        judged = self._judge(step, value, layer)
        return None if judged is None else judged[1]

    def update(self, step: int, value: Any, layer: str | None = None) -> Alert | None:
        """Feed one value; returns the alert it raises (or its recovery), else ``None``.

        Args:
            step: the training step of the value.
            value: the value (``None`` = not measured at this step: skipped).
            layer: the stream (module path) for per-layer rules; ``None`` for a global value.
        """
        if self._fast:
            return None if value is None else self._feed(step, value, layer)
        judged = self._judge(step, value, layer)
        return None if judged is None else self._advance(judged[0], step, judged[1], layer)

    def _advance(self, s: _Stream, step: int, verdict: Verdict, layer: str | None) -> Alert | None:
        if verdict.triggered:
            s.streak += 1
            s.calm = 0
            if s.active:
                return None
            ready = s.streak >= self.patience or verdict.urgent
            if ready and (s.last_alert is None or step - s.last_alert >= self.cooldown):
                s.active = True
                s.last_alert = step
                s.since = step
                return self._make_alert(step, layer, verdict)
            return None
        s.streak = 0
        if s.active:
            s.calm += 1
            if s.calm >= self.clear_after:
                s.active = False
                s.calm = 0
                if self.report_recovery:
                    return self._make_recovery(step, layer, verdict, s.since)
        return None

    def observe(self, view: RecordView) -> list[Alert]:
        """Feed this rule the values of one record (what `AlertEngine.evaluate` calls).

        The same as calling `update` on each value; a rule that keeps `Rule`'s `update` gets its values
        judged here directly (one call less per value: the engine calls this for every rule and record).
        """
        record = view.record
        binding = self.binding
        if self.suppressed_by and self._suppressed(view):
            return self._observe_suppressed(view)
        if self._fast:  # the built-in rule types: one call per value, no list of pairs
            kind = binding.kind
            if kind == "field":  # one global value (most rules): `_feed`, inlined
                value = getattr(record, binding.field)  # type: ignore[arg-type]
                if value is None:
                    return []
                if type(value) is not float or not _isfinite(value):  # converted, refused or skipped
                    return self._feed_list(view.step, value, None)
                s = self._streams.get(None)
                if s is None:
                    s = self._stream(None)
                verdict = self._scan(s.det, view.step, value, s.active, False)
                if verdict is None:
                    return []
                if verdict is False:
                    s.streak = 0
                    return []
                alert = self._advance(s, view.step, verdict, None)  # type: ignore[arg-type]
                return [] if alert is None else [alert]
            if kind == "layers":  # one value per layer: `_feed`, inlined
                field, step = binding.field, view.step
                fired: list[Alert] = []
                streams, scan = self._streams, self._scan
                for path, vals in view.layers.items():
                    value = vals.get(field)  # type: ignore[arg-type]
                    if value is None:
                        continue
                    if type(value) is not float or not _isfinite(value):  # converted, refused or skipped
                        alert = self._feed(step, value, path)
                    else:
                        s = streams.get(path)
                        if s is None:
                            s = self._stream(path)
                        verdict = scan(s.det, step, value, s.active, False)
                        if verdict is None:
                            continue
                        if verdict is False:
                            s.streak = 0
                            continue
                        alert = self._advance(s, step, verdict, path)  # type: ignore[arg-type]
                    if alert is not None:
                        fired.append(alert)
                return fired
        own_update = type(self).update is not _RULE_UPDATE  # a subclass that feeds values its own way
        if binding.kind == "field" and not own_update:  # one global value (most rules): no list to make
            value = getattr(record, binding.field)  # type: ignore[arg-type]
            judged = None if value is None else self._judge(record.step, value, None)
            alert = None if judged is None else self._advance(judged[0], record.step, judged[1], None)
            return [] if alert is None else [alert]
        out: list[Alert] = []
        step = record.step
        pairs = binding.values(view)
        if own_update:
            for layer, value in pairs:
                alert = self.update(step, value, layer)
                if alert is not None:
                    out.append(alert)
            return out
        for layer, value in pairs:
            judged = self._judge(step, value, layer)
            if judged is not None:
                alert = self._advance(judged[0], step, judged[1], layer)
                if alert is not None:
                    out.append(alert)
        return out

    def _suppressed(self, view: RecordView) -> bool:
        """Whether a rule named in ``suppressed_by`` ended an episode within ``suppress_for`` steps."""
        recent = view.recent
        for name in self.suppressed_by:
            last = recent.get(name)
            if last is not None and view.step - last <= self.suppress_for:
                return True
        return False

    def _observe_suppressed(self, view: RecordView) -> list[Alert]:
        """`observe` while suppressed: every value is judged (the detector advances) and taken as calm."""
        out: list[Alert] = []
        step = view.step
        for layer, value in self.binding.values(view):
            judged = self._judge(step, value, layer)
            if judged is None:
                continue
            s, verdict = judged
            if verdict.triggered:
                self._absorb(s.det, step, verdict.value)
                verdict = Verdict(False, verdict.value, verdict.detail)
            alert = self._advance(s, step, verdict, layer)
            if alert is not None:
                out.append(alert)
        return out

    def _absorb(self, state: Any, step: int, value: float) -> None:
        """Take a triggering value into the detector's history as a normal one (while suppressed); rule
        types whose history keeps triggering values out override it."""

    def verdicts(self, view: RecordView) -> list[tuple[str | None, Verdict]]:
        """Verdicts of every stream of one record without the lifecycle (used by combinations)."""
        step = view.record.step
        out = []
        for layer, value in self.binding.values(view):
            v = self.check(step, value, layer)
            if v is not None:
                out.append((layer, v))
        return out

    # --- alerts ----------------------------------------------------------------------------------------
    def subject(self, layer: str | None) -> str:
        """What the message is about: ``"grad_norm"`` or ``"grad_norm of fc1"``."""
        return f"{self.label} of {layer}" if layer else self.label

    def _message(self, layer: str | None, detail: str) -> str:
        return " ".join(part for part in (self.subject(layer), detail) if part)

    def _make_alert(self, step: int, layer: str | None, verdict: Verdict) -> Alert:
        streak = self._stream(layer).streak
        held = f" (held for {streak} observations)" if streak > 1 else ""
        return Alert(
            rule=self.name,
            reason=self.reason,
            severity=self.severity,
            step=step,
            metric=self.label,
            layer=layer,
            value=verdict.value,
            message=self._message(layer, verdict.text) + held,
            suggestion=self.suggestion,
        )

    def _make_recovery(self, step: int, layer: str | None, verdict: Verdict, since: int | None) -> Alert:
        began = f" (alert raised at step {since})" if since is not None else ""
        return Alert(
            rule=self.name,
            reason=AlertReason.RECOVERED,
            severity=Severity.INFO,
            step=step,
            metric=self.label,
            layer=layer,
            value=verdict.value,
            message=f"recovered: {self._message(layer, verdict.text)}{began}",
        )

    # --- state ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every stream (windows, episodes, cooldowns)."""
        self._streams.clear()

    def active_layers(self) -> list[str | None]:
        """Streams currently in an alert episode."""
        return [layer for layer, s in self._streams.items() if s.active]

    def state_dict(self) -> dict[str, Any]:
        """Every stream's state as plain Python values (JSON- and ``torch.load(weights_only=True)``-safe)."""
        streams = []
        for layer, s in self._streams.items():
            streams.append(
                {
                    "layer": layer,
                    "active": s.active,
                    "streak": s.streak,
                    "calm": s.calm,
                    "last_alert": s.last_alert,
                    "since": s.since,
                    "det": self._dump_state(s.det),
                }
            )
        return {"type": type(self).__name__, "streams": streams}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned.

        Raises:
            StabwatchError: ``state`` is for another rule type or is not what `state_dict` returns.
        """
        kind = state.get("type") if isinstance(state, dict) else None
        if kind is not None and kind != type(self).__name__:
            raise StabwatchError(f"rule {self.name!r}: state is for a {kind}, this rule is a {type(self).__name__}")
        streams = {}
        try:
            for item in state["streams"]:
                s = _Stream(self._load_state(item["det"]))
                s.active = bool(item["active"])
                s.streak = int(item["streak"])
                s.calm = int(item["calm"])
                s.last_alert = None if item["last_alert"] is None else int(item["last_alert"])
                s.since = None if item["since"] is None else int(item["since"])
                streams[item["layer"]] = s
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StabwatchError(
                f"rule {self.name!r}: load_state_dict expects what state_dict() returns "
                f"({{'type': ..., 'streams': [...]}}); {type(exc).__name__}: {exc}"
            ) from None
        self._streams = streams

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, metric={self.metric!r}, severity={self.severity.value!r})"


_RULE_UPDATE = Rule.update
_isfinite = math.isfinite


def scan_check(self: Rule, state: Any, step: int, value: float, active: bool) -> Verdict | None:
    """The `Rule._check` of a rule type that implements `Rule._scan`: its full verdict."""
    return self._scan(state, step, value, active, True)  # type: ignore[return-value]


def check_unique_names(rules: Iterable[Rule]) -> None:
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ConfigError(f"two alert rules are named {rule.name!r}; give each rule a unique name=")
        seen.add(rule.name)
