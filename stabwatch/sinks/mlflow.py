"""`MlflowSink`: stabwatch metrics in an MLflow run.

What goes where:

* the monitor configuration → run params ``stabwatch.<name>`` (preset, schedules, model, optimizer);
* every metric of a record → a metric with ``step = record.step`` (keys from `StabilityMetrics.to_dict`,
  the per-layer ones selected by a `LayerKeyPolicy`);
* alerts → run tags ``stabwatch.alert.<rule>`` (the latest alert of each rule), ``stabwatch.alert.last``
  and ``stabwatch.alerts.count``; at close every alert in the artifact ``stabwatch/alerts.json``;
* at close, a figure of the global metrics → the artifact ``stabwatch/metrics.png`` (needs matplotlib).

MLflow's limits are respected: at most 1000 entities (metrics + tags) per ``log_batch`` request; keys use
only the characters MLflow accepts (`metric_key` makes them); tag values are cut to 5000 characters.

Exactly once. The sink sends a batch of records as consecutive ``log_batch`` requests, each carrying the
run tag ``stabwatch.sink_seq = <token>:<n>`` (MLflow's SQL store writes a batch's tags after its
metrics). If a request fails (server down, timeout, connection reset), the sink does not know whether it
was stored; before sending anything else it reads that tag back: equal to the failed request's value
means the request arrived and is skipped, anything else means it is sent again. Requests go out with
no HTTP-level retry (MLflow's own client retries a POST whose answer was lost, which would duplicate it),
a ``request_timeout`` and the dispatcher's back-off in between.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from stabwatch.errors import StabwatchError
from stabwatch.metrics import FIELD_KEYS, Alert, StabilityMetrics, metric_key
from stabwatch.sinks._keys import LayerKeyPolicy, resolve_policy

__all__ = ["MlflowSink"]

log = logging.getLogger("stabwatch")

#: MLflow accepts at most 1000 metrics+params+tags per log_batch and 100 params/tags.
_MAX_ENTITIES = 1000
_MAX_TAGS = 100
_MAX_TAG_VALUE = 5000
_SEQ_TAG = "stabwatch.sink_seq"
_HISTORY_CAP = 4000


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise StabwatchError("MlflowSink needs the mlflow package: pip install 'stabwatch[mlflow]'") from exc
    return mlflow


def _fast_rest_store(uri: str, timeout: float) -> Any:
    """A RestStore whose requests have a timeout and no HTTP-level retry (see the module docstring)."""
    from mlflow.store.tracking.rest_store import RestStore

    try:
        from mlflow.utils.credentials import get_default_host_creds
    except ImportError:  # MLflow 2.x
        from mlflow.tracking._tracking_service.utils import (  # type: ignore[no-redef,attr-defined]
            _get_default_host_creds as get_default_host_creds,
        )
    from mlflow.utils.proto_json_utils import parse_dict
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    class _Store(RestStore):  # type: ignore[misc]
        def _call_endpoint(  # type: ignore[override]
            self, api: Any, json_body: Any = None, endpoint: Any = None, *args: Any, **kwargs: Any
        ) -> Any:
            info = getattr(self, "_METHOD_TO_INFO", None)
            if info is None or api not in info or args or kwargs.get("response_proto") is not None:
                return super()._call_endpoint(api, json_body, endpoint, *args, **kwargs)
            default_endpoint, method = info[api]
            body = json.loads(json_body) if json_body is not None else None
            call = {"params": body} if method == "GET" else {"json": body}
            response = http_request(
                self.get_host_creds(),
                endpoint or default_endpoint,
                method,
                max_retries=0,
                backoff_factor=0,
                timeout=timeout,
                **call,
            )
            response = verify_rest_response(response, endpoint or default_endpoint)
            proto = api.Response()
            parse_dict(js_dict=json.loads(response.text or "{}"), message=proto)
            return proto

    return _Store(lambda: get_default_host_creds(uri))


def _replay_uri(tracking_uri: str, run_id: str) -> str:
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "http":
        base = f"mlflow://{parsed.netloc}{parsed.path}"
    elif parsed.scheme:
        base = f"mlflow+{tracking_uri}"
    else:
        base = f"mlflow+file://{Path(tracking_uri).absolute()}"
    return f"{base}?run_id={run_id}"


class MlflowSink:
    """Log stabwatch records to MLflow.

    Uses the run given by `run_id`; else the active MLflow run (``mlflow.active_run()``); else it
    creates a run in `experiment` and ends it at `close`. It never ends a run it did not start.

    Args:
        tracking_uri: MLflow tracking URI (default: ``mlflow.get_tracking_uri()``). Checked at
            construction: an unreachable server or an unsupported URI raises `StabwatchError`.
        experiment: experiment name for a new run (created if missing; default: the
            ``MLFLOW_EXPERIMENT_NAME``/``MLFLOW_EXPERIMENT_ID`` environment variables, else MLflow's
            default experiment).
        run_id: log into this existing run.
        run_name: name of a run the sink creates.
        tags: extra tags of a run the sink creates.
        layer_keys: which per-layer keys to send: a `LayerKeyPolicy` or a mode name (default ``"auto"``).
        log_figures: at close, log a figure of the global metrics (needs matplotlib).
        request_timeout: seconds per HTTP request.
        spill_dir: where the dispatcher spills undelivered records (default ``./stabwatch-spill``).
        close_timeout: how long closing keeps retrying a server that is down.

    Example:
        >>> import tempfile, stabwatch as sw
        >>> db = "sqlite:///" + tempfile.mkdtemp() + "/mlflow.db"
        >>> sink = sw.sinks.MlflowSink(tracking_uri=db, experiment="demo", log_figures=False)
        >>> sink.write(sw.StabilityMetrics(step=0, loss=0.5, grad_norm=1.5))
        >>> sink.close()
        >>> from mlflow import MlflowClient
        >>> [m.value for m in MlflowClient(db).get_metric_history(sink.run_id, "grad/norm")]
        [1.5]
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_id: str | None = None,
        *,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        layer_keys: LayerKeyPolicy | str | None = None,
        log_figures: bool = True,
        request_timeout: float = 10.0,
        spill_dir: str | os.PathLike[str] | None = None,
        close_timeout: float = 30.0,
    ) -> None:
        mlflow = _import_mlflow()
        from mlflow import MlflowClient

        self.layer_keys = resolve_policy(layer_keys)
        self.log_figures = bool(log_figures)
        self.request_timeout = float(request_timeout)
        self.spill_dir = spill_dir
        self.close_timeout = float(close_timeout)
        self.linger_s = 0.2
        active = mlflow.active_run() if tracking_uri is None else None
        uri = str(tracking_uri) if tracking_uri is not None else mlflow.get_tracking_uri()
        self.tracking_uri = uri
        scheme = urlparse(uri).scheme
        self._http = scheme in ("http", "https")
        if scheme == "sqlite":
            self._check_sqlite_path(uri)
        try:
            self.client = MlflowClient(uri)
            if self._http:
                self._store = _fast_rest_store(uri, self.request_timeout)
            else:
                self._store = self.client._tracking_client.store
        except StabwatchError:
            raise
        except Exception as exc:
            raise StabwatchError(
                f"MlflowSink: cannot use tracking_uri {uri!r} ({type(exc).__name__}: {exc}); expected "
                "http(s)://HOST:PORT of an MLflow server, sqlite:///PATH.db or a local folder"
            ) from exc
        self._owns_run = False
        try:
            if run_id is not None:
                self.run_id = self._store.get_run(run_id).info.run_id
            elif active is not None:
                self.run_id = active.info.run_id
            else:
                self.run_id = self._create_run(experiment, run_name, tags or {})
                self._owns_run = True
        except Exception as exc:
            hint = (
                f"is an MLflow server running there? Start one with `mlflow server --host "
                f"{urlparse(uri).hostname or '127.0.0.1'} --port {urlparse(uri).port or 5000}`"
                if self._http
                else "check the path and run id"
            )
            raise StabwatchError(
                f"MlflowSink: cannot open {'run ' + repr(run_id) if run_id else 'a run'} at tracking_uri "
                f"{uri!r} ({type(exc).__name__}: {str(exc)[:300]}); {hint}"
            ) from exc
        self.replay_uri = _replay_uri(uri, self.run_id)
        self._token = uuid.uuid4().hex[:12]
        self._seq = 0
        self._head_done = 0  # entities of the next batch's head already stored
        self._unknown: tuple[str, int] | None = None  # (seq tag, size) of a request with unknown fate
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

    def _create_run(self, experiment: str | None, run_name: str | None, tags: dict[str, str]) -> str:
        from mlflow.entities import RunTag

        import stabwatch

        if experiment is None and os.environ.get("MLFLOW_EXPERIMENT_ID"):
            experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
        else:
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
            if name is None:
                experiment_id = "0"
            else:
                exp = self._store.get_experiment_by_name(name)
                experiment_id = exp.experiment_id if exp is not None else self._store.create_experiment(name)
        all_tags = {"stabwatch.version": stabwatch.__version__, **tags}
        if run_name:
            all_tags["mlflow.runName"] = run_name
        run = self._store.create_run(
            experiment_id=experiment_id,
            user_id=os.environ.get("USER", "stabwatch"),
            start_time=int(time.time() * 1000),
            tags=[RunTag(k, str(v)) for k, v in all_tags.items()],
            run_name=run_name,
        )
        return str(run.info.run_id)

    # sink protocol ---------------------------------------------------------------------------------
    def log_config(self, params: dict[str, str]) -> None:
        """Queue the monitor configuration as params ``stabwatch.<name>`` (sent with the next batch)."""
        from mlflow.entities import Param

        self._params = [Param(metric_key(f"stabwatch.{k}"), str(v)[:6000]) for k, v in params.items()]

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
            landed = self._call(self._store.get_run, self.run_id).data.tags.get(_SEQ_TAG) == seq_value
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
                self._call(
                    self._store.log_batch,
                    self.run_id,
                    [e for k, e in chunk if k == "m"],
                    [],
                    [e for k, e in chunk if k == "t"] + [RunTag(_SEQ_TAG, seq_value)],
                )
            except Exception:
                self._unknown = (seq_value, len(chunk))
                self._head_done = pos
                raise
            pos += len(chunk)
        self._head_done = 0
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
                from mlflow.entities import RunStatus

                self._call(
                    self._store.update_run_info,
                    self.run_id,
                    RunStatus.FINISHED,
                    int(time.time() * 1000),
                    None,
                )
            except Exception as exc:  # noqa: BLE001
                log.warning("stabwatch: MlflowSink could not end run %s: %s", self.run_id, exc)

    def __repr__(self) -> str:
        return f"MlflowSink(tracking_uri={self.tracking_uri!r}, run_id={self.run_id!r})"

    # internals -------------------------------------------------------------------------------------
    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            out = fn(*args)
        except Exception:
            self._healthy = False
            raise
        self._healthy = True
        return out

    def _send_params(self) -> None:
        try:
            self._call(self._store.log_batch, self.run_id, [], self._params, [])
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
        retried batch that starts with the same records has the same prefix (what `_head_done` counts).
        """
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        out: list[tuple[str, Any]] = []
        count = self._alert_count
        for record in records:
            for key, value in self.layer_keys.select(record).items():
                if record.step in self._skip.get(key, ()):
                    continue
                out.append(("m", Metric(key, value, now, record.step)))
            tags: dict[str, str] = {}
            for alert in record.alerts:
                count += 1
                text = str(alert)[:_MAX_TAG_VALUE]
                tags[metric_key(f"stabwatch.alert.{alert.rule}")] = text
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
