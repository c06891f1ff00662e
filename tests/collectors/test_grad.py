"""`GradCollector` on its own: global and per-layer gradient norms against float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabwatch.collectors import GradCollector
from tests.collectors.drive import Drive, batch, cross_entropy, layer_norms


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))


def _grads_by_layer(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out.setdefault(name.rsplit(".", 1)[0] if "." in name else "(root)", []).append(p.grad.detach().clone())
    return out


def _check(values, grads: dict[str, list[torch.Tensor]]) -> None:
    ref = layer_norms(grads)
    assert len(ref) > 0
    total = float(torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for gs in grads.values() for g in gs])))
    assert values.field("grad_norm") == pytest.approx(total, rel=1e-6)
    got = values.layers("grad_norm")
    assert list(got) == list(ref)
    for layer, norm in ref.items():
        assert got[layer] == pytest.approx(norm, rel=1e-6), layer


@pytest.mark.parametrize("after_step", ["auto", True, False])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_norms_are_those_of_the_gradients_the_optimizer_used(optim, after_step):
    model = _model()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if optim == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    seen: list[dict[str, list[torch.Tensor]]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(_grads_by_layer(model)))
    drive = Drive(GradCollector(every=1, after_step=after_step), model, opt)
    # True is "auto": after the step for these read-only torch optimizers; False: always before
    assert drive.collector._post is (after_step is not False)
    for step in range(3):
        values = drive.train_step(cross_entropy, batch(seed=step))
        _check(values, seen[-1])
        assert drive.record.grad_source == "optimizer_pre_step"
    assert len(seen) == 3
    drive.close()


def test_without_an_optimizer_the_gradients_are_read_at_collect():
    model = _model()
    drive = Drive(GradCollector(every=1), model)
    values = drive.train_step(cross_entropy, batch())
    _check(values, _grads_by_layer(model))
    assert drive.record.grad_source == "monitor_step"
    drive.close()


def test_layers_without_gradients_are_left_out():
    model = _model()
    model[2].requires_grad_(False)  # frozen: not a monitored parameter at all
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    drive = Drive(GradCollector(every=1), model, opt)

    def head_only(m, b):  # the first layer gets no gradient this step (grad stays None)
        with torch.no_grad():
            h = m[3](m[2](m[1](m[0](b[0]))))
        return cross_entropy(lambda x: m[4](h), b)

    values = drive.train_step(head_only, batch())
    assert list(values.layers("grad_norm")) == ["4"]
    _check(values, _grads_by_layer(model))
    values = drive.train_step(cross_entropy, batch(seed=1))  # all trainable layers again
    assert list(values.layers("grad_norm")) == ["0", "4"]
    _check(values, _grads_by_layer(model))
    drive.close()


def test_unscheduled_steps_add_nothing():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    drive = Drive(GradCollector(every=2), model, opt)
    counts = [len(drive.train_step(cross_entropy, batch(seed=s))) for s in range(4)]
    assert counts[1] == counts[3] == 0 and counts[0] == counts[2] == 1 + 3  # global + one per layer
    drive.close()
