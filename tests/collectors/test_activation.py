"""`ActivationCollector` on its own: per-layer activation statistics against the same activations
computed again with plain torch ops (no hooks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabwatch.collectors import ActivationCollector
from stabwatch.collectors.base import Readout
from tests.collectors.drive import Drive, Values, batch, cross_entropy

#: ``activation_batch_std`` is emitted once `stabwatch.metrics` has the field


def _stats(y: torch.Tensor, kind: str) -> dict[str, float]:
    y = y.detach().double()
    out = {"activation_mean": float(y.mean()), "activation_std": float(y.std())}
    if y.shape[0] > 1:  # RMS over units of the std over the batch
        out["activation_batch_std"] = float(y.reshape(y.shape[0], -1).var(dim=0).mean().sqrt())
    if kind == "relu":
        out["dead_frac"] = float((y.reshape(y.shape[0], -1) <= 0).all(dim=0).double().mean())
    if kind == "tanh":
        out["saturated_frac"] = float((y.abs() > 0.99).double().mean())
    if kind == "sigmoid":
        out["saturated_frac"] = float(((y > 0.99) | (y < 0.01)).double().mean())
    return out


def _mean_of(calls: list[dict[str, float]]) -> dict[str, float]:
    assert len(calls) > 0
    return {k: sum(c[k] for c in calls) / len(calls) for k in calls[0]}


class Net(nn.Module):
    """ReLU (with dead units), Tanh (saturating), Sigmoid, and a Tanh called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.l1 = nn.Linear(8, 24)
        self.relu = nn.ReLU()
        self.l2 = nn.Linear(24, 16)
        self.tanh = nn.Tanh()
        self.l3 = nn.Linear(16, 16)
        self.sig = nn.Sigmoid()
        self.twice = nn.Tanh()
        with torch.no_grad():
            self.l1.bias[:6] = -50.0  # six units dead for every input
            self.l2.weight.mul_(25.0)  # tanh in its flat tails

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.l1(x))
        b = self.tanh(self.l2(a))
        c = self.sig(self.l3(b))
        return self.twice(self.twice(c) * 3.0)

    def reference(self, x: torch.Tensor) -> dict[str, dict[str, float]]:
        """The same forward with torch functions, statistics per activation module."""
        with torch.no_grad():
            a = torch.relu(self.l1(x))
            b = torch.tanh(self.l2(a))
            c = torch.sigmoid(self.l3(b))
            t1 = torch.tanh(c)
            t2 = torch.tanh(t1 * 3.0)
        return {
            "relu": _stats(a, "relu"),
            "tanh": _stats(b, "tanh"),
            "sig": _stats(c, "sigmoid"),
            "twice": _mean_of([_stats(t1, "tanh"), _stats(t2, "tanh")]),  # averaged over its calls
        }


FIELDS = ("activation_mean", "activation_std", "dead_frac", "saturated_frac", "activation_batch_std")


def test_statistics_match_a_hook_free_recomputation():
    model = Net()
    drive = Drive(ActivationCollector(every=1), model)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    model(x)
    values = drive.collect()
    ref = model.reference(x)
    assert ref["relu"]["dead_frac"] >= 6 / 24 and ref["tanh"]["saturated_frac"] > 0.2
    for field in FIELDS:
        want = {layer: stats[field] for layer, stats in ref.items() if field in stats}
        got = values.layers(field)
        assert sorted(got) == sorted(want) and len(want) > 0, field
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), field
        assert values.field(field) == pytest.approx(sum(want.values()) / len(want), rel=1e-5, abs=1e-7)
    drive.close()


def test_a_model_without_activation_modules_falls_back_to_linear_outputs():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4))
    drive = Drive(ActivationCollector(every=1), model)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    model(x)
    values = drive.collect()
    with torch.no_grad():
        h = model[0](x)
        want = {"0": _stats(h, "linear"), "1": _stats(model[1](h), "linear")}
    for field in FIELDS[:2] + FIELDS[4:]:
        assert values.layers(field) == pytest.approx({k: v[field] for k, v in want.items()}, rel=1e-5)
    assert values.layers("dead_frac") == {} and values.layers("saturated_frac") == {}
    drive.close()


def test_only_scheduled_steps_are_measured_and_detach_removes_the_hooks():
    model = Net()
    collector = ActivationCollector(every=2)
    drive = Drive(collector, model)
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    counts = []
    for _ in range(4):
        model(x)
        counts.append(len(drive.collect()))
    assert counts[1] == counts[3] == 0 and counts[0] == counts[2] > 0
    drive.close()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.01), nn.RReLU(), nn.PReLU(), nn.ReLU(), nn.ReLU6()])
def test_dead_means_no_gradient_flows(act):
    """All pre-activations negative: ReLU/ReLU6 pass no gradient (dead 1.0); the leaky ones do (no dead_frac)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), act, nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    drive = Drive(ActivationCollector(every=1), model)
    values = drive.train_step(cross_entropy, batch())
    with torch.no_grad():
        assert bool((model[0](batch()[0]) < 0).all())
    grad = float(model[0].weight.grad.norm())  # autograd: does anything flow back through the activation?
    leaky = not isinstance(act, (nn.ReLU, nn.ReLU6))
    if leaky:
        assert grad > 0
        assert values.layers("dead_frac") == {} and values.field("dead_frac") is None
        assert values.layers("activation_std") != {}  # still measured
    else:
        assert grad == 0
        assert values.layers("dead_frac") == {"1": 1.0}
    drive.close()


def test_a_collapsed_batch_reads_zero_spread_across_the_batch():
    """Every sample gives the same varied vector: pooled std ~1, batch std 0."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh())
    drive = Drive(ActivationCollector(every=1), model)
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(3)).expand(32, 8)
    model(x)
    values = drive.collect()
    assert values.layers("activation_std")["1"] > 0.2
    assert values.layers("activation_batch_std")["1"] < 1e-6
    assert values.field("activation_batch_std") == values.layers("activation_batch_std")["1"]
    record = drive.record
    assert record is not None
    assert record.to_dict()["activation_layers/batch_std/1"] == values.layers("activation_batch_std")["1"]
    assert record.to_dict()["activation/batch_std"] == values.field("activation_batch_std")
    drive.close()


def test_a_batch_of_one_sample_has_no_batch_std():
    model = Net()
    drive = Drive(ActivationCollector(every=1), model)
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(4))
    model(x)
    values = drive.collect()
    assert values.layers("activation_batch_std") == {} and values.field("activation_batch_std") is None
    want = {k: v["activation_std"] for k, v in model.reference(x).items()}
    assert values.layers("activation_std") == pytest.approx(want, rel=1e-5)
    drive.close()


class _Captured(Readout):
    """A readout of one of several ranks that keeps what `add_reduced` would send to the others (the
    transport, faked: the test adds the ranks' values itself)."""

    def __init__(self) -> None:
        super().__init__(across_ranks=True)
        self.raw: list[tuple[torch.Tensor, object]] = []

    def add_reduced(self, values, reduce, then, key=None):
        assert reduce == "sum"
        self.raw.append((values, then))


def test_statistics_combined_across_ranks():
    """Two ranks' sums added as `Readout.reduce_across_ranks` does: mean and std of the combined batch,
    batch std the pooled within-rank spread (as the collector's docstring says)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU())
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(6, 8, generator=g), 3.0 + torch.randn(10, 8, generator=g)]
    readouts = []
    for x in xs:
        collector = ActivationCollector(every=1)
        drive = Drive(collector, model)
        model(x)
        readout = _Captured()
        collector.collect(0, readout, None, None)
        readouts.append(readout)
        drive.close()
    total = readouts[0].raw[0][0].double() + readouts[1].raw[0][0].double()
    readouts[0].raw[0][1](total)  # rank 0's callback adds the combined values into its readout
    values = Values(readouts[0], readouts[0].sync())
    with torch.no_grad():
        ys = [model(x).double() for x in xs]
    both = torch.cat(ys)
    assert values.field("activation_mean") == pytest.approx(float(both.mean()), rel=1e-6)
    assert values.field("activation_std") == pytest.approx(float(both.std()), rel=1e-5)
    pooled = sum((y.shape[0] - 1) * float(y.var(dim=0).mean()) for y in ys) / sum(y.shape[0] - 1 for y in ys)
    assert values.field("activation_batch_std") == pytest.approx(pooled**0.5, rel=1e-5)
