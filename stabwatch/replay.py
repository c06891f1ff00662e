"""``stabwatch replay``: send the records a sink could not deliver (its spill file) to a tracker.

When a tracker was down until the end of a run, the monitor leaves the undelivered records in a spill
file (JSON lines, one `StabilityMetrics` per line) and prints the command to replay them::

    stabwatch replay stabwatch-spill/MlflowSink-1234-....jsonl --to mlflow://127.0.0.1:5000?run_id=RUN

Targets (``--to``):

* ``mlflow://HOST:PORT[/PATH]?run_id=ID`` — an MLflow server over http (``mlflow+https://...`` for
  https, ``mlflow+sqlite:///PATH.db?run_id=ID`` or ``mlflow+file:///PATH?run_id=ID`` for local
  stores); without ``run_id`` a new run is created (``experiment=NAME`` picks its experiment). Metric
  (key, step) pairs the run already holds are skipped, so replaying twice sends nothing twice.
* ``wandb://PROJECT?run_id=ID[&mode=offline]`` — resumes that W&B run.
* ``tensorboard://LOG_DIR`` — appends to a TensorBoard folder.
* ``jsonl://PATH`` — appends to a JSONL file.

On success the spill file is deleted (``--keep`` keeps it). If the tracker fails part-way, the spill
file is rewritten to hold only what was not sent, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from stabwatch.errors import StabwatchError
from stabwatch.metrics import StabilityMetrics
from stabwatch.sinks.jsonl import read_jsonl

__all__ = ["add_parser", "open_target", "replay"]

log = logging.getLogger("stabwatch")


def _split_query(uri: str) -> tuple[str, dict[str, str]]:
    base, _, query = uri.partition("?")
    return base, {k: v[-1] for k, v in parse_qs(query).items()}


def open_target(uri: str) -> Any:
    """Build the sink a ``--to`` URI names (see the module docstring)."""
    base, query = _split_query(uri)
    scheme = urlparse(base).scheme
    if scheme == "mlflow" or scheme.startswith("mlflow+"):
        from stabwatch.sinks.mlflow import MlflowSink

        http = scheme == "mlflow"
        tracking_uri = "http://" + base[len("mlflow://") :] if http else base[len("mlflow+") :]
        return MlflowSink(
            tracking_uri=tracking_uri,
            experiment=query.get("experiment"),
            run_id=query.get("run_id"),
            log_figures=False,
        )
    if scheme == "wandb":
        from stabwatch.sinks.wandb import WandbSink

        project = base[len("wandb://") :] or None
        kwargs: dict[str, Any] = {}
        if query.get("run_id"):
            kwargs.update(id=query["run_id"], resume="allow")
        return WandbSink(project=project, mode=query.get("mode"), **kwargs)
    if scheme == "tensorboard":
        from stabwatch.sinks.tensorboard import TensorBoardSink

        return TensorBoardSink(base[len("tensorboard://") :])
    if scheme == "jsonl":
        from stabwatch.sinks.jsonl import JsonlSink

        return JsonlSink(base[len("jsonl://") :], mode="a")
    raise StabwatchError(
        f"replay --to {uri!r}: unknown target; expected mlflow://HOST:PORT?run_id=ID, "
        "mlflow+sqlite:///PATH?run_id=ID, wandb://PROJECT?run_id=ID, tensorboard://DIR or jsonl://PATH"
    )


def _write(sink: Any, records: Sequence[StabilityMetrics]) -> None:
    write_batch = getattr(sink, "write_batch", None)
    if callable(write_batch):
        write_batch(records)
    else:
        for record in records:
            sink.write(record)


def replay(
    paths: Sequence[str | os.PathLike[str]],
    to: str,
    *,
    batch_size: int = 256,
    keep: bool = False,
    sink: Any = None,
) -> int:
    """Send the records of spill files to a tracker, in order.

    Args:
        paths: spill files (JSONL).
        to: target URI (see the module docstring); ignored when `sink` is given.
        batch_size: records per write.
        keep: keep the spill files after a successful replay.
        sink: an already built sink to write to (instead of `to`).

    Returns:
        The number of records sent.

    Raises:
        StabwatchError: a bad file or target, or a tracker that failed part-way (the spill file then
            holds only what was not sent).
    """
    records_by_path: list[tuple[Path, list[StabilityMetrics]]] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise StabwatchError(f"replay: spill file {str(path)!r} does not exist")
        records_by_path.append((path, list(read_jsonl(path))))
    target = sink if sink is not None else open_target(to)
    skip = getattr(target, "skip_logged", None)
    if callable(skip):  # the keys the sink sends: its layer-key policy's choice, summaries included
        select = getattr(getattr(target, "layer_keys", None), "select", None)
        keys = sorted({k for _, recs in records_by_path for r in recs for k in (select(r) if select else r.to_dict())})
        skip(keys)
    sent = 0
    try:
        for path, records in records_by_path:
            for start in range(0, len(records), batch_size):
                try:
                    _write(target, records[start : start + batch_size])
                except Exception as exc:
                    rest = records[start:]
                    tmp = path.with_suffix(path.suffix + ".tmp")
                    tmp.write_text("".join(r.to_json_line() + "\n" for r in rest), encoding="utf-8")
                    os.replace(tmp, path)
                    raise StabwatchError(
                        f"replay: {to} failed after {sent} record(s) ({type(exc).__name__}: {exc}); "
                        f"the {len(rest)} unsent record(s) are kept in {path}; run the command again"
                    ) from exc
                sent += len(records[start : start + batch_size])
            if not keep:
                path.unlink()
    finally:
        if sink is None:
            target.close()
    return sent


def _run(args: argparse.Namespace) -> int:
    try:
        n = replay(args.spill, args.to, keep=args.keep)
    except StabwatchError as exc:
        log.error("%s", exc)
        print(f"stabwatch replay: {exc}")
        return 1
    print(f"stabwatch replay: sent {n} record(s) to {args.to}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``stabwatch replay SPILL... --to URI``."""
    p = subparsers.add_parser(
        "replay",
        help="send a spill file (records a tracker did not receive) to MLflow, W&B, TensorBoard or JSONL",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("spill", nargs="+", help="spill file(s) written by stabwatch (JSON lines)")
    p.add_argument(
        "--to",
        required=True,
        help="target: mlflow://HOST:PORT?run_id=ID, mlflow+sqlite:///PATH?run_id=ID, "
        "wandb://PROJECT?run_id=ID, tensorboard://DIR or jsonl://PATH",
    )
    p.add_argument("--keep", action="store_true", help="keep the spill file after a successful replay")
    p.set_defaults(func=_run)
