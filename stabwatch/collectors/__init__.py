"""Metric families: one module per family, each a `Collector` subclass.

``FAMILIES`` maps a family name (the key of ``Monitor(every={...})``) to its collector class; presets
give each family a period (``None`` = off).
"""

from __future__ import annotations

from stabwatch.collectors.activations import ActivationCollector
from stabwatch.collectors.base import Collector, MonitorContext, Readout
from stabwatch.collectors.gradients import GradientCollector
from stabwatch.collectors.nonfinite import NonFiniteCollector
from stabwatch.collectors.spectrum import GradientSpectrumCollector
from stabwatch.collectors.spiking import SpikingCollector
from stabwatch.collectors.updates import UpdateCollector
from stabwatch.collectors.weights import WeightSpectrumCollector

__all__ = [
    "FAMILIES",
    "PRESETS",
    "ActivationCollector",
    "Collector",
    "GradientCollector",
    "GradientSpectrumCollector",
    "MonitorContext",
    "NonFiniteCollector",
    "Readout",
    "SpikingCollector",
    "UpdateCollector",
    "WeightSpectrumCollector",
]

#: family name -> collector class (constructed with ``every=<period>``)
FAMILIES: dict[str, type[Collector]] = {
    "grad": GradientCollector,
    "nonfinite": NonFiniteCollector,
    "update": UpdateCollector,
    "grad_sv": GradientSpectrumCollector,
    "spectral": WeightSpectrumCollector,
    "activation": ActivationCollector,
    "spiking": SpikingCollector,
}

#: preset -> {family: period or None (off)}. "full" computes every family at every step.
PRESETS: dict[str, dict[str, int | None]] = {
    "cheap": {
        "grad": 1,
        "nonfinite": 1,
        "update": 50,
        "grad_sv": None,
        "spectral": None,
        "activation": None,
        "spiking": None,
    },
    "default": {
        "grad": 1,
        "nonfinite": 1,
        "update": 10,
        "grad_sv": 100,
        "spectral": 100,
        "activation": 50,
        "spiking": 10,
    },
    "full": {family: 1 for family in FAMILIES},
}
