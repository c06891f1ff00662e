"""Fixtures for the sink tests: a real MLflow server on 127.0.0.1, an offline W&B environment, a
reader for W&B's ``run-*.wandb`` files, and a private spill folder per test."""

from __future__ import annotations

import glob
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import offline_tracker_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """``mlflow server`` with a sqlite backend in its own process group; `stop` kills the group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        log = open(self.root / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def live_mlflow(mlflow_server: MlflowServer) -> MlflowServer:
    """The session server, restarted if an earlier test left it down."""
    if not mlflow_server.up():
        mlflow_server.start()
    return mlflow_server


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_tracker_env(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def wandb_records(wandb_dir: Path, run_id: str | None = None) -> list[Any]:
    """Parse a W&B offline run file: a 7-byte header (``:W&B``, 0xBEE1, version 0), then LevelDB-log
    framing in 32 KiB blocks (7-byte chunk headers: crc32 seeded with the type byte, length, type;
    types FULL=1, FIRST=2, MIDDLE=3, LAST=4) of ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    pattern = f"run-{run_id}.wandb" if run_id else "run-*.wandb"
    (path,) = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / pattern))
    deadline = time.monotonic() + 20
    while True:  # finish() can return before the file is complete: wait for the exit record
        data = Path(path).read_bytes()
        assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe" and data[6] == 0, data[:7]
        payloads: list[bytes] = []
        pos, block, buf = 7, 32768, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:
                pos += left
                continue
            crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0 and length == 0:
                pos += left
                continue
            chunk = data[pos + 7 : pos + 7 + length]
            intact = len(chunk) == length and zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
            if not intact and time.monotonic() <= deadline:
                break  # the writer is still writing this chunk: read the file again
            assert intact, f"bad crc at {pos}"
            pos += 7 + length
            if kind == 1:
                payloads.append(chunk)
            elif kind == 2:
                buf = chunk
            elif kind == 3:
                buf += chunk
            elif kind == 4:
                payloads.append(buf + chunk)
        records = []
        for raw in payloads:
            rec = pb.Record()
            rec.ParseFromString(raw)
            records.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_history(records: list[Any]) -> list[dict[str, Any]]:
    import json

    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows
