"""`UpdateCollector` on its own: update-to-weight ratios and weight norms against the parameters'
values copied before and after ``optimizer.step()``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabwatch.collectors import UpdateCollector
from tests.collectors.drive import Drive, batch, cross_entropy, layer_norms


def _model() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def _by_layer(tensors: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for name, t in tensors.items():
        out.setdefault(name.rsplit(".", 1)[0], []).append(t)
    return out


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_ratio_is_the_norm_of_the_change_over_the_norm_before(optim):
    model = _model()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if optim == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    drive = Drive(UpdateCollector(every=1), model, opt)
    for step in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        values = drive.train_step(cross_entropy, batch(seed=step))
        delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        w_layers, d_layers = layer_norms(_by_layer(before)), layer_norms(_by_layer(delta))
        w = layer_norms({"all": list(before.values())})["all"]
        d = layer_norms({"all": list(delta.values())})["all"]
        assert d > 0
        assert values.field("weight_norm") == pytest.approx(w, rel=1e-6)
        assert values.field("update_norm") == pytest.approx(d, rel=1e-5)
        assert values.field("update_ratio") == pytest.approx(d / w, rel=1e-5)
        assert values.layers("weight_norm") == pytest.approx(w_layers, rel=1e-6)
        ratios = values.layers("update_ratio")
        assert list(ratios) == ["0", "2"]
        assert ratios == pytest.approx({k: d_layers[k] / w_layers[k] for k in w_layers}, rel=1e-5)
    drive.close()


def test_a_step_that_changes_nothing_has_ratio_zero():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    drive = Drive(UpdateCollector(every=1), model, opt)
    values = drive.train_step(cross_entropy, batch())
    assert values.field("update_ratio") == 0.0 and values.field("weight_norm") > 0
    drive.close()


def test_no_optimizer_step_no_values_and_unscheduled_steps_copy_nothing():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    collector = UpdateCollector(every=2)
    drive = Drive(collector, model, opt)
    assert len(drive.train_step(cross_entropy, batch(), optimizer_step=False)) == 0  # no update was made
    assert len(drive.train_step(cross_entropy, batch(seed=1))) == 0  # step 1 is not scheduled
    assert len(drive.train_step(cross_entropy, batch(seed=2))) > 0
    drive.close()
