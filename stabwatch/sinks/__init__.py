"""Sinks: where `StabilityMetrics` records go. Each tracker's sink imports its tracker lazily.

``MlflowSink``, ``WandbSink`` and ``TensorBoardSink`` are loaded on first access (module
``__getattr__``), so ``import stabwatch`` never imports mlflow, wandb or tensorboard.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stabwatch.sinks._keys import LayerKeyPolicy
from stabwatch.sinks.base import Sink
from stabwatch.sinks.console import ConsoleSink
from stabwatch.sinks.jsonl import JsonlSink, read_jsonl

if TYPE_CHECKING:
    from stabwatch.sinks.mlflow import MlflowSink
    from stabwatch.sinks.tensorboard import TensorBoardSink
    from stabwatch.sinks.wandb import WandbSink

_LAZY = {
    "MlflowSink": "stabwatch.sinks.mlflow",
    "TensorBoardSink": "stabwatch.sinks.tensorboard",
    "WandbSink": "stabwatch.sinks.wandb",
}

__all__ = [
    "ConsoleSink",
    "JsonlSink",
    "LayerKeyPolicy",
    "MlflowSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "read_jsonl",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stabwatch.sinks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
