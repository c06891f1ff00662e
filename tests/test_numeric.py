"""`stabwatch.numeric`: the one number formatter and the one median, against independent references, and
the places that must use them (alert messages, printed records, the diagnosis, both reports)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from stabwatch.alerts import RatioRule
from stabwatch.alerts.base import Window
from stabwatch.diagnosis import analyse
from stabwatch.metrics import StabilityMetrics
from stabwatch.numeric import fmt, median, median_sorted


def _magnitudes(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = rng.uniform(1.0, 10.0) * 10.0 ** rng.randint(-9, 9)
        out.append(-x if rng.random() < 0.3 else x)
    return out


@pytest.mark.parametrize("digits", [2, 3, 4, 6])
def test_fmt_reads_back_to_its_digits_and_picks_the_notation_by_magnitude(digits):
    for x in _magnitudes(3000, seed=digits):
        text = fmt(x, digits)
        by_magnitude = abs(x) >= 1e4 or abs(x) < 1e-3
        # below 1e4, %g itself goes scientific once the rounded integer part has more than `digits` digits
        rounded_exponent = math.floor(math.log10(abs(float(f"{x:.{digits - 1}e}"))))
        scientific = by_magnitude or rounded_exponent >= digits
        # significant digits kept: `digits`, one fewer in scientific notation (the exponent takes the room)
        kept = max(digits - 1, 1) if by_magnitude else digits
        assert abs(float(text) - x) <= 0.5 * 10 ** (math.floor(math.log10(abs(x))) - kept + 1) * (1 + 1e-9), (x, text)
        assert ("e" in text) == scientific, (x, text)
        if "e" in text:
            mantissa, exponent = text.split("e")
            assert not mantissa.endswith("0") or "." not in mantissa, text  # trailing zeros dropped
            assert exponent[0] in "+-" and len(exponent) == 3


def test_fmt_special_values_and_sign():
    assert [fmt(v) for v in (math.nan, math.inf, -math.inf, 0.0, -0.0)] == ["nan", "inf", "-inf", "0", "-0"]
    assert fmt(0.25, signed=True) == "+0.25" and fmt(-0.25, signed=True) == "-0.25"
    assert fmt(math.nan, signed=True) == "nan" and fmt(math.inf, signed=True) == "+inf"
    assert fmt(32000.0) == "3.2e+04" and fmt(0.00012) == "1.2e-04" and fmt(12345.0) == "1.23e+04"
    assert fmt(3) == "3"  # ints and numpy scalars are numbers too


def test_median_matches_the_standard_library():
    rng = random.Random(0)
    for n in range(1, 60):
        values = [rng.choice([rng.gauss(0, 1), 1.0, -2.0]) for _ in range(n)]  # ties too
        assert median(values) == statistics.median(values)
        assert median_sorted(sorted(values)) == statistics.median(values)
    assert math.isnan(median([]))


def test_the_window_median_is_the_shared_median():
    rng = random.Random(1)
    w = Window(25)
    kept: list[float] = []
    for step in range(200):
        v = rng.lognormvariate(0, 1)
        w.push(step, v)
        kept = [*kept, v][-25:]
        assert w.median() == statistics.median(kept)


def test_every_reader_writes_numbers_with_fmt():
    """An alert message, a printed record and the diagnosis write the same number the same way."""
    rule = RatioRule("grad_norm", factor=10, min_history=3)
    alert = [rule.update(s, v) for s, v in enumerate([1.234e-5, 1.234e-5, 1.234e-5, 32123.0])][-1]
    assert alert is not None and "3.21e+04" in alert.message and "1.23e-05" in alert.message
    record = StabilityMetrics(step=0, grad_norm=32123.0, loss=1.234e-5)
    assert "3.21e+04" in str(record) and "1.23e-05" in str(record)
    recs = [StabilityMetrics(step=s, grad_norm=32123.0) for s in range(8)]
    assert "median 3.21e+04 → 3.21e+04" in analyse(recs).to_text()
