"""Metric families: one module per family, each a `Collector` subclass.

A family's name is its module's name, its class's prefix and the first segment of the keys it emits
(``grad`` -> `stabwatch.collectors.grad` -> `GradCollector` -> ``grad/norm``, per layer
``grad_layers/norm/<module>``; see `stabwatch.metrics.metric_key`). ``FAMILIES`` maps a family
name (the key of ``Monitor(every={...})``) to its collector class; a preset is a list of configured
collectors (``PRESETS[name]()`` makes a fresh one). Each collector declares its own options
(``GradSVCollector(every=10, top_k=5)``).
"""

from __future__ import annotations

from collections.abc import Callable

from stabwatch.collectors.activation import ActivationCollector
from stabwatch.collectors.attention import AttentionCollector
from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.collectors.ftle import FTLECollector
from stabwatch.collectors.grad import GradCollector
from stabwatch.collectors.grad_sv import GradSVCollector
from stabwatch.collectors.lyapunov_spectrum import LyapunovSpectrumCollector
from stabwatch.collectors.nonfinite import NonfiniteCollector
from stabwatch.collectors.sharpness import SharpnessCollector
from stabwatch.collectors.spiking import SpikingCollector
from stabwatch.collectors.update import UpdateCollector
from stabwatch.collectors.weight import WeightCollector

__all__ = [
    "FAMILIES",
    "PRESETS",
    "ActivationCollector",
    "AttentionCollector",
    "Collector",
    "CollectorOptions",
    "FTLECollector",
    "GradCollector",
    "GradSVCollector",
    "LyapunovSpectrumCollector",
    "MonitorContext",
    "NonfiniteCollector",
    "Readout",
    "SharpnessCollector",
    "SpikingCollector",
    "UpdateCollector",
    "WeightCollector",
]

#: family name -> collector class: the one registry line a new family adds
FAMILIES: dict[str, type[Collector]] = {
    cls.family: cls
    for cls in (
        GradCollector,
        NonfiniteCollector,
        UpdateCollector,
        GradSVCollector,
        WeightCollector,
        ActivationCollector,
        SpikingCollector,
        AttentionCollector,
        LyapunovSpectrumCollector,
        FTLECollector,
        SharpnessCollector,
    )
}


def _cheap() -> list[Collector]:
    return [GradCollector(1), NonfiniteCollector(1), UpdateCollector(50)]


def _default() -> list[Collector]:
    return [
        GradCollector(1),
        NonfiniteCollector(1),
        UpdateCollector(10),
        GradSVCollector(100),
        WeightCollector(100),
        ActivationCollector(50),
        SpikingCollector(10),
        AttentionCollector(5),
    ]


#: families that probe the model apart from training (a probe batch, a loss function of their own, a
#: whole-sequence analysis): on a schedule of the user's choosing, in no preset (``every={...}`` turns them on)
PROBES = frozenset({"ftle", "lyapunov_spectrum", "sharpness"})


def _full() -> list[Collector]:
    return [cls(1) for name, cls in FAMILIES.items() if name not in PROBES]


#: preset name -> a function making its list of configured collectors (fresh instances per monitor)
PRESETS: dict[str, Callable[[], list[Collector]]] = {"cheap": _cheap, "default": _default, "full": _full}
