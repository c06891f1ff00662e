"""stabwatch: is my training stable, and if not, why?

Wrap a training loop in `Monitor`; get one `StabilityMetrics` record per step in the sinks you use.
"""

from stabwatch import functional, sinks
from stabwatch.collectors.shadow import Shadow, ShadowEstimate
from stabwatch.compat import StabilityMonitor
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
    "ShadowEstimate",
    "StabilityMetrics",
    "StabilityMonitor",
    "StabwatchError",
    "functional",
    "sinks",
]
