"""The collector base: `Readout` (values kept on the device, one sync) and `MonitorContext.build`
(the monitored parameters, their owner modules and the layer index)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabwatch.collectors.base import Collector, MonitorContext, Readout


def test_readout_keeps_order_and_kinds_and_syncs_once():
    r = Readout()
    r.add("grad_norm", torch.tensor(2.0))
    r.add_layers("grad_norm", ["a", "b"], torch.tensor([3.0, 4.0]))
    r.add_extra("grad_sv/top1", torch.tensor(5.0), layer="a")
    r.add_internal("flags", torch.tensor([0.0, 1.0, 0.0]))
    r.add("loss", 0.5)  # a host float is accepted too
    assert r.internal("flags") == []  # not synced yet
    values = r.sync()
    assert values == [2.0, 3.0, 4.0, 5.0, 0.0, 1.0, 0.0, 0.5]
    assert r.entries[:4] == [
        ("field", "grad_norm", None),
        ("layer", "grad_norm", "a"),
        ("layer", "grad_norm", "b"),
        ("extra", "grad_sv/top1", "a"),
    ]
    assert len(r.entries) == len(values) and r.internal("flags") == [0.0, 1.0, 0.0] and r.internal("x") == []
    assert Readout().sync() == []


def test_readout_refuses_names_and_values_of_different_lengths():
    with pytest.raises(ValueError, match="2 names but 3 values"):
        Readout().add_layers("grad_norm", ["a", "b"], torch.ones(3))


def test_context_lists_trainable_parameters_once_with_their_owner_modules():
    torch.manual_seed(0)
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight  # tied: one parameter, owned by the first module that has it
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    model = nn.Sequential(emb, frozen, nn.Sequential(nn.ReLU(), nn.Linear(4, 4)), head)
    ctx = MonitorContext.build(model, None, torch.Generator())
    names = [n for n, _ in ctx.params]
    assert names == ["0.weight", "2.1.weight", "2.1.bias"]
    assert [ctx.param_owner[id(p)] for _, p in ctx.params] == ["0", "2.1", "2.1"]
    assert ctx.layers == ["0", "2.1"] and ctx.param_layer == [0, 1, 1]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for _, p in ctx.params} == trainable and len(trainable) == 3


def test_detach_removes_every_hook_it_added_also_while_paused():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())

    class Hooking(Collector):
        family = "hooking"

        def setup(self, ctx):
            self.add_hook(ctx.model[1].register_forward_hook, lambda *a: None)
            self.hook(ctx.model[0].register_forward_pre_hook(lambda *a: None))

    c = Hooking(every=1)
    ctx = MonitorContext.build(model, None, torch.Generator())
    ctx.collectors = [c]
    c.attach(ctx)
    assert len(model[1]._forward_hooks) == 1 and len(model[0]._forward_pre_hooks) == 1
    with ctx.hooks_paused():
        assert len(model[1]._forward_hooks) == 0  # add_hook hooks can be paused (the shadow's copy)
    assert len(model[1]._forward_hooks) == 1
    c.suspend_hooks()
    c.detach()  # detached while suspended: nothing comes back
    c.resume_hooks()
    assert len(model[1]._forward_hooks) == 0 and len(model[0]._forward_pre_hooks) == 0
