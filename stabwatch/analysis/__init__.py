"""Perturbation-trajectory analysis of training stability (drop-in for ``deep-lyapunov``).

Switch from deep-lyapunov by changing one import::

    from stabwatch.analysis import StabilityAnalyzer, AnalyzerConfig, AnalysisResults, TrajectoryMetrics

What it measures: ``N`` copies of the model, perturbed by ``epsilon * std(W)`` per tensor, are trained
on the same batches; the exact pairwise distances between them in the full weight space give the
spread ``s(t)``, the convergence ratio ``s(t_last)/s(t_0)`` and the Lyapunov exponent
``log(s(t_last)/s(t_0)) / (t_last - t_0)`` (per epoch: divided by the elapsed epochs, not by the number
of checkpoints) with per-interval local exponents and jackknife confidence intervals. See
``docs/analysis.md``.

deep-lyapunov's other documented names are here too, so that only import lines change:
``metrics``, ``visualization`` and ``tracking`` (its functions and classes, stabwatch's definitions),
``config`` (`MetricsConfig`, `VisualizationConfig`, which take effect), ``__version__`` and `get_logger`.
"""

import logging

from stabwatch import __version__
from stabwatch.analysis import config, metrics, tracking, visualization
from stabwatch.analysis._config import AnalyzerConfig, MetricsConfig, VisualizationConfig
from stabwatch.analysis._errors import AnalysisWarning
from stabwatch.analysis._results import AnalysisResults, TrajectoryMetrics
from stabwatch.analysis._training import TrainStep
from stabwatch.analysis.ftle import FTLEResult, ftle, ftle_field
from stabwatch.analysis.lyapunov_spectrum import LyapunovSpectrum, lyapunov_spectrum
from stabwatch.analysis.trajectory import StabilityAnalyzer

__all__ = [
    "AnalysisResults",
    "AnalysisWarning",
    "AnalyzerConfig",
    "FTLEResult",
    "LyapunovSpectrum",
    "MetricsConfig",
    "StabilityAnalyzer",
    "TrainStep",
    "TrajectoryMetrics",
    "VisualizationConfig",
    "__version__",
    "config",
    "ftle",
    "ftle_field",
    "get_logger",
    "lyapunov_spectrum",
    "metrics",
    "tracking",
    "visualization",
]


def get_logger() -> logging.Logger:
    """The logger the analysis writes to (``"stabwatch.analysis"``), as deep-lyapunov's ``get_logger()``.

    Configure it as you configured deep-lyapunov's: ``get_logger().setLevel(logging.DEBUG)``, add a
    handler, or ``logging.basicConfig(level=logging.INFO)`` (records propagate to the root logger). A
    logger configured by name, ``logging.getLogger("deep_lyapunov")`` (a level or a handler), gets the
    same records at its own level too; the root's handlers still get each record once.

    Example:
        >>> get_logger().name
        'stabwatch.analysis'
    """
    return logging.getLogger("stabwatch.analysis")
