"""Error and warning types of `stabwatch.analysis`.

Every failure is a `stabwatch.errors.StabwatchError`, and also the built-in type that `deep-lyapunov`
raised for the same situation, so code written against that package keeps catching what it caught
before: a bad setting is the package-wide `stabwatch.errors.ConfigError` (a `ValueError`), a missing
optional dependency `stabwatch.errors.MissingExtraError` (an `ImportError`), and a call in the wrong
state `StateError` below (a `RuntimeError`).
"""

from __future__ import annotations

import os
import sys
import warnings

from stabwatch.errors import StabwatchError

__all__ = ["AnalysisWarning"]


class AnalysisWarning(UserWarning):
    """A measured number is less trustworthy than it looks (resolution, saturation, data order...).

    Each warning is also stored, word for word, in `AnalysisResults.diagnostics`.
    """


class StateError(StabwatchError, RuntimeError):
    """A method was called in the wrong state (e.g. `record_checkpoint` before `start_recording`)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn(message: str) -> None:
    """Issue an `AnalysisWarning` attributed to the first caller outside `stabwatch.analysis`."""
    level = 1
    frame = sys._getframe(0)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, AnalysisWarning, stacklevel=level)
