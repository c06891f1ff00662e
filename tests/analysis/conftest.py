"""Fixtures of the `stabwatch.analysis` tests."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from stabwatch.analysis import AnalysisWarning
from tests.analysis.analysis_helpers import LeastSquares


@pytest.fixture
def expanding() -> LeastSquares:
    # 1 - eta h = [-1.25, 0.25, 0.625, 0.85]: the first mode expands by 1.25 per step.
    return LeastSquares(h=np.array([3.0, 1.0, 0.5, 0.2]), eta=0.75, steps_per_epoch=5)


@pytest.fixture
def contracting() -> LeastSquares:
    # 1 - eta h = [-0.5, 0.5, 0.75, 0.95]: every mode contracts, the slowest by 0.95 per step.
    return LeastSquares(h=np.array([3.0, 1.0, 0.5, 0.1]), eta=0.5, steps_per_epoch=5)


@pytest.fixture
def quiet():
    """Silence AnalysisWarning in tests that are not about warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnalysisWarning)
        yield


@pytest.fixture(autouse=True)
def _close_pyplot_figures():
    """Plots go through pyplot once a test has imported it (as deep-lyapunov users do); close them."""
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
