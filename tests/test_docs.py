"""The documentation: runnable examples run, the key reference lists every key a run emits, the schedules
the pages state are the presets', and ``mkdocs build --strict`` is clean.

A fenced ``python`` block directly preceded by the line ``<!-- test: run -->`` is runnable: the blocks of
one page run in order, in one namespace (like a notebook), in a temporary working directory.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = "<!-- test: run -->"
#: extras a page's examples may import; without them the page is skipped, not failed
OPTIONAL = {"snntorch", "mlflow", "wandb", "tensorboard", "matplotlib", "sklearn"}
_BLOCK = re.compile(r"^" + re.escape(MARKER) + r"\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def runnable_blocks(text: str) -> list[str]:
    """The code of every fenced python block marked runnable."""
    return [m.group(1) for m in _BLOCK.finditer(text)]


def _pages_with_blocks() -> list[str]:
    return sorted(p.name for p in DOCS.glob("*.md") if runnable_blocks(p.read_text()))


def _keys_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stabwatch_docs_keys", DOCS / "hooks" / "keys.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_marker_finds_blocks_and_ignores_unmarked_ones() -> None:
    text = f"intro\n{MARKER}\n```python\nx = 1\n```\n\n```python\nnot run\n```\n{MARKER}\n```python\ny = x\n```\n"
    assert runnable_blocks(text) == ["x = 1\n", "y = x\n"]
    assert runnable_blocks("```python\nz = 2\n```\n") == []
    assert {"index.md", "alerts.md"} <= set(_pages_with_blocks())


@pytest.mark.parametrize("page", _pages_with_blocks())
def test_runnable_blocks_of_a_page_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STABWATCH_SPILL_DIR", str(tmp_path / "spill"))
    namespace: dict[str, object] = {"__name__": f"docs_{page}"}
    for i, code in enumerate(runnable_blocks((DOCS / page).read_text())):
        try:
            exec(compile(code, f"{page}[block {i}]", "exec"), namespace)
        except ModuleNotFoundError as exc:  # an optional extra (snntorch, ...) that is not installed
            if exc.name in OPTIONAL:
                pytest.skip(f"{page} needs {exc.name}: pip install -e '.[dev]'")
            raise


class _Reference(torch.nn.Module):
    """Shaped unlike the generator's model: nested containers, an RNN with 2 layers, a Conv1d, a GELU,
    parameters owned by the root module, and snntorch's Synaptic neuron when it is there."""

    def __init__(self, spiking: bool) -> None:
        super().__init__()
        from torch import nn

        self.scale = nn.Parameter(torch.ones(6))
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv1d(1, 2, 3, padding=1), nn.GELU()), nn.Sequential(nn.Linear(6, 6), nn.Tanh())]
        )
        self.rnn = nn.RNN(6, 6, num_layers=2, batch_first=True)
        self.syn = None
        if spiking:
            import snntorch

            self.syn = snntorch.Synaptic(alpha=0.8, beta=0.9)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x.unsqueeze(1)).mean(1) * self.scale
        h = self.blocks[1](h)
        h = self.rnn(h.unsqueeze(1))[0][:, 0]
        if self.syn is not None:
            syn, mem = self.syn.init_synaptic()
            for _ in range(2):
                spk, syn, mem = self.syn(h, syn, mem)
            h = h + spk
        return self.out(h)


@pytest.mark.slow
def test_key_reference_lists_every_key_a_full_run_emits(one_thread) -> None:
    keys = _keys_module()
    spiking = importlib.util.find_spec("snntorch") is not None
    found = keys.emitted_patterns()
    assert keys.check(found) == []  # every emitted pattern described, every description emitted
    page = keys.render(found)

    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(4)]
    emitted = keys.monitor_keys(_Reference(spiking), batches=batches)
    assert len(emitted) > 80
    documented = {keys.pattern(k) for k in emitted}
    missing = sorted(p for p in documented if f"`{p}`" not in page)
    assert missing == [], f"keys a full run emits but docs/keys.md lacks: {missing}"
    assert "grad_layers/norm/_root_" in emitted  # the page's claim about root parameters
    assert "weight_layers/spectral_radius/rnn.weight_hh_l1" in emitted  # an RNN has no gate suffix
    if spiking:
        assert "spiking_layers/firing_rate_mean/syn" in emitted


def test_key_patterns_and_the_drift_check_can_fail() -> None:
    keys = _keys_module()
    assert keys.pattern("grad_layers/norm/encoder.0") == "grad_layers/norm/<module.path>"
    assert keys.pattern("grad_sv_layers/top12/a.b") == "grad_sv_layers/top<i>/<module.path>"
    assert keys.pattern("grad_layers/norm/layers:p50") == "grad_layers/norm/layers:<stat>"
    assert keys.pattern("grad/norm") == "grad/norm"
    found = {p: {"Monitor"} for p in keys.DESCRIPTIONS}
    assert keys.check(found) == []
    found["grad/new_metric"] = {"Monitor"}
    del found["loss/value"]
    problems = keys.check(found)
    assert len(problems) == 2 and "grad/new_metric" in problems[1] + problems[0]
    with pytest.raises(RuntimeError, match="not described"):
        keys.render(found)


def _schedule_table(text: str) -> dict[str, tuple[str, str, str]]:
    rows = re.findall(r"^\| `(\w+)` \| (off|\d+) \| (off|\d+) \| (off|\d+) \|", text, re.MULTILINE)
    return {family: (cheap, default, full) for family, cheap, default, full in rows}


def test_concepts_states_the_schedules_of_the_presets() -> None:
    from stabwatch.collectors import FAMILIES, PRESETS

    stated = _schedule_table((DOCS / "concepts.md").read_text())
    actual = {
        family: tuple(
            str(next((c.every for c in PRESETS[p]() if c.family == family), None) or "off")
            for p in ("cheap", "default", "full")
        )
        for family in FAMILIES
    }
    assert stated == actual


@pytest.mark.slow
def test_mkdocs_build_strict_is_clean(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-4000:]
    keys_page = (site / "keys" / "index.html").read_text()
    assert "grad_layers/norm/&lt;module.path&gt;" in keys_page
    assert 'id="stabwatch.Monitor"' in (site / "api" / "index.html").read_text()
    shutil.rmtree(site)
