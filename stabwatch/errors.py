"""The one exception type stabwatch raises."""

from __future__ import annotations

__all__ = ["StabwatchError"]


class StabwatchError(Exception):
    """Raised when stabwatch is misconfigured or cannot do what was asked.

    The message always says what was wrong and how to fix it (the field, the allowed values, the
    module path or the tensor shapes involved).
    """
