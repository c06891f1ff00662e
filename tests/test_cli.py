"""The command line: ``stabwatch demo`` end to end."""

from __future__ import annotations

import subprocess
import sys

from stabwatch.cli import main
from stabwatch.sinks import read_jsonl


def test_demo_writes_both_runs_and_prints_diagnosis(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "40", "--quiet"]) == 0
    out = capsys.readouterr().out
    stable = list(read_jsonl(tmp_path / "stable.jsonl"))
    unstable = list(read_jsonl(tmp_path / "unstable.jsonl"))
    assert len(stable) == len(unstable) == 40
    assert "diagnosis" in out and "stable run" in out and "unstable run" in out
    # the too-high learning rate shows in the numbers
    assert max(r.loss for r in unstable[-10:]) > 5 * max(r.loss for r in stable[-10:])
    assert max(r.spectral_norm for r in unstable if r.spectral_norm) > max(
        r.spectral_norm for r in stable if r.spectral_norm
    )


def test_cli_entry_point_runs_as_module():
    res = subprocess.run([sys.executable, "-m", "stabwatch", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout
