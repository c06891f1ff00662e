"""The console: `ConsoleSink` through real runs, and the console of ``stabwatch demo`` — piped (no bar, no
carriage returns, steps in order, each alert once, small) and on a terminal (one bar that advances with
the steps, lines printed above it through its writer, no stale copies of the bar)."""

from __future__ import annotations

import io
import re

import torch
from torch import nn

import stabwatch as sw
from stabwatch.demo import run_demo
from stabwatch.diagnosis import analyse
from stabwatch.metrics import AlertReason, Severity
from stabwatch.sinks import read_jsonl
from stabwatch.sinks.console import format_alert
from tests.helpers import data, mlp

STEP_LINE = re.compile(r"^step (\d+) \|")
ALERT_LINE = re.compile(r"^  \[(critical|warning|info|recovered)\] step (\d+) ")


def _jump_run(stream: io.StringIO, steps: int = 60) -> list[sw.Alert]:
    """A tiny MLP whose learning rate jumps ×300 at step 30: gradient, update and loss alerts."""
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = data(64)
    with sw.Monitor(
        model,
        opt,
        sinks=[sw.sinks.ConsoleSink(every=7, stream=stream)],
        alerts=sw.alerts.AlertEngine(sw.alerts.default_rules(), log_alerts=False),
    ) as mon:
        for i in range(steps):
            if i == 30:
                opt.param_groups[0]["lr"] = 3.0
            opt.zero_grad()
            b = slice(i % 4 * 16, i % 4 * 16 + 16)
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    return list(mon.alerts)


def _steps_in_order(lines: list[str]) -> list[int]:
    out = []
    for line in lines:
        m = STEP_LINE.match(line) or ALERT_LINE.match(line)
        if m:
            out.append(int(m.groups()[-1]))
    return out


def test_console_sink_prints_steps_in_order_and_each_alert_once(one_thread):
    buf = io.StringIO()  # not a terminal
    alerts = _jump_run(buf)
    out = buf.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    steps = _steps_in_order(lines)
    assert steps == sorted(steps) and len(steps) > 10
    assert [int(STEP_LINE.match(x).group(1)) for x in lines if STEP_LINE.match(x)] == list(range(0, 60, 7))
    assert any(a.severity is Severity.CRITICAL for a in alerts)
    for a in alerts:
        assert out.count(f"  {format_alert(a)}\n") == 1, format_alert(a)
    assert sum(1 for x in lines if ALERT_LINE.match(x)) == len(alerts)
    # a rule's suggestion once, however often it fires
    rules = {a.rule for a in alerts if a.suggestion and a.reason is not AlertReason.RECOVERED}
    assert sum(1 for x in lines if x.startswith("    try: ")) == len(rules)


def test_with_a_console_sink_the_monitor_does_not_log_its_alerts_a_second_time(caplog):
    # the default rules (alerts=True) and a console sink: each alert on the console once, none on the log
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = data(64)
    buf = io.StringIO()
    sinks = [sw.sinks.ConsoleSink(every=10, stream=buf)]
    with caplog.at_level("INFO", logger="stabwatch"), sw.Monitor(model, opt, sinks=sinks) as mon:
        for i in range(50):
            if i == 30:
                opt.param_groups[0]["lr"] = 3.0
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            mon.step()
    alerts = list(mon.alerts)
    assert alerts, "the learning-rate jump raises alerts"
    assert all(buf.getvalue().count(f"  {format_alert(a)}\n") == 1 for a in alerts)
    assert not [r for r in caplog.records if r.name.startswith("stabwatch.alerts")]
    # without a console sink the alerts still go to the log (nothing else would show them)
    caplog.clear()
    with caplog.at_level("INFO", logger="stabwatch"), sw.Monitor(model, opt) as mon2:
        for _ in range(3):
            opt.param_groups[0]["lr"] = 300.0
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            mon2.step()
    assert list(mon2.alerts) and [r for r in caplog.records if r.name.startswith("stabwatch.alerts")]


def test_alert_lines_name_the_layer_as_a_layer():
    a = sw.Alert(
        rule="grad_explode_layer",
        reason=AlertReason.EXPLODING_GRADIENT,
        severity=Severity.WARNING,
        step=22,
        metric="grad_norm",
        layer="0",
        message="grad_norm of 0 43.09 is 12× its median",
    )
    assert format_alert(a) == "[warning] step 22 grad_explode_layer, layer '0': grad_norm of 0 43.09 is 12× its median"
    rec = a.model_copy(update={"reason": AlertReason.RECOVERED, "severity": Severity.INFO, "step": 30})
    assert format_alert(rec) == "[recovered] step 30 grad_explode_layer, layer '0'"


def _alerts_of(path) -> list[sw.Alert]:
    return [a for r in read_jsonl(path) for a in r.alerts]


def test_demo_piped_output_is_small_ordered_and_prints_each_alert_once(tmp_path, capsys, one_thread):
    run_demo(tmp_path, steps=40)
    captured = capsys.readouterr()
    out = captured.out
    assert "\r" not in out and "it/s" not in out  # no bar, no redraws
    assert len(out.encode("utf-8")) < 5000
    stable_part, unstable_part = out.split("== stable run", 1)
    for part in (stable_part, unstable_part.split("== unstable run")[0]):
        steps = _steps_in_order(part.splitlines())
        assert steps == sorted(steps) and steps[0] == 0
    for name in ("stable", "unstable"):
        path = tmp_path / f"{name}.jsonl"
        alerts = _alerts_of(path)
        for a in alerts:
            assert out.count(f"  {format_alert(a)}\n") == 1, format_alert(a)
        # the counts printed are the diagnosis's counts of the run file
        d = analyse(list(read_jsonl(path)), alerts)
        summary = re.search(rf"== {name} run \(lr=[^)]*\): (.*)", out).group(1)
        assert summary.startswith(d.verdict.upper())
        for sev, n in d.counts.items():
            assert (f"{n} {sev}" in summary) == bool(n)
    assert any(a.severity is Severity.CRITICAL for a in _alerts_of(tmp_path / "unstable.jsonl"))
    assert "[critical]" not in captured.err and "[warning]" not in captured.err  # not a second time in the log


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: ``\\r`` returns to the line start, ``ESC[A`` goes up a line."""
    screen, row, col = [""], 0, 0
    for tok in re.findall(r"\x1b\[A|\r|\n|[^\r\n\x1b]+|\x1b", raw):
        if tok == "\r":
            col = 0
        elif tok == "\n":
            row, col = row + 1, 0
            if row == len(screen):
                screen.append("")
        elif tok == "\x1b[A":
            row = max(0, row - 1)
        elif tok != "\x1b":
            line = screen[row]
            screen[row] = line[:col] + tok + line[col + len(tok) :]
            col += len(tok)
    return [line.rstrip() for line in screen]


def test_demo_on_a_terminal_keeps_one_bar_that_advances(tmp_path, monkeypatch, one_thread):
    term = _Terminal()
    monkeypatch.setattr("sys.stdout", term)
    steps = 25
    run_demo(tmp_path, steps=steps)
    raw = term.getvalue()
    # every drawing of the bar shows the step count that goes with its loss
    renders = re.findall(rf"(\w+) \(lr=[^)]*\): +\d+%\|[^|]*\| *(\d+)/{steps} \[[^\]]*loss=([^ ]+) grad=", raw)
    assert {run for run, _, _ in renders} == {"stable", "unstable"}
    shown: dict[tuple[str, str], set[str]] = {}
    for run, n, loss in renders:
        shown.setdefault((run, n), set()).add(loss)
    assert all(len(v) == 1 for v in shown.values()), shown  # not "0/25" beside a changing loss
    for name in ("stable", "unstable"):
        counts = [int(n) for run, n, _ in renders if run == name]
        # how many intermediate drawings there are depends on tqdm's redraw interval (time), not on us
        assert counts == sorted(counts) and counts[-1] == steps
    screen = _screen(raw)
    bars = [i for i, line in enumerate(screen) if f"/{steps} [" in line]
    assert len(bars) == 2  # one finished bar per run, no stale copies between the lines
    assert all(screen[i].split("|")[0].strip().startswith(("stable", "unstable")) for i in bars)
    assert all(f"{steps}/{steps}" in screen[i] for i in bars)
    text = "\n".join(screen) + "\n"
    for name in ("stable", "unstable"):
        for a in _alerts_of(tmp_path / f"{name}.jsonl"):
            assert text.count(f"  {format_alert(a)}\n") == 1, format_alert(a)
