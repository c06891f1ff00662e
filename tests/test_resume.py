"""Checkpoint and resume: a run stopped after K steps and resumed from ``torch.save``/``torch.load(weights_only=True)``
emits exactly the records and alerts of the same run done in one go (issue #14).

The reference is the uninterrupted run itself: every flat key of every record after the resume point (timing
aside) and every alert must be equal, bit for bit. Each test also checks that it can fail: without the part
of the state under test (warm-start vectors, alert windows, the shadow's window) the resumed run differs.
"""

from __future__ import annotations

import copy
import io
import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.collectors import GradSVCollector
from stabwatch.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
N, K, JUMP = 26, 13, 18  # steps, the resume point (inside a shadow window), the learning-rate jump (x30)
_X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
_Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))


def _model(width: int = 32) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, width), nn.Tanh(), nn.Linear(width, 3)
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(1000 + step))
    return _X[idx], _Y[idx]


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _monitor(model: nn.Module, opt: Any, preset: str, shadow: bool = False, **kwargs: Any) -> sw.Monitor:
    """Every family runs within a few steps; the gradient spectra of the 32x144 layer go through the
    warm-started Krylov path (``exact_max_dim=8``), the weights' through warm-started power iteration."""
    every = {"update": 1, "grad_sv": 2, "weight": 3, "activation": 2, "spiking": 2} if preset == "default" else {}
    every.update(kwargs.pop("every", {}))
    kwargs.setdefault("collectors", [GradSVCollector(every=2 if preset == "default" else 1, exact_max_dim=8)])
    sh = sw.Shadow(loss_fn=_loss, every=6, window=4) if shadow else None
    return sw.Monitor(model, opt, preset=preset, every=every, shadow=sh, max_records=1000, **kwargs)


def _train(mon: sw.Monitor, model: nn.Module, opt: Any, start: int, stop: int) -> None:
    for step in range(start, stop):
        if step == JUMP:
            for g in opt.param_groups:
                g["lr"] *= 30.0
        batch = _batch(step)
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        mon.step(loss=loss, batch=batch)


def _flat(record: sw.StabilityMetrics) -> dict[str, Any]:
    out: dict[str, Any] = dict(record.to_dict())
    out.pop("monitor/overhead_ms", None)  # timing
    out.update(step=record.step, grad_source=record.grad_source, nonfinite_source=record.nonfinite_source)
    return out


def _alerts(alerts: Any, since: int = 0) -> list[tuple[str, str, int, str | None, str]]:
    return [(a.rule, a.reason.value, a.step, a.layer, a.message) for a in alerts if a.step >= since]


def _save(mon: sw.Monitor, model: nn.Module, opt: Any) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "monitor": mon.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _uninterrupted(preset: str, shadow: bool) -> tuple[list[dict[str, Any]], list[Any]]:
    model, opt = _model()
    with _monitor(model, opt, preset, shadow) as mon:
        _train(mon, model, opt, 0, N)
    return [_flat(r) for r in mon.records if r.step >= K], _alerts(mon.alerts, K)


def _checkpoint(preset: str, shadow: bool) -> dict[str, Any]:
    model, opt = _model()
    with _monitor(model, opt, preset, shadow) as mon:
        _train(mon, model, opt, 0, K)
        return _save(mon, model, opt)


def _resume(preset: str, shadow: bool, ckpt: dict[str, Any], before_start: bool = False) -> sw.Monitor:
    model, opt = _model()
    with torch.no_grad():  # a fresh process: other weights until the checkpoint is loaded
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    mon = _monitor(model, opt, preset, shadow)
    if before_start:
        mon.load_state_dict(ckpt["monitor"])
    with mon:
        if not before_start:
            mon.load_state_dict(ckpt["monitor"])
        assert mon.current_step == K
        _train(mon, model, opt, K, N)
    return mon


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[tuple[str, bool], Any]]:
    """``(preset, shadow) -> (records, alerts, checkpoint)`` of the uninterrupted run and its step-K checkpoint."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for preset, shadow in (("default", False), ("full", True)):
        out[preset, shadow] = (*_uninterrupted(preset, shadow), _checkpoint(preset, shadow))
    yield out
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("preset", "shadow", "before_start"), [("default", False, False), ("full", True, True)])
def test_resumed_run_emits_the_uninterrupted_records_and_alerts(runs, preset, shadow, before_start):
    records, alerts, ckpt = runs[preset, shadow]
    mon = _resume(preset, shadow, ckpt, before_start)
    resumed = [_flat(r) for r in mon.records]
    assert [r["step"] for r in resumed] == list(range(K, N))
    families = {key.split("/")[0].removesuffix("_layers") for r in resumed for key in r if "/" in key}
    assert {"grad", "update", "grad_sv", "weight", "activation"} <= families
    assert any("grad_sv_layers/top1/3" in r for r in resumed)  # the Krylov path ran
    if shadow:
        assert any("shadow/lyapunov" in r for r in resumed[:3])  # the window open at the resume point went on
    for got, want in zip(resumed, records, strict=True):
        assert got == want, (
            f"step {want['step']}: {sorted(k for k in want.keys() | got.keys() if got.get(k) != want.get(k))}"
        )
    # the learning-rate jump after the resume point is judged against update ratios from before it
    # (patience 2: the alert comes at the second jumped step, against an 18-step median)
    assert ("update_jump", "update_ratio", JUMP + 1) in [(a[0], a[1], a[2]) for a in alerts]
    assert _alerts(mon.alerts) == alerts


def test_resume_without_saved_state_differs(runs):
    """The comparison is sharp: dropping the warm-start vectors or the alert windows changes the result."""
    records, _, ckpt = runs["full", True]
    state = ckpt["monitor"]
    cold = {**state, "collectors": {**state["collectors"], "weight": {}, "grad_sv": {}}}
    mon = _resume("full", True, {**ckpt, "monitor": cold})
    resumed = [_flat(r) for r in mon.records]
    for family in ("weight", "grad_sv"):
        differ = [k for got, want in zip(resumed, records) for k in want if k.startswith(family) and got[k] != want[k]]
        assert differ, family
    mon = _resume("full", True, {**ckpt, "monitor": {**state, "alerts": None}})
    assert "update_jump" not in [a[0] for a in _alerts(mon.alerts)]  # 5 update ratios: below min_history
    no_window = {
        **state,
        "collectors": {**state["collectors"], "shadow": {**state["collectors"]["shadow"], "window": None}},
    }
    mon = _resume("full", True, {**ckpt, "monitor": no_window})
    assert "shadow/lyapunov" not in _flat(mon.records[0])


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("preset", ["cheap", "default", "full"])
def test_state_round_trips_through_weights_only_load(preset, one_thread):
    model, opt = _model()
    shadow = sw.Shadow(loss_fn=_loss, every=4, window=3)
    with sw.Monitor(model, opt, preset=preset, shadow=shadow, guard=True) as mon:
        _train(mon, model, opt, 0, 6)  # a window is open (spawned at step 4) and the guard has a window
        assert shadow.open
        state = mon.state_dict()
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
    assert _equal(loaded, state)
    assert loaded["version"] == 2 and loaded["guard"]["norms"]["values"]
    assert loaded["collectors"]["shadow"]["window"]["n"] == 2
    model2, opt2 = _model()
    with sw.Monitor(
        model2, opt2, preset=preset, shadow=sw.Shadow(loss_fn=_loss, every=4, window=3), guard=True
    ) as mon2:
        mon2.load_state_dict(loaded)
        assert _equal(mon2.state_dict(), state)


def test_state_after_close_keeps_all_but_the_shadow_window(one_thread):
    model, opt = _model()
    with _monitor(model, opt, "full", shadow=True) as mon:
        _train(mon, model, opt, 0, 6)
        inside = mon.state_dict()
        assert inside["collectors"]["shadow"]["window"] is not None
        inside = copy.deepcopy(inside)
    after = mon.state_dict()
    assert after["collectors"]["shadow"]["window"] is None
    inside["collectors"]["shadow"]["window"] = None
    assert _equal(after, inside)
    assert after["collectors"]["weight"]["u"] and after["collectors"]["grad_sv"]["bases"]


def test_a_state_from_another_configuration_is_refused(runs, one_thread):
    ckpt = runs["default", False][2]
    state = ckpt["monitor"]

    def load(
        state: dict[str, Any], *, width: int = 32, preset: str = "default", strict: bool = True, **kw: Any
    ) -> sw.Monitor:
        model, opt = _model(width)
        mon = _monitor(model, opt, preset, **kw)
        mon.load_state_dict(state, strict=strict)
        return mon

    with pytest.raises(ConfigError, match=r"preset='default'.*preset='full'"):
        load(state, preset="full")
    with pytest.raises(ConfigError, match=r"another model.*only in the checkpoint: 3.weight \(32, 144\)"):
        load(state, width=16)
    with pytest.raises(ConfigError, match="only in the checkpoint: grad_sv"):
        load(state, collectors=[], every={"grad_sv": None})
    with pytest.raises(ConfigError, match="not in the checkpoint: shadow"):
        load(state, shadow=True)
    with pytest.raises(ConfigError, match="newer"):
        load({**state, "version": 99})
    with pytest.raises(ConfigError, match="state_dict"):
        load({"generator": state["generator"]})
    # nothing was half-loaded by a refused state
    model, opt = _model(16)
    mon = _monitor(model, opt, "default")
    with pytest.raises(ConfigError):
        mon.load_state_dict(state)
    assert mon.current_step == 0
    # a shadow window saved for other tensors
    full = runs["full", True][2]["monitor"]
    shadow_state = full["collectors"]["shadow"]
    window = {**shadow_state["window"], "tensors": shadow_state["window"]["tensors"][:-1]}
    bad = {**full, "collectors": {**full["collectors"], "shadow": {**shadow_state, "window": window}}}
    model, opt = _model()
    with pytest.raises(ConfigError, match="saved open window does not fit"), _monitor(model, opt, "full", True) as mon:
        mon.load_state_dict(bad)
    # strict=False loads what fits
    assert load(state, shadow=True, strict=False).current_step == K


def test_a_state_of_the_previous_format_loads(runs, one_thread):
    """Before the "version" key: no config, no warm-start vectors, no shadow window, trend rules without sums."""
    state = runs["full", True][2]["monitor"]
    old = {k: v for k, v in state.items() if k not in ("version", "config", "optimizer_steps")}
    old["collectors"] = {**state["collectors"], "weight": {}, "grad_sv": {}}
    old["collectors"]["shadow"] = {
        k: state["collectors"]["shadow"][k] for k in ("estimates", "windows_opened", "generator")
    }
    rules = old["alerts"]["rules"]
    for stream in rules["grad_rising"]["streams"]:
        stream["det"] = {"steps": stream["det"]["steps"], "values": stream["det"]["values"]}
    model, opt = _model()
    with _monitor(model, opt, "full", shadow=True) as mon:
        mon.load_state_dict(old)
        _train(mon, model, opt, K, K + 2)
    assert [r.step for r in mon.records] == [K, K + 1]


def test_example_runs(tmp_path, capsys, one_thread):
    example = runpy.run_path(str(ROOT / "examples" / "resume_example.py"))
    assert example["main"](["--steps", "26", "--stop-at", "24", "--out", str(tmp_path)])  # a shadow window open
    out = capsys.readouterr().out
    assert "resumed at step 24" in out and "records continue: True" in out
    assert "differ from the uninterrupted run: 0 of 26" in out


def test_trend_rule_state_resumes_its_running_sums_exactly():
    """The trend rule's running sums are saved as they are: rebuilding them from the window rounds differently."""
    values = [1.0 + 0.37 * ((s * 7919) % 13) / 13 + 1e-3 * s for s in range(260)]
    straight = sw.alerts.TrendRule("grad_norm", window=100)
    first = sw.alerts.TrendRule("grad_norm", window=100)
    for s, v in enumerate(values):
        straight.update(s, v)
        if s < 150:
            first.update(s, v)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = sw.alerts.TrendRule("grad_norm", window=100)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for s, v in enumerate(values[150:], start=150):
        resumed.update(s, v)
    assert resumed.state_dict() == straight.state_dict()
    # sharp: the window alone (the earlier format) gives other sums
    det = first.state_dict()["streams"][0]["det"]
    rebuilt = sw.alerts.TrendRule("grad_norm", window=100)
    rebuilt.load_state_dict(
        {
            "type": "TrendRule",
            "streams": [{**first.state_dict()["streams"][0], "det": {k: det[k] for k in ("steps", "values")}}],
        }
    )
    assert rebuilt.state_dict()["streams"][0]["det"]["sums"] != det["sums"]
