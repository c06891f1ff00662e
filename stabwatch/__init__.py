"""stabwatch: is my training stable, and if not, why?

Wrap a training loop in `Monitor`; get one `StabilityMetrics` record per step in the sinks you use.
"""

from stabwatch import functional, sinks
from stabwatch.errors import StabwatchError
from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics
from stabwatch.monitor import Monitor

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "AlertReason",
    "Monitor",
    "Severity",
    "StabilityMetrics",
    "StabwatchError",
    "functional",
    "sinks",
]
