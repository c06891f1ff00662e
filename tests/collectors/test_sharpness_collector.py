"""`SharpnessCollector` in a real `Monitor`: values against Hessians formed explicitly, the edge-of-stability
ratio against its formula, and training left bit-identical (weights, buffers, ``.grad``, optimizer state,
RNG, the other collectors' values)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.func import functional_call

import stabwatch as sw
from stabwatch.collectors import ActivationCollector, SharpnessCollector
from stabwatch.errors import ConfigError


def _least_squares(n: int = 64, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, 1, generator=g, dtype=torch.float64
    )
    return x, y


def _mse(model: nn.Module, batch) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _run(model, opt, collector, steps, batches=None, preset="cheap", **mon_kw):
    records = []
    with sw.Monitor(
        model, opt, preset=preset, collectors=[collector] if collector else [], alerts=False, **mon_kw
    ) as mon:
        for i in range(steps):
            batch = batches[i] if batches is not None else collector.probe
            opt.zero_grad()
            loss = _mse(model, batch)
            loss.backward()
            opt.step()
            records.append(mon.step(loss=loss, batch=batch))
    return records


@pytest.mark.parametrize(
    "sgd", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.5, "dampening": 0.5}]
)
def test_least_squares_sharpness_is_the_top_eigenvalue_of_2xtx_over_n_and_the_ratio_its_formula(sgd):
    x, y = _least_squares()
    model = nn.Linear(4, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **sgd)
    recs = _run(model, opt, SharpnessCollector(every=2, loss_fn=_mse, probe=(x, y), tol=1e-10), 3)
    exact = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())
    mu, d = sgd.get("momentum", 0.0), sgd.get("dampening", 0.0)
    gain = (1 + 2 * mu) if sgd.get("nesterov") else (1 - d)
    for step, rec in enumerate(recs):
        if step % 2:
            assert rec.get("sharpness/max") is None and rec.get("sharpness/eos_ratio") is None
            continue
        assert rec.get("sharpness/max") == pytest.approx(exact, rel=1e-9)
        assert rec.get("sharpness/eos_ratio") == pytest.approx(0.05 * gain * exact / (2 + 2 * mu), rel=1e-9)
        assert rec.get("sharpness/preconditioned_max") is None


def test_adam_preconditioned_sharpness_matches_the_explicit_p_inverse_sqrt_h_p_inverse_sqrt():
    x, y = _least_squares(seed=1)
    model = nn.Linear(4, 1, bias=True).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    recs = _run(model, opt, SharpnessCollector(every=1, loss_fn=_mse, probe=(x, y), tol=1e-10), 3)
    # after the last step: P from the optimizer's state, H of least squares in (weight, bias)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    h = 2 * xb.T @ xb / len(x)
    state = [opt.state[p] for p in (model.weight, model.bias)]
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in state]) / (1 - 0.99 ** float(state[0]["step"]))
    p = v.sqrt() + 1e-6
    sym = h / p.sqrt()[:, None] / p.sqrt()[None, :]
    exact_p = float(torch.linalg.eigvalsh(sym).max())
    rec = recs[-1]
    assert rec.get("sharpness/max") == pytest.approx(float(torch.linalg.eigvalsh(h).max()), rel=1e-9)
    assert rec.get("sharpness/preconditioned_max") == pytest.approx(exact_p, rel=1e-8)
    assert rec.get("sharpness/eos_ratio") == pytest.approx(0.01 * (1 - 0.8) * exact_p / (2 + 2 * 0.8), rel=1e-8)


def test_mlp_sharpness_matches_the_explicit_hessian_at_the_parameters_after_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 1)).double()
    g = torch.Generator().manual_seed(3)
    probe = (torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(32, 1, generator=g, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _run(model, opt, SharpnessCollector(every=1, loss_fn=_mse, probe=probe, tol=1e-8, n_iter=40), 2)[-1]
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def flat_loss(w):
        ps = [part.reshape(p.shape) for part, p in zip(torch.split(w, sizes), params, strict=True)]
        return _mse(lambda x: functional_call(model, dict(zip(names, ps, strict=True)), (x,)), probe)

    h = torch.func.hessian(flat_loss)(torch.cat([p.reshape(-1) for p in params]))
    assert rec.get("sharpness/max") == pytest.approx(float(torch.linalg.eigvalsh(h).max()), rel=1e-9)


# ------------------------------------------------------------------------------ training unchanged
class _Net(nn.Module):
    """Dropout (global RNG) and BatchNorm (running statistics updated in place by a training forward)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.norm = nn.BatchNorm1d(16)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.act(self.norm(self.inp(x)))))


def _train(collector, opt_name: str, steps: int = 6, preset: str = "default"):
    model = _Net()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if opt_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)) for _ in range(steps)]
    torch.manual_seed(123)
    records, grads_untouched = [], True
    # the activation collector after this one: its forward hooks would see the probe's forward if not paused
    collectors = [*([collector] if collector else []), ActivationCollector(1)]
    with sw.Monitor(model, opt, preset=preset, collectors=collectors, alerts=False) as mon:
        for batch in batches:
            opt.zero_grad()
            loss = _mse(model, batch)
            loss.backward()
            opt.step()
            grads = [p.grad.clone() for p in model.parameters()]
            records.append(mon.step(loss=loss, batch=batch))
            grads_untouched &= all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))
        generator = mon._generator.get_state()
    return model, opt, records, torch.get_rng_state(), grads_untouched, generator


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("use_probe", [False, True])
def test_training_is_bit_identical_with_the_collector_on(opt_name, use_probe):
    g = torch.Generator().manual_seed(99)
    probe = (torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)) if use_probe else None
    plain = _train(None, opt_name)
    watched = _train(SharpnessCollector(every=1, loss_fn=_mse, probe=probe), opt_name)
    (m0, o0, r0, rng0, _, gen0), (m1, o1, r1, rng1, untouched, gen1) = plain, watched
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert "norm.running_mean" in s0 and "norm.num_batches_tracked" in s0
    for name in s0:
        assert torch.equal(s0[name], s1[name]), name
    for p0, p1 in zip(m0.parameters(), m1.parameters(), strict=True):
        assert torch.equal(p0.grad, p1.grad)
    for (k0, v0), (k1, v1) in zip(o0.state_dict()["state"].items(), o1.state_dict()["state"].items(), strict=True):
        assert k0 == k1 and all(torch.equal(v0[k], v1[k]) for k in v0)
    assert torch.equal(rng0, rng1) and torch.equal(gen0, gen1)
    assert untouched  # .grad is what backward left, after the collector ran
    # the collector ran, and the other collectors (activation statistics: forward hooks) saw nothing of it
    assert all(r.get("sharpness/max") is not None and r.get("sharpness/max") > 0 for r in r1)
    assert all(r.activation_mean is not None for r in r1)
    for a, b in zip(r0, r1, strict=True):
        da = {k: v for k, v in a.to_dict().items() if k != "monitor/overhead_ms"}
        db = {k: v for k, v in b.to_dict().items() if k != "monitor/overhead_ms" and not k.startswith("sharpness/")}
        assert da == db
    assert all(m.training for m in m1.modules())


def test_eval_mode_measures_the_eval_loss_and_restores_the_training_flags():
    model = _Net().double()
    g = torch.Generator().manual_seed(5)
    probe = (torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    collector = SharpnessCollector(every=1, loss_fn=_mse, probe=probe, eval_mode=True, tol=1e-8, n_iter=60)
    rec = _run(model, opt, collector, 1)[-1]
    assert all(m.training for m in model.modules())
    ref = copy.deepcopy(model).eval()
    names = [n for n, _ in ref.named_parameters()]
    params = [p.detach() for p in ref.parameters()]
    sizes = [p.numel() for p in params]

    def flat_loss(w):
        ps = [part.reshape(p.shape) for part, p in zip(torch.split(w, sizes), params, strict=True)]
        return _mse(lambda x: functional_call(ref, dict(zip(names, ps, strict=True)), (x,)), probe)

    h = torch.func.hessian(flat_loss)(torch.cat([p.reshape(-1) for p in params]))
    assert rec.get("sharpness/max") == pytest.approx(float(torch.linalg.eigvalsh(h).max()), rel=1e-7)


# -------------------------------------------------------------------------------- state and setup
def test_a_resumed_run_measures_what_an_uninterrupted_one_does():
    x, y = _least_squares(seed=2)

    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        return model, torch.optim.SGD(model.parameters(), lr=0.05)

    model, opt = fresh()
    whole = _run(model, opt, SharpnessCollector(every=1, loss_fn=_mse, probe=(x, y), tol=1e-12, n_iter=6), 4)

    model, opt = fresh()
    first = SharpnessCollector(every=1, loss_fn=_mse, probe=(x, y), tol=1e-12, n_iter=6)
    _run(model, opt, first, 2)
    state = copy.deepcopy(first.state_dict())
    assert set(state["vectors"]) == {"plain"}
    second = SharpnessCollector(every=1, loss_fn=_mse, probe=(x, y), tol=1e-12, n_iter=6)
    second.load_state_dict(state)  # before the monitor starts
    resumed = _run(model, opt, second, 2)
    assert [r.get("sharpness/max") for r in resumed] == [r.get("sharpness/max") for r in whole[2:]]
    with pytest.raises(ConfigError, match="load_state_dict"):
        second.load_state_dict({"vectors": 3})


def test_without_a_loss_fn_or_a_batch_it_says_so_once_and_emits_nothing(caplog):
    x, y = _least_squares()
    model = nn.Linear(4, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        recs = _run(model, opt, None, 3, batches=[(x, y)] * 3, every={"sharpness": 1})
    assert all(r.get("sharpness/max") is None for r in recs)
    assert sum("no loss_fn" in m for m in caplog.messages) == 1

    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="stabwatch"),
        sw.Monitor(model, opt, preset="cheap", collectors=[SharpnessCollector(1, loss_fn=_mse)], alerts=False) as mon,
    ):
        for _ in range(3):
            opt.zero_grad()
            loss = _mse(model, (x, y))
            loss.backward()
            opt.step()
            rec = mon.step(loss=loss)  # no batch=
            assert rec.get("sharpness/max") is None
    assert sum("no probe batch" in m for m in caplog.messages) == 1


def test_the_step_batch_is_used_without_a_probe():
    x, y = _least_squares(seed=4)
    model = nn.Linear(4, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    half = [(x[:32], y[:32]), (x[32:], y[32:])]
    recs = _run(model, opt, SharpnessCollector(every=1, loss_fn=_mse, tol=1e-10), 2, batches=half)
    for rec, (xb, _) in zip(recs, half, strict=True):
        assert rec.get("sharpness/max") == pytest.approx(
            float(torch.linalg.eigvalsh(2 * xb.T @ xb / 32).max()), rel=1e-9
        )


def test_groups_with_different_learning_rates_give_no_ratio(caplog):
    x, y = _least_squares()
    model = nn.Linear(4, 1).double()
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}])
    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        rec = _run(model, opt, SharpnessCollector(every=1, loss_fn=_mse, probe=(x, y)), 1)[-1]
    assert rec.get("sharpness/max") is not None and rec.get("sharpness/eos_ratio") is None
    assert any("different lr" in m for m in caplog.messages)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="n_iter"):
        SharpnessCollector(n_iter=0)
    with pytest.raises(ConfigError, match="tol"):
        SharpnessCollector(tol=0.0)
    with pytest.raises(ConfigError, match=r"unknown_option|Extra inputs"):
        SharpnessCollector(unknown_option=1)
    assert SharpnessCollector().every == SharpnessCollector.default_every


@pytest.mark.parametrize(("factor", "fires"), [(0.9, False), (1.1, True)])
def test_an_alert_rule_on_the_ratio_fires_exactly_beyond_the_edge(factor, fires):
    """Full-batch GD on least squares at η = factor · 2/λ_max: the ratio is `factor`, and the loss grows iff > 1."""
    x, y = _least_squares(seed=5)
    lam = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())
    model = nn.Linear(4, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=factor * 2 / lam)
    rule = sw.alerts.SustainedRule("sharpness/eos_ratio", above=1.0, patience=3, name="edge_of_stability")
    collector = SharpnessCollector(every=1, loss_fn=_mse, probe=(x, y), tol=1e-10)
    with sw.Monitor(model, opt, preset="cheap", collectors=[collector], alerts=[rule]) as mon:
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = _mse(model, (x, y))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            rec = mon.step(loss=loss)
            assert rec.get("sharpness/eos_ratio") == pytest.approx(factor, rel=1e-9)
    assert (losses[-1] > losses[0]) == fires
    assert [a.rule for a in mon.alerts if a.rule == "edge_of_stability"] == (["edge_of_stability"] if fires else [])
