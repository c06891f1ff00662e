"""What the docs say about the non-finite family, checked on a real `Monitor`: ``every={"nonfinite": N}``
only switches it on or off (and says so), the values ``nonfinite_source`` takes (a module path,
``"gradients"``, ``"loss"``), and that lazy mode keeps a hooked output alive until `Monitor.step`."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.collectors import GradCollector, NonfiniteCollector

OFF = {"update": None, "grad_sv": None, "weight": None, "activation": None, "spiking": None}


class Blow(nn.Module):
    """Multiplies by ``inf`` where armed (an overflow), identity otherwise (a fault injector)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("inf") if self.armed else x


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), Blow(), nn.Tanh(), nn.Linear(8, 2))


def _step(
    model: nn.Module, opt: torch.optim.Optimizer, mon: sw.Monitor, update: bool = True
) -> sw.StabilityMetrics | None:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    if update:  # a step with a NaN is skipped, as a GradScaler would, so the weights stay finite
        opt.step()
    return mon.step(loss=loss)


def test_a_period_only_switches_the_family_on_and_says_so(caplog):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        mon = sw.Monitor(model, opt, preset="cheap", every={"nonfinite": 5, **OFF}, alerts=False)
    assert any("every['nonfinite']=5 has no effect" in r.getMessage() for r in caplog.records)
    with mon:
        records = []
        for step in range(4):
            model[1].armed = step == 2  # steps 1-4 are off a period of 5
            records.append(_step(model, opt, mon, update=step != 2))
    assert [r.nonfinite for r in records] == [False, False, True, False]
    assert records[2].nonfinite_source == "1"  # named, though step 2 is not a multiple of 5


def test_none_turns_the_family_off_without_a_warning(caplog):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        mon = sw.Monitor(model, opt, preset="cheap", every={"nonfinite": None, **OFF}, alerts=False)
    assert not any("nonfinite" in r.getMessage() for r in caplog.records)
    with mon:
        model[1].armed = True
        record = _step(model, opt, mon)
    assert record is not None and record.nonfinite is None and record.nonfinite_source is None


def _poison_grad(model: nn.Sequential) -> None:
    """A NaN in the last layer's weight gradient only: every output and the loss stay finite."""
    model[3].weight.register_hook(lambda g: g * float("nan"))


@pytest.mark.parametrize(("per_layer", "source"), [(True, "3"), (False, "gradients")])
def test_source_of_a_gradient_only_nan(per_layer, source):
    model = _net()
    _poison_grad(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    collectors = [GradCollector(every=1, per_layer=per_layer), NonfiniteCollector(every=1)]
    with sw.Monitor(model, opt, preset="cheap", every=OFF, collectors=collectors, alerts=False) as mon:
        record = _step(model, opt, mon)
    assert record is not None and record.loss is not None and torch.isfinite(torch.tensor(record.loss))
    assert record.nonfinite and record.nonfinite_source == source


def test_source_loss_when_only_the_loss_is_nonfinite():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with sw.Monitor(model, opt, preset="cheap", every=OFF, alerts=False) as mon:
        record = mon.step(loss=torch.tensor(float("nan")))  # no forward, no backward: only the loss
    assert record is not None and record.nonfinite and record.nonfinite_source == "loss"


@pytest.mark.parametrize(("mode", "held"), [("lazy", True), ("eager", False)])
def test_lazy_mode_keeps_a_hooked_output_alive_until_monitor_step(mode, held):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    storages: list[weakref.ref] = []
    # the first Linear's output: Blow (identity) passes it on, Tanh saves only its own output for
    # backward, so without the monitor nothing keeps it after the forward pass
    model[0].register_forward_hook(lambda m, a, out: storages.append(weakref.ref(out.untyped_storage())))
    collectors = [NonfiniteCollector(every=1, mode=mode)]
    with sw.Monitor(model, opt, preset="cheap", every=OFF, collectors=collectors, alerts=False) as mon:
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        gc.collect()
        assert (storages[0]() is not None) == held  # after backward, before Monitor.step
        mon.step(loss=loss)
        del loss
        gc.collect()
        assert storages[0]() is None  # released by Monitor.step
