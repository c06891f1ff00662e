"""`stabwatch.compat` against the hand-written SNN monitor it replaces, driven with the same calls.

The reference is ``../shared/references/snn-stability-monitor-reference.py.txt``; the stored text lost its
indentation, so ``tests/test_compat_reference.py`` holds it with the indentation restored, and
`test_the_reference_copy_is_the_shared_text` checks line by line (whitespace stripped) that it is that text.
Each run trains a small snntorch network (healthy, dead, exploding) and, after every ``backward()``, calls
both monitors with the same arguments, then compares every public return value and the printed text.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stabwatch import compat
from stabwatch.functional.spiking import firing_statistics

snn = pytest.importorskip("snntorch", reason="snntorch is a test dependency (pip install -e '.[dev]')")

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "references" / "snn-stability-monitor-reference.py.txt"
_spec = importlib.util.spec_from_file_location("snn_monitor_reference", HERE / "test_compat_reference.py")
assert _spec is not None and _spec.loader is not None
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def test_the_reference_copy_is_the_shared_text():
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not present (only in the project's workspace)")
    shared = [line.strip() for line in SHARED.read_text(encoding="utf-8").splitlines()]
    shared = [line for line in shared if line and line != "|"]  # the stored text's frame
    mine = (HERE / "test_compat_reference.py").read_text(encoding="utf-8").splitlines()
    body = mine[next(i for i, line in enumerate(mine) if not line.startswith("#")) :]  # after the header
    assert [line.strip() for line in body if line.strip()] == shared


class _SNN(nn.Module):
    """Two leaky layers; records the hidden layer's spikes and membrane ``[B, T, H]`` as SNN code does."""

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.lif1 = nn.Linear(12, 24), snn.Leaky(beta=0.9)
        self.fc2, self.lif2 = nn.Linear(24, 3), snn.Leaky(beta=0.9)
        with torch.no_grad():
            self.fc1.bias.add_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spikes, membranes, out = [], [], []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            _, mem2 = self.lif2(self.fc2(spk1), mem2)
            spikes.append(spk1)
            membranes.append(mem1)
            out.append(mem2)
        self.spk_rec = torch.stack(spikes, dim=1)
        self.mem_rec = torch.stack(membranes, dim=1)
        return torch.stack(out).mean(0)


def _run(kind: str, steps: int = 24):
    """Train a run of ``kind`` and yield after each backward: (model, the keyword arguments of compute)."""
    torch.manual_seed(0)
    model = _SNN(bias=-5.0 if kind == "dead" else 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = (torch.rand(6, 8, 12, generator=g) < 0.4).float()  # [T, B, 12]
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if kind == "exploding":
            loss = loss * 1.6**i  # the gradient grows 1.6x per step, as in a run that diverges
        loss.backward()
        lyap = torch.tensor(0.9 - 0.08 * i) if kind != "dead" else -0.7 - 0.01 * i  # a tensor, or a float
        yield model, {"lyapunov": lyap, "spikes": model.spk_rec, "membrane": model.mem_rec, "compute_sv": i % 5 == 4}
        opt.step()


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("kind", ["healthy", "dead", "exploding"])
def test_same_calls_same_answers(kind, one_thread):
    mine, theirs = compat.StabilityMonitor(), ref.StabilityMonitor()
    for model, kwargs in _run(kind):
        a, b = mine.compute(model, **kwargs), theirs.compute(model, **kwargs)
        da, db = a.to_dict(), b.to_dict()
        if kwargs["compute_sv"]:  # intentional difference: smallest *non-zero* singular value (see the docs)
            assert da.pop("grad_max_sv") == pytest.approx(db.pop("grad_max_sv"), rel=1e-5)
            for key in ("grad_min_sv", "grad_condition"):
                assert da.pop(key) >= 0 and db.pop(key) is not None  # 0 / inf for an all-zero gradient
        _close(da, db)
        assert str(a) == str(b)
        for name in ("lyap_history", "grad_history", "fr_history"):
            np.testing.assert_allclose(getattr(mine, name), getattr(theirs, name), rtol=1e-12)
        assert mine.get_trends() == theirs.get_trends()
        ours, refs = mine.diagnose().splitlines(), theirs.diagnose().splitlines()
        assert ours[: len(refs)] == refs  # the reference's lines, word for word
        assert ours[len(refs)] == "" and ours[len(refs) + 1].startswith("--- stabwatch: ")
        spikes, membrane = kwargs["spikes"], kwargs["membrane"]
        assert mine.compute_firing_stats(spikes) == pytest.approx(theirs.compute_firing_stats(spikes), rel=1e-6)
        assert mine.compute_membrane_stats(membrane) == pytest.approx(theirs.compute_membrane_stats(membrane), rel=1e-6)
        assert mine.compute_gradient_norm(model) == pytest.approx(theirs.compute_gradient_norm(model), rel=1e-12)
    assert a.record is not None and a.record.step == 23 and len(mine.records) == 24
    for name, rho in compat.analyze_weight_spectrum(model).items():
        assert rho == pytest.approx(ref.analyze_weight_spectrum(model)[name], rel=1e-5)


def test_the_runs_show_what_they_are_meant_to(one_thread):
    trends = {}
    for kind in ("healthy", "dead", "exploding"):
        mon = compat.StabilityMonitor()
        for model, kwargs in _run(kind):
            mon.compute(model, **kwargs)
        trends[kind] = (mon.get_trends(), mon.diagnose(), {a.reason.value for a in mon.alerts})
    assert trends["healthy"][0] == {
        "lyapunov": "✓ DECREASING (stabilizing)",
        "gradients": "✓ STABLE",
        "firing": "✓ HEALTHY",
    }
    assert trends["dead"][0]["firing"] == "⚠️ DEAD NETWORK"
    assert trends["exploding"][0]["gradients"] == "⚠️ EXPLODING"
    assert "exploding_gradient" in trends["exploding"][2] and "silent_layer" in trends["dead"][2]
    for found, text, _ in trends.values():  # every warning of get_trends is in diagnose, never "no sign"
        warnings = [word for word in found.values() if word.startswith("⚠️")]
        assert all(word in text for word in warnings) and (not warnings or "none — no sign" not in text)
    text = trends["exploding"][1]
    assert "Gradient norm: avg=" in text and " → ⚠️ EXPLODING" in text and "likely causes" in text
    assert "Network is OVER-STABLE" in trends["dead"][1] and "[network]" not in trends["healthy"][1]


def test_diagnose_states_every_trend_warning_as_a_cause():
    """A get_trends warning no rule alerted on (here: the firing rate of the last 10 records just under
    0.01, above the silent-layer rule's floor) is listed among the causes: the two parts never disagree."""
    mon = compat.StabilityMonitor(rules=[])  # no alert rules at all
    model = nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    for _ in range(10):
        mon.compute(model, spikes=torch.full((4, 100), 0.005))
    text = mon.diagnose()
    assert mon.get_trends()["firing"] == "⚠️ DEAD NETWORK" and "get_trends: ⚠️ DEAD NETWORK" in text
    assert "the network stopped firing" in text and "none — no sign" not in text
    mon = compat.StabilityMonitor()
    for i in range(12):  # the exponent rises; diagnose's reference lines do not print the lyapunov trend
        mon.compute(model, lyapunov=-0.5 + 0.08 * i)
    text = mon.diagnose()
    assert mon.get_trends()["lyapunov"] == "⚠️ INCREASING (becoming unstable)" and "EDGE OF CHAOS" in text
    assert "get_trends: ⚠️ INCREASING (becoming unstable)" in text and "lambda_reg" in text.split("---")[-1]


def test_a_rate_exactly_at_the_threshold_is_judged_in_float32_as_the_reference_does():
    # 9 spikes in 9 samples of 10 steps: the rate is 0.1 exactly, but the reference's float32 means
    # (0.9 in one sample, then the mean over 9 samples) give 0.099999994 < float32(0.1): dead at 0.1
    spikes = torch.zeros(9, 10, 4)
    spikes[0, :9, 0] = 1.0
    spikes[:, :5, 1] = 1.0  # rate 0.5
    mine = compat.StabilityMonitor(dead_threshold=0.1, saturated_threshold=0.5)
    theirs = ref.StabilityMonitor(dead_threshold=0.1, saturated_threshold=0.5)
    want = theirs.compute_firing_stats(spikes)
    assert want[2] == 0.75 and mine.compute_firing_stats(spikes) == pytest.approx(want, rel=1e-7)
    assert mine.compute(nn.Linear(2, 2), spikes=spikes).dead_neuron_frac == 0.75
    # float64 rates (the collectors' statistics) say 0.5: the test would catch that
    rates64 = spikes.double().mean(dim=(0, 1))
    assert float(firing_statistics(rates64, 0.1, 0.5)[2]) == 0.5


def test_the_record_is_the_reference_dataclass():
    names = [f.name for f in dataclasses.fields(compat.StabilityMetrics)]
    assert names == [f.name for f in dataclasses.fields(ref.StabilityMetrics)]
    for kwargs in (
        {},
        {"lyapunov": -0.25, "grad_norm": 3.0},
        {
            "firing_rate_mean": 0.1234,
            "firing_rate_std": 0.05,
            "dead_neuron_frac": 0.125,
            "saturated_neuron_frac": 0.0,
            "membrane_std": 0.2,
        },
    ):
        a, b = compat.StabilityMetrics(**kwargs), ref.StabilityMetrics(**kwargs)
        assert a.to_dict() == b.to_dict() and str(a) == str(b) and dataclasses.asdict(a) == dataclasses.asdict(b)
        assert a == compat.StabilityMetrics(**kwargs) and a.record is None


def test_the_lyapunov_passed_in_has_its_own_key(tmp_path):
    from stabwatch.sinks import JsonlSink, read_jsonl

    model = nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    with compat.StabilityMonitor(sinks=JsonlSink(tmp_path / "run.jsonl")) as mon:
        m = mon.compute(model, lyapunov=torch.tensor(0.375))
    assert m.lyapunov == 0.375 and m.record.lyapunov is None  # not the shadow replica's field
    flat = m.record.to_dict()
    assert flat[compat.LYAPUNOV_KEY] == 0.375 and compat.LYAPUNOV_KEY == "compat/lyapunov"
    assert "shadow/lyapunov" not in flat
    (written,) = read_jsonl(tmp_path / "run.jsonl")
    assert written.to_dict()["compat/lyapunov"] == 0.375


@pytest.mark.parametrize(
    ("offset", "scale"),
    [(0.2, 0.5), (-0.6, 0.3), (10.0, 0.01), (0.0, 0.0)],  # the one-pass route, then the two-pass fallbacks
)
def test_membrane_statistics_of_large_recordings(offset, scale):
    v = torch.randn(16, 25, 200, generator=torch.Generator().manual_seed(3)) * scale + offset  # 80 000 elements
    want = (v.double().mean().item(), v.double().std().item())
    got = compat.StabilityMonitor().compute_membrane_stats(v)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert got == pytest.approx(ref.StabilityMonitor().compute_membrane_stats(v), rel=2e-6, abs=1e-12)
    v[3, 4, 5] = float("nan")
    assert all(np.isnan(compat.StabilityMonitor().compute_membrane_stats(v)))
