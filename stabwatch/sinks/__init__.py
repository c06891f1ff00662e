"""Sinks: where `StabilityMetrics` records go. Each tracker's sink imports its tracker lazily."""

from stabwatch.sinks.base import Sink
from stabwatch.sinks.console import ConsoleSink
from stabwatch.sinks.jsonl import JsonlSink, read_jsonl

__all__ = ["ConsoleSink", "JsonlSink", "Sink", "read_jsonl"]
