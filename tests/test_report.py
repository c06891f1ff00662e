"""``stabwatch report`` / ``stabwatch diagnose``: run files from real training, the HTML page (checked
in a real headless Chromium when one is installed), escaping, and the errors."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.cli import main
from stabwatch.errors import StabwatchError
from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics
from stabwatch.report import load_run, render_report, write_report
from tests.helpers import data, mlp

EVIL = "<script>alert('x')</script>"
N_PLOTS = 10  # loss, grad norm, 3 heat maps, singular values, spectral radii, Lyapunov, update ratio, timeline


def _train_mlp(path: Path, blow_at: int | None, alerts: bool = True) -> None:
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data(64)
    with sw.Monitor(model, opt, sinks=[sw.sinks.JsonlSink(path)], alerts=alerts, every={"grad_sv": 10}) as mon:
        for i in range(80):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i % 4 * 16 : i % 4 * 16 + 16]), y[i % 4 * 16 : i % 4 * 16 + 16])
            if blow_at is not None and i >= blow_at:
                loss = loss * 300.0  # the loss scale jumps: gradients explode
            loss.backward()
            opt.step()
            mon.step(loss=loss)


def _train_rnn(path: Path) -> None:
    torch.manual_seed(0)
    rnn, head = nn.RNN(1, 8, batch_first=True), nn.Linear(8, 1)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with sw.Monitor(model, opt, sinks=[sw.sinks.JsonlSink(path)], every={"weight": 10}) as mon:
        for _ in range(60):
            x = torch.randn(8, 12, 1, generator=g)
            opt.zero_grad()
            out, _ = rnn(x)
            loss = nn.functional.mse_loss(head(out), x.cumsum(1) * 0.1)
            loss.backward()
            opt.step()
            mon.step(loss=loss)


def _write_synthetic(path: Path) -> None:
    """A hand-written run with a Lyapunov series, a hostile layer name and a hostile alert message."""
    with open(path, "w", encoding="utf-8") as f:
        for s in range(40):
            alerts = []
            if s == 30:
                alerts.append(
                    Alert(
                        rule="chaotic",
                        reason=AlertReason.CHAOTIC_TRAINING,
                        severity=Severity.WARNING,
                        step=s,
                        metric="lyapunov",
                        layer=EVIL,
                        message=f"λ > 0 {EVIL} <img src=x onerror=alert(1)>",
                    )
                )
            rec = StabilityMetrics(
                step=s,
                loss=1.0 / (s + 1),
                grad_norm=1.0,
                lyapunov=-0.1 + 0.01 * s,
                lyapunov_local=0.01 * s - 0.2,
                layers={EVIL: {"grad_norm": 0.5 + 0.01 * s}},
                alerts=alerts,
            )
            f.write(rec.to_json_line() + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    paths = {"unstable": d / "unstable.jsonl", "rnn": d / "rnn.jsonl", "weird": d / "weird <b>.jsonl"}
    _train_mlp(paths["unstable"], blow_at=50)
    _train_rnn(paths["rnn"])
    _write_synthetic(paths["weird"])
    return paths


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_cli_writes_a_self_contained_page(runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs.values()), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) == N_PLOTS
    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(a["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    for heading in ("Loss", "Gradient norm per layer", "Singular values", "Spectral radii", "Lyapunov exponent"):
        assert f"<h2>{heading}</h2>" in page
    # every run's alerts and diagnosis are there
    assert "grad_explode" in page and "likely causes" in page


def test_report_escapes_all_text(runs, tmp_path):
    run = load_run(runs["weird"])
    page = render_report([run], title=f"t {EVIL}")
    parser = _Tags()
    parser.feed(page)
    assert [t for t, _ in parser.tags].count("script") == 1  # only the report's own
    assert not any("onerror" in a for _, a in parser.tags)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "weird &lt;b&gt;" in page


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_report_loads_in_headless_chromium(runs, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium: `apt-get install -y chromium` (the CI script installs it)")
    out = write_report(list(runs.values()), tmp_path / "r.html")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        out.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # the page's own check: every <img class="plot"> decoded by the browser (naturalWidth > 0)
    assert f'data-plots-loaded="{N_PLOTS}/{N_PLOTS}"' in dom, dom[:500]
    assert f"{N_PLOTS} of {N_PLOTS} plots rendered" in dom
    assert "<script>alert(" not in dom


def test_report_without_matplotlib_names_the_extra(runs, tmp_path, monkeypatch, capsys):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(StabwatchError, match=r"pip install stabwatch\[plot\]"):
        write_report([runs["rnn"]], tmp_path / "x.html")
    assert main(["report", str(runs["rnn"]), "-o", str(tmp_path / "x.html")]) == 2
    assert "pip install stabwatch[plot]" in capsys.readouterr().err


def test_report_and_diagnose_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "r.html")]) == 2
    assert "no such run file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0, "loss": 1.0}\n{"step": "x"}\n', encoding="utf-8")
    assert main(["diagnose", str(bad)]) == 2
    assert "bad.jsonl:2: not a stabwatch record" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(StabwatchError, match="holds no records"):
        load_run(empty)


def test_diagnose_cli_text_and_json(runs, capsys):
    assert main(["diagnose", str(runs["unstable"])]) == 0
    text = capsys.readouterr().out
    assert "verdict: UNSTABLE" in text and "grad_explode" in text
    assert "likely causes (most likely first):\n  1. the learning rate (step size) is too high" in text
    assert "clip_grad_norm_" in text
    assert main(["diagnose", "--json", str(runs["unstable"]), str(runs["rnn"])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["run"] for o in out] == ["unstable", "rnn"]
    assert out[0]["verdict"] == "unstable" and out[0]["causes"][0]["key"] == "step_size"
    assert {t["metric"] for t in out[1]["trends"]} >= {"loss", "grad_norm", "spectral_radius"}


def test_rerun_rules_on_a_run_recorded_without_alerts(tmp_path, capsys):
    path = tmp_path / "quiet.jsonl"
    _train_mlp(path, blow_at=50, alerts=False)
    assert all(not r.alerts for r in load_run(path).records)
    rerun = load_run(path, rerun_rules=True)
    assert any(a.rule == "grad_explode" and a.step >= 50 for a in rerun.alerts)
    assert main(["diagnose", "--rerun-rules", str(path)]) == 0
    assert "grad_explode" in capsys.readouterr().out


def test_report_leaves_the_users_matplotlib_state_alone(tmp_path):
    """Building a report must not switch the backend, import pyplot or change rcParams: it draws on bare
    Agg figures. Run in a fresh interpreter whose backend is set to 'pdf' first."""
    path = tmp_path / "run.jsonl"
    _write_synthetic(path)
    code = f"""
import sys, matplotlib
matplotlib.use("pdf")
before = dict(matplotlib.rcParams)
from stabwatch.report import write_report
out = write_report([{str(path)!r}], {str(tmp_path / "r.html")!r})
assert matplotlib.get_backend() == "pdf", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
assert dict(matplotlib.rcParams) == before
print(out.read_text(encoding="utf-8").count('<img class="plot"'))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip()) >= 4  # loss, grad norm, heat map, Lyapunov, ... were drawn


def test_report_in_a_process_that_uses_pyplot(runs, tmp_path):
    """With pyplot in use, the report neither closes nor adds pyplot figures, nor changes the backend."""
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    fig = plt.figure()
    try:
        before = plt.get_fignums()
        page = render_report([load_run(runs["weird"])])
        assert plt.get_fignums() == before and plt.fignum_exists(fig.number)
        assert matplotlib.get_backend() == backend
        assert page.count("data:image/png;base64,") >= 4
    finally:
        plt.close(fig)


def test_report_refuses_what_is_not_a_run(runs):
    with pytest.raises(StabwatchError, match=r"runs\[1\] must be a stabwatch.report.Run"):
        render_report([load_run(runs["weird"]), str(runs["weird"])])
    # one path given as a string is one run, not one run per character
    assert write_report(str(runs["weird"]), runs["weird"].parent / "one.html").is_file()
