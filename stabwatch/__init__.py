"""stabwatch: is my training stable, and if not, why?

Wrap a training loop in `Monitor`; get one `StabilityMetrics` record per step in the sinks you use.
`stabwatch.analysis` (offline analyzers) and `stabwatch.compat` (the SNN-monitor drop-in
``StabilityMonitor``) are imported by name, so ``import stabwatch`` stays light.
"""

from stabwatch import alerts, functional, sinks
from stabwatch.collectors.shadow import Shadow
from stabwatch.errors import InstabilityError, StabwatchError
from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics
from stabwatch.monitor import Monitor

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "AlertReason",
    "InstabilityError",
    "Monitor",
    "Severity",
    "Shadow",
    "StabilityMetrics",
    "StabwatchError",
    "alerts",
    "functional",
    "sinks",
]
