"""The gradient metrics of a step are those of the gradients the optimizer used in that step.

Every kind of step users write: plain, ``optimizer.step(closure)`` (SGD and LBFGS), two-batch
accumulation, clipping before the step, ``GradScaler`` with a plain and a fused optimizer. The reference
is computed independently of the monitor: from the update the optimizer applied (plain SGD: ``g =
(θ_before − θ_after) / lr``) or from a separate copy of the model evaluated at the step's starting point.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

import stabwatch as sw

LR = 0.1


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _monitor(model: nn.Module, opt: torch.optim.Optimizer, **kw: object) -> sw.Monitor:
    return sw.Monitor(model, opt, preset="cheap", every={"grad_sv": 1}, alerts=False, **kw)


def _applied(before: list[torch.Tensor], model: nn.Module) -> list[torch.Tensor]:
    """The gradient plain SGD applied: (θ_before − θ_after) / lr, per parameter."""
    return [(b - p.detach()) / LR for b, p in zip(before, model.parameters(), strict=True)]


def _norm(tensors: list[torch.Tensor]) -> float:
    assert tensors
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def _top_sv(grads: list[torch.Tensor]) -> float:
    mats = [g for g in grads if g.ndim == 2]
    assert len(mats) == 2
    return max(float(torch.linalg.svdvals(g.double())[0]) for g in mats)


def _check(rec: sw.StabilityMetrics, grads: list[torch.Tensor], rel: float = 1e-5) -> None:
    assert rec.grad_norm == pytest.approx(_norm(grads), rel=rel)
    assert rec.grad_max_sv == pytest.approx(_top_sv(grads), rel=rel)
    assert rec.layers["0"]["grad_norm"] == pytest.approx(_norm(grads[:2]), rel=rel)


def test_plain_step_measures_the_applied_gradient() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with _monitor(model, opt) as mon:
        for batch in _batches(3):
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            rec = mon.step(loss=loss)
            assert rec is not None
            _check(rec, _applied(before, model))


def test_closure_step_measures_this_steps_gradient_not_the_previous_one(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    recs = []
    with caplog.at_level(logging.WARNING, logger="stabwatch"), _monitor(model, opt) as mon:
        for batch in _batches(4):

            def closure(batch: tuple[torch.Tensor, torch.Tensor] = batch) -> torch.Tensor:
                opt.zero_grad()
                loss = _loss(model, batch)
                loss.backward()
                return loss

            before = [p.detach().clone() for p in model.parameters()]
            loss = opt.step(closure)
            rec = mon.step(loss=loss)
            assert rec is not None
            _check(rec, _applied(before, model))
            recs.append(rec)
    assert [r.grad_source for r in recs] == ["optimizer_pre_step"] * 4
    assert "changed the gradients" not in caplog.text


def test_lbfgs_measures_the_gradient_at_the_steps_starting_point() -> None:
    """LBFGS evaluates the closure several times per step; the step's gradient is the one at θ_t."""
    model = _model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    batches = _batches(3)
    with _monitor(model, opt) as mon:
        for batch in batches:
            reference = copy.deepcopy(model)
            _loss(reference, batch).backward()
            expected = [p.grad.detach().clone() for p in reference.parameters()]
            calls: list[int] = []

            def closure(batch: tuple[torch.Tensor, torch.Tensor] = batch, calls: list[int] = calls) -> torch.Tensor:
                calls.append(1)
                opt.zero_grad()
                loss = _loss(model, batch)
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert len(calls) > 1  # later evaluations replaced .grad: reading it after the step is wrong
            last = [p.grad.detach().clone() for p in model.parameters()]
            assert _norm(last) != pytest.approx(_norm(expected), rel=1e-3)
            rec = mon.step(loss=loss)
            assert rec is not None
            _check(rec, expected)


def test_two_batch_accumulation_measures_the_summed_gradient() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batches = _batches(6)
    with _monitor(model, opt) as mon:
        for a, b in zip(batches[::2], batches[1::2], strict=True):
            opt.zero_grad()
            (_loss(model, a) / 2).backward()
            (_loss(model, b) / 2).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            rec = mon.step()
            assert rec is not None
            _check(rec, _applied(before, model))


def test_clipping_before_the_step_is_seen() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with _monitor(model, opt) as mon:
        for batch in _batches(3):
            opt.zero_grad()
            loss = _loss(model, batch) * 100.0
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.25)
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            rec = mon.step(loss=loss)
            assert rec is not None
            assert rec.grad_norm == pytest.approx(0.25, rel=1e-4)
            _check(rec, _applied(before, model))


def test_clipping_inside_a_closure_is_seen() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with _monitor(model, opt) as mon:
        for batch in _batches(3):

            def closure(batch: tuple[torch.Tensor, torch.Tensor] = batch) -> torch.Tensor:
                opt.zero_grad()
                loss = _loss(model, batch) * 100.0
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.25)
                return loss

            before = [p.detach().clone() for p in model.parameters()]
            opt.step(closure)
            rec = mon.step()
            assert rec is not None
            assert rec.grad_norm == pytest.approx(0.25, rel=1e-4)
            _check(rec, _applied(before, model))


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused-adam"])
def test_grad_scaler_gradients_are_unscaled(fused: bool) -> None:
    """GradScaler unscales before a plain optimizer's step, but hands a fused one scaled gradients."""
    model = _model()
    reference = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    with _monitor(model, opt) as mon:
        for batch in _batches(3):
            ref_opt.zero_grad()
            _loss(reference, batch).backward()
            expected = [p.grad.detach().clone() for p in reference.parameters()]
            ref_opt.step()
            opt.zero_grad()
            loss = _loss(model, batch)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            rec = mon.step(loss=loss)
            assert rec is not None
            _check(rec, expected, rel=1e-4)


def test_the_guard_decides_on_the_closures_gradients() -> None:
    """A closure step whose gradients come out non-finite is undone (the guard saw this step's gradients)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    batches = _batches(5)
    with _monitor(model, opt, guard=True) as mon:
        for i, batch in enumerate(batches):

            def closure(batch: tuple[torch.Tensor, torch.Tensor] = batch, poison: bool = i == 3) -> torch.Tensor:
                opt.zero_grad()
                loss = _loss(model, batch) * (float("nan") if poison else 1.0)
                loss.backward()
                return loss

            before = [p.detach().clone() for p in model.parameters()]
            opt.step(closure)
            mon.step()
            after = list(model.parameters())
            unchanged = all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
            assert unchanged == (i == 3), i
    assert mon._pipeline.guard.skipped == [3]


@pytest.mark.parametrize("preset", ["default", "full"])
def test_closure_steps_train_bit_identically_with_the_monitor(preset: str) -> None:
    def run(monitored: bool) -> list[torch.Tensor]:
        model = _model(seed=3)
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=3)
        mon = sw.Monitor(model, opt, preset=preset, alerts=False) if monitored else None
        if mon is not None:
            mon.start()
        for batch in _batches(5, seed=7):

            def closure(batch: tuple[torch.Tensor, torch.Tensor] = batch) -> torch.Tensor:
                opt.zero_grad()
                loss = _loss(model, batch)
                loss.backward()
                return loss

            loss = opt.step(closure)
            if mon is not None:
                mon.step(loss=loss)
        if mon is not None:
            mon.close()
        return [p.detach().clone() for p in model.parameters()]

    bare, watched = run(False), run(True)
    assert len(bare) == 4
    assert all(torch.equal(a, b) for a, b in zip(bare, watched, strict=True))
