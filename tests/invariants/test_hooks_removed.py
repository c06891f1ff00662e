"""No stabwatch hook outlives the monitor, on every way out of the ``with`` block.

A real snntorch network (``Leaky`` and ``Synaptic(init_hidden=True)``) so the spiking collector hooks its
layers, a shadow window open at the moment of exit (its RNG-capture pre-hook on the root module and its
replica alive), and a user hook that must survive. After the exit, every hook table torch keeps (modules,
parameters, the optimizer, the process-wide ones) is exactly what it was before entering.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import stabwatch as sw
from tests.invariants.probes import hook_counts, hook_table, stabwatch_hooks
from tests.spiking.snn_models import TwoLayerSNN, batch  # skips the module without snntorch


class Boom(Exception):
    pass


def _loss(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(b[0]).sum(0), b[1])


def _step(model, opt, mon, seed: int) -> None:
    b = batch(seed)
    opt.zero_grad()
    loss = _loss(model, b)
    loss.backward()
    opt.step()
    mon.step(loss=loss, batch=b)


EXITS = ["normal", "exception", "keyboard_interrupt", "exception_in_forward", "exception_in_optimizer_step"]


@pytest.mark.parametrize("exit_path", EXITS)
@pytest.mark.parametrize("preset", ["cheap", "default", "full"])
def test_no_hook_left_after_any_exit(preset, exit_path):
    model = TwoLayerSNN(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    armed = {"forward": False, "step": False}

    def user_forward_hook(module, args, out):  # a user's hook: must be there before and after
        if armed["forward"]:
            raise Boom("in forward")

    def user_step_hook(optimizer, args, kwargs):
        if armed["step"]:
            raise Boom("in optimizer.step")

    # registered before the monitor's: the forward one raises after lif1's spiking hook ran, the step one
    # after the monitor's pre-step hook ran and before its post-step hook (collectors caught mid-step)
    user = [model.lif2.register_forward_hook(user_forward_hook), opt.register_step_post_hook(user_step_hook)]
    before = hook_table(model, opt)
    assert stabwatch_hooks(before) == {}

    shadow = sw.Shadow(loss_fn=_loss, every=4, window=4)
    expected = {
        "normal": None,
        "exception": Boom,
        "keyboard_interrupt": KeyboardInterrupt,
        "exception_in_forward": Boom,
        "exception_in_optimizer_step": Boom,
    }[exit_path]
    raises = pytest.raises(expected) if expected else contextlib.nullcontext()
    with raises, sw.Monitor(model, opt, preset=preset, shadow=shadow) as mon:
        inside = hook_table(model, opt)
        hooked = stabwatch_hooks(inside)
        # both snntorch layers are hooked (by the spiking collector unless the preset turns it off), and
        # the optimizer by the monitor
        for layer in ("lif1", "lif2"):
            names = hooked.get(f"{layer}._forward_hooks", [])
            assert len(names) > 0 and (preset == "cheap" or any("SpikingCollector" in n for n in names)), names
        assert "optimizer._optimizer_step_pre_hooks" in hooked and "optimizer._optimizer_step_post_hooks" in hooked
        _step(model, opt, mon, 0)
        _step(model, opt, mon, 1)
        assert shadow.open  # spawned at step 0, window of 4: still open at exit
        assert "(root)._forward_pre_hooks" in stabwatch_hooks(hook_table(model, opt))
        if exit_path == "exception":
            raise Boom("in the loop body")
        if exit_path == "keyboard_interrupt":
            raise KeyboardInterrupt
        armed["forward"] = exit_path == "exception_in_forward"
        armed["step"] = exit_path == "exception_in_optimizer_step"
        _step(model, opt, mon, 2)
    armed["forward"] = armed["step"] = False

    after = hook_table(model, opt)
    assert stabwatch_hooks(after) == {}
    assert hook_counts(after) == hook_counts(before)
    assert after == before  # the very same callables: user hooks kept, in their order
    assert not shadow.open
    # and the hooks really are inert: training goes on without touching the closed monitor
    b = batch(3)
    opt.zero_grad()
    _loss(model, b).backward()
    opt.step()
    for h in user:
        h.remove()
    assert sum(hook_counts(hook_table(model, opt)).values()) == 0
