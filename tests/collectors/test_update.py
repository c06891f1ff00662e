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


class _Lora(nn.Module):
    """``y = base(x) + B(A(x))`` with ``B`` zero-initialised, as LoRA adapters start (base frozen)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.base = nn.Linear(8, 3)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(8, 2, bias=False)
        self.lora_B = nn.Linear(2, 3, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


def test_a_weight_that_starts_at_zero_reads_one_then_the_ordinary_ratio():
    """Step 0: B moves off zero (ratio ||dB|| / ||B after|| = 1), A gets no gradient through B = 0 (0).
    Step 1: both the ordinary ratio. The global ratio is the ordinary one throughout (A is not zero)."""
    model = _Lora()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    drive = Drive(UpdateCollector(every=1), model, opt)
    for step in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        values = drive.train_step(cross_entropy, batch(seed=step))
        after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        a0, a1 = before["lora_A.weight"].double(), after["lora_A.weight"].double()
        b0, b1 = before["lora_B.weight"].double(), after["lora_B.weight"].double()
        ratios = values.layers("update_ratio")
        if step == 0:
            assert float(b0.norm()) == 0.0 and float(b1.norm()) > 0
            assert ratios == {"lora_A": 0.0, "lora_B": 1.0}
        else:
            assert ratios["lora_A"] == pytest.approx(float((a1 - a0).norm() / a0.norm()), rel=1e-5)
            assert ratios["lora_B"] == pytest.approx(float((b1 - b0).norm() / b0.norm()), rel=1e-5)
        moved = float(torch.cat([(a1 - a0).reshape(-1), (b1 - b0).reshape(-1)]).norm())
        weights = float(torch.cat([a0.reshape(-1), b0.reshape(-1)]).norm())
        assert values.field("update_ratio") == pytest.approx(moved / weights, rel=1e-5)
    drive.close()


def test_zero_weights_that_do_not_move_read_zero_and_all_zero_reads_one():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    # all weights zero: only the last bias gets a gradient (the rest is behind zero weights)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    drive = Drive(UpdateCollector(every=1), model, opt)
    values = drive.train_step(cross_entropy, batch())
    assert values.layers("update_ratio") == {"0": 0.0, "2": 1.0}
    assert values.field("weight_norm") == 0.0 and values.field("update_norm") > 0
    assert values.field("update_ratio") == 1.0  # ||delta|| / ||theta after||, theta before = 0
    drive.close()
    frozen = Drive(UpdateCollector(every=1), model, torch.optim.SGD(model.parameters(), lr=0.0))
    values = frozen.train_step(cross_entropy, batch())
    assert values.layers("update_ratio") == {"0": 0.0, "2": 0.0}  # layer 0 still all zero, nothing moved
    assert values.field("update_ratio") == 0.0
    frozen.close()
