"""Monitoring never changes training: with and without the monitor, every weight, gradient, optimizer-state
tensor, loss and the global RNG state are bit-identical after training.

The model is built so every estimator path runs: a layer wider than the exact gradient-spectrum limit
(randomized block Krylov probes), narrow layers (exact spectra), dropout (training itself draws from the
global RNG, so a probe drawn from it shifts every later mask), a GRU (spectral radius of the recurrent
gate blocks), ReLU/Tanh (activation statistics) and the shadow replica (its own forward/backward/step per
step). Each run also checks that those paths really produced values, so the comparison is not vacuous.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.collectors import GradSVCollector

STEPS = 6
WIDE = 300  # > GradSVCollector's exact_max_dim (256): the randomized path
EVERY = {"grad_sv": 1, "weight": 1, "activation": 1, "update": 1}


class WideNet(nn.Module):
    """``[B, T, 8]``: Linear(8, 300), ReLU, Dropout, Linear(300, 300), Tanh, GRU(300, 16), Linear(16, 3)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, WIDE)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.3)
        self.wide = nn.Linear(WIDE, WIDE)
        self.squash = nn.Tanh()
        self.rnn = nn.GRU(WIDE, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.squash(self.wide(self.drop(self.act(self.inp(x)))))
        out, _ = self.rnn(h)
        return self.head(out[:, -1])


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd_momentum":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _train(model, opt, mon=None, steps=STEPS, loss_fn=_loss, make_batch=None):
    """Train from the global seed 123; returns (losses, records). Batches come from their own generator."""
    g = torch.Generator().manual_seed(7)
    make_batch = make_batch or (lambda: (torch.randn(12, 3, 8, generator=g), torch.randint(0, 3, (12,), generator=g)))
    torch.manual_seed(123)
    losses, records = [], []
    for _ in range(steps):
        batch = make_batch()
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
        if mon is not None:
            rec = mon.step(loss=loss, batch=batch)
            if rec is not None:
                records.append(rec)
    return losses, records


def assert_identical(plain: tuple, watched: tuple) -> None:
    """Everything training produced is bit-identical: weights, buffers, grads, optimizer state, losses, RNG."""
    (m0, o0, losses0, rng0), (m1, o1, losses1, rng1) = plain, watched
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert list(s0) == list(s1) and len(s0) > 0
    for name in s0:
        assert torch.equal(s0[name], s1[name]), f"{name} differs"
    g0 = {n: p.grad for n, p in m0.named_parameters()}
    g1 = {n: p.grad for n, p in m1.named_parameters()}
    assert list(g0) == list(g1) and len(g0) > 0
    for name in g0:
        assert g0[name] is not None and torch.equal(g0[name], g1[name]), f"gradient of {name} differs"
    st0, st1 = o0.state_dict(), o1.state_dict()
    assert st0["param_groups"] == st1["param_groups"]
    assert list(st0["state"]) == list(st1["state"]) and len(st0["state"]) > 0
    for idx in st0["state"]:
        assert list(st0["state"][idx]) == list(st1["state"][idx]) and len(st0["state"][idx]) > 0
        for key, a in st0["state"][idx].items():
            b = st1["state"][idx][key]
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), f"optimizer state {idx}.{key} differs"
    assert len(losses0) == len(losses1) > 0
    for i, (a, b) in enumerate(zip(losses0, losses1, strict=True)):
        assert torch.equal(a, b), f"loss of step {i} differs"
    assert torch.equal(rng0, rng1), "the global RNG state after training differs"


def _assert_every_path_ran(records, shadow) -> None:
    assert len(records) == STEPS
    for rec in records:
        # randomized path (wide layer: top-k only), exact path (narrow ones: also the condition number)
        assert rec.layers["wide"].get("grad_max_sv") is not None
        assert "grad_condition" not in rec.layers["wide"]
        assert rec.layers["inp"].get("grad_condition") is not None
        assert rec.grad_norm is not None and rec.spectral_norm is not None
        assert rec.spectral_radius is not None  # the GRU's gate blocks
        assert rec.activation_mean is not None and rec.update_ratio is not None
    if shadow is not None:
        assert [r.shadow_divergence is not None for r in records] == [True] * STEPS
        assert len(shadow.estimates) == STEPS // 3  # every window opened, advanced and closed


def test_the_model_takes_the_randomized_gradient_spectrum_path():
    assert min(WIDE, WIDE) > GradSVCollector().exact_max_dim


@pytest.mark.parametrize("use_shadow", [False, True], ids=["no_shadow", "shadow"])
@pytest.mark.parametrize("optim", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("preset", ["default", "full"])
def test_training_is_bit_identical_with_and_without_the_monitor(preset, optim, use_shadow):
    m0 = WideNet()
    o0 = _optimizer(optim, m0)
    losses0, _ = _train(m0, o0)
    plain = (m0, o0, losses0, torch.get_rng_state())

    m1 = WideNet()
    o1 = _optimizer(optim, m1)
    shadow = sw.Shadow(loss_fn=_loss, every=3, window=3) if use_shadow else None
    with sw.Monitor(m1, o1, preset=preset, every=EVERY, shadow=shadow) as mon:
        losses1, records = _train(m1, o1, mon)
    watched = (m1, o1, losses1, torch.get_rng_state())

    _assert_every_path_ran(records, shadow)
    assert_identical(plain, watched)


def test_spiking_network_training_is_bit_identical_with_and_without_the_monitor():
    pytest.importorskip("snntorch")
    from tests.spiking.snn_models import TwoLayerSNN, batch

    def snn_loss(model, b):
        return nn.functional.cross_entropy(model(b[0]).sum(0), b[1])

    def runs(mon_factory):
        model = TwoLayerSNN(seed=1)
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        seeds = iter(range(STEPS))
        if mon_factory is None:
            losses, _ = _train(model, opt, loss_fn=snn_loss, make_batch=lambda: batch(next(seeds)))
            return (model, opt, losses, torch.get_rng_state()), []
        with mon_factory(model, opt) as mon:
            losses, records = _train(model, opt, mon, loss_fn=snn_loss, make_batch=lambda: batch(next(seeds)))
        return (model, opt, losses, torch.get_rng_state()), records

    plain, _ = runs(None)
    shadow = sw.Shadow(loss_fn=snn_loss, every=3, window=3)
    watched, records = runs(lambda m, o: sw.Monitor(m, o, preset="full", shadow=shadow))
    assert len(records) == STEPS
    assert all(r.firing_rate_mean is not None and r.layers["lif1"].get("membrane_mean") is not None for r in records)
    assert len(shadow.estimates) == STEPS // 3  # every window opened, also after snntorch kept graph state
    assert_identical(plain, watched)
