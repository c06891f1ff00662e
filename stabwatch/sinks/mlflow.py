"""`MlflowSink`: stabwatch metrics in an MLflow run, through MLflow's public client only.

What goes where:

* the monitor configuration → run params ``stabwatch.<name>`` (preset, schedules, model, optimizer);
* every metric of a record → a metric with ``step = record.step`` (keys from `StabilityMetrics.to_dict`,
  the per-layer ones selected by a `LayerKeyPolicy`);
* alerts → run tags ``stabwatch.alert.<rule>`` (the latest alert of each rule), ``stabwatch.alert.last``
  and ``stabwatch.alerts.count``; at close every alert in the artifact ``stabwatch/alerts.json``;
* at close, a figure of the global metrics → the artifact ``stabwatch/metrics.png`` (needs matplotlib).

Every call goes through ``mlflow.MlflowClient`` (``log_batch``, ``get_run``, ``create_run``,
``set_terminated``, ``log_dict``, ``log_figure``), so any tracking URI MLflow supports works: a server
(``http(s)://``), ``sqlite:///PATH.db``, or a local folder (MLflow 3 wants ``MLFLOW_ALLOW_FILE_STORE=true``
for that). MLflow's limits are respected: at most 1000 entities (metrics + tags) per ``log_batch``; keys
use only the characters MLflow accepts and no key is a path prefix of another (`metric_key`; the file
store needs that); tag values are cut to 5000 characters.

HTTP timeouts and retries are MLflow's own, set by its documented environment variables
``MLFLOW_HTTP_REQUEST_TIMEOUT`` (default 120 s) and ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default 7,
with ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` 2: about four minutes before a request to a dead server
fails). The sink does not change them: they are process-wide and also govern the user's own MLflow
calls. Lower them to notice an outage sooner; either way training never waits (the sink runs on the
dispatcher's thread) and nothing is lost or duplicated. At construction, an ``http(s)`` server is first
probed with a plain TCP connect (`connect_timeout`), so a wrong URI fails in seconds, not minutes.

Exactly once, on two layers:

* **Resent requests are identical.** A record's metrics carry the wall time at which the sink first
  tried to send it, kept until it is stored, so a resend — MLflow's own HTTP retry after a lost answer,
  or the dispatcher's retry — carries the same ``(key, step, value, timestamp)`` rows, which MLflow's
  SQL store (behind a server, or ``sqlite:``) stores once (it is the table's primary key).
* **A request whose fate is unknown is not resent if it arrived.** The sink sends a batch of records as
  consecutive ``log_batch`` requests, each carrying the run tag ``stabwatch.sink_seq = <token>:<n>``
  (the stores write a batch's tags after its metrics). If a request fails, the sink reads that tag back
  (``get_run``) before sending anything else: equal to the failed request's value means it was stored
  and is skipped; anything else means it is sent again. This is what keeps MLflow's file store, which
  appends rows without a key, free of duplicates.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import Field, StrictBool

from stabwatch.errors import MissingExtraError, StabwatchError, validated
from stabwatch.metrics import FIELD_KEYS, Alert, StabilityMetrics
from stabwatch.sinks._keys import LayerKeyPolicy, resolve_policy
from stabwatch.sinks.base import SinkOptions

__all__ = ["MlflowSink"]

log = logging.getLogger("stabwatch")

#: MLflow accepts at most 1000 metrics+params+tags per log_batch and 100 params/tags.
_MAX_ENTITIES = 1000
_MAX_TAGS = 100
_MAX_TAG_VALUE = 5000
_SEQ_TAG = "stabwatch.sink_seq"
_HISTORY_CAP = 4000
_STAMPS_CAP = 100_000


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise MissingExtraError("MlflowSink needs the mlflow package: pip install 'stabwatch[mlflow]'") from exc
    return mlflow


def _sync_kwargs(client: Any) -> dict[str, Any]:
    """``{"synchronous": True}`` where ``log_batch`` has it (MLflow >= 2.8), so errors surface in the call."""
    try:
        parameters = inspect.signature(client.log_batch).parameters
    except (TypeError, ValueError):
        return {}
    return {"synchronous": True} if "synchronous" in parameters else {}


def _probe_server(uri: str, timeout: float) -> None:
    """Raise `StabwatchError` when nothing accepts a TCP connection at an http(s) tracking URI.

    Skipped when a proxy is configured for the host (the server may not be reachable directly).
    """
    import urllib.request

    parsed = urlparse(uri)
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if urllib.request.getproxies().get(parsed.scheme) and not urllib.request.proxy_bypass(host):
        return
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise StabwatchError(
            f"MlflowSink: nothing answers at tracking_uri {uri!r} ({type(exc).__name__}: {exc}); is an MLflow "
            f"server running there? Start one with `mlflow server --host {host} --port {port}`"
        ) from exc


def _name(text: str) -> str:
    """A param or tag name MLflow accepts (params and tags are not metrics: `metric_key` is not for them)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", text)[:250]


def _replay_uri(tracking_uri: str, run_id: str) -> str:
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "http":
        base = f"mlflow://{parsed.netloc}{parsed.path}"
    elif parsed.scheme:
        base = f"mlflow+{tracking_uri}"
    else:
        base = f"mlflow+file://{Path(tracking_uri).absolute()}"
    return f"{base}?run_id={run_id}"


class _Options(SinkOptions):
    tracking_uri: str | None = None
    experiment: str | None = Field(default=None, min_length=1)
    run_id: str | None = Field(default=None, min_length=1)
    run_name: str | None = None
    tags: dict[str, Any] | None = None
    log_figures: StrictBool = True
    connect_timeout: float = Field(default=5.0, gt=0.0, allow_inf_nan=False)


class MlflowSink:
    """Log stabwatch records to MLflow.

    Uses the run given by `run_id`; else the active MLflow run (``mlflow.active_run()``); else it
    creates a run in `experiment` and ends it at `close`. It never ends a run it did not start.

    Args:
        tracking_uri: MLflow tracking URI (default: ``mlflow.get_tracking_uri()``): ``http(s)://HOST:PORT``
            of a server, ``sqlite:///PATH.db``, or a local folder / ``file:`` URI (file store). Checked at
            construction: an unreachable server or an unsupported URI raises `StabwatchError`.
        experiment: experiment name for a new run (created if missing; default: the
            ``MLFLOW_EXPERIMENT_NAME``/``MLFLOW_EXPERIMENT_ID`` environment variables, else MLflow's
            default experiment).
        run_id: log into this existing run.
        run_name: name of a run the sink creates.
        tags: extra tags of a run the sink creates.
        layer_keys: which per-layer keys to send: a `LayerKeyPolicy` or a mode name (default ``"auto"``).
        log_figures: at close, log a figure of the global metrics (needs matplotlib).
        connect_timeout: seconds the construction check waits for an http(s) server to accept a
            connection. Request timeouts and retries are MLflow's (see the module docstring).
        spill_dir: where the dispatcher spills undelivered records (default ``./stabwatch-spill``).
        close_timeout: how long closing keeps retrying a server that is down.

    Raises:
        ConfigError: a bad argument (the message names it and what is allowed).
        MissingExtraError: mlflow is not installed (a `StabwatchError` and an ``ImportError``).
        StabwatchError: the tracking URI or the run cannot be used.

    Example:
        >>> import tempfile, stabwatch as sw
        >>> db = "sqlite:///" + tempfile.mkdtemp() + "/mlflow.db"
        >>> sink = sw.sinks.MlflowSink(tracking_uri=db, experiment="demo", log_figures=False)
        >>> sink.write(sw.StabilityMetrics(step=0, loss=0.5, grad_norm=1.5, layers={"fc1": {"grad_norm": 1.0}}))
        >>> sink.close()
        >>> from mlflow import MlflowClient
        >>> client = MlflowClient(db)
        >>> [m.value for m in client.get_metric_history(sink.run_id, "grad/norm")]
        [1.5]
        >>> [m.value for m in client.get_metric_history(sink.run_id, "grad_layers/norm/fc1")]
        [1.0]
    """

    def __init__(
        self,
        tracking_uri: str | os.PathLike[str] | None = None,
        experiment: str | None = None,
        run_id: str | None = None,
        *,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
        layer_keys: LayerKeyPolicy | str | None = None,
        log_figures: bool = True,
        connect_timeout: float = 5.0,
        spill_dir: str | os.PathLike[str] | None = None,
        close_timeout: float = 30.0,
    ) -> None:
        opts = validated(
            _Options,
            "MlflowSink",
            tracking_uri=os.fspath(tracking_uri) if isinstance(tracking_uri, os.PathLike) else tracking_uri,
            experiment=experiment,
            run_id=run_id,
            run_name=run_name,
            tags=tags,
            log_figures=log_figures,
            connect_timeout=connect_timeout,
            spill_dir=spill_dir,
            close_timeout=close_timeout,
        )
        self.layer_keys = resolve_policy(layer_keys)
        mlflow = _import_mlflow()
        from mlflow import MlflowClient

        self.log_figures = opts.log_figures
        self.connect_timeout = opts.connect_timeout
        self.spill_dir = opts.spill_dir
        self.close_timeout = opts.close_timeout
        self.linger_s = 0.2
        active = mlflow.active_run() if opts.tracking_uri is None else None
        uri = opts.tracking_uri if opts.tracking_uri is not None else str(mlflow.get_tracking_uri())
        self.tracking_uri = uri
        scheme = urlparse(uri).scheme
        http = scheme in ("http", "https")
        if scheme == "sqlite":
            self._check_sqlite_path(uri)
        if http:
            _probe_server(uri, self.connect_timeout)
        try:
            self.client = MlflowClient(uri)
        except Exception as exc:
            raise StabwatchError(
                f"MlflowSink: cannot use tracking_uri {uri!r} ({type(exc).__name__}: {exc}); expected "
                "http(s)://HOST:PORT of an MLflow server, sqlite:///PATH.db or a local folder"
            ) from exc
        self._sync = _sync_kwargs(self.client)
        self._owns_run = False
        try:
            if opts.run_id is not None:
                self.run_id = str(self.client.get_run(opts.run_id).info.run_id)
            elif active is not None:
                self.run_id = str(active.info.run_id)
            else:
                self.run_id = self._create_run(opts.experiment, opts.run_name, opts.tags or {})
                self._owns_run = True
        except Exception as exc:
            if http:
                hint = "is it an MLflow server?"
            elif "filesystem tracking backend" in str(exc) or "MLFLOW_ALLOW_FILE_STORE" in str(exc):
                hint = "set MLFLOW_ALLOW_FILE_STORE=true to use a file store, or use sqlite:///PATH.db"
            else:
                hint = "check the path and the run id"
            raise StabwatchError(
                f"MlflowSink: cannot open {'run ' + repr(opts.run_id) if opts.run_id else 'a run'} at "
                f"tracking_uri {uri!r} ({type(exc).__name__}: {str(exc)[:300]}); {hint}"
            ) from exc
        self.replay_uri = _replay_uri(uri, self.run_id)
        self._token = uuid.uuid4().hex[:12]
        self._seq = 0
        self._head_done = 0  # entities of the next batch's head already stored
        self._unknown: tuple[str, int] | None = None  # (seq tag, size) of a request with unknown fate
        self._stamps: dict[int, int] = {}  # step -> ms timestamp of records tried but not yet stored
        self._params: list[Any] = []
        self._alerts: list[Alert] = []
        self._alert_count = 0
        self._history: dict[str, list[tuple[int, float]]] = {}
        self._healthy = True
        self._skip: dict[str, set[int]] = {}
        self._closed = False

    # construction helpers ------------------------------------------------------------------------
    @staticmethod
    def _check_sqlite_path(uri: str) -> None:
        if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
            return
        path = Path(uri[len("sqlite:///") :]).absolute()
        probe = path.parent
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK):
            raise StabwatchError(
                f"MlflowSink: cannot create the sqlite database {str(path)!r}: {str(probe)!r} is not a "
                "writable folder; choose another tracking_uri"
            )

    def _create_run(self, experiment: str | None, run_name: str | None, tags: dict[str, Any]) -> str:
        import stabwatch

        if experiment is None and os.environ.get("MLFLOW_EXPERIMENT_ID"):
            experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
        else:
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
            if name is None:
                experiment_id = "0"
            else:
                exp = self.client.get_experiment_by_name(name)
                experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        all_tags = {"stabwatch.version": stabwatch.__version__, **{k: str(v) for k, v in tags.items()}}
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        return str(run.info.run_id)

    # sink protocol ---------------------------------------------------------------------------------
    def log_config(self, params: dict[str, str]) -> None:
        """Queue the monitor configuration as params ``stabwatch.<name>`` (sent with the next batch)."""
        from mlflow.entities import Param

        self._params = [Param(_name(f"stabwatch.{k}"), str(v)[:6000]) for k, v in params.items()]

    def skip_logged(self, keys: Sequence[str]) -> None:
        """Skip (key, step) pairs the run already holds (`stabwatch replay` uses it against duplicates)."""
        for key in keys:
            self._skip[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def write(self, record: StabilityMetrics) -> None:
        self.write_batch([record])

    def write_batch(self, records: Sequence[StabilityMetrics]) -> None:
        """Send `records` (in order) with as few ``log_batch`` requests as MLflow's limits allow.

        After a failure, call it again with a batch that starts with the same records: what already
        arrived is not sent twice.
        """
        if self._closed:
            raise StabwatchError("MlflowSink is closed")
        if self._params:
            self._send_params()
        entities = self._entities(records)
        pos = min(self._head_done, len(entities))
        if self._unknown is not None:
            seq_value, size = self._unknown
            landed = self._call(self.client.get_run, self.run_id).data.tags.get(_SEQ_TAG) == seq_value
            self._unknown = None
            if landed:
                pos = min(pos + size, len(entities))
            self._head_done = pos
        while pos < len(entities):
            chunk: list[tuple[str, Any]] = []
            n_tags = 1
            while pos + len(chunk) < len(entities) and len(chunk) + n_tags < _MAX_ENTITIES:
                kind, ent = entities[pos + len(chunk)]
                if kind == "t":
                    if n_tags >= _MAX_TAGS:
                        break
                    n_tags += 1
                chunk.append((kind, ent))
            self._seq += 1
            seq_value = f"{self._token}:{self._seq}"
            from mlflow.entities import RunTag

            try:
                self._log_batch(
                    metrics=[e for k, e in chunk if k == "m"],
                    tags=[e for k, e in chunk if k == "t"] + [RunTag(_SEQ_TAG, seq_value)],
                )
            except Exception:
                self._unknown = (seq_value, len(chunk))
                self._head_done = pos
                raise
            pos += len(chunk)
        self._head_done = 0
        for record in records:
            self._stamps.pop(record.step, None)
        self._remember(records)

    def flush(self) -> None:
        """Nothing is buffered: `write_batch` returns once MLflow stored the records."""

    def close(self) -> None:
        """Send the alerts artifact and the figure, end the run if the sink started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._params:
            try:
                self._send_params()
            except Exception as exc:  # noqa: BLE001
                log.warning("stabwatch: MlflowSink could not log the configuration params: %s", exc)
        alerts = [a.model_dump(mode="json") for a in self._alerts]
        if not self._healthy:
            self._save_locally(alerts)
            return
        try:
            self.client.log_dict(self.run_id, alerts, "stabwatch/alerts.json")  # type: ignore[arg-type]
            if self.log_figures and self._history:
                fig = self._figure()
                if fig is not None:
                    self.client.log_figure(self.run_id, fig, "stabwatch/metrics.png")
        except Exception as exc:  # noqa: BLE001
            log.warning("stabwatch: MlflowSink could not upload its artifacts: %s", exc)
            self._save_locally(alerts)
        if self._owns_run:
            try:
                self._call(self.client.set_terminated, self.run_id, "FINISHED")
            except Exception as exc:  # noqa: BLE001
                log.warning("stabwatch: MlflowSink could not end run %s: %s", self.run_id, exc)

    def __repr__(self) -> str:
        return f"MlflowSink(tracking_uri={self.tracking_uri!r}, run_id={self.run_id!r})"

    # internals -------------------------------------------------------------------------------------
    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            out = fn(*args, **kwargs)
        except Exception:
            self._healthy = False
            raise
        self._healthy = True
        return out

    def _log_batch(self, *, metrics: Sequence[Any] = (), params: Sequence[Any] = (), tags: Sequence[Any] = ()) -> None:
        """One synchronous ``MlflowClient.log_batch`` request."""
        self._call(self.client.log_batch, self.run_id, metrics=metrics, params=params, tags=tags, **self._sync)

    def _send_params(self) -> None:
        try:
            self._log_batch(params=self._params)
        except Exception as exc:
            if "INVALID_PARAMETER_VALUE" in str(exc) or "Changing param" in str(exc):
                log.warning(
                    "stabwatch: MlflowSink: run %s already has different stabwatch.* params (%s); "
                    "the configuration of this monitor is not logged as params",
                    self.run_id,
                    str(exc)[:200],
                )
                self._healthy = True
            else:
                raise
        self._params = []

    def _entities(self, records: Sequence[StabilityMetrics]) -> list[tuple[str, Any]]:
        """The batch as a flat list of ("m", Metric) / ("t", RunTag), record by record.

        Each record's entities depend only on the record and on what earlier batches delivered, so a
        retried batch that starts with the same records has the same prefix (what `_head_done` counts),
        and the same rows: a record keeps the timestamp of its first attempt until it is stored.
        """
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        if len(self._stamps) > _STAMPS_CAP:  # records that were never retried (cannot happen with the dispatcher)
            self._stamps.clear()
        out: list[tuple[str, Any]] = []
        count = self._alert_count
        for record in records:
            stamp = self._stamps.setdefault(record.step, now)
            for key, value in self.layer_keys.select(record).items():
                if record.step in self._skip.get(key, ()):
                    continue
                out.append(("m", Metric(key, value, stamp, record.step)))
            tags: dict[str, str] = {}
            for alert in record.alerts:
                count += 1
                text = str(alert)[:_MAX_TAG_VALUE]
                tags[_name(f"stabwatch.alert.{alert.rule}")] = text
                tags["stabwatch.alert.last"] = text
                tags["stabwatch.alerts.count"] = str(count)
            out.extend(("t", RunTag(k, v)) for k, v in tags.items())
        return out

    def _remember(self, records: Sequence[StabilityMetrics]) -> None:
        for record in records:
            self._alerts.extend(record.alerts)
            self._alert_count += len(record.alerts)
            for field, key in FIELD_KEYS.items():
                value = getattr(record, field)
                if value is None or field == "overhead_ms":
                    continue
                hist = self._history.setdefault(key, [])
                hist.append((record.step, float(value)))
                if len(hist) > _HISTORY_CAP:
                    del hist[1::2]  # keep memory flat: halve the resolution

    def _figure(self) -> Any:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            log.info("stabwatch: matplotlib is not installed; no figure logged (pip install 'stabwatch[plot]')")
            return None
        keys = [k for k in self._history if k != "nonfinite/any"][:8]
        if not keys:
            return None
        cols = 2 if len(keys) > 1 else 1
        rows = (len(keys) + cols - 1) // cols
        fig = Figure(figsize=(6 * cols, 2.6 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        alert_steps = sorted({a.step for a in self._alerts})
        for ax, key in zip(axes.flat, keys):
            steps, values = zip(*self._history[key])
            ax.plot(steps, values, lw=1)
            finite = [v for v in values if v == v and abs(v) != float("inf")]
            if finite and min(finite) > 0 and max(finite) / min(finite) > 1e3:
                ax.set_yscale("log")
            for s in alert_steps[:50]:
                ax.axvline(s, color="tab:red", alpha=0.3, lw=0.8)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        for ax in list(axes.flat)[len(keys) :]:
            ax.set_visible(False)
        return fig

    def _save_locally(self, alerts: list[dict[str, Any]]) -> None:
        from stabwatch.sinks._dispatch import resolve_spill_dir

        try:
            folder = resolve_spill_dir(self.spill_dir)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"mlflow-{self.run_id}-alerts.json"
            path.write_text(json.dumps(alerts, indent=1))
            log.warning(
                "stabwatch: MlflowSink could not reach %s at close; the alerts are saved in %s",
                self.tracking_uri,
                path,
            )
        except (OSError, StabwatchError) as exc:
            log.warning("stabwatch: MlflowSink could not save its alerts locally: %s", exc)
