"""Surrogate-gradient health, the dense start of the spiking schedule, and overhead that counts the hooks.

Surrogate derivatives are checked against the hand-written formulas of each library's surrogate; the
collector's per-layer values against the same formula applied to the membranes the model recorded.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.collectors.base import hook_dispatch_seconds
from stabwatch.collectors.spiking import SpikingAdapter, SpikingCollector
from stabwatch.errors import ConfigError, StabwatchError
from stabwatch.functional.spiking import near_threshold_fraction, surrogate_derivative, surrogate_statistics
from stabwatch.schedules import dense_start, every, never
from tests.spiking.snn_models import FIRING, Recorder, TwoLayerSNN, snn, train_step

surrogate = snn.surrogate
ONLY_SPIKING = {"update": None, "grad_sv": None, "weight": None, "activation": None, "nonfinite": None, "spiking": None}


def _fast_sigmoid_grad(u: np.ndarray, k: float) -> np.ndarray:
    return 1.0 / (1.0 + k * np.abs(u)) ** 2


# functional ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [25.0, 500.0])
def test_surrogate_derivative_of_snntorch_fast_sigmoid_is_the_formula(slope):
    u = torch.linspace(-1.5, 1.5, 301)
    got = surrogate_derivative(surrogate.fast_sigmoid(slope=slope), u)
    np.testing.assert_allclose(got.numpy(), _fast_sigmoid_grad(u.double().numpy(), slope), rtol=1e-6, atol=1e-9)


def test_surrogate_derivative_of_snntorch_atan_and_spikingjelly_sigmoid():
    u = torch.linspace(-1.0, 1.0, 101)
    a = 2.0
    atan = 1 / math.pi / (1 + (math.pi / 2 * a * u.double()) ** 2) * (a / 2) * math.pi  # alpha/2 / (1 + (pi/2 a u)^2)
    np.testing.assert_allclose(surrogate_derivative(surrogate.atan(alpha=a), u).numpy(), atan.numpy(), rtol=1e-6)
    sj = pytest.importorskip("spikingjelly.activation_based.surrogate")
    s = torch.sigmoid(4.0 * u.double())
    np.testing.assert_allclose(
        surrogate_derivative(sj.Sigmoid(alpha=4.0), u).numpy(), (4.0 * s * (1 - s)).numpy(), rtol=1e-5, atol=1e-7
    )


def test_surrogate_statistics_window_and_mean_against_the_formula():
    k = 25.0
    u = torch.tensor([0.0, 0.01, -0.016, 0.017, 0.3, -2.0, 0.5, 0.002])
    g = _fast_sigmoid_grad(u.double().numpy(), k)
    half_width = (math.sqrt(2) - 1) / k  # 1 / (1 + k|u|)^2 = 1/2
    stats = surrogate_statistics(surrogate.fast_sigmoid(slope=k), u)
    assert stats[0].item() == pytest.approx(g.mean(), rel=1e-6)
    assert stats[1].item() == pytest.approx(np.mean(np.abs(u.numpy()) <= half_width)) == 0.5
    assert near_threshold_fraction(u, half_width).item() == 0.5
    rows = surrogate_statistics(surrogate.fast_sigmoid(slope=k), u, [3, 5, 0])
    assert rows[0, 0].item() == pytest.approx(g[:3].mean(), rel=1e-6)
    assert rows[1, 0].item() == pytest.approx(g[3:].mean(), rel=1e-6)
    assert torch.isnan(rows[2]).all()
    with pytest.raises(StabwatchError, match="do not add up"):
        surrogate_statistics(surrogate.fast_sigmoid(slope=k), u, [3, 3])


def test_a_surrogate_without_gradient_lets_none_through():
    u = torch.tensor([-0.5, 0.0, 0.5])
    assert surrogate_derivative(lambda x: (x > 0).float(), u).tolist() == [0.0, 0.0, 0.0]
    stats = surrogate_statistics(lambda x: (x > 0).float(), u)
    assert stats[0].item() == 0.0 and math.isnan(stats[1].item())


def test_stochastic_surrogate_leaves_the_global_rng_alone():
    u = torch.randn(1000)
    fn = surrogate.SSO(mean=0.0, variance=0.2)
    # the stochastic surrogate does draw from the global RNG in its backward ...
    state = torch.get_rng_state()
    x = u.clone().requires_grad_(True)
    fn(x).sum().backward()
    assert not torch.equal(state, torch.get_rng_state())
    # ... but not through surrogate_derivative
    state = torch.get_rng_state()
    surrogate_derivative(fn, u)
    assert torch.equal(state, torch.get_rng_state())


def test_surrogate_derivative_leaves_its_input_and_grad_mode_alone():
    u = torch.randn(10, requires_grad=True)
    before = u.detach().clone()
    with torch.no_grad():
        g = surrogate_derivative(surrogate.fast_sigmoid(slope=25), u)
    assert not g.requires_grad and u.grad is None and torch.equal(u.detach(), before)
    with pytest.raises(StabwatchError, match="callable"):
        surrogate_derivative("fast_sigmoid", u)  # type: ignore[arg-type]


# the collector -------------------------------------------------------------------------------------
def _all_values_collector(**kw) -> SpikingCollector:
    # 4 x the elements of one call: every call keeps all its rows, so the reference is exact
    return SpikingCollector(1, surrogate_samples=4 * 64 * 24, **kw)


def test_collector_surrogate_grad_equals_the_formula_on_the_recorded_membranes():
    model = TwoLayerSNN(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.rec = Recorder()
    with sw.Monitor(model, opt, every=ONLY_SPIKING, alerts=False, collectors=[_all_values_collector()]) as mon:
        rec = train_step(model, opt, seed=0, mon=mon)
    per_layer, neurons = {}, {"lif1": 24, "lif2": 6}
    half_width = (math.sqrt(2) - 1) / 25
    for layer, items in model.rec.membrane.items():
        gap = np.concatenate([(v.double().numpy() - float(th)).reshape(-1) for v, th in items])
        per_layer[layer] = _fast_sigmoid_grad(gap, 25.0).mean()
        assert rec.extra[f"spiking/surrogate_grad/{layer}"] == pytest.approx(per_layer[layer], rel=1e-5)
        frac = np.mean(np.abs(gap) <= half_width)
        assert rec.extra[f"spiking/near_threshold_frac/{layer}"] == pytest.approx(frac, abs=1e-6)
    pooled = sum(per_layer[k] * neurons[k] for k in per_layer) / sum(neurons.values())
    assert rec.extra["spiking/surrogate_grad"] == pytest.approx(pooled, rel=1e-5)
    flat = rec.to_dict()
    assert flat["spiking_layers/surrogate_grad/lif1"] == rec.extra["spiking/surrogate_grad/lif1"]
    assert 0.0 < rec.extra["spiking/surrogate_grad"] < 1.0


def test_sampled_surrogate_grad_is_close_to_the_full_one_and_a_steeper_surrogate_reads_lower():
    def run(slope: float, samples: int) -> float:
        model = TwoLayerSNN(seed=2)
        for lif in (model.lif1, model.lif2):
            lif.spike_grad = surrogate.fast_sigmoid(slope=slope)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        coll = SpikingCollector(1, surrogate_samples=samples)
        with sw.Monitor(model, opt, every=ONLY_SPIKING, alerts=False, collectors=[coll]) as mon:
            values = [train_step(model, opt, seed=s, mon=mon).extra["spiking/surrogate_grad"] for s in range(3)]
        return float(np.mean(values))

    full, sampled = run(25, 4 * 64 * 24), run(25, 512)
    assert sampled == pytest.approx(full, rel=0.25)
    assert run(500, 512) < 0.2 * sampled


def test_without_a_reachable_surrogate_only_the_window_fraction_with_a_width():
    class Plain(nn.Module):
        def forward(self, x):
            self.v = x
            return (x > 1.0).float()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.lif = Plain()

        def forward(self, x):
            return self.lif(self.fc(x))

    adapter = SpikingAdapter(Plain, spikes=0, membrane="v", threshold=1.0)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    for width, expect in ((None, False), (0.25, True)):
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        coll = SpikingCollector(1, adapters=[adapter], surrogate_width=width, surrogate_samples=4 * 16 * 8)
        with sw.Monitor(model, opt, every=ONLY_SPIKING, alerts=False, collectors=[coll]) as mon:
            v = model.fc(x).detach()
            model(x)
            rec = mon.step()
        assert "spiking/surrogate_grad" not in rec.extra and rec.firing_rate_mean is not None
        assert ("spiking/near_threshold_frac" in rec.extra) is expect
        if expect:
            frac = ((v - 1.0).abs() <= width).double().mean().item()
            assert rec.extra["spiking/near_threshold_frac/lif"] == pytest.approx(frac)
    with pytest.raises(StabwatchError, match="surrogate must be"):
        SpikingAdapter(Plain, surrogate=3)  # type: ignore[arg-type]


def test_adapter_surrogate_from_attribute_or_callable():
    lif = snn.Leaky(beta=0.9, spike_grad=surrogate.fast_sigmoid(slope=25))
    assert SpikingAdapter(snn.Leaky, surrogate="spike_grad").surrogate_fn(lif) is lif.spike_grad
    fn = surrogate.atan()
    assert SpikingAdapter(snn.Leaky, surrogate=lambda m: fn).surrogate_fn(lif) is fn
    assert SpikingAdapter(snn.Leaky, surrogate="missing").surrogate_fn(lif) is None


def test_norse_and_spikingjelly_surrogates_are_reached():
    from stabwatch.collectors.spiking import builtin_adapters

    sj = pytest.importorskip("spikingjelly.activation_based.neuron")
    node = sj.LIFNode()
    adapters = builtin_adapters()
    sj_adapter = next(a for a in adapters if a.matches(node))
    assert sj_adapter.surrogate_fn(node) is node.surrogate_function
    norse = pytest.importorskip("norse.torch")
    cell = norse.LIFCell()
    fn = next(a for a in adapters if a.matches(cell)).surrogate_fn(cell)
    assert fn is not None
    u = torch.linspace(-0.5, 0.5, 11)
    # norse 1.1's SuperSpike backward is 1 / (|u| + 1)^2: it ignores p.alpha (100), and so does the metric,
    # which measures what the library's surrogate lets through
    np.testing.assert_allclose(surrogate_derivative(fn, u).numpy(), _fast_sigmoid_grad(u.numpy(), 1.0), rtol=1e-5)


# the dense start -----------------------------------------------------------------------------------
def test_dense_start_schedule():
    s = dense_start(every(10), 4)
    assert [i for i in range(35) if s(i)] == [0, 1, 2, 3, 10, 20, 30]
    assert s.period == 10 and s.dense_steps == 4  # type: ignore[attr-defined]
    assert dense_start(never, 20) is never
    base = every(7)
    assert dense_start(base, 0) is base
    with pytest.raises(ConfigError, match=r"dense_start\.steps"):
        dense_start(every(10), -1)
    with pytest.raises(ConfigError, match="callable"):
        dense_start(10, 5)  # type: ignore[arg-type]


def test_spiking_family_is_dense_first_then_on_its_period_and_hooks_only_on_scheduled_steps():
    model = TwoLayerSNN(seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    hooks: list[int] = []

    def count_hooks(module, args):
        hooks.append(len(model.lif1._forward_hooks))

    model.fc1.register_forward_pre_hook(count_hooks)
    coll = SpikingCollector(4, dense_steps=3)
    measured = []
    with sw.Monitor(model, opt, every=ONLY_SPIKING, alerts=False, collectors=[coll]) as mon:
        for step in range(10):
            hooks.clear()
            rec = train_step(model, opt, seed=step, mon=mon)
            on = rec.firing_rate_mean is not None
            measured.append(step) if on else None
            assert set(hooks) == {1 if on else 0}  # the hook is on the module only on measured steps
    assert measured == [0, 1, 2, 4, 8]
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_default_and_preset_schedules_start_dense_and_off_stays_off():
    model = TwoLayerSNN(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with sw.Monitor(model, opt, alerts=False) as mon:  # the default preset: spiking every 10 after 20
        steps = [s for s in range(25) if train_step(model, opt, seed=s, mon=mon).firing_rate_mean is not None]
    assert steps == list(range(21))
    assert SpikingCollector().dense_steps == 20
    with sw.Monitor(model, opt, alerts=False, every={"spiking": None}) as mon:
        rec = train_step(model, opt, seed=0, mon=mon)
    assert all(getattr(rec, f) is None for f in FIRING)
    coll = SpikingCollector(10)
    coll.reschedule(5)
    assert [s for s in range(26) if coll.scheduled(s)] == [*range(20), 20, 25]


# overhead ------------------------------------------------------------------------------------------
def test_overhead_counts_the_hook_bodies_and_their_dispatch():
    sleep_s = 0.002

    def slow_spikes(module, out):
        time.sleep(sleep_s)  # an adapter that takes time: a lower bound on what the hooks cost
        return out[0]

    slow = SpikingAdapter(snn.Leaky, spikes=slow_spikes, membrane=1, threshold="threshold", name="slow")
    model = TwoLayerSNN(seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    coll = SpikingCollector(2, dense_steps=0, adapters=[slow])
    with sw.Monitor(model, opt, every=ONLY_SPIKING, alerts=False, collectors=[coll]) as mon:
        measured = train_step(model, opt, seed=0, mon=mon)
        assert coll.hook_calls == 0 and coll.elapsed == 0.0  # taken into the record
        skipped = train_step(model, opt, seed=1, mon=mon)
    calls = 8  # T forward calls of lif1 on the measured step
    assert measured.overhead_ms >= calls * sleep_s * 1e3
    assert skipped.overhead_ms < calls * sleep_s * 1e3  # no hook ran on the unscheduled step
    # the dispatch estimate is what the count multiplies
    d = hook_dispatch_seconds()
    assert 0.0 <= d < 1e-3 and math.isfinite(d)
    coll.elapsed, coll.hook_calls = 0.5, 1000
    assert coll.take_hook_time() == pytest.approx(0.5 + 1000 * d)
    assert coll.take_hook_time() == 0.0


def test_membrane_sample_takes_strided_rows_and_thins_large_rows():
    from stabwatch.collectors.spiking import _gap_sample

    v, th = torch.randn(64, 24), torch.rand(24)
    # 11 rows of 24 cover a budget of 256; every 5th row, starting at the call's offset
    assert torch.equal(_gap_sample(v, th, 256, 3), (v[3::5][:11] - th).reshape(-1))
    assert torch.equal(_gap_sample(v, 1.0, 256, 7), (v[2::5][:11] - 1.0).reshape(-1))
    # a per-sample threshold [B, N] is sliced with the rows
    th_rows = torch.rand(64, 24)
    assert torch.equal(_gap_sample(v, th_rows, 256, 1), (v[1::5][:11] - th_rows[1::5][:11]).reshape(-1))
    # a conv layer's row (one sample's [C, H, W] map) larger than the budget: every 3rd element of it
    v4, th_c = torch.randn(4, 3, 10, 10), torch.rand(3, 1, 1)
    assert torch.equal(_gap_sample(v4, th_c, 100, 1), (v4[1] - th_c).reshape(-1)[::3])
