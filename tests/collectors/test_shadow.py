"""`Shadow` on its own: on full-batch gradient descent on least squares the training map is linear,
δ ↦ (I − ηH)δ with H = (2/N) XᵀX, so each interval's log growth is log ‖(I − ηH) u‖ for the unit
difference u the shadow carries (`Shadow.lyapunov_vector`), computed here with ``torch.linalg``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stabwatch as sw
from tests.collectors.drive import Drive

N, D, LR, EPS = 64, 4, 0.2, 1e-4


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    y = x @ torch.randn(D, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    model = nn.Linear(D, 1, bias=False).double()
    return model, (x, y)


def _mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def test_log_growth_divergence_and_estimate_match_the_linear_map():
    model, batch = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # transient=0: every step is averaged (the default "auto" cuts a data-sized transient first; see
    # tests/test_shadow_defaults.py)
    shadow = sw.Shadow(loss_fn=_mse, every=10, window=5, eps=EPS, transient=0)
    drive = Drive(shadow, model, opt)
    h = 2.0 / N * batch[0].T @ batch[0]
    step_map = torch.eye(D, dtype=torch.float64) - LR * h
    growths = []
    for _ in range(5):
        assert shadow.open
        (u,) = shadow.lyapunov_vector().values()  # the unit difference before the step
        theta = model.weight.detach().clone()
        values = drive.train_step(_mse, batch)
        growth = math.log(float(torch.linalg.vector_norm(step_map @ u.reshape(D))))
        growths.append(growth)
        assert values.field("lyapunov_local") == pytest.approx(growth, abs=1e-7)
        assert values.field("lyapunov") == pytest.approx(sum(growths) / len(growths), abs=1e-7)
        # ‖δ‖ = eps ‖θ‖ at the start of the interval (renormalised every step), then mapped
        want = EPS * float(theta.norm()) * math.exp(growth) / float(model.weight.detach().norm())
        assert values.field("shadow_divergence") == pytest.approx(want, rel=1e-6)
    assert not shadow.open  # the window of 5 closed
    assert len(shadow.estimates) == 1 and len(growths) == 5
    assert shadow.estimates[0].lyapunov == pytest.approx(sum(growths) / 5, abs=1e-7)
    # a contraction: every eigenvalue of I - ηH has modulus < 1
    assert max(growths) < 0 and float(torch.linalg.eigvalsh(step_map).abs().max()) < 1
    drive.close()


def test_steps_without_an_optimizer_step_are_skipped_and_the_window_closes_on_detach():
    model, batch = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    shadow = sw.Shadow(loss_fn=_mse, every=10, window=10, eps=EPS)
    drive = Drive(shadow, model, opt)
    values = drive.train_step(_mse, batch, optimizer_step=False)  # the map was the identity
    assert len(values) == 0 and shadow.open
    values = drive.train_step(_mse, batch)
    assert values.field("shadow_divergence") is not None
    drive.close()
    assert not shadow.open and sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_a_window_opens_on_an_snntorch_model_after_a_forward_pass():
    from tests.spiking.snn_models import TwoLayerSNN
    from tests.spiking.snn_models import batch as snn_batch

    def loss_fn(model, b):
        return nn.functional.cross_entropy(model(b[0]).sum(0), b[1])

    model = TwoLayerSNN(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    shadow = sw.Shadow(loss_fn=loss_fn, every=lambda step: step == 1, window=1)
    drive = Drive(shadow, model, opt)
    # step 0 leaves graph tensors in the layers' mem/syn buffers; begin_step(1), at its end, spawns the window
    drive.train_step(loss_fn, snn_batch(0))
    values = drive.train_step(loss_fn, snn_batch(1))
    drive.close()
    assert values.field("shadow_divergence") is not None
