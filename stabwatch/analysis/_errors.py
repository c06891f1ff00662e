"""Error and warning types of `stabwatch.analysis`.

Every failure is a `stabwatch.errors.StabwatchError`. The private subclasses below also derive from the
built-in type that `deep-lyapunov` raised for the same situation (`ValueError` for a bad setting,
`RuntimeError` for a call in the wrong state, `ImportError` for a missing optional dependency), so code
written against that package keeps catching what it caught before.
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


class _ConfigError(StabwatchError, ValueError):
    """A setting is out of range."""


class _StateError(StabwatchError, RuntimeError):
    """A method was called in the wrong state (e.g. `record_checkpoint` before `start_recording`)."""


class _MissingExtraError(StabwatchError, ImportError):
    """An optional dependency (matplotlib) is not installed."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn(message: str) -> None:
    """Issue an `AnalysisWarning` attributed to the first caller outside `stabwatch.analysis`."""
    level = 1
    frame = sys._getframe(0)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, AnalysisWarning, stacklevel=level)
