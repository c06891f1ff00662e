"""``stabwatch report`` / ``stabwatch diagnose``: run files from real training, the HTML page (checked
in a real headless Chromium when one is installed), escaping, and the errors."""

from __future__ import annotations

import base64
import json
import math
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
from stabwatch.diagnosis import analyse
from stabwatch.errors import StabwatchError
from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics
from stabwatch.report import load_run, natural_sorted, render_report, write_report
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


# --- layout: verdict first, shared scales, dead cells, natural order, text not math, aligned axes ---------
def _train_dead(path: Path) -> nn.Module:
    """A real run whose layer ``0`` is dead (every ReLU unit off: exactly zero gradient, so also a
    ``grad_min_sv`` of 0), with square weights (spectral radii on request) and a learning-rate jump at
    step 25 (an ``update_jump`` alert on the update ratio, a ``loss_spike`` on the loss)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = data(64)
    weight = sw.collectors.WeightCollector(every=5, radius="square")  # the report's hint for spectral radii
    with sw.Monitor(
        model, opt, sinks=[sw.sinks.JsonlSink(path)], every={"grad_sv": 5, "update": 1}, collectors=[weight]
    ) as mon:
        for i in range(40):
            if i == 25:
                opt.param_groups[0]["lr"] = 5.0
            opt.zero_grad()
            b = slice(i % 4 * 16, i % 4 * 16 + 16)
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    return model


class _Deep(nn.Module):
    """14 numbered layers and one whose name holds matplotlib math (``x$_1$``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(*[nn.Linear(8, 8) for _ in range(14)])
        self.add_module("x$_1$", nn.Linear(8, 3))

    def forward(self, x):
        return getattr(self, "x$_1$")(torch.tanh(self.body(x)))


def _train_deep(path: Path) -> nn.Module:
    model = _Deep()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = data(32)
    with sw.Monitor(model, opt, sinks=[sw.sinks.JsonlSink(path)], every={"grad_sv": 0, "weight": 0}) as mon:
        for _ in range(12):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    return model


@pytest.fixture(scope="module")
def layout(runs, tmp_path_factory):
    """The unstable MLP, the dead run and the deep run through `render_report`, every figure kept."""
    import stabwatch.report as report

    d = tmp_path_factory.mktemp("layout")
    dead_model, deep_model = _train_dead(d / "dead.jsonl"), _train_deep(d / "deep.jsonl")
    loaded = [load_run(runs["unstable"]), load_run(d / "dead.jsonl"), load_run(d / "deep.jsonl")]
    loaded[1].layer_types = report.describe_layers(dead_model)
    loaded[2].layer_types = report.describe_layers(deep_model)
    figures: list = []
    real = report.figure_data_uri
    mp = pytest.MonkeyPatch()
    mp.setattr(report, "figure_data_uri", lambda fig, *a, **k: (figures.append(fig), real(fig, *a, **k))[1])
    try:
        page = render_report(loaded)
    finally:
        mp.undo()
    return {"page": page, "runs": loaded, "figures": {f.axes[0].get_title(): f for f in figures}}


def _figure(layout, start: str):
    return next(f for t, f in layout["figures"].items() if t.startswith(start))


def test_report_opens_with_one_coloured_verdict_line_per_run(layout):
    page = layout["page"]
    parser = _Tags()
    parser.feed(page)
    tags = parser.tags
    first_img = next(i for i, (t, _) in enumerate(tags) if t == "img")
    verdicts = [(i, a) for i, (t, a) in enumerate(tags) if t == "li" and "verdict" in a.get("class", "")]
    assert [a["data-run"] for _, a in verdicts] == ["unstable", "dead", "deep"]
    assert all(i < first_img for i, _ in verdicts)
    assert page.index("class='verdicts'") < page.index("<h2>Runs</h2>") < page.index("<img")
    # the verdict is analyse()'s, the first critical step is the run's first critical alert
    unstable, dead, _ = layout["runs"]
    first_crit = min(a.step for a in unstable.alerts if a.severity is Severity.CRITICAL)
    assert [a["data-verdict"] for _, a in verdicts] == [analyse(r.records, r.alerts).verdict for r in layout["runs"]]
    assert verdicts[0][1]["data-verdict"] == "unstable" and verdicts[1][1]["data-verdict"] == "warnings"
    line = re.search(r"<li class=\"verdict unstable\".*?</li>", page).group(0)
    assert f"first critical step {first_crit} (grad_explode)" in line
    assert "most likely cause: the learning rate" in line
    first_warn = min(a.step for a in dead.alerts if a.severity is Severity.WARNING)
    assert f"first warning at step {first_warn}" in re.search(r"<li class=\"verdict warnings\".*?</li>", page).group(0)
    # each verdict has its own colour, in the page's style sheet
    colours = {
        v: re.search(rf"li\.verdict\.{v}{{border-color:(#[0-9a-f]+)}}", page).group(1)
        for v in ("healthy", "warnings", "unstable")
    }
    assert len(set(colours.values())) == 3


def test_heatmaps_share_one_colour_scale_and_show_dead_cells(layout):
    import numpy as np
    from matplotlib.collections import QuadMesh

    import stabwatch.report as report

    maps = {t.split(":")[0]: f for t, f in layout["figures"].items() if "gradient norm per layer" in t}
    assert set(maps) == {"unstable", "dead", "deep"}
    meshes = {name: [c for c in f.axes[0].collections if isinstance(c, QuadMesh)] for name, f in maps.items()}
    clims = {name: m[1].get_clim() for name, m in meshes.items()}  # [0]: the empty cells, [1]: the values
    assert len(set(clims.values())) == 1
    # the scale is the 0.5..99.5 percentile of every run's log10 grad norms, computed here from the files
    logs = [
        math.log10(v)
        for run in layout["runs"]
        for r in run.records
        for vals in r.layers.values()
        if "grad_norm" in vals and math.isfinite(v := vals["grad_norm"]) and v > 0
    ]
    np.testing.assert_allclose(clims["dead"], np.percentile(logs, [0.5, 99.5]), rtol=1e-12)
    # layer '0' of the dead run: exactly 0 at every step, drawn in the dead colour, not as a value
    dead = layout["runs"][1]
    zero_steps = [r.step for r in dead.records if r.layers["0"]["grad_norm"] == 0.0]
    assert len(zero_steps) == len(dead.records)
    empty, values = meshes["dead"]
    row = [t.get_text() for t in maps["dead"].axes[0].get_yticklabels()].index("0 · Linear 8→8")
    assert np.ma.getmaskarray(values.get_array()).reshape(-1, len(dead.records))[row].all()
    kinds = empty.get_array().reshape(-1, len(dead.records))
    assert (kinds[row] == report._DEAD - 1).all()
    assert empty.get_cmap()(empty.norm(report._DEAD - 1))[:3] == pytest.approx(matplotlib_rgb(report._DEAD_COLOR))
    legend = [t.get_text() for t in maps["dead"].axes[0].get_legend().get_texts()]
    assert legend[:3] == ["dead: exactly 0", "non-finite", "missing"]
    assert report._DEAD_COLOR not in (report._MISSING_COLOR, report._NONFINITE_COLOR)


def matplotlib_rgb(color: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(color)


def test_layers_are_labelled_with_type_and_sorted_numerically(layout):
    labels = [t.get_text() for t in _figure(layout, "deep: gradient norm").axes[0].get_yticklabels()]
    assert labels == [f"body.{i} · Linear 8→8" for i in range(14)] + [r"x\$_1\$ · Linear 8→3"]
    assert natural_sorted(["13", "3", "1", "11", "a.10", "a.2"]) == ["1", "3", "11", "13", "a.2", "a.10"]
    from stabwatch.report import describe_layers

    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LSTM(4, 6), nn.Embedding(10, 4))
    assert describe_layers(conv) == {"0": "Conv2d 3→8 k3×3", "2": "LSTM 4→6", "3": "Embedding 10×4"}


def test_no_text_in_any_figure_is_read_as_math(layout):
    from matplotlib.cbook import is_math_text
    from matplotlib.text import Text

    texts = [t for f in layout["figures"].values() for t in f.findobj(Text) if t.get_text()]
    assert any("x\\$_1\\$" in t.get_text() for t in texts)  # the name is there, escaped
    math_texts = [
        t.get_text()
        for t in texts
        if t.get_parse_math() and is_math_text(t.get_text()) and not t.get_text().startswith(r"$\mathdefault{")
    ]  # (log-axis tick labels are matplotlib's own math: 10^k)
    assert math_texts == []


def test_every_plot_spans_the_same_steps_and_legends_sit_outside_the_data(layout):
    xlims, lefts, rights = set(), set(), set()
    for fig in layout["figures"].values():
        ax = fig.axes[0]
        xlims.add(tuple(round(x, 9) for x in ax.get_xlim()))
        box = ax.get_position()
        lefts.add(round(box.x0, 9))
        rights.add(round(box.x1, 9))
        legend = ax.get_legend()
        if legend is not None:
            renderer = fig.canvas.get_renderer()
            assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    steps = [r.step for run in layout["runs"] for r in run.records]
    assert len(xlims) == 1
    lo, hi = xlims.pop()
    assert lo < min(steps) and hi > max(steps)
    assert len(lefts) == len(rights) == 1  # the axes line up on the page too (same figure width and margins)


def test_alert_markers_carry_their_run_and_sit_on_their_metric(layout):
    import stabwatch.report as report

    dead = layout["runs"][1]
    jump = next(a for a in dead.alerts if a.rule == "update_jump")
    spike = next(a for a in dead.alerts if a.rule == "loss_spike")

    def markers(title):
        return {
            line.get_label(): list(line.get_xdata())
            for line in _figure(layout, title).axes[0].get_lines()
            if line.get_label().endswith(" alert")
        }

    def fired(metric):
        return sorted({a.step for a in dead.alerts if a.metric == metric and a.reason is not AlertReason.RECOVERED})

    update = markers("update-to-weight ratio")
    assert jump.step in update["dead: warning alert"] == fired("update_ratio")
    assert spike.step in markers("loss")["dead: warning alert"] == fired("loss")
    unstable = layout["runs"][0]
    crit = sorted({a.step for a in unstable.alerts if a.rule == "grad_explode" and a.severity is Severity.CRITICAL})
    assert markers("global gradient norm")["unstable: critical alert"] == crit
    # not on a plot of another metric: the update-ratio plot holds the update-ratio alerts only
    on_update = sorted(
        {a.step for a in unstable.alerts if a.metric == "update_ratio" and a.severity is Severity.CRITICAL}
    )
    assert update.get("unstable: critical alert", []) == on_update
    # the marker is drawn in its run's colour, and no run colour is a severity colour
    line = next(
        x for x in _figure(layout, "update-to-weight").axes[0].get_lines() if x.get_label() == "dead: warning alert"
    )
    assert line.get_color() == report._RUN_COLORS[1]
    assert not set(report._RUN_COLORS) & set(report._SEVERITY_COLOR.values())


def test_a_zero_on_a_log_axis_is_marked_not_dropped(layout):
    dead = layout["runs"][1]
    zeros = [r.step for r in dead.records if r.grad_min_sv == 0.0]
    assert zeros  # the dead layer makes the smallest singular value exactly 0
    fig = _figure(layout, "gradient singular values")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    floor = next(line for line in ax.get_lines() if line.get_label().startswith("dead: grad_min_sv = 0"))
    assert list(floor.get_xdata()) == zeros and set(floor.get_ydata()) == {0.0}  # y in axes units: the floor


def test_sections_without_data_say_how_to_turn_them_on(runs, layout):
    from stabwatch.collectors import FAMILIES

    page = render_report([load_run(runs["unstable"])])
    nodata = re.findall(r'<p class="muted nodata">(.*?)</p>', page)
    spectral = next(p for p in nodata if p.startswith("spectral radii"))
    assert "Monitor(every={&quot;weight&quot;: N})" in spectral and "radius=&quot;square&quot;" in spectral
    assert any(p.startswith("Lyapunov exponent") and "stabwatch.Shadow(loss_fn)" in p for p in nodata)
    import stabwatch.report as report

    for hint in report._ENABLE.values():  # every family a hint names exists
        assert set(re.findall(r'"(\w+)": [N1]', hint)) <= set(FAMILIES)
    # following the spectral-radius hint (WeightCollector(radius="square")) does give the section data
    assert any(t.startswith("spectral radius") for t in layout["figures"])
    assert "spectral radii: no data" not in layout["page"]


def test_alert_table_rows_match_the_counts(layout):
    unstable = layout["runs"][0]
    d = analyse(unstable.records, unstable.alerts)
    table = re.search(r"<h3>unstable</h3><table>(.*?)</table>", layout["page"]).group(1)
    rows = re.findall(r"<tr><td>\d+</td>", table)
    assert len(rows) == d.counts["critical"] + d.counts["warning"] + d.counts["info"]
    assert "recovered at" in table


def test_non_finite_cells_and_verdict(tmp_path, monkeypatch):
    """A real run whose loss turns NaN at step 12: the verdict names the step, and the heat map paints
    the non-finite cells in their own colour (not the dead one, not the missing one)."""
    import numpy as np
    from matplotlib.collections import QuadMesh

    import stabwatch.report as report

    path = tmp_path / "nan.jsonl"
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(32)
    with sw.Monitor(model, opt, sinks=[sw.sinks.JsonlSink(path)], every={"grad_sv": 0, "weight": 0}) as mon:
        for i in range(16):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if i == 12:
                loss = loss * float("nan")
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    run = load_run(path)
    bad = [r.step for r in run.records if r.layers and not math.isfinite(r.layers["0"]["grad_norm"])]
    assert bad and bad[0] == 12
    figures: list = []
    real = report.figure_data_uri
    monkeypatch.setattr(report, "figure_data_uri", lambda fig, *a, **k: (figures.append(fig), real(fig, *a, **k))[1])
    page = render_report([run])
    line = re.search(r"<li class=\"verdict unstable\".*?</li>", page).group(0)
    assert "non-finite values from step 12" in line
    heat = next(f for f in figures if "gradient norm per layer" in f.axes[0].get_title())
    empty = next(c for c in heat.axes[0].collections if isinstance(c, QuadMesh))
    steps = sorted({r.step for r in run.records if "0" in r.layers})
    kinds = empty.get_array().reshape(-1, len(steps))
    row0 = kinds[0]
    expect = np.array([report._NONFINITE - 1 if s in bad else -1 for s in steps])
    assert (np.where(np.ma.getmaskarray(row0), -1, row0.filled(-1)) == expect).all()
