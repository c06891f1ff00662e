"""Sink constructors: a bad argument raises `ConfigError` naming the argument and what is allowed, before
any tracker is imported or contacted; and `MlflowSink` reaches MLflow through its public API only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import stabwatch as sw
from stabwatch.errors import ConfigError
from stabwatch.sinks import LayerKeyPolicy


def _sink(name: str):
    return getattr(sw.sinks, name)


CASES = [
    ("JsonlSink", {"mode": "x"}, r"mode='x'.*'w' or 'a'"),
    ("JsonlSink", {"flush_every": 0}, r"flush_every=0.*greater than or equal to 1"),
    ("JsonlSink", {"path": None}, r"path=None.*file path"),
    ("ConsoleSink", {"every": 0}, r"every=0.*greater than or equal to 1"),
    ("ConsoleSink", {"stream": "stderr"}, r"stream='stderr'.*write\(\)"),
    ("MlflowSink", {"close_timeout": -1}, r"close_timeout=-1.*greater than or equal to 0"),
    ("MlflowSink", {"connect_timeout": 0}, r"connect_timeout=0.*greater than 0"),
    ("MlflowSink", {"log_figures": "yes"}, r"log_figures='yes'.*valid boolean"),
    ("MlflowSink", {"experiment": ""}, r"experiment=''.*at least 1 character"),
    ("MlflowSink", {"spill_dir": 3}, r"spill_dir=3.*folder path"),
    ("MlflowSink", {"layer_keys": "some"}, r"layer_keys='some'.*'auto', 'all', 'top_k', 'quantiles', 'none'"),
    ("MlflowSink", {"bogus": 1}, r"unexpected keyword argument 'bogus'"),
    ("WandbSink", {"mode": "sometimes"}, r"mode='sometimes'.*'online', 'offline', 'disabled' or 'shared'"),
    ("WandbSink", {"alert_cooldown_s": -5}, r"alert_cooldown_s=-5.*greater than or equal to 0"),
    ("WandbSink", {"step_metric": ""}, r"step_metric=''"),
    ("TensorBoardSink", {"flush_secs": 0}, r"flush_secs=0.*greater than or equal to 1"),
    ("TensorBoardSink", {"close_timeout": "soon"}, r"close_timeout='soon'.*valid number"),
]


@pytest.mark.parametrize(("name", "bad", "message"), CASES, ids=[f"{c[0]}-{next(iter(c[1]))}" for c in CASES])
def test_bad_arguments_raise_config_error_naming_them(name, bad, message, tmp_path: Path):
    kwargs = dict(bad)
    if name == "JsonlSink":
        kwargs.setdefault("path", tmp_path / "run.jsonl")
    elif name == "TensorBoardSink":
        kwargs.setdefault("log_dir", tmp_path / "tb")
    error = TypeError if "bogus" in bad else ConfigError
    with pytest.raises(error, match=message) as info:
        _sink(name)(**kwargs)
    if error is ConfigError:
        assert (isinstance(info.value, ValueError) and str(info.value).startswith(name)) or "layer_keys" in message
    assert not (tmp_path / "tb").exists() and not (tmp_path / "run.jsonl").exists()  # nothing was created


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"mode": "some"}, "mode"), ({"k": 0}, "k"), ({"quantiles": (1.5,)}, "quantiles")]
)
def test_layer_key_policy_raises_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=rf"{field}="):
        LayerKeyPolicy(**kwargs)


def test_mlflow_sink_uses_no_private_mlflow_name():
    """The sink talks to MLflow through ``MlflowClient`` and ``mlflow.entities`` only (the issue: it used to
    subclass ``RestStore`` and override its private ``_call_endpoint``)."""
    import stabwatch.sinks.mlflow as module

    source = Path(module.__file__).read_text()
    imports = set(re.findall(r"^\s*(?:from|import) (mlflow[\w.]*)", source, flags=re.M))
    assert imports <= {"mlflow", "mlflow.entities"}, imports
    used = set(re.findall(r"\bmlflow\.(\w+)", source)) | set(re.findall(r"\bclient\.(\w+)", source))
    assert not {name for name in used if name.startswith("_")}, used
    for private in ("RestStore", "_call_endpoint", "_METHOD_TO_INFO", "_tracking_client", "rest_utils"):
        assert private not in source
