"""`NonfiniteCollector` on its own: the module it names is the first, in execution order, whose output
is non-finite — checked against a trace of every leaf module's output taken by the test's own hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabwatch.collectors import NonfiniteCollector
from tests.collectors.drive import Drive


class Blow(nn.Module):
    """Multiplies by ``inf`` where armed (an overflow), identity otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("inf") if self.armed else x


class Net(nn.Module):
    """``late`` is registered before ``early`` but runs after it: order of execution, not of definition."""

    def __init__(self, mask_nonfinite: bool = False) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.inp = nn.Linear(4, 8)
        self.late = Blow()
        self.early = Blow()
        self.mid = nn.Linear(8, 8)  # carries an inf on (a Tanh would squash it to 1)
        self.out = nn.Linear(8, 2)
        self.mask_nonfinite = mask_nonfinite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.late(self.mid(self.early(self.inp(x))))
        if self.mask_nonfinite:  # the NaN never reaches the loss
            h = torch.where(torch.isfinite(h), h, torch.zeros_like(h))
        return self.out(h)


def _first_nonfinite(model: nn.Module, x: torch.Tensor) -> str | None:
    """Run the forward with the test's own hooks on every leaf module; the first non-finite output."""
    trace: list[tuple[str, bool]] = []
    handles = [
        m.register_forward_hook(lambda mod, a, out, name=name: trace.append((name, bool(torch.isfinite(out).all()))))
        for name, m in model.named_modules()
        if not list(m.children())
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert len(trace) > 0
    return next((name for name, finite in trace if not finite), None)


def _loss(model, batch):
    return model(batch[0]).pow(2).mean()


X = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["lazy", "eager"])
@pytest.mark.parametrize("armed", [(), ("late",), ("early",), ("late", "early")])
def test_names_the_first_module_in_execution_order(mode, armed):
    model = Net()
    for name in armed:
        getattr(model, name).armed = True
    want = _first_nonfinite(model, X)
    assert (want is None) == (len(armed) == 0)
    drive = Drive(NonfiniteCollector(every=1, mode=mode), model)
    loss = _loss(model, (X,))
    assert bool(torch.isfinite(loss)) == (want is None)  # the lazy mode reduces only on a failing step
    values = drive.collect(loss)
    assert drive.record.nonfinite == (want is not None)
    assert drive.record.nonfinite_source == want
    assert values.layers("nonfinite") == {} and values.field("nonfinite") is None  # set on the record only
    drive.close()


def test_a_nonfinite_loss_from_finite_activations_is_the_loss():
    model = Net()
    drive = Drive(NonfiniteCollector(every=1), model)
    loss = _loss(model, (X,)) * float("inf")
    assert _first_nonfinite(model, X) is None
    drive.collect(loss)
    assert drive.record.nonfinite and drive.record.nonfinite_source == "loss"
    drive.close()


@pytest.mark.parametrize(("mode", "caught"), [("lazy", False), ("eager", True)])
def test_only_eager_mode_sees_a_nan_that_never_reaches_the_loss(mode, caught):
    model = Net(mask_nonfinite=True)
    model.early.armed = True
    assert _first_nonfinite(model, X) == "early"
    drive = Drive(NonfiniteCollector(every=1, mode=mode), model)
    loss = _loss(model, (X,))
    assert torch.isfinite(loss)
    drive.collect(loss)
    assert drive.record.nonfinite == caught
    assert drive.record.nonfinite_source == ("early" if caught else None)
    drive.close()


def test_runs_every_step_whatever_its_schedule_and_forgets_the_previous_step():
    model = Net()
    drive = Drive(NonfiniteCollector(every=3), model)
    model.early.armed = True
    drive.collect(_loss(model, (X,)))
    assert drive.record.nonfinite_source == "early"
    drive.collect(_loss(model, (X,)))  # step 1: unscheduled, still checked
    assert drive.record.nonfinite_source == "early"
    model.early.armed = False
    drive.collect(_loss(model, (X,)))
    assert not drive.record.nonfinite and drive.record.nonfinite_source is None
    drive.close()
