"""The spiking collector on real snntorch networks, checked against the tensors the model recorded."""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.collectors.spiking import ADAPTERS, SpikingAdapter, SpikingCollector, register_adapter
from stabwatch.metrics import AlertReason
from tests.spiking.snn_models import (
    FIRING,
    Recorder,
    T,
    TwoLayerSNN,
    assert_matches,
    batch,
    reference,
    snn,
    train_step,
)

ONLY_SPIKING = {"update": None, "grad_sv": None, "weight": None, "activation": None, "spiking": 1}


def _monitor(model, opt, **kw):
    kw.setdefault("every", ONLY_SPIKING)
    kw.setdefault("alerts", False)
    return sw.Monitor(model, opt, **kw)


def test_snntorch_per_step_layers_match_recorded_spikes():
    model = TwoLayerSNN(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.rec = Recorder()
    with _monitor(model, opt) as mon:
        for step in range(3):
            model.rec.clear()
            rec = train_step(model, opt, seed=step, mon=mon)
            ref = reference(model.rec)
            assert_matches(rec, ref)
    assert rec.membrane_mean is not None and rec.membrane_threshold_distance is not None
    # the init_hidden Synaptic layer reports the membrane kept in `module.mem`
    assert set(rec.layers["lif2"]) >= {"membrane_mean", "membrane_std", "membrane_threshold_distance"}
    assert 0.0 < rec.firing_rate_mean < 1.0
    flat = rec.to_dict()
    assert flat["spiking_layers/dead_neuron_frac/lif1"] == rec.layers["lif1"]["dead_neuron_frac"]


def test_thresholds_options_change_dead_and_saturated():
    model = TwoLayerSNN(seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.rec = Recorder()
    with _monitor(model, opt, collectors=[SpikingCollector(dead_threshold=0.2, saturated_threshold=0.5)]) as mon:
        rec = train_step(model, opt, seed=0, mon=mon)
    assert_matches(rec, reference(model.rec, dead=0.2, sat=0.5))


def test_time_major_snntorch_layers():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.par = snn.LeakyParallel(input_size=10, hidden_size=16)
            self.fc = nn.Linear(16, 8)
            self.state = snn.StateLeaky(beta=0.8, channels=8, output=True)
            self.rec = Recorder()

        def forward(self, x):  # [T, B, 10]
            s1 = self.par(x)
            s2, mem = self.state(self.fc(s1) * 3)
            self.rec.add("par", s1, None, None, tdim=0)
            self.rec.add("state", s2, mem, self.state.threshold, tdim=0)
            return s2

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _monitor(model, opt) as mon:
        x, _ = batch(0)
        loss = model(x).sum()
        loss.backward()
        opt.step()
        rec = mon.step(loss=loss)
    assert_matches(rec, reference(model.rec))
    assert "membrane_mean" not in rec.layers["par"]  # LeakyParallel exposes no membrane


def test_custom_adapter_batch_major_conv_neurons_and_bool_spikes():
    class ConvLIF(nn.Module):
        """Batch-major [B, T, C, H, W] bool spikes; membrane in `self.u`, threshold per channel."""

        def __init__(self) -> None:
            super().__init__()
            self.theta = torch.tensor([0.2, 0.5, 0.8]).view(3, 1, 1)

        def forward(self, x):
            self.u = x
            return x > self.theta

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.lif = ConvLIF()

        def forward(self, x):  # [B, T, 2, 5, 5]
            b, t = x.shape[:2]
            y = torch.sigmoid(self.conv(x.flatten(0, 1))).unflatten(0, (b, t))
            return self.lif(y)

    adapter = SpikingAdapter(ConvLIF, spikes=0, membrane="u", threshold="theta", time_dim=1)
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 6, 2, 5, 5)
    with _monitor(model, opt, collectors=[SpikingCollector(adapters=[adapter])]) as mon:
        s = model(x)
        loss = model.conv.weight.sum()
        loss.backward()
        opt.step()
        rec = mon.step(loss=loss)
    r = Recorder()
    r.add("lif", s.float(), model.lif.u, model.lif.theta, tdim=1)
    assert_matches(rec, reference(r))
    rates = s.float().mean(dim=(0, 1))  # neurons are (c, h, w) positions: 75 of them
    assert rec.dead_neuron_frac == pytest.approx(float((rates < 0.01).float().mean()))


def test_unscheduled_steps_are_empty_and_do_not_accumulate():
    model = TwoLayerSNN(seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.rec = Recorder()
    every = {**ONLY_SPIKING, "spiking": None}
    with _monitor(model, opt, every=every, collectors=[SpikingCollector(3, dense_steps=0)]) as mon:
        for step in range(7):
            model.rec.clear()
            rec = train_step(model, opt, seed=step, mon=mon)
            if step % 3:
                assert all(getattr(rec, f) is None for f in FIRING)
                assert not any("firing_rate_mean" in v for v in rec.layers.values())
            else:  # only this step's spikes, none from the skipped steps
                assert_matches(rec, reference(model.rec))


def test_eval_mode_calls_are_ignored_unless_asked():
    model = TwoLayerSNN(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.rec = Recorder()
    with _monitor(model, opt) as mon:
        model.eval()
        with torch.no_grad():
            model(torch.ones(T, 5, 10))  # a validation pass inside the step: not part of training
        model.train()
        rec = train_step(model, opt, seed=0, mon=mon)
    assert_matches(rec, reference(model.rec))

    every = {**ONLY_SPIKING, "spiking": None}
    with _monitor(model, opt, every=every, collectors=[SpikingCollector(every=1, training_only=False)]) as mon:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(T, 5, 10))
        model.train()
        model.rec.clear()
        rec_all = train_step(model, opt, seed=0, mon=mon)
    # 5 extra samples x T steps of an all-zero input lower the rates of lif1 (its input is only the bias)
    ref = reference(model.rec)
    assert rec_all.layers["lif1"]["firing_rate_mean"] != pytest.approx(ref["lif1"]["firing_rate_mean"])


def test_learnable_and_per_neuron_thresholds_use_the_forward_time_values():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(10, 16)
            theta = torch.linspace(0.5, 1.5, 16)
            self.lif = snn.Leaky(beta=0.9, threshold=theta, learn_threshold=True)
            self.rec = Recorder()

        def forward(self, x):
            mem = self.lif.init_leaky()
            out = []
            for t in range(x.shape[0]):
                spk, mem = self.lif(self.fc(x[t]) * 2, mem)
                self.rec.add("lif", spk, mem, self.lif.threshold)
                out.append(spk)
            return torch.stack(out)

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # moves the threshold a lot at opt.step()
    with _monitor(model, opt) as mon:
        x, _ = batch(0)
        before = model.lif.threshold.detach().clone()
        loss = model(x).sum() + model.lif.threshold.sum()
        loss.backward()
        opt.step()
        assert not torch.equal(before, model.lif.threshold)
        rec = mon.step(loss=loss)
    assert_matches(rec, reference(model.rec))


def test_varying_batch_size_within_a_step():
    model = TwoLayerSNN(seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.rec = Recorder()
    with _monitor(model, opt) as mon:
        x1, _ = batch(1, b=7)
        x2, _ = batch(2, b=3)
        loss = model(x1).sum() + model(x2).sum()
        loss.backward()
        opt.step()
        rec = mon.step(loss=loss)
    assert_matches(rec, reference(model.rec))


def test_hooks_removed_no_tensors_kept_and_memory_flat():
    model = TwoLayerSNN(seed=6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = sum(len(m._forward_hooks) for m in model.modules())
    mon = _monitor(model, opt, max_records=5)
    coll = next(c for c in mon.collectors if c.family == "spiking")
    counts = []
    with mon:
        assert coll.layers == ["lif1", "lif2"]
        for step in range(40):
            train_step(model, opt, seed=step, mon=mon)
            assert len(coll._sums) == 2 and all(not s.spikes and not s.v and s.th_run is None for s in coll._sums)
            if step in (10, 39):
                gc.collect()
                counts.append(sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor)))
    assert counts[1] <= counts[0]
    assert sum(len(m._forward_hooks) for m in model.modules()) == before
    assert coll._sums == []


def test_monitoring_does_not_change_training():
    def run(monitored: bool) -> list[torch.Tensor]:
        model = TwoLayerSNN(seed=7)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        if monitored:
            with sw.Monitor(model, opt, preset="full") as mon:
                for step in range(5):
                    train_step(model, opt, seed=step, mon=mon)
        else:
            for step in range(5):
                train_step(model, opt, seed=step)
        return [p.detach().clone() for p in model.parameters()]

    plain, monitored = run(False), run(True)
    assert len(plain) == len(monitored) > 0
    for a, b in zip(plain, monitored, strict=True):
        assert torch.equal(a, b)


def test_a_failing_adapter_never_stops_training(caplog):
    class Boom(nn.Module):
        def forward(self, x):
            return (x > 0).float()

    def broken(module, out):
        raise RuntimeError("adapter bug")

    model = nn.Sequential(nn.Linear(4, 4), Boom())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    adapter = SpikingAdapter(Boom, spikes=broken)
    with (
        caplog.at_level(logging.WARNING, logger="stabwatch"),
        _monitor(model, opt, collectors=[SpikingCollector(adapters=[adapter])]) as mon,
    ):
        for _ in range(3):
            opt.zero_grad()
            loss = model[0](torch.randn(2, 4)).sum()
            model(torch.randn(2, 4))
            loss.backward()
            opt.step()
            rec = mon.step(loss=loss)
    assert rec.grad_norm is not None and rec.firing_rate_mean is None
    warnings = [r for r in caplog.records if "spiking hook failed" in r.getMessage()]
    assert len(warnings) == 1 and "adapter bug" in warnings[0].getMessage()


def test_neuron_shape_change_within_a_step_is_reported(caplog):
    model = TwoLayerSNN(seed=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    lif = snn.Leaky(beta=0.9)
    with caplog.at_level(logging.WARNING, logger="stabwatch"), _monitor(nn.ModuleList([model, lif]), opt) as mon:
        lif(torch.randn(3, 4))
        lif(torch.randn(3, 5))  # same layer, different neurons: an adapter / layout mistake
        rec = train_step(model, opt, seed=0, mon=mon)
    msg = next(r.getMessage() for r in caplog.records if "spiking hook failed" in r.getMessage())
    assert "'1': neurons (5,) differ from (4,)" in msg
    assert rec.layers["1"]["firing_rate_mean"] is not None  # the consistent calls still count


def test_adapter_and_option_validation():
    with pytest.raises(sw.StabwatchError, match="match must be a module class"):
        SpikingAdapter("Leaky")  # type: ignore[arg-type]
    with pytest.raises(sw.StabwatchError, match="spikes must be an output index"):
        SpikingAdapter(nn.ReLU, spikes="out")  # type: ignore[arg-type]
    with pytest.raises(sw.StabwatchError, match="membrane must be None, an output index"):
        SpikingAdapter(nn.ReLU, membrane=1.5)  # type: ignore[arg-type]
    with pytest.raises(sw.StabwatchError, match="threshold must be None, a number"):
        SpikingAdapter(nn.ReLU, threshold=True)  # type: ignore[arg-type]
    with pytest.raises(sw.StabwatchError, match=r"time_dim must be None \(one call per step"):
        SpikingAdapter(nn.ReLU, time_dim=2)
    model = TwoLayerSNN()
    with pytest.raises(sw.StabwatchError, match="dead_threshold < saturated_threshold"):
        sw.Monitor(model, collectors=[SpikingCollector(dead_threshold=0.5, saturated_threshold=0.4)])
    with pytest.raises(sw.StabwatchError, match=r"dead_threshold=-0\.1"):
        SpikingCollector(dead_threshold=-0.1)
    with pytest.raises(sw.StabwatchError, match=r"adapters\[0\] must be a stabwatch SpikingAdapter"):
        SpikingCollector(adapters=[object()])
    with pytest.raises(sw.StabwatchError, match=r"SpikingCollector\(dead_threshold=...\)"):
        sw.Monitor(model, spiking_dead_threshold=0.2)
    with pytest.raises(sw.StabwatchError, match="expected a SpikingAdapter"):
        register_adapter(nn.ReLU)  # type: ignore[arg-type]


def test_register_adapter_process_wide_and_unregister():
    class MyNeuron(nn.Module):
        def forward(self, x):
            self.v = x
            return (x > 0.5).float(), x

    adapter = register_adapter(SpikingAdapter(MyNeuron, membrane=1, threshold=0.5))
    try:
        model = nn.Sequential(nn.Linear(3, 5), MyNeuron())
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with _monitor(model, opt) as mon:
            spk, v = model(torch.randn(9, 3))
            loss = v.sum()
            loss.backward()
            opt.step()
            rec = mon.step(loss=loss)
        r = Recorder()
        r.add("1", spk, v, 0.5)
        assert_matches(rec, reference(r))
    finally:
        ADAPTERS.unregister(adapter)
    assert ADAPTERS.find(MyNeuron()) is None


def test_non_spiking_models_are_unaffected():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sw.Monitor(model, opt, preset="full") as mon:
        loss = model(torch.randn(3, 4)).sum()
        loss.backward()
        opt.step()
        rec = mon.step(loss=loss)
    assert rec.firing_rate_mean is None and rec.grad_norm is not None


@pytest.mark.slow
def test_dead_layer_alert_names_the_silent_layer():
    model = TwoLayerSNN(seed=9)
    with torch.no_grad():
        model.fc1.bias.fill_(-20.0)  # lif1 can never reach its threshold
        model.fc1.weight.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with sw.Monitor(model, opt, every={"spiking": 1}) as mon:
        for step in range(5):
            rec = train_step(model, opt, seed=step, mon=mon)
    assert rec.layers["lif1"]["dead_neuron_frac"] == 1.0 and rec.layers["lif1"]["firing_rate_mean"] == 0.0
    dead = [a for a in mon.alerts if a.reason in (AlertReason.DEAD_NEURONS, AlertReason.SILENT_LAYER)]
    assert dead and {a.layer for a in dead} >= {"lif1"}
    assert all(a.suggestion for a in dead)
    text = mon.diagnose()
    assert "lif1" in text and "threshold" in text
    assert np.isfinite(rec.layers["lif1"]["membrane_threshold_distance"])
    assert rec.layers["lif1"]["membrane_threshold_distance"] > 5.0  # far below threshold
