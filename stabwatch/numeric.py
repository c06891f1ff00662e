"""The number helpers every part shares: `fmt`, how a number is written for a person (alert messages,
records printed by the console sink, the diagnosis, the reports), and `median`.

One function each, so a number reads the same in an alert, a diagnosis and a report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["fmt", "median", "median_sorted", "round32"]

_F32_MAX = float(np.finfo(np.float32).max)


def round32(x: float) -> float:
    """``x`` rounded to float32 as a cast does (to ±inf beyond its range, without numpy's overflow
    warning), as a Python float.

    Example:
        >>> round32(0.1), round32(1e39)
        (0.10000000149011612, inf)
    """
    if -_F32_MAX <= x <= _F32_MAX or x != x:
        return float(np.float32(x))
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def fmt(value: float, digits: int = 4, *, signed: bool = False) -> str:
    """Write a number with ``digits`` significant digits; scientific, with one digit fewer, when
    ``|value| >= 1e4`` or ``< 1e-3`` (trailing zeros dropped); ``nan`` / ``inf`` as such. In between it is
    ``%g`` with ``digits`` digits (which itself goes scientific when the integer part has more digits
    than that, e.g. ``fmt(5947, 3) == '5.95e+03'``).

    Args:
        value: the number.
        digits: significant digits (>= 1).
        signed: write ``+`` before a positive number (for changes and rates).

    Example:
        >>> fmt(32000.0), fmt(0.00012), fmt(2.5), fmt(2 / 3), fmt(float("nan")), fmt(-float("inf"))
        ('3.2e+04', '1.2e-04', '2.5', '0.6667', 'nan', '-inf')
        >>> fmt(123456.0, 3), fmt(0.25, signed=True), fmt(0.0)
        ('1.2e+05', '+0.25', '0')
    """
    value = float(value)
    if not math.isfinite(value):
        text = str(value)
    elif value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        mantissa, exponent = f"{value:.{max(digits - 2, 0)}e}".split("e")
        if "." in mantissa:
            mantissa = mantissa.rstrip("0").rstrip(".")
        text = f"{mantissa}e{exponent}"
    else:
        text = f"{value:.{max(digits, 1)}g}"
    return f"+{text}" if signed and not text.startswith("-") and text != "nan" else text


def median_sorted(values: Sequence[float]) -> float:
    """The median of values already in ascending order (``nan`` when there are none), in O(1).

    Example:
        >>> median_sorted([1.0, 2.0, 10.0]), median_sorted([1.0, 2.0, 3.0, 10.0])
        (2.0, 2.5)
    """
    n = len(values)
    if n == 0:
        return math.nan
    mid = n // 2
    return float(values[mid]) if n % 2 else 0.5 * (values[mid - 1] + values[mid])


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (the mean of the two middle ones for an even count; ``nan`` for none).

    Example:
        >>> median([3.0, 1.0, 2.0]), median([4, 1, 3, 2]), median([])
        (2.0, 2.5, nan)
    """
    return median_sorted(sorted(values))
