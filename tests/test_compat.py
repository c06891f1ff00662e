"""`stabwatch.compat.StabilityMonitor` and the module functions of stabwatch.compat, against the formulas of
the hand-written SNN monitors (re-implemented here in numpy) and scripted runs for the rule answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.compat import StabilityMonitor, analyze_weight_spectrum, compute_spectral_radius
from stabwatch.errors import ConfigError
from stabwatch.metrics import AlertReason, StabilityMetrics
from stabwatch.sinks import JsonlSink, read_jsonl


def _spikes(shape, p, seed=0):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p).float()


def _ref_firing(spikes: np.ndarray, dead=0.01, sat=0.9):
    """The hand-written monitors' formula: (B, T, H) -> mean over T then B; (T, H) -> mean over T."""
    s = spikes.astype(np.float64)
    if s.ndim == 3:
        rates = s.mean(axis=1)
    elif s.ndim == 2:
        rates = s.mean(axis=0, keepdims=True)
    else:
        rates = s[None]
    r = rates.mean(axis=0)
    return r.mean(), r.std(ddof=1), np.mean(r < dead), np.mean(r > sat)


@pytest.mark.parametrize("shape", [(6, 10, 30), (10, 30), (30,)])
def test_firing_stats_match_the_hand_written_formula(shape):
    s = _spikes(shape, 0.3, seed=len(shape))
    mon = StabilityMonitor()
    np.testing.assert_allclose(mon.compute_firing_stats(s), _ref_firing(s.numpy()), rtol=1e-6, atol=1e-12)
    # thresholds that no rate k / (B * T) equals (at a tie the two summation orders may round apart)
    mon = StabilityMonitor(dead_threshold=0.213, saturated_threshold=0.411)
    np.testing.assert_allclose(mon.compute_firing_stats(s), _ref_firing(s.numpy(), 0.213, 0.411), rtol=1e-6, atol=1e-12)


def test_four_dim_spikes_are_batch_time_features():
    s = _spikes((4, 7, 3, 5), 0.5, seed=1)
    rates = s.double().mean(dim=(0, 1)).reshape(-1).numpy()
    got = StabilityMonitor().compute_firing_stats(s)
    np.testing.assert_allclose(got, [rates.mean(), rates.std(ddof=1), np.mean(rates < 0.01), np.mean(rates > 0.9)])


def test_membrane_and_gradient_norm():
    v = torch.randn(5, 7, 11, generator=torch.Generator().manual_seed(2)) * 0.3 - 0.4
    mean, std = StabilityMonitor().compute_membrane_stats(v)
    assert mean == pytest.approx(v.double().mean().item(), rel=1e-6)
    assert std == pytest.approx(v.double().std().item(), rel=1e-6)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    assert StabilityMonitor().compute_gradient_norm(model) == 0.0  # no gradients yet
    model(torch.randn(4, 5)).pow(2).sum().backward()
    ref = sum(float(np.sum(p.grad.double().numpy() ** 2)) for p in model.parameters()) ** 0.5
    assert StabilityMonitor().compute_gradient_norm(model) == pytest.approx(ref, rel=1e-6)


def test_gradient_singular_values_against_numpy():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))
    (model(torch.randn(3, 12)) - torch.randn(3, 6)).pow(2).sum().backward()  # batch 3: rank <= 3 gradients
    mon = StabilityMonitor()
    out = mon.compute_gradient_singular_values(model, top_k=4)
    assert set(out) == {"0.weight", "2.weight"}  # 2-D parameters only
    conds = []
    for name, (top, cond) in out.items():
        g = dict(model.named_parameters())[name].grad.double().numpy()
        s = np.linalg.svd(g, compute_uv=False)
        tol = s[0] * max(g.shape) * np.finfo(np.float32).eps
        nonzero = s[s > tol]
        r = len(nonzero)
        assert 1 <= r <= 3 and len(top) == 4
        np.testing.assert_allclose(top[:r], s[:r], rtol=1e-5)
        assert np.all(top[r:] < tol)  # the rest is float32 round-off
        assert cond == pytest.approx(s[0] / nonzero[-1], rel=1e-4)
        conds.append(cond)
    max_sv, min_sv, avg_cond = mon.get_aggregate_gradient_sv(model)
    all_s = {n: np.linalg.svd(dict(model.named_parameters())[n].grad.double().numpy(), compute_uv=False) for n in out}
    assert max_sv == pytest.approx(max(s[0] for s in all_s.values()), rel=1e-5)
    assert avg_cond == pytest.approx(np.mean(conds), rel=1e-6)
    assert min_sv > 0
    assert StabilityMonitor().get_aggregate_gradient_sv(nn.Linear(2, 2)) == (0.0, 0.0, 1.0)


def test_compute_returns_a_record_with_every_field():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 4))
    model(torch.randn(5, 6)).sum().backward()
    spikes = _spikes((5, 8, 10), 0.25, seed=3)
    mem = torch.randn(5, 8, 10, generator=torch.Generator().manual_seed(4))
    mon = StabilityMonitor()
    m = mon.compute(model, lyapunov=torch.tensor(0.05), spikes=spikes, membrane=mem, compute_sv=True)
    assert isinstance(m.record, sw.StabilityMetrics) and m.record.step == 0
    assert m.lyapunov == pytest.approx(0.05)
    np.testing.assert_allclose(
        [m.firing_rate_mean, m.firing_rate_std, m.dead_neuron_frac, m.saturated_neuron_frac],
        _ref_firing(spikes.numpy()),
        rtol=1e-6,
    )
    assert m.membrane_mean == pytest.approx(mem.double().mean().item(), rel=1e-5)
    assert m.membrane_std == pytest.approx(mem.double().std().item(), rel=1e-5)
    assert m.grad_norm == pytest.approx(mon.compute_gradient_norm(model))
    assert (m.grad_max_sv, m.grad_min_sv) == pytest.approx(mon.get_aggregate_gradient_sv(model)[:2])
    assert m.record.layers["network"]["dead_neuron_frac"] == m.dead_neuron_frac
    assert set(m.record.layers["0"]) == {"grad_max_sv", "grad_min_sv", "grad_condition"}
    assert "fr=" in str(m) and mon.lyap_history == [pytest.approx(0.05)] and len(mon.fr_history) == 1
    m2 = mon.compute(model)
    assert m2.record.step == 1 and m2.firing_rate_mean is None and m2.grad_max_sv is None


def test_compute_per_layer_dicts_pool_all_neurons():
    a, b = _spikes((4, 6, 10), 0.1, seed=5), _spikes((4, 6, 30), 0.6, seed=6)
    va, vb = torch.randn(40), torch.randn(90) + 1.0
    m = StabilityMonitor().compute(nn.Linear(2, 2), spikes={"l1": a, "l2": b}, membrane={"l1": va, "l2": vb}).record
    for name, s in (("l1", a), ("l2", b)):
        np.testing.assert_allclose(
            [m.layers[name][f] for f in ("firing_rate_mean", "firing_rate_std", "dead_neuron_frac")],
            _ref_firing(s.numpy())[:3],
            rtol=1e-6,
        )
    rates = np.concatenate([a.double().mean(dim=(0, 1)).numpy(), b.double().mean(dim=(0, 1)).numpy()])
    assert m.firing_rate_mean == pytest.approx(rates.mean()) and m.firing_rate_std == pytest.approx(rates.std(ddof=1))
    allv = torch.cat([va, vb]).double()
    assert m.membrane_mean == pytest.approx(allv.mean().item(), rel=1e-6)
    assert m.membrane_std == pytest.approx(allv.std().item(), rel=1e-6)
    assert m.layers["l2"]["membrane_mean"] == pytest.approx(vb.double().mean().item(), rel=1e-6)


def _run(mon, n, grad_scale=lambda i: 1.0, spikes=None, lyap=None):
    model = nn.Linear(4, 4)
    for i in range(n):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1 * grad_scale(i))
        mon.compute(model, spikes=spikes(i) if spikes else None, lyapunov=lyap(i) if lyap else None)
    return mon


def test_trends_healthy_run():
    mon = _run(StabilityMonitor(), 12, spikes=lambda i: _spikes((4, 10, 20), 0.3, seed=i), lyap=lambda i: -0.1)
    assert mon.get_trends() == {"lyapunov": "→ STABLE", "gradients": "✓ STABLE", "firing": "✓ HEALTHY"}
    assert _run(StabilityMonitor(), 9).get_trends() == {}  # the hand-written monitors wait for 10 values


def test_trends_dead_network_and_diagnosis_name_the_layer():
    mon = _run(StabilityMonitor(), 12, spikes=lambda i: torch.zeros(4, 10, 20))
    assert mon.get_trends()["firing"] == "⚠️ DEAD NETWORK"
    reasons = {a.reason for a in mon.alerts}
    assert AlertReason.DEAD_NEURONS in reasons and AlertReason.SILENT_LAYER in reasons
    text = mon.diagnose()
    assert text.startswith("=== Stability Diagnosis ===") and "Firing rate: 0.0000\n → ⚠️ DEAD NETWORK" in text
    assert "silent_layer" in text and "try:" in text


def test_trends_saturated_exploding_and_lyapunov():
    mon = _run(StabilityMonitor(), 12, spikes=lambda i: torch.ones(4, 10, 20))
    assert mon.get_trends()["firing"] == "⚠️ SATURATED"

    mon = _run(StabilityMonitor(), 14, grad_scale=lambda i: 1.0 if i < 12 else 1000.0)
    assert mon.get_trends()["gradients"] == "⚠️ EXPLODING"
    assert any(a.reason == AlertReason.EXPLODING_GRADIENT for a in mon.alerts)

    mon = _run(StabilityMonitor(), 30, grad_scale=lambda i: 1.0 if i < 10 else 1e-3)  # last 10 / first 10
    assert mon.get_trends()["gradients"] == "⚠️ VANISHING"

    mon = _run(StabilityMonitor(), 25, lyap=lambda i: -1.0 + 0.05 * i)  # rising through 0
    assert mon.get_trends()["lyapunov"] == "⚠️ INCREASING (becoming unstable)"
    mon = _run(StabilityMonitor(), 25, lyap=lambda i: 0.5 - 0.05 * i)
    assert mon.get_trends()["lyapunov"] == "✓ DECREASING (stabilizing)"
    mon = _run(StabilityMonitor(), 12, lyap=lambda i: 0.3 + 0.01 * (-1) ** i)
    assert mon.get_trends()["lyapunov"] == "→ STABLE"


def test_history_is_bounded_and_options_validated():
    mon = _run(StabilityMonitor(history_size=5), 12, lyap=lambda i: float(i))
    assert mon.lyap_history == [7.0, 8.0, 9.0, 10.0, 11.0] and len(mon.records) == 5 and len(mon.grad_history) == 5
    with pytest.raises(sw.StabwatchError, match="dead_threshold < saturated_threshold"):
        StabilityMonitor(dead_threshold=0.9, saturated_threshold=0.1)
    with pytest.raises(sw.StabwatchError, match="history_size must be a positive int"):
        StabilityMonitor(history_size=0)
    with pytest.raises(sw.StabwatchError, match="spikes must be a tensor or a non-empty"):
        StabilityMonitor().compute(nn.Linear(2, 2), spikes=[torch.zeros(3)])  # type: ignore[arg-type]


def test_spectral_radius_functions_against_numpy():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(7))
    assert compute_spectral_radius(w) == pytest.approx(np.max(np.abs(np.linalg.eigvals(w.double().numpy()))), rel=1e-12)
    with pytest.raises(sw.StabwatchError, match=r"square 2-D matrix, got shape \(3, 4\)"):
        compute_spectral_radius(torch.zeros(3, 4))
    torch.manual_seed(3)
    model = nn.ModuleDict({"rnn": nn.RNN(5, 7), "fc": nn.Linear(7, 7), "out": nn.Linear(7, 2)})
    got = analyze_weight_spectrum(model)
    assert set(got) == {"rnn.weight_hh_l0", "fc.weight"}
    for name, rho in got.items():
        ref = np.max(np.abs(np.linalg.eigvals(dict(model.named_parameters())[name].double().detach().numpy())))
        assert rho == pytest.approx(ref, rel=1e-10)


def test_options_of_the_wrong_type_are_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match=r"dead_threshold must be a number.*'x'"):
        StabilityMonitor(dead_threshold="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"StabilityMonitor: sinks= takes a sink or a list of sinks"):
        StabilityMonitor(sinks="run.jsonl")
    with pytest.raises(ConfigError, match=r"sinks\[0\] \(object\) lacks write, flush, close"):
        StabilityMonitor(sinks=[object()])


def test_jsonl_sink_gets_one_line_per_compute_with_the_returned_numbers(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 4))
    path = tmp_path / "compat.jsonl"
    returned = []
    with StabilityMonitor(sinks=JsonlSink(path)) as mon:
        for i in range(4):
            model.zero_grad()
            model(torch.randn(5, 6)).pow(2).sum().backward()
            kwargs = {"spikes": _spikes((5, 8, 10), 0.2, seed=i)} if i % 2 else {"membrane": torch.randn(3, 7)}
            returned.append(mon.compute(model, lyapunov=0.1 * i, compute_sv=i > 1, **kwargs).record)
            if i == 0:
                assert mon.flush() and len(path.read_text().splitlines()) == 1  # delivered, not just queued
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    written = [StabilityMetrics.from_json_line(line) for line in lines]
    for got, want in zip(written, returned, strict=True):
        assert got.step == want.step and got.to_dict() == want.to_dict()  # every number, bit for bit
        assert got.layers == want.layers
    assert [r.step for r in written] == [0, 1, 2, 3] and written[3].grad_condition is not None


class _DownSink:
    """A tracker that is down: every write raises (fault injection)."""

    close_timeout = 0.2

    def __init__(self, spill_dir) -> None:
        self.spill_dir = spill_dir

    def write(self, record) -> None:
        raise ConnectionError("tracker unreachable")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_failing_sink_never_stops_compute_and_its_records_are_spilled(tmp_path):
    good = JsonlSink(tmp_path / "good.jsonl")
    mon = StabilityMonitor(sinks=[good, _DownSink(tmp_path / "spill")])
    model = nn.Linear(3, 2)
    model(torch.ones(2, 3)).sum().backward()
    records = [mon.compute(model, lyapunov=float(i)).record for i in range(3)]
    assert not mon.flush(timeout=1.0)  # the down sink does not confirm
    mon.close()
    assert [r.step for r in read_jsonl(tmp_path / "good.jsonl")] == [0, 1, 2]
    (spill,) = (tmp_path / "spill").glob("_DownSink-*.jsonl")  # kept for `stabwatch replay`
    lyap = [r.extra["compat/lyapunov"] for r in read_jsonl(spill)]
    assert lyap == [r.extra["compat/lyapunov"] for r in records] == [0.0, 1.0, 2.0]


# --- the CPU host paths give the tensor kernels' numbers, bit for bit -------------------------------------
# `compute` on the CPU reads its statistics on the host (fewer kernels, no stack/cat); each host path is
# checked here against the tensor operations it replaces (the ones an accelerator still runs), with `==`.


def _bits(values):
    """Floats as comparable bit patterns (NaN == NaN)."""
    return [np.float64(v).tobytes() for v in values]


def _rates_cases():
    g = torch.Generator().manual_seed(7)
    yield torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])  # at both default thresholds' neighbours
    yield torch.full((9,), 0.1)  # every rate at a threshold
    for n in (2, 3, 31, 64, 65, 300):  # both sides of the replayed-std limit
        yield torch.rand(n, generator=g)
        yield (torch.rand(n, generator=g) < 0.2).float() / 7
        yield torch.randn(n, generator=g).abs() * 1e-3
    yield torch.rand(10, 3, generator=g).t()[0]  # not contiguous
    yield torch.tensor([0.2, float("nan"), 0.4])
    yield torch.tensor([0.2, float("inf"), 0.4])
    yield torch.tensor([0.3])  # one neuron: std is NaN


@pytest.mark.filterwarnings("ignore:std....degrees of freedom is <= 0:UserWarning")  # one neuron: the kernel warns
@pytest.mark.parametrize(("dead", "saturated"), [(0.01, 0.9), (0.1, 0.5), (0.0, 1.0)])
def test_host_firing_statistics_are_the_kernels_bits(dead, saturated):
    from stabwatch.compat import _firing_host, _firing_vector

    for rates in _rates_cases():
        want = _firing_vector(rates, dead, saturated).tolist()
        assert _bits(_firing_host(rates, dead, saturated)) == _bits(want), rates


def test_replayed_std_and_counts_are_torchs():
    from stabwatch.compat import _REPLAY_STD, _few_firing_stats

    if not _REPLAY_STD:
        pytest.skip("the std is replayed on x86-64 only")
    g = torch.Generator().manual_seed(8)
    low, high = float(np.float32(0.1)), float(np.float32(0.9))
    for i in range(2000):
        n = 2 + i % 63
        v = torch.randn(n, generator=g) * 10.0 ** (i % 41 - 20) + (i % 3) * 0.4
        std, n_low, n_high = _few_firing_stats(v.tolist(), v.mean().item(), low, high)
        assert _bits([std]) == _bits([v.std().item()]), (n, i)
        assert (n_low, n_high) == (int((v < 0.1).sum()), int((v > 0.9).sum()))
    huge = torch.tensor([3e38, -3e38, 3e38])
    assert _few_firing_stats(huge.tolist(), huge.mean().item(), low, high)[0] == huge.std().item() == float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectrum_summary_rows_are_spectrum_summarys_bits(dtype):
    from stabwatch.functional.spectral import spectrum_summary, spectrum_summary_rows

    g = torch.Generator().manual_seed(9)
    batches = [
        torch.randn(3, 32, 20, generator=g),  # the small-matrix route
        torch.randn(2, 4, 40, generator=g),  # wide: transposed
        torch.randn(2, 60, 40, generator=g),  # the Gram route
        torch.randn(1, 40, 3, generator=g) @ torch.randn(1, 3, 30, generator=g),  # rank 3: round-off tail
        torch.zeros(1, 5, 5),  # no non-zero value: s_min 0, kappa inf
        torch.diag(torch.tensor([1e30, 1e-10, 1.0]))[None],  # kappa beyond float32: inf
    ]
    nan = torch.randn(3, 6, 5, generator=g)
    nan[1, 2, 3] = float("nan")
    batches.append(nan)
    for a in batches:
        a = a.to(dtype)
        top, s_min, rank, kappa = spectrum_summary(a, 4)
        rows = spectrum_summary_rows(a, 4)
        if bool(torch.isfinite(a).all()):
            assert rows == spectrum_summary_rows(a, 4, assume_finite=True)
        assert len(rows) == a.shape[0]
        for j, (t, s, r, k) in enumerate(rows):
            assert _bits(t) == _bits(top[j].tolist())
            assert _bits([s, r, k]) == _bits([s_min[j].item(), rank[j].item(), kappa[j].item()])


_FIRING = ("firing_rate_mean", "firing_rate_std", "dead_neuron_frac", "saturated_neuron_frac")


def test_compute_on_the_cpu_gives_the_tensor_path_numbers():
    """Every value of a CPU `compute` equals the tensor operations the accelerator path runs."""
    from stabwatch.functional.spectral import spectrum_summary

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3))
    model(torch.randn(4, 6)).pow(2).sum().backward()
    spikes = {"a": _spikes((4, 9, 12), 0.2, seed=1), "b": _spikes((4, 9, 7), 0.05, seed=2)}
    mem = torch.randn(4, 9, 12, generator=torch.Generator().manual_seed(3))
    m = StabilityMonitor().compute(model, lyapunov=torch.tensor(0.125), spikes=spikes, membrane=mem, compute_sv=True)
    r = m.record
    norms = torch.stack(torch._foreach_norm([p.grad for p in model.parameters()], 2.0)).tolist()
    assert m.grad_norm == sum(n**2 for n in norms) ** 0.5
    for name, p in model.named_parameters():
        if p.ndim == 2:
            top, s_min, _, kappa = spectrum_summary(p.grad[None], 5)
            layer = r.layers[name.rsplit(".", 1)[0]]
            assert (layer["grad_max_sv"], layer["grad_min_sv"], layer["grad_condition"]) == (
                top[0, 0].item(),
                s_min.item(),
                kappa.item(),
            )
    for layer, s in spikes.items():
        rates = s.mean(dim=1).mean(dim=0)
        want = torch.stack([rates.mean(), rates.std(), (rates < 0.01).float().mean(), (rates > 0.9).float().mean()])
        assert [r.layers[layer][f] for f in _FIRING] == want.tolist()
    assert (m.membrane_mean, m.membrane_std) == (mem.mean().item(), mem.std().item())
    assert m.lyapunov == 0.125


def test_alerts_are_what_each_rule_says_when_fed_by_hand():
    """The engine's fast path (`Rule.observe` judging values directly) raises the alerts, at the same steps
    and with the same messages, that `rule.update(step, value, layer)` on every value gives."""
    from stabwatch.alerts.base import RecordView, Rule
    from stabwatch.compat import _compat_rules

    torch.manual_seed(4)
    model = nn.Linear(8, 8)
    mon, by_hand = StabilityMonitor(), _compat_rules()
    seen: list[tuple[int, str, str | None, str]] = []
    for step in range(60):
        model.zero_grad()
        scale = 1.0 if step < 30 else 3.0 ** (step - 29)  # then exploding
        (model(torch.randn(4, 8)).pow(2).mean() * scale).backward()
        p = 0.3 if step < 20 else 0.0  # then silent
        m = mon.compute(model, spikes=_spikes((4, 10, 8), p, seed=step), membrane=torch.randn(4, 10, 8))
        want = []
        for rule in by_hand:
            if type(rule).observe is not Rule.observe:  # a rule that reads the record itself (non_finite)
                want += rule.observe(RecordView(m.record))
                continue
            for layer, value in rule.binding.values(RecordView(m.record)):
                alert = rule.update(m.record.step, value, layer)
                if alert is not None:
                    want.append(alert)
        assert m.record.alerts == want
        seen += [(a.step, a.rule, a.layer, a.message) for a in m.record.alerts]
    assert {rule for _, rule, _, _ in seen} >= {"grad_explode", "silent_layer"}


def test_a_non_finite_gradient_raises_the_critical_non_finite_alert():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    mon = StabilityMonitor(log_alerts=False)
    spikes = _spikes((4, 10, 8), 0.2)
    for step in range(3):
        model.zero_grad()
        model(torch.randn(4, 5)).pow(2).sum().backward()
        if step == 2:
            model[0].weight.grad[0, 0] = float("nan")
        out = mon.compute(model, spikes=spikes)
    assert np.isnan(out.grad_norm)  # the returned number is the reference's (NaN propagates)
    assert out.record.nonfinite and out.record.nonfinite_source == "gradients"
    fired = [(a.rule, a.step, a.severity) for a in mon.alerts]
    assert ("non_finite", 2, sw.Severity.CRITICAL) in fired
    assert all(a.step == 2 for a in mon.alerts if a.rule == "non_finite")
    mon.close()
