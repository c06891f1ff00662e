"""The probes of the invariant tests see what they claim to see (and fail loudly when torch moves its hooks)."""

from __future__ import annotations

import tracemalloc

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from tests.invariants.probes import hook_counts, hook_table, is_stabwatch, live_tensor_bytes, rss_bytes, stabwatch_hooks


def test_hook_table_sees_every_hook_registered_through_the_public_api():
    model = nn.Sequential(nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    empty = hook_counts(hook_table(model, opt))
    assert len(empty) > 0 and sum(empty.values()) == 0

    def fn(*args, **kwargs):
        return None

    handles = [
        model[0].register_forward_hook(fn),
        model[0].register_forward_pre_hook(fn),
        model[0].register_full_backward_hook(fn),
        model[0].register_full_backward_pre_hook(fn),
        model[0].weight.register_hook(fn),
        model[0].weight.register_post_accumulate_grad_hook(fn),
        opt.register_step_pre_hook(fn),
        opt.register_step_post_hook(fn),
        nn.modules.module.register_module_forward_hook(fn),
        nn.modules.module.register_module_forward_pre_hook(fn),
        nn.modules.module.register_module_full_backward_hook(fn),
        nn.modules.module.register_module_full_backward_pre_hook(fn),
        register_optimizer_step_pre_hook(fn),
        register_optimizer_step_post_hook(fn),
    ]
    try:
        full = hook_counts(hook_table(model, opt))
        assert set(full) == set(empty)
        assert sum(full.values()) == len(handles), {k: v for k, v in full.items() if v}
    finally:
        for h in handles:
            h.remove()
    assert hook_counts(hook_table(model, opt)) == empty


def test_is_stabwatch_tells_stabwatch_hooks_from_user_hooks():
    from stabwatch.collectors.base import Collector

    collector = Collector()
    assert is_stabwatch(collector.guard(lambda: None)) and is_stabwatch(collector.attach)
    assert not is_stabwatch(lambda: None) and not is_stabwatch(print)
    assert stabwatch_hooks({"a": [collector.attach, print], "b": [print]}) == {"a": ["Collector.attach"]}


def test_tensor_bytes_see_storage_that_tracemalloc_does_not():
    before, n_before = live_tensor_bytes()
    tracemalloc.start()
    big = torch.ones(10_000_000)  # 40 MB, written so its pages are resident
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    view = big[::2]  # shares the storage: not counted twice
    after, n_after = live_tensor_bytes()
    assert traced < 100_000  # what the old flat-memory test measured: blind to the 40 MB
    nbytes = big.untyped_storage().nbytes()
    slack = 64 * 1024  # tensors another thread may hold for a moment
    assert nbytes <= after - before <= nbytes + slack and n_after >= n_before + 1
    assert rss_bytes() > 40_000_000
    del big, view
    assert live_tensor_bytes()[0] <= before + slack
