"""The claims docs/alerts.md makes about the default rules, checked against independent computations.

* The spectral radius of the recurrent weight is no test for exploding gradients through time: the
  spectral norm bounds them, the radius neither bounds nor implies them (an explicit product of the
  Jacobians ``diag(1 - h_t²) W`` against autograd through the recurrence).
* The gradient condition number tracks the batch size (rank <= B), which is why ``ill_conditioned`` is not
  a default rule; the default rules stay quiet when the batch size changes.
* Cooldowns and clear levels: every default rule but ``non_finite`` has them, they cut repeats of a
  flapping condition and never delay a first alert.
* The ``collapse`` rule watches the spread across the batch.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.alerts import AlertEngine, RatioRule, default_rules
from stabwatch.alerts.defaults import CLEAR_AFTER, COOLDOWN
from stabwatch.collectors import GradSVCollector
from stabwatch.metrics import StabilityMetrics

ROOT = Path(__file__).resolve().parents[2]

# --- recurrent weights: what the spectral radius and the spectral norm imply -------------------------------


def _inputs(w: torch.Tensor, targets: list[list[float]]) -> list[torch.Tensor]:
    """Inputs that put the pre-activation ``W h_(t-1) + x_t`` of ``h_t = tanh(.)`` at the given targets."""
    h, xs = torch.zeros(w.shape[0], dtype=w.dtype), []
    for target in targets:
        t = torch.tensor(target, dtype=w.dtype)
        xs.append(t - w @ h)
        h = torch.tanh(t)
    return xs


def _autograd_jacobian(w: torch.Tensor, xs: list[torch.Tensor], h0: torch.Tensor) -> torch.Tensor:
    """∂h_T/∂h_0 through ``nn.RNN`` (tanh, no bias, identity input weights), by autograd."""
    n = w.shape[0]
    rnn = nn.RNN(n, n, bias=False, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(w)
        rnn.weight_ih_l0.copy_(torch.eye(n, dtype=w.dtype))
    seq = torch.stack(xs)[None]  # [1, T, n]

    def final(h: torch.Tensor) -> torch.Tensor:
        return rnn(seq, h[None, None])[1][0, 0]

    return torch.autograd.functional.jacobian(final, h0)


def _jacobian_product(w: torch.Tensor, xs: list[torch.Tensor], h0: torch.Tensor) -> torch.Tensor:
    """The same Jacobian as the explicit product ``Π_t diag(1 - h_t²) W`` (the chain rule, written out)."""
    h, prod = h0, torch.eye(w.shape[0], dtype=w.dtype)
    for x in xs:
        h = torch.tanh(w @ h + x)
        prod = torch.diag(1 - h * h) @ w @ prod
    return prod


def test_zero_spectral_radius_yet_gradients_through_time_grow_2x_per_step():
    w = torch.tensor([[2.0, 2.0], [-2.0, -2.0]], dtype=torch.float64)
    assert float(torch.linalg.eigvals(w).abs().max()) < 1e-7  # ρ = 0: W is nilpotent
    assert torch.equal(w @ w, torch.zeros(2, 2, dtype=torch.float64))  # the linear recurrence dies in 2 steps
    assert float(torch.linalg.matrix_norm(w, 2)) == pytest.approx(4.0)
    steps = 10
    # the two units saturate in turn: pre-activations (0, 10), (10, 0), ...
    xs = _inputs(w, [[0.0, 10.0] if t % 2 == 0 else [10.0, 0.0] for t in range(steps)])
    h0 = torch.zeros(2, dtype=torch.float64)
    norms = []
    for t in range(1, steps + 1):
        jac = _autograd_jacobian(w, xs[:t], h0)
        torch.testing.assert_close(jac, _jacobian_product(w, xs[:t], h0))
        norms.append(float(torch.linalg.matrix_norm(jac, 2)))
    # analytic: W = u vᵀ with u = (2, -2), v = (1, 1); each step multiplies by |vᵀ D u| = 2|d1 - d2| = 2
    for t, n in enumerate(norms, start=1):
        assert n == pytest.approx(2 * math.sqrt(2) * 2 ** (t - 1), rel=1e-6)


def test_spectral_norm_below_one_bounds_gradients_through_time():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, generator=g, dtype=torch.float64)
    w *= 0.9 / torch.linalg.matrix_norm(w, 2)  # ‖W‖₂ = 0.9, whatever its radius
    steps = 12
    xs = [3 * torch.randn(6, generator=g, dtype=torch.float64) for _ in range(steps)]
    h0 = torch.randn(6, generator=g, dtype=torch.float64)
    jac = _autograd_jacobian(w, xs, h0)
    torch.testing.assert_close(jac, _jacobian_product(w, xs, h0))
    assert float(torch.linalg.matrix_norm(jac, 2)) <= 0.9**steps  # |tanh'| <= 1: ‖Π D_t W‖ <= ‖W‖₂^T


def test_spectral_radius_above_one_with_saturation_gradients_vanish():
    w = 1.5 * torch.eye(3, dtype=torch.float64)  # ρ = ‖W‖₂ = 1.5
    steps = 30
    xs = [torch.zeros(3, dtype=torch.float64)] * steps
    h0 = torch.full((3,), 0.5, dtype=torch.float64)
    jac = _autograd_jacobian(w, xs, h0)
    torch.testing.assert_close(jac, _jacobian_product(w, xs, h0))
    # the state settles at h* = tanh(1.5 h*) ≈ 0.858, where the step Jacobian is 1.5 (1 - h*²) ≈ 0.40 < 1
    assert float(torch.linalg.matrix_norm(jac, 2)) < 1e-8


def test_radius_below_one_allows_transient_growth_of_a_non_normal_recurrence():
    w = torch.tensor([[0.5, 4.0], [0.0, 0.5]], dtype=torch.float64)
    assert float(torch.linalg.eigvals(w).abs().max()) == pytest.approx(0.5)
    powers = [float(torch.linalg.matrix_norm(torch.linalg.matrix_power(w, k), 2)) for k in range(1, 40)]
    assert max(powers) > 4  # the linear recurrence first grows...
    assert powers[-1] < 1e-6  # ...and only decays asymptotically


# --- the gradient condition number and the batch size --------------------------------------------------------


def _kappa_run(batch_sizes: list[int], width: int, rules: list | None) -> sw.Monitor:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    engine = AlertEngine(rules, log_alerts=False) if rules is not None else False
    with sw.Monitor(net, opt, preset="default", collectors=[GradSVCollector(every=1)], alerts=engine) as mon:
        for b in batch_sizes:
            x, y = torch.randn(b, width, generator=g), torch.randn(b, 1, generator=g)
            opt.zero_grad()
            loss = (net(x) - y).pow(2).mean()
            loss.backward()
            opt.step()  # SGD leaves .grad as it was: the gradient the record describes
            rec = mon.step(loss=loss)
            ref = torch.linalg.svdvals(net[0].weight.grad.double())
            rank = int(rec.layers["0"]["grad_rank"])
            assert rank <= b  # a sum of b outer products
            assert rec.layers["0"]["grad_condition"] == pytest.approx(float(ref[0] / ref[rank - 1]), rel=1e-2)
    return mon


def test_gradient_condition_number_tracks_the_batch_size():
    mon = _kappa_run([4, 16, 63], width=64, rules=None)
    kappa = [r.layers["0"]["grad_condition"] for r in mon.records]
    assert kappa[0] < kappa[1] < kappa[2] and kappa[2] > 100 * kappa[0], kappa


def test_default_rules_stay_quiet_when_the_batch_size_changes_and_the_retired_rule_did_not():
    assert "ill_conditioned" not in {r.name for r in default_rules()}
    assert not any(r.binding.field == "grad_condition" for r in default_rules())
    sizes = [4] * 15 + [63] * 10
    retired = RatioRule("layers:grad_condition", factor=1000.0, window=10, min_history=3, name="ill_conditioned")
    mon = _kappa_run(sizes, width=64, rules=[*default_rules(), retired])
    fired = [a for a in mon.alerts if a.reason is not sw.AlertReason.RECOVERED]
    assert fired and {a.rule for a in fired} == {"ill_conditioned"}, [str(a) for a in fired]
    assert fired[0].step == 15  # the batch-size change: the retired rule fires, the default rules do not


# --- cooldowns and clear levels -----------------------------------------------------------------------------


def test_every_default_rule_but_non_finite_has_a_cooldown_and_per_step_rules_a_clear_level():
    per_step = {"grad_norm", "loss"}
    for rule in default_rules():
        if rule.name == "non_finite":
            assert (rule.cooldown, rule.clear_after) == (0, 1)  # every new NaN episode is news
            continue
        assert rule.cooldown == COOLDOWN, rule.name
        assert rule.clear_after == (CLEAR_AFTER if rule.binding.field in per_step else 1), rule.name


def _flapping(n: int = 400, onset: int = 100, period: int = 4) -> list[StabilityMetrics]:
    """grad_norm 1 (with a small wobble), 100x on every ``period``-th step from ``onset``."""
    recs = []
    for s in range(n):
        g = 1.0 + 0.01 * math.sin(s)
        if s >= onset and (s - onset) % period == 0:
            g *= 100.0
        recs.append(StabilityMetrics(step=s, grad_norm=g, loss=1.0, nonfinite=False))
    return recs


def test_cooldown_and_clear_level_cut_repeats_without_delaying_the_first_alert():
    recs = _flapping()
    with_defaults = AlertEngine(default_rules(), log_alerts=False).run(recs)
    old = default_rules()
    for r in old:
        r.cooldown, r.clear_after = 0, 1
    without = AlertEngine(old, log_alerts=False).run(recs)

    def fired(alerts: list[sw.Alert]) -> list[int]:
        return [a.step for a in alerts if a.rule == "grad_explode" and a.reason is not sw.AlertReason.RECOVERED]

    assert fired(without)[0] == fired(with_defaults)[0] == 100  # 100x: urgent, at once
    assert len(fired(without)) == 75  # every spike re-alerts after a one-step "recovery"
    # the calm runs (3 steps) are shorter than clear_after: one episode, one alert
    assert CLEAR_AFTER > 3
    assert fired(with_defaults) == [100]


def test_cooldown_counts_steps_and_windows_count_records():
    """With a sparse schedule (``log_every``-like: one record every 10 steps) a ratio rule's window is
    records, the cooldown steps."""
    rule = RatioRule("grad_norm", factor=10, window=5, min_history=5, cooldown=100, name="r")
    alerts = []
    for i in range(40):
        step = 10 * i
        v = 50.0 if i in (10, 13, 30) else 1.0
        if a := rule.update(step, v):
            alerts.append(a)
    # the spike at step 130 comes 30 steps after the alert at 100: cooled down, no alert
    assert [(a.step, a.reason.value) for a in alerts] == [
        (100, "spike"),
        (110, "recovered"),
        (300, "spike"),
        (310, "recovered"),
    ]
    assert "its 5-value (steps 50-90) median" in alerts[0].message  # 5 records span 50 steps


# --- collapse: the spread across the batch -------------------------------------------------------------------


def test_collapse_watches_the_spread_across_the_batch_not_the_pooled_std():
    rule = next(r for r in default_rules() if r.name == "collapse")
    assert rule.metric == "layers:activation_batch_std"
    recs = []
    for s in range(30):
        # the pooled std stays 1 (units differ from each other) while every unit becomes constant over the batch
        batch_std = 1.0 if s < 20 else 1e-4
        recs.append(StabilityMetrics(step=s, layers={"fc": {"activation_std": 1.0, "activation_batch_std": batch_std}}))
    alerts = AlertEngine(default_rules(), log_alerts=False).run(recs)
    assert [(a.rule, a.step, a.layer) for a in alerts] == [("collapse", 20, "fc")]


# --- the docs' parameter table is the rules' --------------------------------------------------------------------


def test_the_parameter_table_in_the_docs_is_the_default_rules():
    spec = importlib.util.spec_from_file_location("bench_alerts", ROOT / "benchmarks" / "bench_alerts.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_alerts", bench)
    spec.loader.exec_module(bench)
    doc = (ROOT / "docs" / "alerts.md").read_text(encoding="utf-8")
    rows = list(map(bench.rule_row, default_rules()))
    missing = [row for row in rows if row not in doc]
    assert not missing, "docs/alerts.md lacks these rows (print them: benchmarks/bench_alerts.py --only table):\n" + (
        "\n".join(missing)
    )


def test_with_log_every_the_rules_see_one_value_per_record():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with sw.Monitor(model, opt, preset="cheap", log_every=10) as mon:
        for _ in range(100):
            opt.zero_grad()
            loss = model(torch.randn(16, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
        state = mon.state_dict()
    engine = AlertEngine(default_rules(), log_alerts=False)
    engine.load_state_dict(state["alerts"])
    window = engine["grad_explode"].state_dict()["streams"][0]["det"]["window"]
    steps = window["steps"]
    assert len(steps) == len(mon.records) == 10
    assert all(b - a == 10 for a, b in itertools.pairwise(steps))  # 10 values of a 50-value window: 100 steps
