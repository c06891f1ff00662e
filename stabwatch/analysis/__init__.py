"""Perturbation-trajectory analysis of training stability (drop-in for ``deep-lyapunov``).

Switch from deep-lyapunov by changing one import::

    from stabwatch.analysis import StabilityAnalyzer, AnalyzerConfig, AnalysisResults, TrajectoryMetrics

What it measures: ``N`` copies of the model, perturbed by ``epsilon * std(W)`` per tensor, are trained
on the same batches; the exact pairwise distances between them in the full weight space give the
spread ``s(t)``, the convergence ratio ``s(T)/s(0)`` and the Lyapunov exponent
``log(s(T)/s(0)) / T`` with per-interval local exponents and jackknife confidence intervals. See
``docs/analysis.md``.
"""

from stabwatch.analysis._config import AnalyzerConfig
from stabwatch.analysis._errors import AnalysisWarning
from stabwatch.analysis._results import AnalysisResults, TrajectoryMetrics
from stabwatch.analysis._training import TrainStep
from stabwatch.analysis.trajectory import StabilityAnalyzer

__all__ = [
    "AnalysisResults",
    "AnalysisWarning",
    "AnalyzerConfig",
    "StabilityAnalyzer",
    "TrainStep",
    "TrajectoryMetrics",
]
