"""The settings classes, where ``deep_lyapunov.config`` has them: `AnalyzerConfig`, `MetricsConfig`,
`VisualizationConfig` (also importable from `stabwatch.analysis`)."""

from stabwatch.analysis._config import AnalyzerConfig, MetricsConfig, VisualizationConfig

__all__ = ["AnalyzerConfig", "MetricsConfig", "VisualizationConfig"]
