"""Shadow collector: it never changes training, replays what the real step did, schedules its windows,
refuses settings that cannot work, and fails without killing training."""

from __future__ import annotations

import functools
import gc
import logging
import math
import threading
import weakref

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.collectors import shadow as shadow_module
from stabwatch.metrics import metric_key
from tests.helpers import data, mlp, train


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (`tests/conftest.py::one_thread`)."""


def _ce(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hook_fns(model: nn.Module) -> list[object]:
    """Every module hook function on ``model`` (a read-only look at torch's hook dicts: fine in a test)."""
    return [fn for m in model.modules() for attr in _HOOK_DICTS for fn in getattr(m, attr).values()]


def _hook_count(model: nn.Module) -> int:
    return len(_hook_fns(model))


def _is_stabwatch(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return (getattr(fn, "__module__", None) or "").startswith("stabwatch")


def _bn_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)


def _assert_same_training(m0, o0, m1, o1):
    for (name, a), b in zip(m0.state_dict().items(), m1.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs"
    s0, s1 = o0.state_dict()["state"], o1.state_dict()["state"]
    assert s0.keys() == s1.keys()
    for k in s0:
        for key in s0[k]:
            assert torch.equal(torch.as_tensor(s0[k][key]), torch.as_tensor(s1[k][key])), f"state {k}.{key}"


def _with_user_hook(model: nn.Module) -> nn.Module:
    """A user's forward hook that changes the output: part of the model, copied into the replica."""
    model[0].register_forward_hook(lambda mod, inp, out: out * 1.5)
    return model


@pytest.mark.parametrize(
    ("optim", "model_fn", "continuous", "offload"),
    [
        ("sgd", lambda: mlp(0, dropout=0.3), False, False),  # SGD with momentum, dropout
        ("sgd", lambda: _with_user_hook(mlp(0, dropout=0.3)), False, True),  # + a user hook, a kept replica
        ("adam", _bn_mlp, False, False),  # Adam, dropout, BatchNorm
        ("adam", lambda: _with_user_hook(_bn_mlp()), False, True),
        ("amsgrad", _bn_mlp, True, False),
    ],
)
def test_training_bit_identical_with_shadow(optim, model_fn, continuous, offload):
    torch.manual_seed(123)
    m0 = model_fn()
    o0 = _optimizer(optim, m0)
    torch.manual_seed(7)
    train(m0, o0, 24)
    after0 = torch.rand(3)  # the global RNG stream after training

    m1 = model_fn()
    o1 = _optimizer(optim, m1)
    shadow = sw.Shadow(loss_fn=_ce, every=6, window=4, eps=1e-3, continuous=continuous, per_layer=True, offload=offload)
    torch.manual_seed(7)
    with sw.Monitor(m1, o1, preset="full", shadow=shadow) as mon:
        recs = train(m1, o1, 24, monitor=mon)
    after1 = torch.rand(3)
    _assert_same_training(m0, o0, m1, o1)
    assert torch.equal(after0, after1)
    with_shadow = [r for r in recs if r.shadow_divergence is not None]
    assert len(with_shadow) == (24 if continuous else 16)
    assert all(math.isfinite(r.lyapunov) for r in with_shadow)


def test_shadow_forward_does_not_feed_the_real_collectors_and_hooks_are_removed():
    def run(with_shadow: bool):
        model = mlp(0, dropout=0.2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = _hook_count(model)
        shadow = sw.Shadow(loss_fn=_ce, every=2, window=2) if with_shadow else None
        torch.manual_seed(3)
        with sw.Monitor(model, opt, preset="full", shadow=shadow, alerts=False) as mon:
            recs = train(model, opt, 6, monitor=mon)
            if with_shadow:
                # the replica carries none of the monitor's hooks
                replica = shadow._window.replica.model
                assert _hook_count(replica) == 0
                assert _hook_count(model) > before
        assert _hook_count(model) == before
        return recs

    plain, shadowed = run(False), run(True)
    skip = {"lyapunov", "lyapunov_local", "shadow_divergence", "overhead_ms", "layers", "extra", "alerts"}
    for a, b in zip(plain, shadowed):
        assert a.model_dump(exclude=skip) == b.model_dump(exclude=skip)
        assert a.layers == {k: v for k, v in b.layers.items()}
        assert a.extra == b.extra


def test_user_hooks_are_kept_in_the_replica():
    """A forward hook the user registered (it changes the output) is part of the model being trained."""
    model = nn.Linear(4, 1, bias=False).double()
    model.register_forward_hook(lambda mod, inp, out: 3.0 * out)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randn(32, 1, dtype=torch.float64)
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    shadow = sw.Shadow(loss_fn=mse, every=200, window=200, transient=50)
    with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
        assert len(shadow._window.replica.model._forward_hooks) == 1
        for _ in range(200):
            opt.zero_grad()
            loss = mse(model, (x, y))
            loss.backward()
            opt.step()
            mon.step(loss=loss, batch=(x, y))
    h = torch.linalg.eigvalsh(2 * 9.0 / 32 * x.T @ x)  # the hook scales the Hessian by 3²
    exact = math.log(float((1 - 0.02 * h).abs().max()))
    assert shadow.estimates[0].lyapunov == pytest.approx(exact, abs=1e-6)  # without the hook: ≈ 9× off


@pytest.mark.parametrize("exit_by", ["normal", "exception", "keyboard_interrupt"])
def test_hooks_removed_and_replica_released_on_every_exit_with_a_window_open(exit_by):
    model = mlp(0, dropout=0.2)
    user = model[0].register_forward_hook(lambda mod, inp, out: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = _hook_fns(model)
    shadow = sw.Shadow(loss_fn=_ce, every=100, window=50, offload=True)
    refs: list[weakref.ref] = []

    def body() -> None:
        with sw.Monitor(model, opt, preset="full", shadow=shadow, alerts=False) as mon:
            train(model, opt, 3, monitor=mon)
            assert shadow.open
            w = shadow._window
            refs.extend(weakref.ref(obj) for obj in (w.replica.model, w.optimizer, *w.shadow_params))
            assert any(_is_stabwatch(fn) for fn in _hook_fns(model))
            del w
            if exit_by == "exception":
                raise RuntimeError("boom")
            if exit_by == "keyboard_interrupt":
                raise KeyboardInterrupt

    if exit_by == "normal":
        body()
    else:
        with pytest.raises(RuntimeError if exit_by == "exception" else KeyboardInterrupt):
            body()
    assert _hook_fns(model) == before  # the user's hook, nothing of stabwatch's
    assert not shadow.open
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)  # replica, its optimizer and parameters released
    user.remove()
    assert _hook_count(model) == 0


def test_replica_carries_the_users_hooks_and_none_of_stabwatchs_with_every_family_on():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.utils.spectral_norm(nn.Linear(32, 3)))
    nn.utils.parametrizations.spectral_norm(model[0])
    model[1].register_forward_hook(lambda mod, inp, out: out)
    model.register_forward_pre_hook(lambda mod, args: None)
    user = _hook_fns(model)
    assert len(user) == 3  # the two lambdas and SpectralNorm's pre-hook
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    shadow = sw.Shadow(loss_fn=_ce, every=3, window=2)
    with sw.Monitor(model, opt, preset="full", shadow=shadow, alerts=False) as mon:
        on_model = _hook_fns(model)
        for step in range(7):
            if shadow.open:
                copied = _hook_fns(shadow._window.replica.model)
                assert not any(_is_stabwatch(fn) for fn in copied), step
                # the user's lambdas (functions are shared by deepcopy) and a copy of the SpectralNorm hook
                assert sorted(map(repr, map(type, copied))) == sorted(map(repr, map(type, user)))
                assert {id(fn) for fn in user if getattr(fn, "__name__", "") == "<lambda>"} <= set(map(id, copied))
            train(model, opt, 1, monitor=mon)
            # the collectors' hooks (the shadow's own RNG hook among them) were paused and registered again
            assert sorted(map(id, _hook_fns(model))) == sorted(map(id, on_model))
        assert any(_is_stabwatch(fn) for fn in on_model)
        assert shadow._windows_opened == 3
    assert _hook_fns(model) == user


def test_a_model_that_cannot_be_copied_fails_once_and_the_other_hooks_keep_working(caplog):
    def run(copyable: bool):
        model = mlp(0)
        if not copyable:
            model.lock = threading.Lock()  # copy.deepcopy refuses it
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        hooks_before = _hook_count(model)
        shadow = sw.Shadow(loss_fn=_ce, every=2, window=1)
        torch.manual_seed(0)
        with sw.Monitor(model, opt, preset="full", shadow=shadow, alerts=False) as mon:
            on_model = _hook_count(model)
            recs = train(model, opt, 4, monitor=mon)
            assert _hook_count(model) == on_model
        assert _hook_count(model) == hooks_before
        return recs

    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        broken = run(False)
    assert any("shadow" in r.getMessage() and "lock" in r.getMessage() for r in caplog.records)
    assert all(r.shadow_divergence is None for r in broken)
    fine = run(True)
    skip = {"lyapunov", "lyapunov_local", "shadow_divergence", "overhead_ms", "layers", "extra", "alerts"}
    for a, b in zip(fine, broken):  # the activation/non-finite hooks saw every step
        assert a.model_dump(exclude=skip) == b.model_dump(exclude=skip)
        assert {k: {m: v for m, v in d.items() if m != "shadow_divergence"} for k, d in a.layers.items()} == b.layers


def test_dropout_masks_are_replayed(monkeypatch):
    def first_divergence() -> float:
        model = mlp(0, dropout=0.5).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x, y = data()
        x = x.double()
        shadow = sw.Shadow(loss_fn=_ce, every=10, window=1, eps=1e-6, renorm=None)
        torch.manual_seed(0)
        with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
            opt.zero_grad()
            loss = _ce(model, (x, y))
            loss.backward()
            opt.step()
            rec = mon.step(loss=loss, batch=(x, y))
        return rec.shadow_divergence

    replayed = first_divergence()
    assert replayed < 1e-5  # one smooth step moves a 1e-6 difference by O(1)
    monkeypatch.setattr(shadow_module.Shadow, "_capture_rng", lambda self, module, args: None)
    other_masks = first_divergence()
    assert other_masks > 1000 * replayed


def test_windows_follow_the_schedule_and_log_every():
    def run(log_every: int):
        model = mlp(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        shadow = sw.Shadow(loss_fn=_ce, every=10, window=4, renorm=2, transient=1)
        torch.manual_seed(0)
        with sw.Monitor(model, opt, shadow=shadow, preset="cheap", log_every=log_every, alerts=False) as mon:
            recs = train(model, opt, 30, monitor=mon)
        return shadow, recs

    shadow, recs = run(1)
    assert [r.step for r in recs if r.shadow_divergence is not None] == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    # averaging starts after the 1-step transient
    assert [r.step for r in recs if r.lyapunov is not None] == [1, 2, 3, 11, 12, 13, 21, 22, 23]
    # the transient's end restarts the renormalisation interval: one renormalisation two steps later
    assert [r.step for r in recs if r.lyapunov_local is not None] == [2, 12, 22]
    assert [(e.start, e.stop, e.steps) for e in shadow.estimates] == [(0, 3, 3), (10, 13, 3), (20, 23, 3)]
    assert [e.lyapunov for e in shadow.estimates] == [recs[s].lyapunov for s in (3, 13, 23)]
    assert not shadow.open
    # emitting every 5th record does not change what the shadow measures
    shadow5, _ = run(5)
    assert shadow5.estimates == shadow.estimates


def test_per_layer_divergence_sums_in_quadrature():
    model = mlp(2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    shadow = sw.Shadow(loss_fn=_ce, every=5, window=5, per_layer=True)
    with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
        recs = train(model, opt, 5, monitor=mon)
    for r in recs:
        per_layer = [v["shadow_divergence"] for v in r.layers.values() if "shadow_divergence" in v]
        assert len(per_layer) == 3  # the three Linear layers
        assert math.sqrt(sum(v * v for v in per_layer)) == pytest.approx(r.shadow_divergence, rel=1e-9)
        assert r.to_dict()[metric_key("shadow/divergence", "0")] == r.layers["0"]["shadow_divergence"]


def test_first_divergence_is_eps():
    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # the map is nearly the identity
    shadow = sw.Shadow(loss_fn=_ce, every=3, window=3, eps=2e-3, renorm=None)
    with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
        recs = train(model, opt, 3, monitor=mon)
    assert recs[0].shadow_divergence == pytest.approx(2e-3, rel=1e-4)


def _least_squares(spectrum, rows=64, seed=0):
    """x with H = (2/rows)·xᵀx having the given eigenvalues, and targets."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(spectrum), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=g, dtype=torch.float64))
    x = math.sqrt(rows / 2) * u @ torch.diag(torch.tensor(spectrum, dtype=torch.float64).sqrt()) @ v.T
    return x, torch.randn(rows, 1, generator=g, dtype=torch.float64)


def test_learning_rate_schedule_is_followed():
    x, y = _least_squares([0.5, 4.0, 5.0, 6.0, 7.0])
    model = nn.Linear(5, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    shadow = sw.Shadow(loss_fn=mse, every=100, window=100, continuous=True)
    locals_: list[float] = []
    with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
        for _ in range(100):
            opt.zero_grad()
            loss = mse(model, (x, y))
            loss.backward()
            opt.step()
            locals_.append(mon.step(loss=loss, batch=(x, y)).lyapunov_local)
            sched.step()
    # the top mode is h = 0.5 for both learning rates: log(1 − η·0.5)
    assert locals_[49] == pytest.approx(math.log(1 - 0.05 * 0.5), abs=1e-6)
    assert locals_[99] == pytest.approx(math.log(1 - 0.025 * 0.5), abs=1e-6)


def test_missing_batch_fails_once_and_training_goes_on(caplog):
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    shadow = sw.Shadow(loss_fn=_ce, every=4, window=2)
    with (
        caplog.at_level(logging.WARNING, logger="stabwatch"),
        sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon,
    ):
        recs = []
        for step in range(9):
            opt.zero_grad()
            loss = _ce(model, (x, y))
            loss.backward()
            opt.step()
            recs.append(mon.step(loss=loss, batch=None if step < 5 else (x, y)))
    messages = [r.getMessage() for r in caplog.records if "batch" in r.getMessage()]
    assert len(messages) == 1 and "mon.step" in messages[0]
    assert all(r.shadow_divergence is None for r in recs[:8])
    assert recs[8].shadow_divergence is not None  # the window at step 8 works again
    assert all(r.grad_norm is not None for r in recs)


def test_loss_fn_using_the_real_model_is_reported(caplog):
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shadow = sw.Shadow(loss_fn=lambda m, b: _ce(model, b), every=3, window=2)
    with (
        caplog.at_level(logging.WARNING, logger="stabwatch"),
        sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon,
    ):
        recs = train(model, opt, 4, monitor=mon)
    assert any("its `model` argument" in r.getMessage() for r in caplog.records)
    assert all(r.lyapunov is None for r in recs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of loss_fn"),
        ({"loss_fn": _ce, "step_fn": lambda m, o, b: None}, "exactly one of loss_fn"),
        ({"loss_fn": _ce, "window": 0}, "window"),
        ({"loss_fn": _ce, "every": 10, "window": 20}, "window \\(20\\) must be ≤ every \\(10\\)"),
        ({"loss_fn": _ce, "eps": 0.0}, "eps"),
        ({"loss_fn": _ce, "eps": 1.5}, "eps"),
        ({"loss_fn": _ce, "renorm": 0}, "renorm"),
        ({"loss_fn": _ce, "transient": 20}, "transient \\(20\\) must be < window \\(20\\)"),
        ({"loss_fn": _ce, "every": 0}, "every"),
        ({"loss_fn": _ce, "scaler": object()}, "GradScaler"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(sw.StabwatchError, match=match):
        sw.Shadow(**kwargs)


def test_settings_that_cannot_work_for_this_model_are_refused_at_start():
    model = mlp(0)
    with pytest.raises(sw.StabwatchError, match=r"below what torch\.float32 parameters resolve"):
        sw.Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), shadow=sw.Shadow(loss_fn=_ce, eps=1e-6)).start()
    with pytest.raises(sw.StabwatchError, match="no optimizer"):
        sw.Monitor(model, shadow=sw.Shadow(loss_fn=_ce)).start()
    half = mlp(0).to(torch.bfloat16)
    with pytest.raises(sw.StabwatchError, match="bfloat16"):
        sw.Monitor(half, torch.optim.SGD(half.parameters(), lr=0.1), shadow=sw.Shadow(loss_fn=_ce)).start()
    # float64 resolves far smaller perturbations
    m64 = mlp(0).double()
    sw.Monitor(m64, torch.optim.SGD(m64.parameters(), lr=0.1), shadow=sw.Shadow(loss_fn=_ce, eps=1e-9)).start().close()


def test_no_trainable_parameters_is_refused():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    model = Frozen()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["params"] = []
    with pytest.raises(sw.StabwatchError, match="no trainable parameters in the optimizer"):
        sw.Monitor(model, opt, shadow=sw.Shadow(loss_fn=lambda m, b: m.w.sum())).start()


@pytest.mark.parametrize(("eps", "renorm"), [(0.3, 1), (0.02, None)])
def test_saturation_is_warned_once(caplog, eps, renorm):
    model = mlp(9, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)  # far too large: nearby runs separate fast
    shadow = sw.Shadow(loss_fn=_ce, every=30, window=30, eps=eps, renorm=renorm)
    with (
        caplog.at_level(logging.WARNING, logger="stabwatch"),
        sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon,
    ):
        train(model, opt, 30, monitor=mon)
    warned = [r.getMessage() for r in caplog.records if "no longer small" in r.getMessage()]
    assert len(warned) == 1
    assert ("renorm=None" in warned[0]) == (renorm is None)


def test_replica_is_freed_between_windows_or_kept_on_cpu_with_offload():
    def run(offload: bool):
        model = mlp(4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        shadow = sw.Shadow(loss_fn=_ce, every=5, window=2, offload=offload)
        replicas = []
        torch.manual_seed(0)
        with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
            x, y = data()
            for step in range(15):
                if shadow.open:
                    replicas.append(weakref.ref(shadow._window.replica.model))
                opt.zero_grad()
                loss = _ce(model, (x[:16], y[:16]))
                loss.backward()
                opt.step()
                mon.step(loss=loss, batch=(x[:16], y[:16]))
                if step % 5 == 1:
                    assert not shadow.open
            gc.collect()
            alive = {id(r()) for r in replicas if r() is not None}
        return shadow, alive

    freed, alive = run(False)
    assert alive == set()
    kept, alive_kept = run(True)
    assert len(alive_kept) == 1  # one replica, reused by every window
    assert kept.estimates == freed.estimates


def test_gradscaler_same_scale_and_training_unchanged(monkeypatch):
    replayed: list[float | None] = []
    real_scale_step = shadow_module.ScaledStep

    def recording(scale, device):
        replayed.append(scale)
        return real_scale_step(scale, device)

    monkeypatch.setattr(shadow_module, "ScaledStep", recording)

    def run(use_shadow: bool, scaler_for_shadow: bool = True):
        torch.manual_seed(0)
        model = mlp(5)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        shadow = (
            sw.Shadow(loss_fn=_ce, every=4, window=4, scaler=scaler if scaler_for_shadow else None)
            if use_shadow
            else None
        )
        x, y = data()
        scales, used = [], []
        replayed.clear()
        with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
            for _ in range(12):
                opt.zero_grad()
                loss = _ce(model, (x, y))
                scaler.scale(loss).backward()
                used.append(scaler.get_scale())  # the scale of this step's backward
                scaler.step(opt)
                scaler.update()
                scales.append(scaler.get_scale())
                mon.step(loss=loss, batch=(x, y))
        return model, opt, shadow, scales, used

    m0, o0, _, s0, _ = run(False)
    m1, o1, shadow, s1, used = run(True)
    _assert_same_training(m0, o0, m1, o1)
    assert s0 == s1 and len(set(s1)) > 1  # the scale changed during the run
    assert replayed == used  # the replica used the real step's scale (before update()) at every step
    _, _, unscaled, _, _ = run(True, scaler_for_shadow=False)
    assert replayed == [None] * 12
    # float32 and powers-of-two scales: scaling and unscaling are exact, the estimates are the same
    assert len(shadow.estimates) == len(unscaled.estimates) == 3
    assert shadow.estimates == unscaled.estimates


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_the_real_optimizer_skipped_is_skipped_by_the_shadow(fused):
    """GradScaler skips optimizer.step on overflow: the map is the identity and the shadow waits too.

    A fused optimizer is stepped even then (its kernel does nothing; the step hooks fire): the scaler's
    backed-off scale tells the shadow."""
    torch.manual_seed(0)
    model = mlp(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    # transient=0: every map step is averaged, so `steps` counts the steps the shadow took
    shadow = sw.Shadow(loss_fn=_ce, every=10, window=4, eps=1e-3, scaler=scaler, transient=0)
    x, y = data()
    recs = []
    with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
        for step in range(5):
            opt.zero_grad()
            loss = _ce(model, (x, y))
            scaler.scale(loss * float("inf") if step == 2 else loss).backward()  # overflow at step 2
            scaler.step(opt)
            scaler.update()
            recs.append(mon.step(loss=loss, batch=(x, y)))
    assert recs[2].shadow_divergence is None  # nothing moved
    # had the shadow stepped alone, the difference would jump to the size of an update (≫ eps)
    assert all(r.shadow_divergence < 2e-3 for i, r in enumerate(recs) if i != 2)
    assert [(e.start, e.stop, e.steps) for e in shadow.estimates] == [(0, 4, 4)]


def test_step_fn_for_custom_steps():
    def step_fn(model, optimizer, batch):
        optimizer.zero_grad()
        _ce(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # clipping that never clips
        optimizer.step()

    def run(**kw):
        model = mlp(6)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        shadow = sw.Shadow(every=5, window=5, **kw)
        torch.manual_seed(0)
        with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
            train(model, opt, 10, monitor=mon)
        return shadow

    a, b = run(step_fn=step_fn), run(loss_fn=_ce)
    assert len(a.estimates) == 2
    for ea, eb in zip(a.estimates, b.estimates):
        assert ea.lyapunov == pytest.approx(eb.lyapunov, abs=1e-5)


def test_lyapunov_vector_is_unit_and_named():
    model = mlp(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shadow = sw.Shadow(loss_fn=_ce, every=4, window=3)
    with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
        vec = shadow.lyapunov_vector()
        assert vec is not None
        assert set(vec) == {n for n, _ in model.named_parameters()}
        total = math.sqrt(sum(float(v.double().square().sum()) for v in vec.values()))
        assert total == pytest.approx(1.0, rel=1e-5)
        train(model, opt, 3, monitor=mon)
        assert shadow.lyapunov_vector() is None


def test_state_dict_round_trip():
    model = mlp(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shadow = sw.Shadow(loss_fn=_ce, every=3, window=2)
    with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
        train(model, opt, 7, monitor=mon)
        state = mon.state_dict()
    assert len(shadow.estimates) == 2
    model2 = mlp(8)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    shadow2 = sw.Shadow(loss_fn=_ce, every=3, window=2)
    with sw.Monitor(model2, opt2, shadow=shadow2, preset="cheap", alerts=False) as mon2:
        mon2.load_state_dict(state)
        assert shadow2.estimates == shadow.estimates
        assert torch.equal(shadow2.state_dict()["generator"], shadow.state_dict()["generator"])
        train(model2, opt2, 4, monitor=mon2)  # resumes at step 7: a window opens at step 9
    assert shadow2.estimates[-1].start == 9


def test_tied_weights_stay_tied_in_the_replica():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight  # one parameter used twice
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    def make():
        torch.manual_seed(0)
        model = Tied()
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    m0, o0 = make()
    torch.manual_seed(1)
    train(m0, o0, 8)
    m1, o1 = make()
    shadow = sw.Shadow(loss_fn=_ce, every=4, window=4, per_layer=True)
    torch.manual_seed(1)
    with sw.Monitor(m1, o1, shadow=shadow, preset="cheap", alerts=False) as mon:
        replica = shadow._window.replica.model
        assert replica.a.weight is replica.b.weight and replica.a.weight is not m1.a.weight
        recs = train(m1, o1, 8, monitor=mon)
    _assert_same_training(m0, o0, m1, o1)
    assert len(shadow.estimates) == 2 and all(math.isfinite(e.lyapunov) for e in shadow.estimates)
    assert set(recs[0].layers) >= {"a", "head"}  # the tied weight is counted once, under its first owner


def test_public_names():
    assert "Shadow" in sw.__all__
    from stabwatch.collectors.shadow import ShadowEstimate

    assert ShadowEstimate._fields == ("start", "stop", "lyapunov", "steps")
    assert sw.Shadow.family == "shadow" and issubclass(sw.Shadow, sw.monitor.Collector)
