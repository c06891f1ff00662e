"""The background writer between `Monitor.step` and the sinks: bounded queues, spill files, retries.

`Monitor.step` hands each record to `Dispatcher.submit`, which only appends it to one bounded
in-memory queue per sink and returns (a lock and a deque append; no I/O on the normal path). Each sink
has its own worker thread, so a slow tracker never holds up another sink. The worker takes up to
``batch_size`` records at a time and delivers them with ``sink.write_batch(records)`` when the sink has
it, else with ``sink.write(record)`` one by one.

Nothing is dropped and training never waits on a network call:

* **Queue full** (the tracker is slower than training): the queue's records and every later one go to
  the sink's *spill file* (JSON lines, the `JsonlSink` format, so `read_jsonl` reads it) until the
  worker has caught up; the worker reads the spill file back in order.
* **Sink raises** (tracker down): a warning once per outage, the undelivered records move to the
  spill file, and the worker retries the same head-of-line batch with exponential back-off
  (``backoff_min`` doubling to ``backoff_max`` seconds). When the tracker comes back, every record is
  delivered in order. Exactly once: a record counts as delivered when ``write`` (or ``write_batch``)
  returns; after a failure the next call starts with the same records, so a sink whose
  ``write_batch`` keeps track of what already arrived (the MLflow, W&B and TensorBoard sinks do)
  delivers each record exactly once.
* **Close** (also on an exception or Ctrl-C in the ``with`` body): the workers drain their queues; a
  sink that is still failing gets ``close_timeout`` seconds, after which what is left stays in its spill
  file and a warning says where and how to replay it (``stabwatch replay SPILL --to URI``).

The spill file itself (append, read back in order, compact, disk errors) is `stabwatch.sinks._spill.SpillQueue`;
this module keeps only the threads, the queues and the back-off.

Spill files are created only when needed, as ``<spill_dir>/<SinkClass>-<pid>-<time>-<n>.jsonl``;
``spill_dir`` is the sink's ``spill_dir`` attribute, else the ``STABWATCH_SPILL_DIR`` environment
variable, else ``./stabwatch-spill``. It is checked for writability when the dispatcher is built.

Optional sink attributes the dispatcher reads: ``write_batch(records)``, ``log_config(params)``
(called once on the worker thread before the first record, with the monitor configuration),
``spill_dir``, ``close_timeout`` (seconds), ``linger_s`` (how long a worker waits to fill a batch),
``replay_uri`` (the ``--to`` target printed in the replay hint).
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabwatch.errors import StabwatchError
from stabwatch.metrics import StabilityMetrics
from stabwatch.sinks._spill import SpillQueue

__all__ = ["Dispatcher", "resolve_spill_dir"]

log = logging.getLogger("stabwatch")

_DEFAULT_SPILL_DIR = "stabwatch-spill"


def resolve_spill_dir(spill_dir: str | os.PathLike[str] | None) -> Path:
    """The spill folder: `spill_dir`, else ``$STABWATCH_SPILL_DIR``, else ``./stabwatch-spill``.

    Raises:
        StabwatchError: when the folder cannot be created or written (checked without creating it).
    """
    path = Path(spill_dir or os.environ.get("STABWATCH_SPILL_DIR") or _DEFAULT_SPILL_DIR).absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise StabwatchError(
            f"spill_dir {str(path)!r} is not writable ({str(probe)!r} is not a writable folder); "
            "pass spill_dir=... to the sink or set STABWATCH_SPILL_DIR"
        )
    return path


class _Partial(Exception):
    """`write` failed after `count` records of the batch were delivered."""

    def __init__(self, count: int, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.count = count
        self.exc = exc


class _SinkWorker:
    """One sink's queue, spill file and background thread."""

    def __init__(
        self,
        sink: Any,
        index: int,
        *,
        params: dict[str, str] | None,
        spill_dir: str | os.PathLike[str] | None,
        queue_size: int,
        batch_size: int,
        close_timeout: float,
        backoff_min: float,
        backoff_max: float,
    ) -> None:
        self.sink = sink
        self.name = type(sink).__name__
        self.params = params
        spill_root = resolve_spill_dir(getattr(sink, "spill_dir", None) or spill_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.spill_path = spill_root / f"{self.name}-{os.getpid()}-{stamp}-{id(self) % 10_000:04d}-{index}.jsonl"
        # while the spill queue is active (and not broken), _mem is empty: the file holds the head
        self._spill = SpillQueue(self.spill_path, owner=self.name)
        self.queue_size = max(1, int(queue_size))
        self.batch_size = max(1, int(batch_size))
        self.close_timeout = float(getattr(sink, "close_timeout", close_timeout))
        self.linger_s = float(getattr(sink, "linger_s", 0.05))
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._cond = threading.Condition(threading.Lock())
        self._mem: collections.deque[StabilityMetrics] = collections.deque()
        self._inflight: list[StabilityMetrics] | None = None
        self._inflight_in_spill = False
        self._pending_since: float | None = None
        self._failing = False
        self._warned = False
        self._outages = 0
        self._closing = False
        self._deadline = float("inf")
        self._abandoned = False
        self._finalized = False
        self._flush_req = 0
        self._flush_done = 0
        self._wrote_since_flush = False
        self.delivered = 0
        self.unsent = 0
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"stabwatch-{self.name}-{index}", daemon=True)
        self._started = False

    @property
    def spilled(self) -> int:
        """Records written to the spill file so far."""
        return self._spill.written

    # producer side (training thread) -------------------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def put(self, record: StabilityMetrics) -> None:
        with self._cond:
            spill = self._spill
            if not spill.broken and (spill.active or len(self._mem) >= self.queue_size):
                self._activate_spill()
                if not spill.append([record]):
                    self._mem.append(record)  # the file failed: memory keeps it, after the file's
                self._cond.notify()
            else:
                self._mem.append(record)
                n = len(self._mem)
                if n == 1 or n >= self.batch_size:
                    self._cond.notify()

    # spill file (all under self._cond) --------------------------------------------------------------
    def _activate_spill(self) -> None:
        """Move the in-flight batch (if it came from memory) and the memory queue to the spill file."""
        if self._spill.active or self._spill.broken:
            return
        moving_inflight = self._inflight is not None and not self._inflight_in_spill
        head = [*(self._inflight or [] if moving_inflight else []), *self._mem]
        if not self._spill.start(head):
            return
        self._mem.clear()
        if moving_inflight:
            self._inflight_in_spill = True

    def _finalize_spill(self) -> int:
        """Leave exactly the undelivered records in the spill file; return how many there are."""
        if self._finalized:
            return self.unsent
        self._finalized = True
        if (self._inflight and not self._inflight_in_spill) or self._mem:
            self._activate_spill()
        if self._spill.active and self._mem and self._spill.append(list(self._mem)):
            self._mem.clear()
        lost = len(self._mem) + (len(self._inflight or []) if not self._inflight_in_spill else 0)
        if lost:
            log.error("stabwatch: %d record(s) for %s could not be written to any file", lost, self.name)
        self.unsent = self._spill.finalize() + lost
        return self.unsent

    # worker side -----------------------------------------------------------------------------------
    def _available(self) -> int:
        if self._spill.active:
            n = self._spill.pending
            if n == 0 and self._spill.broken and self._inflight is None:
                self._spill.discard()  # the file is drained: go on with what was kept in memory
            else:
                return n
        return len(self._mem)

    def _run(self) -> None:
        try:
            self._log_config()
            backoff = self.backoff_min
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                if self._deliver(batch):
                    backoff = self.backoff_min
                else:
                    with self._cond:
                        self._cond.wait_for(
                            lambda: self._abandoned or (self._closing and time.monotonic() >= self._deadline),
                            timeout=backoff,
                        )
                    backoff = min(backoff * 2, self.backoff_max)
        except BaseException as exc:  # noqa: BLE001 - the worker must end cleanly whatever happens
            log.error("stabwatch: the writer thread of %s stopped: %r", self.name, exc)
        finally:
            self._finish()

    def _log_config(self) -> None:
        hook = getattr(self.sink, "log_config", None)
        if self.params is None or not callable(hook):
            return
        try:
            hook(dict(self.params))
        except Exception as exc:  # noqa: BLE001
            log.warning("stabwatch: %s could not log the monitor configuration: %s", self.name, exc)

    def _next_batch(self) -> list[StabilityMetrics] | None:
        with self._cond:
            while True:
                if self._abandoned:
                    return None
                now = time.monotonic()
                if self._closing and self._failing and now >= self._deadline:
                    return None
                n = self._available()
                flush_pending = self._flush_req > self._flush_done
                if n:
                    if self._pending_since is None:
                        self._pending_since = now
                    ready = (
                        n >= self.batch_size
                        or self._closing
                        or flush_pending
                        or self._failing
                        or now - self._pending_since >= self.linger_s
                    )
                    if ready:
                        self._pending_since = None
                        batch = self._take(min(n, self.batch_size))
                        if batch:
                            return batch
                        continue  # only unreadable spill lines were left: they were skipped
                    self._cond.wait(timeout=max(1e-3, self.linger_s - (now - self._pending_since)))
                    continue
                if flush_pending or (self._wrote_since_flush and self._closing):
                    token = self._flush_req
                    self._cond.release()
                    try:
                        self._flush_sink()
                    finally:
                        self._cond.acquire()
                    self._flush_done = max(self._flush_done, token)
                    self._cond.notify_all()
                    continue
                if self._closing:
                    return None
                self._cond.wait(timeout=1.0)
                if self._wrote_since_flush and not self._available():
                    self._cond.release()
                    try:
                        self._flush_sink()
                    finally:
                        self._cond.acquire()

    def _take(self, k: int) -> list[StabilityMetrics]:
        if self._spill.active:
            batch = self._spill.peek(k)
            if not batch:
                return batch
            self._inflight_in_spill = True
        else:
            batch = [self._mem.popleft() for _ in range(k)]
            self._inflight_in_spill = False
        self._inflight = batch
        return batch

    def _flush_sink(self) -> None:
        self._wrote_since_flush = False
        try:
            self.sink.flush()
        except Exception as exc:  # noqa: BLE001
            log.debug("stabwatch: flushing %s failed: %s", self.name, exc)

    def _call_sink(self, batch: list[StabilityMetrics]) -> None:
        write_batch = getattr(self.sink, "write_batch", None)
        if callable(write_batch):
            write_batch(batch)
            return
        for i, record in enumerate(batch):
            try:
                self.sink.write(record)
            except Exception as exc:
                raise _Partial(i, exc) from exc

    def _deliver(self, batch: list[StabilityMetrics]) -> bool:
        error: BaseException | None = None
        done = len(batch)
        try:
            self._call_sink(batch)
        except _Partial as exc:
            done, error = exc.count, exc.exc
        except Exception as exc:  # noqa: BLE001 - a failing sink never kills training
            done, error = 0, exc
        with self._cond:
            if self._abandoned:
                return True
            if done:
                self._wrote_since_flush = True
                self.delivered += done
                if self._inflight_in_spill:
                    self._spill.advance(done)
            if error is None:
                self._inflight = None
                if self._failing:
                    self._failing = False
                    log.warning("stabwatch: %s is delivering again; spilled records are being re-sent", self.name)
                if self._spill.active and self._spill.pending == 0:
                    self._spill.discard()
                self._cond.notify_all()
                return True
            self._inflight = batch[done:]
            self.last_error = error
            if not self._inflight_in_spill:
                self._activate_spill()
            if self._inflight_in_spill:
                self._inflight = None
            else:  # no spill file: keep the failed records at the head of the memory queue
                self._mem.extendleft(reversed(self._inflight))
                self._inflight = None
            if not self._failing:
                self._failing = True
                self._outages += 1
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "stabwatch: sink %s failed at step %d (%s: %s); training goes on. Its records are "
                        "spilled to %s and retried with back-off; further failures are not logged.",
                        self.name,
                        batch[done].step,
                        type(error).__name__,
                        error,
                        self.spill_path,
                    )
                else:
                    log.info("stabwatch: sink %s failed again (%s); retrying with back-off", self.name, error)
            self._cond.notify_all()
            return False

    def _finish(self) -> None:
        with self._cond:
            if self._abandoned:
                return
            unsent = self._finalize_spill()
            self._cond.notify_all()
        if unsent:
            self._report_unsent(unsent)
        try:
            self.sink.close()
        except Exception as exc:  # noqa: BLE001
            log.warning("stabwatch: closing sink %s failed: %s", self.name, exc)

    def _report_unsent(self, unsent: int) -> None:
        target = getattr(self.sink, "replay_uri", None) or "<tracker URI>"
        log.warning(
            "stabwatch: %d record(s) for %s were not delivered; they are kept in %s. Replay them with:\n"
            "    stabwatch replay %s --to %s",
            unsent,
            self.name,
            self.spill_path,
            self.spill_path,
            target,
        )

    # control (training thread) -----------------------------------------------------------------------
    def problem(self) -> str | None:
        """What a front-end reports while this sink fails (``None`` while it delivers)."""
        with self._cond:
            if not self._failing:
                return None
            if self._spill.active:
                waiting, where = self._spill.pending, f"the spill file {self.spill_path}"
            else:
                waiting, where = len(self._mem), "memory"
            error = self.last_error
            return (
                f"sink {self.name} failed ({type(error).__name__}: {error}); {waiting} record(s) wait in {where} "
                "and are retried with back-off"
            )

    def request_flush(self) -> int:
        with self._cond:
            self._flush_req += 1
            self._cond.notify_all()
            return self._flush_req

    def wait_flushed(self, token: int, deadline: float) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: self._flush_done >= token or not self._thread.is_alive(),
                timeout=max(0.0, deadline - time.monotonic()),
            ) and (self._flush_done >= token)

    def request_close(self) -> None:
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + self.close_timeout
            self._cond.notify_all()

    def join(self, deadline: float) -> bool:
        if self._started:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            return not self._thread.is_alive()
        return True

    def abandon(self) -> None:
        """Stop waiting for the worker: keep everything undelivered in the spill file now."""
        with self._cond:
            if self._finalized and not self._thread.is_alive():
                return
            self._abandoned = True
            unsent = self._finalize_spill()
            self._cond.notify_all()
        if unsent:
            self._report_unsent(unsent)
        if not self._started:
            try:
                self.sink.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("stabwatch: closing sink %s failed: %s", self.name, exc)


class Dispatcher:
    """Fan records out to sinks through per-sink background workers (see the module docstring).

    Args:
        sinks: the sinks (each needs ``write``, ``flush``, ``close``).
        params: the monitor configuration, passed to each sink's ``log_config`` if it has one.
        spill_dir: default spill folder (a sink's own ``spill_dir`` attribute wins).
        queue_size: records kept in memory per sink before spilling to disk.
        batch_size: records per delivery call.
        close_timeout: seconds `close` keeps retrying a failing sink (a sink's ``close_timeout``
            attribute wins).
        backoff_min / backoff_max: retry back-off, doubling from min to max seconds.

    Example:
        >>> import tempfile
        >>> from stabwatch.sinks import JsonlSink, read_jsonl
        >>> path = tempfile.mkdtemp() + "/run.jsonl"
        >>> d = Dispatcher([JsonlSink(path)])
        >>> for step in range(3):
        ...     d.submit(StabilityMetrics(step=step, loss=1.0 / (step + 1)))
        >>> d.close()
        >>> [r.step for r in read_jsonl(path)]
        [0, 1, 2]
    """

    def __init__(
        self,
        sinks: Sequence[Any],
        *,
        params: dict[str, str] | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
        queue_size: int = 1000,
        batch_size: int = 64,
        close_timeout: float = 10.0,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.workers = [
            _SinkWorker(
                sink,
                i,
                params=params,
                spill_dir=spill_dir,
                queue_size=queue_size,
                batch_size=batch_size,
                close_timeout=close_timeout,
                backoff_min=backoff_min,
                backoff_max=backoff_max,
            )
            for i, sink in enumerate(sinks)
        ]
        self._started = False
        self._closed = False
        if self.workers:
            ref = weakref.ref(self)

            def _close_at_exit() -> None:
                d = ref()
                if d is not None:
                    d.close()

            self._atexit = _close_at_exit
            atexit.register(self._atexit)

    def set_params(self, params: dict[str, str]) -> None:
        """Set the configuration passed to ``log_config`` (before `start`)."""
        for w in self.workers:
            w.params = params

    def start(self) -> None:
        """Start the worker threads (idempotent; `submit` starts them too)."""
        if not self._started and not self._closed:
            self._started = True
            for w in self.workers:
                w.start()

    def submit(self, record: StabilityMetrics) -> None:
        """Queue `record` for every sink; never blocks on a sink."""
        if self._closed:
            raise StabwatchError("Dispatcher.submit after close")
        if not self._started:
            self.start()
        for w in self.workers:
            w.put(record)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued record reached its sink and each sink was flushed.

        Args:
            timeout: seconds to wait at most (default: the longest ``close_timeout``).

        Returns:
            ``True`` when every sink confirmed, ``False`` when one is still failing or slow (its
            records are safe in its spill file and keep being retried).
        """
        if self._closed or not self._started:
            return True
        if timeout is None:
            timeout = max((w.close_timeout for w in self.workers), default=0.0)
        deadline = time.monotonic() + timeout
        tokens = [w.request_flush() for w in self.workers]
        return all([w.wait_flushed(t, deadline) for w, t in zip(self.workers, tokens)])

    def problems(self) -> list[str]:
        """One line per sink that is failing now: the error, how many records wait and where."""
        return [p for p in (w.problem() for w in self.workers) if p is not None]

    def close(self) -> None:
        """Drain every queue, close every sink; what a failing sink could not take stays in its spill file.

        Idempotent. On an interrupt (Ctrl-C) while waiting, the undelivered records are written to the
        spill files at once and the interrupt propagates.
        """
        if self._closed:
            return
        self._closed = True
        if self.workers:
            atexit.unregister(self._atexit)
        try:
            for w in self.workers:
                w.request_close()
            grace = 15.0  # an in-flight call gets this long past close_timeout to return
            deadline = time.monotonic() + max((w.close_timeout for w in self.workers), default=0.0) + grace
            for w in self.workers:
                w.join(deadline)
        finally:
            for w in self.workers:
                if not w.join(time.monotonic()) or not w._started:
                    w.abandon()
