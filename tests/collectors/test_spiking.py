"""`SpikingCollector` on its own, on a real snntorch network: firing and membrane statistics against a
float64 numpy reference computed from the tensors the model recorded itself (no hooks)."""

from __future__ import annotations

import torch

from stabwatch.collectors import SpikingCollector
from tests.collectors.drive import Drive
from tests.spiking.snn_models import FIRING, Recorder, TwoLayerSNN, assert_matches, batch, reference


def _forward_collect(drive: Drive, model: TwoLayerSNN, seed: int, *, calls: int = 1):
    model.rec = Recorder()
    for i in range(calls):  # several forward passes in one step are pooled
        model(batch(seed + 100 * i)[0])
    values = drive.collect()
    return values, model.rec


def test_statistics_match_the_recorded_tensors():
    model = TwoLayerSNN(seed=1, bias2=0.5)
    drive = Drive(SpikingCollector(every=1), model)
    for step, calls in enumerate((1, 2)):
        values, rec = _forward_collect(drive, model, seed=step, calls=calls)
        ref = reference(rec)
        assert sorted(k for k in ref if k is not None) == ["lif1", "lif2"]
        assert_matches(values.record(step), ref)
        assert values.layers("membrane_threshold_distance").keys() == {"lif1", "lif2"}
    drive.close()


def test_thresholds_decide_dead_and_saturated():
    model = TwoLayerSNN(seed=2, bias2=2.0)
    drive = Drive(SpikingCollector(every=1, dead_threshold=0.2, saturated_threshold=0.5), model)
    values, rec = _forward_collect(drive, model, seed=0)
    ref = reference(rec, dead=0.2, sat=0.5)
    assert ref[None]["saturated_neuron_frac"] > 0 and ref[None]["dead_neuron_frac"] > 0
    assert_matches(values.record(0), ref)
    drive.close()


def test_eval_mode_calls_and_unscheduled_steps_are_ignored():
    model = TwoLayerSNN(seed=3)
    drive = Drive(SpikingCollector(every=2, dense_steps=0), model)
    model.eval()
    with torch.no_grad():
        values, _ = _forward_collect(drive, model, seed=0)  # step 0 is scheduled, but eval mode
    assert len(values) == 0
    model.train()
    values, _ = _forward_collect(drive, model, seed=1)  # step 1: not scheduled
    assert len(values) == 0
    values, rec = _forward_collect(drive, model, seed=2)
    assert all(values.field(f) is not None for f in FIRING) and len(FIRING) == 4
    assert_matches(values.record(2), reference(rec))
    drive.close()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
