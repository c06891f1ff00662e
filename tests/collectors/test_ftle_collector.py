"""The ``ftle`` collector through a real `Monitor`: its values equal `stabwatch.analysis.ftle` on the
model as it was at the record, only on its schedule, from the same probe every time, off in the cheap and
default presets, and training with it on is bit-identical to training without it."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.analysis import ftle
from stabwatch.collectors import FAMILIES, PRESETS, FTLECollector
from stabwatch.errors import ConfigError


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(12, 3, generator=g), torch.randint(0, 2, (12,), generator=g)) for _ in range(n)]


def _train(model: nn.Module, collectors: list | None, steps: int = 6, **kw) -> tuple[list, list]:
    """Train with dropout (global RNG) and momentum; returns (records, parameters)."""
    torch.manual_seed(123)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    records = []
    ctx = sw.Monitor(model, opt, preset="cheap", collectors=collectors or [], alerts=False, **kw)
    with ctx as mon:
        for x, y in _batches(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            records.append(mon.step(loss=loss, batch=(x, y)))
    return records, [p.detach().clone() for p in model.parameters()]


def test_values_equal_ftle_of_the_model_at_the_record():
    probe = torch.randn(20, 3, generator=torch.Generator().manual_seed(9))
    model = _model()
    seen: list[tuple[int, torch.Tensor]] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sw.Monitor(model, opt, preset="cheap", collectors=[FTLECollector(every=3, probe=probe)], alerts=False) as mon:
        for step, (x, y) in enumerate(_batches(7)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            rec = mon.step(loss=torch.tensor(0.0), batch=(x, y))
            lam = ftle(model, probe).exponents[:, -1]  # the model as the record saw it
            seen.append((step, lam))
            if rec.step % 3 == 0:
                assert rec.extra["ftle/mean"] == pytest.approx(float(lam.mean()), rel=1e-12, abs=1e-12)
                assert rec.extra["ftle/max"] == pytest.approx(float(lam.max()), rel=1e-12, abs=1e-12)
            else:
                assert "ftle/mean" not in rec.extra and "ftle/max" not in rec.extra
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_power_path_values_agree_with_exact():
    probe = torch.randn(10, 3, generator=torch.Generator().manual_seed(9))
    exact, _ = _train(_model(), [FTLECollector(every=2, probe=probe, method="exact")], steps=2)
    power, _ = _train(_model(), [FTLECollector(every=2, probe=probe, method="power", tol=1e-6, max_iter=500)], steps=2)
    assert power[0].extra["ftle/mean"] == pytest.approx(exact[0].extra["ftle/mean"], abs=1e-6)
    assert power[0].extra["ftle/max"] == pytest.approx(exact[0].extra["ftle/max"], abs=1e-6)


def test_training_is_bit_identical_with_the_collector_on():
    probe = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    _, plain = _train(_model(), None)
    for col in (FTLECollector(every=1, probe=probe), FTLECollector(every=2, method="power"), FTLECollector(every=1)):
        recs, watched = _train(_model(), [col])
        assert any("ftle/mean" in r.extra for r in recs)
        assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))


def test_probe_taken_once_from_the_first_batch():
    model = _model()
    col = FTLECollector(every=2, max_probe=5)
    recs, _ = _train(model, [col], steps=3)  # steps 0, 1, 2: measured at 0 and 2 (the model's final state)
    sched = [i for i, r in enumerate(recs) if "ftle/mean" in r.extra]
    assert sched == [0, 2]
    first = _batches(3)[0][0][:5]  # the kept probe: the first scheduled step's inputs, not the last's
    sched = [recs[i] for i in sched]
    assert sched[-1].extra["ftle/mean"] == pytest.approx(float(ftle(model, first).exponents[:, -1].mean()), rel=1e-12)


def test_family_registered_and_off_in_cheap_and_default():
    assert FAMILIES["ftle"] is FTLECollector
    for preset in ("cheap", "default"):
        assert all(c.family != "ftle" for c in PRESETS[preset]())
    col = FTLECollector()
    assert col.every == 500 and col.method == "auto" and col.tol == 1e-3


def test_bad_options_and_unusable_batches():
    with pytest.raises(ConfigError, match="probe"):
        FTLECollector(probe=torch.zeros(4, dtype=torch.float32))
    with pytest.raises(ConfigError, match="probe"):
        FTLECollector(probe=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="method"):
        FTLECollector(method="arnoldi")
    with pytest.raises(ConfigError):
        FTLECollector(tol=0)


def test_a_batch_without_inputs_is_logged_not_raised(caplog: pytest.LogCaptureFixture):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = sw.Monitor(model, opt, preset="cheap", collectors=[FTLECollector(every=1)], alerts=False)
    with caplog.at_level(logging.WARNING, logger="stabwatch"), monitor as mon:
        x, y = _batches(1)[0]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rec = mon.step(loss=torch.tensor(0.0), batch={"tokens": [1, 2]})
    assert "ftle/mean" not in rec.extra
    assert "FTLECollector(probe=inputs)" in caplog.text


def test_state_dict_keeps_the_probe_taken_from_a_batch():
    col = FTLECollector(every=1)
    assert col.state_dict() == {}
    _train(_model(), [col], steps=1)
    state = col.state_dict()
    torch.testing.assert_close(state["probe"], _batches(1)[0][0])
    kept = torch.randn(7, 3, generator=torch.Generator().manual_seed(4))  # not the batch's inputs
    fresh = FTLECollector(every=1)
    fresh.load_state_dict({"probe": kept})
    model = _model()
    recs, _ = _train(model, [fresh], steps=1)
    assert recs[0].extra["ftle/mean"] == pytest.approx(float(ftle(model, kept).exponents[:, -1].mean()), rel=1e-12)
    torch.testing.assert_close(fresh.state_dict()["probe"], kept)
    with pytest.raises(ConfigError, match="probe"):
        fresh.load_state_dict({"probe": torch.zeros(3)})
