"""examples/ddp_example.py runs at a tiny size: two processes, one JSONL file, written by rank 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stabwatch.sinks import read_jsonl

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_example.py"


@pytest.mark.slow
def test_ddp_example_runs_two_ranks_and_rank_0_writes(tmp_path: Path) -> None:
    out = tmp_path / "ddp.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "4", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        env={**env, "OMP_NUM_THREADS": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2: 4 records" in proc.stdout
    assert [r.step for r in read_jsonl(out)] == [0, 1, 2, 3]
    assert "grad=" in proc.stdout
