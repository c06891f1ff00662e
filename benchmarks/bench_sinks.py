"""In-loop cost of emitting a record to each tracker sink: what `Monitor.step` pays per step.

Target (sinks issue): <= 0.5 ms per step for a 50-metric record, with each sink. `Monitor._emit` is
`Dispatcher.submit` (a queue append; the sink is written by a background thread), so this times
`submit` in a loop that also does ~2 ms of "training" work per step, and compares it with writing the
same record synchronously on the training thread (what a naive integration pays). Sinks: JSONL,
MLflow (a local `mlflow server`, sqlite backend, over HTTP; and MLflow's file store), W&B offline,
TensorBoard.

Run: python benchmarks/bench_sinks.py [--steps 400]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import stabwatch as sw
from stabwatch.sinks._dispatch import Dispatcher


def record(step: int) -> sw.StabilityMetrics:
    layers = {f"blocks.{i}": {"grad_norm": 0.1 * i + step, "update_ratio": 1e-3 * i} for i in range(20)}
    return sw.StabilityMetrics(
        step=step, loss=1.0 / (step + 1), grad_norm=1.0 + step, update_ratio=1e-3, update_norm=0.1,
        weight_norm=10.0, spectral_norm=2.0, grad_max_sv=1.0, grad_min_sv=0.1, grad_condition=10.0,
        overhead_ms=0.5, layers=layers,
    )  # fmt: skip


def work(ms: float = 2.0) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def start_mlflow(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/m.db",
         "--artifacts-destination", str(root / "art"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1):
                return proc, uri
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("mlflow server did not start")


def make_sinks(root: Path, uri: str) -> dict[str, object]:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(root), WANDB_DISABLE_GIT="true")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 keeps its file store behind this switch
    return {
        "jsonl": lambda: sw.sinks.JsonlSink(root / "run.jsonl"),
        "mlflow (http server)": lambda: sw.sinks.MlflowSink(tracking_uri=uri, experiment="bench", log_figures=False),
        "mlflow (file store)": lambda: sw.sinks.MlflowSink(
            tracking_uri=(root / "mlruns").as_uri(), experiment="bench", log_figures=False
        ),
        "wandb (offline)": lambda: sw.sinks.WandbSink(project="bench", mode="offline", dir=str(root)),
        "tensorboard": lambda: sw.sinks.TensorBoardSink(root / "tb"),
    }


def bench(factory, steps: int) -> tuple[list[float], list[float], float]:
    recs = [record(s) for s in range(steps)]
    assert len(recs[0].to_dict()) == 50
    sink = factory()
    d = Dispatcher([sink])
    in_loop = []
    for rec in recs:
        work()
        t0 = time.perf_counter()
        d.submit(rec)
        in_loop.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    d.close()
    drain = time.perf_counter() - t0
    sink = factory()
    sync = []
    for rec in recs:
        work()
        t0 = time.perf_counter()
        sink.write(rec)
        sync.append(time.perf_counter() - t0)
    sink.close()
    return in_loop, sync, drain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="stabwatch-bench-sinks-"))
    os.environ["STABWATCH_SPILL_DIR"] = str(root / "spill")
    proc, uri = start_mlflow(root)
    try:
        print(f"{args.steps} steps, 50 metrics per record, ~2 ms of work per step; times per step in ms")
        print(f"{'sink':22s} {'in-loop mean':>12s} {'p50':>7s} {'p99':>7s} {'sync mean':>10s} {'sync/in-loop':>13s}")
        for name, factory in make_sinks(root, uri).items():
            in_loop, sync, drain = bench(factory, args.steps)
            mean, smean = statistics.mean(in_loop) * 1e3, statistics.mean(sync) * 1e3
            p50 = statistics.median(in_loop) * 1e3
            p99 = sorted(in_loop)[int(0.99 * len(in_loop))] * 1e3
            verdict = "ok" if mean <= 0.5 else "OVER 0.5 ms"
            print(f"{name:22s} {mean:12.4f} {p50:7.4f} {p99:7.4f} {smean:10.3f} {smean / mean:12.0f}x  {verdict}"
                  f"  (close drained in {drain:.2f} s)")  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
