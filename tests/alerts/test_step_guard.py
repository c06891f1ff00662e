"""The opt-in skip-step guard: a skipped step leaves parameters and optimizer state bit for bit as
they were; steps it does not skip train exactly as without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.alerts import StepGuard
from stabwatch.errors import StabwatchError
from tests.helpers import data, mlp

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}


def _snapshot(model, opt):
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {
        i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for i, s in opt.state_dict()["state"].items()
    }
    return params, state


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"parameter {k} changed"
    assert sa.keys() == sb.keys(), "optimizer state gained or lost entries"
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            va, vb = sa[i][k], sb[i][k]
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), f"optimizer state {i}/{k} changed"


def _step(model, opt, mon, x, y, scale=1.0):
    opt.zero_grad()
    loss = scale * nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return mon.step(loss=loss)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("first", [True, False], ids=["first_step", "after_10_steps"])
def test_nonfinite_step_is_undone_bit_for_bit(name, first):
    model = mlp(0)
    opt = OPTIMIZERS[name](model.parameters())
    x, y = data(64)
    guard = StepGuard()
    with sw.Monitor(model, opt, guard=guard, preset="full") as mon:
        if not first:
            for i in range(10):
                _step(model, opt, mon, x[i : i + 16], y[i : i + 16])
        before = _snapshot(model, opt)
        bad = x[:16].clone()
        bad[3, 2] = float("nan")
        rec = _step(model, opt, mon, bad, y[:16])
        _assert_same(before, _snapshot(model, opt))
        # the record shows the NaN, the guard's alert and an update ratio of exactly 0
        assert rec.nonfinite and rec.update_ratio == 0.0
        guard_alerts = [a for a in rec.alerts if a.rule == "skip_step"]
        assert len(guard_alerts) == 1 and guard_alerts[0].reason is sw.AlertReason.NON_FINITE
        assert guard.skipped == [rec.step]
        # training goes on with finite weights
        rec2 = _step(model, opt, mon, x[:16], y[:16])
        assert not rec2.nonfinite
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_spiking_step_is_undone_and_normal_steps_match_an_unguarded_run():
    def run(guard):
        model = mlp(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = data(64, seed=1)
        snaps = {}
        with sw.Monitor(model, opt, guard=guard, preset="cheap", alerts=False) as mon:
            for i in range(30):
                xb, yb = x[(i * 8) % 48 : (i * 8) % 48 + 16], y[(i * 8) % 48 : (i * 8) % 48 + 16]
                snaps[i] = _snapshot(model, opt)
                # step 20: a loss 1000x too large (a bad weighting), gradients 1000x too
                rec = _step(model, opt, mon, xb, yb, scale=1000.0 if i == 20 else 1.0)
                snaps[f"after{i}"] = _snapshot(model, opt)
                if i == 20:
                    snaps["rec20"] = rec
        return snaps

    guard = StepGuard(factor=10, window=20, warmup=5)
    guarded = run(guard)
    plain = run(False)
    _assert_same(guarded[20], guarded["after20"])  # the spike was skipped
    assert guard.skipped == [20]
    alerts = [a for a in guarded["rec20"].alerts if a.rule == "skip_step"]
    assert alerts and alerts[0].reason is sw.AlertReason.EXPLODING_GRADIENT and "× its" in alerts[0].message
    for i in range(20):  # identical to the unguarded run until the spike
        _assert_same(guarded[f"after{i}"], plain[f"after{i}"])


def test_guard_gives_in_after_max_consecutive_spikes():
    g = StepGuard(factor=10, window=10, warmup=3, max_consecutive=2)
    for s in range(5):
        assert g.decide(1.0, s) is None
    assert g.decide(100.0, 5) is not None
    assert g.decide(100.0, 6) is not None
    assert g.decide(100.0, 7) is None  # third in a row: applied, becomes part of the window
    assert g.decide(float("inf"), 8) is not None  # non-finite is always skipped
    assert g.decide(float("nan"), 9) is not None


def test_guard_state_roundtrip():
    g = StepGuard(window=10, warmup=3)
    for s, v in enumerate([1.0, 1.1, 0.9, 1.2, 50.0]):
        g.decide(v, s)
    g2 = StepGuard(window=10, warmup=3)
    g2.load_state_dict(g.state_dict())
    assert g2.decide(30.0, 5) == g.decide(30.0, 5)
    assert g2.state_dict() == g.state_dict()


def test_guard_needs_an_optimizer_and_validates():
    with pytest.raises(StabwatchError, match="guard=True needs the optimizer"):
        sw.Monitor(mlp(), guard=True)
    with pytest.raises(StabwatchError, match=r"guard must be True, False or a stabwatch\.alerts\.StepGuard"):
        model = mlp()
        sw.Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), guard="yes")
    with pytest.raises(StabwatchError, match=r"StepGuard\.factor"):
        StepGuard(factor=0.5)


def test_guard_adds_no_hooks_and_leaves_none_behind():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sw.Monitor(model, opt, guard=True) as mon:
        assert len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks) == 2
        x, y = data(16)
        _step(model, opt, mon, x, y)
    assert len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks) == 0
