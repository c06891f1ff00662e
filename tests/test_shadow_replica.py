"""The shadow's plumbing (`stabwatch.collectors._replica`), each piece on its own: the model copy and its
pairing, the optimizer clone, the AMP replay, the RNG replay — and a pin on the private names it avoids."""

from __future__ import annotations

import ast
import copy
import functools
import pathlib

import pytest
import torch
from torch import nn

import stabwatch
from stabwatch.collectors import _replica
from stabwatch.collectors._replica import (
    NONNEGATIVE_STATE,
    Replica,
    RngState,
    ScaledStep,
    clone_optimizer,
    follow_hyperparameters,
    fused_step_skipped,
    is_grad_scaler,
    isolated_rng,
    loss_scale,
    paired_state,
)
from stabwatch.collectors.base import Collector, MonitorContext
from stabwatch.errors import StabwatchError
from tests.helpers import data, mlp

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooks(model: nn.Module) -> list[object]:
    """Every module hook function of ``model`` (read-only look at torch's hook dicts: fine for a test)."""
    return [fn for m in model.modules() for attr in HOOK_DICTS for fn in getattr(m, attr).values()]


def _is_stabwatch(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return (getattr(fn, "__module__", None) or "").startswith("stabwatch")


class _Probe(Collector):
    """A collector with one forward hook on every Linear, registered through the base class."""

    family = "probe"

    def setup(self, ctx: MonitorContext) -> None:
        self.calls = 0
        for module in ctx.model.modules():
            if isinstance(module, nn.Linear):
                self.add_hook(module.register_forward_hook, self._seen)

    def _seen(self, module: nn.Module, args: object, out: object) -> None:
        self.calls += 1


def _ctx_with_probe(model: nn.Module) -> tuple[MonitorContext, _Probe]:
    ctx = MonitorContext.build(model, None, torch.Generator().manual_seed(0))
    probe = _Probe()
    ctx.collectors = [probe]
    probe.attach(ctx)
    return ctx, probe


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))


# ------------------------------------------------------------------------------------------ Replica
def test_replica_pairs_every_parameter_and_buffer_and_keeps_ties():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.bn = nn.BatchNorm1d(4)

    model = Tied()
    model.a.weight.grad = torch.ones(4, 4)
    rep = Replica.build(model)
    real = list(model.parameters()) + list(model.buffers())
    assert [id(r) for r, _ in rep.tensors] == [id(t) for t in real]  # shared weight once, buffers too
    for r, s in rep.tensors:
        assert s is not r and torch.equal(s, r) and s.data_ptr() != r.data_ptr()
    assert rep.param_map[id(model.a.weight)] is rep.model.a.weight is rep.model.b.weight
    assert all(p.grad is None for p in rep.model.parameters())
    assert [type(s) for _, s in rep.modules] == [type(m) for m in model.modules()]


def test_replica_refresh_and_offload_keep_the_pairs():
    model = _bn_net()
    rep = Replica.build(model)
    objects = [s for _, s in rep.tensors]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(5, 8))  # moves the BatchNorm statistics
    rep.refresh()
    assert all(torch.equal(s, r) for r, s in rep.tensors)
    rep.model[0].weight.grad = torch.ones(16, 8)
    rep.offload("cpu")
    assert [s for _, s in rep.tensors] == objects  # same objects: an optimizer over them stays valid
    assert all(p.grad is None for p in rep.model.parameters())


def test_replica_follows_train_and_eval_per_module():
    model = _bn_net()
    rep = Replica.build(model)
    model.eval()
    model[1].train()
    rep.follow_modes()
    assert [m.training for m in rep.model.modules()] == [m.training for m in model.modules()]


def test_replica_leaves_paused_hooks_out_and_keeps_the_users():
    """Hooks of a collector (added with add_hook) are not copied; the user's hooks and spectral norm are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.utils.spectral_norm(nn.Linear(16, 3)))
    nn.utils.parametrizations.spectral_norm(model[0])  # the parametrisation flavour too
    user_fwd = model[1].register_forward_hook(lambda m, i, out: 2.0 * out)
    model.register_forward_pre_hook(lambda m, args: None)
    ctx, probe = _ctx_with_probe(model)
    before = _hooks(model)
    assert len(before) == 5  # three of the user's, two of the collector's

    rep = Replica.build(model, without=ctx.hooks_paused)

    copied = _hooks(rep.model)
    assert not any(isinstance(getattr(fn, "__self__", None), _Probe) for fn in copied)
    assert not any(_is_stabwatch(fn) for fn in copied)
    assert len(copied) == 3  # the two lambdas and SpectralNorm's pre-hook
    assert nn.utils.parametrize.is_parametrized(rep.model[0], "weight")
    assert len(_hooks(model)) == len(before)  # the collector's hooks are back on the real model
    x = torch.randn(4, 8)
    model.eval()
    rep.model.eval()
    probe.calls = 0
    out_rep = rep.model(x)
    assert probe.calls == 0  # the replica's forward does not feed the collector
    out = model(x)
    assert probe.calls == 2  # ... the real one does
    assert torch.equal(out, out_rep)  # the user's doubling hook and both spectral norms act in the copy
    user_fwd.remove()
    probe.detach()
    assert len(_hooks(model)) == 2


def test_a_weight_computed_in_forward_does_not_block_the_copy():
    """Old-style spectral_norm keeps ``weight`` as a non-leaf tensor after a forward: deepcopy alone refuses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 8)), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(4, 8)
    model(x).sum().backward()
    assert not model[0].weight.is_leaf
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    rep = Replica.build(model)
    assert rep.model[0].weight is not model[0].weight
    model.eval()
    rep.model.eval()
    assert torch.equal(rep.model(x), model(x))


def test_hooks_come_back_when_the_copy_fails():
    import threading

    model = mlp(0)
    model.lock = threading.Lock()  # type: ignore[assignment]  # cannot be deep-copied
    ctx, probe = _ctx_with_probe(model)
    n = len(_hooks(model))
    with pytest.raises(TypeError):
        Replica.build(model, without=ctx.hooks_paused)
    assert len(_hooks(model)) == n
    probe.calls = 0
    model(torch.randn(2, 8))
    assert probe.calls == 3


def test_replica_refuses_a_copy_of_another_structure():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def __deepcopy__(self, memo: dict) -> nn.Module:
            return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))

    with pytest.raises(StabwatchError, match="cannot be replicated"):
        Replica.build(Odd())


# ------------------------------------------------------------------------------------------ optimizer
def _make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    return {
        "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "adam": lambda: torch.optim.Adam(params, lr=1e-2),
        "adamw-amsgrad": lambda: torch.optim.AdamW(params, lr=1e-2, amsgrad=True),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=1e-3, momentum=0.5, centered=True),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=1e-2),
    }[kind]()


def _step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw-amsgrad", "rmsprop", "adagrad"])
def test_cloned_optimizer_takes_identical_steps_and_follows_the_schedule(kind):
    model = mlp(0)
    opt = _make_optimizer(kind, model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = data()
    for _ in range(3):
        _step(model, opt, x, y)
        sched.step()
    rep = Replica.build(model)
    clone = clone_optimizer(opt, rep.param_map)
    assert type(clone) is type(opt) and clone is not opt
    real_state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    clone_state = [v for s in clone.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert len(real_state) == len(clone_state) > 0
    assert not {t.data_ptr() for t in real_state if t.numel() > 1} & {t.data_ptr() for t in clone_state}
    for i in range(5):
        xb, yb = x[i::5], y[i::5]
        _step(model, opt, xb, yb)
        follow_hyperparameters(clone, opt)
        assert clone.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        _step(rep.model, clone, xb, yb)
        sched.step()
        for p in model.parameters():
            assert torch.equal(p, rep.param_map[id(p)]), f"step {i}"
    assert opt.param_groups[0]["lr"] < opt.defaults["lr"] / 4  # the schedule moved the lr while cloned
    for p in model.parameters():
        for key, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(clone.state[rep.param_map[id(p)]][key])), key


def test_cloned_optimizer_carries_no_hooks_of_the_real_one():
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[int] = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    clone = clone_optimizer(opt, Replica.build(model).param_map)
    clone.step()
    assert calls == []


def test_clone_refuses_a_parameter_outside_the_model():
    model = mlp(0)
    stray = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    with pytest.raises(StabwatchError, match="not in the model"):
        clone_optimizer(opt, Replica.build(model).param_map)


def test_paired_state_pairs_moments_and_marks_the_nonnegative_ones():
    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    x, y = data()
    _step(model, opt, x, y)
    rep = Replica.build(model)
    clone = clone_optimizer(opt, rep.param_map)
    real_params = list(model.parameters())
    pairs = paired_state(opt, clone, real_params, [rep.param_map[id(p)] for p in real_params])
    assert len(pairs.real) == len(pairs.shadow) == 3 * len(real_params)  # exp_avg, exp_avg_sq, max_exp_avg_sq
    assert len(pairs.nonnegative) == 2 * len(real_params)
    for r, s in zip(pairs.real, pairs.shadow):
        assert torch.equal(r, s) and r is not s
    nonneg_ids = {id(t) for t in pairs.nonnegative}
    for p in real_params:
        cs = clone.state[rep.param_map[id(p)]]
        assert {k for k, v in cs.items() if id(v) in nonneg_ids} == {"exp_avg_sq", "max_exp_avg_sq"}
    assert {"exp_avg_sq", "max_exp_avg_sq"} <= NONNEGATIVE_STATE


# ------------------------------------------------------------------------------------------------ AMP
def test_loss_scale_reads_the_public_gradscaler_api():
    assert loss_scale(None) is None
    assert loss_scale(torch.amp.GradScaler("cpu", enabled=False)) is None
    scaler = torch.amp.GradScaler("cpu", init_scale=1000.0)
    assert loss_scale(scaler) == 1000.0
    assert is_grad_scaler(scaler) and not is_grad_scaler(object())


@pytest.mark.parametrize("init_scale", [2.0**12, 1000.0, 3.0e5])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_scaled_step_is_the_real_gradscaler_step_bit_for_bit(init_scale, kind):
    """The replica's backward/unscale/step at the real step's scale gives the real step's parameters."""
    real = mlp(1)
    opt = _make_optimizer(kind, real.parameters())
    twin = copy.deepcopy(real)
    twin_opt = _make_optimizer(kind, twin.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    x, y = data()
    for i in range(6):
        xb, yb = x[i::6], y[i::6]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(real(xb), yb)
        scaler.scale(loss).backward()
        scale = loss_scale(scaler)  # as the shadow reads it: before update()
        scaler.step(opt)
        scaler.update()

        twin_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            twin_loss = nn.functional.cross_entropy(twin(xb), yb)
        amp = ScaledStep(scale, twin_loss.device)
        amp.backward(twin_loss)
        assert amp.step(twin_opt)
        for a, b in zip(real.parameters(), twin.parameters()):
            assert torch.equal(a, b), f"step {i}"
    assert scaler.get_scale() != init_scale  # the real scale moved; the replay followed it


def test_scaled_step_reports_an_overflow_and_skips_the_step():
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    amp = ScaledStep(2.0**16, w.device)
    amp.backward((w * float("inf")).sum())
    assert amp.step(opt) is False
    assert torch.equal(w.detach(), torch.ones(3))


@pytest.mark.parametrize("fused", [False, True])
def test_fused_step_skipped_reads_the_backed_off_scale(fused):
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    calls: list[int] = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    for overflow in (False, True):
        opt.zero_grad()
        scaler.scale((w * (float("inf") if overflow else 1.0)).sum()).backward()
        used = loss_scale(scaler)
        scaler.step(opt)
        scaler.update()
        # a fused optimizer is called (hooks fire) even when it skips; only the scale tells
        assert fused_step_skipped(opt, scaler, used) is (fused and overflow)
    assert len(calls) == (2 if fused else 1)
    assert not fused_step_skipped(opt, scaler, None)


def test_unscaled_step_is_a_plain_step():
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.5)
    amp = ScaledStep(None, w.device)
    amp.backward((3 * w).sum())
    assert w.grad is not None and w.grad.tolist() == [3.0, 3.0]
    assert amp.step(opt) and w.tolist() == [-0.5, -0.5]


# ------------------------------------------------------------------------------------------------ RNG
def test_rng_replay_gives_the_same_dropout_masks_and_leaves_the_stream_alone():
    drop = nn.Dropout(0.5)
    torch.manual_seed(0)
    state = RngState.capture(())
    mask = drop(torch.ones(64))
    after = torch.get_rng_state()
    with state.replayed():
        assert torch.equal(drop(torch.ones(64)), mask)
        torch.rand(1000)  # draws more than the real step did
    assert torch.equal(torch.get_rng_state(), after)
    with isolated_rng(()):
        torch.rand(10)
    assert torch.equal(torch.get_rng_state(), after)


# ------------------------------------------------------------------------------------- private names
_PLUMBING = [pathlib.Path(stabwatch.__file__).parent / "collectors" / name for name in ("shadow.py", "_replica.py")]


@pytest.mark.parametrize("path", _PLUMBING, ids=lambda p: p.name)
def test_the_shadow_reads_no_private_name_of_another_object(path):
    """No ``obj._name`` except on ``self``: private state of torch, of a GradScaler or of another collector
    would break silently when they change. (The fused ``torch._foreach_*`` kernels live in
    `stabwatch.functional.lyapunov`, pinned by tests/test_shadow_functional.py.)"""
    tree = ast.parse(path.read_text())
    offending = [
        f"{path.name}:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not (node.attr.startswith("__") and node.attr.endswith("__"))
        and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
    ]
    assert offending == []


def test_the_plumbing_module_exports_what_it_defines():
    assert set(_replica.__all__) <= set(vars(_replica))
