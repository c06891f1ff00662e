"""Alerting on real training: detection delay, false-alarm rate, healthy maxima, and the engine's cost.

Runs the default rule set on the scenarios of ``tests/alerts/scenarios.py`` (an MLP on scikit-learn's
digits, a tanh RNN on generated sines). Sections (``--only a,b``; all by default):

* ``table`` — the default rules and their parameters, as the markdown table of docs/alerts.md.
* ``cost`` — `AlertEngine.evaluate` with the default rules per record, against a bare training step of the
  same model, measured in this process.
* ``rules`` — each default rule's own cost per record, alone (``rule.observe`` as the engine calls it), on
  2,000 records of the compat monitor's stream (`stabwatch.compat.StabilityMonitor.compute` at the "docs"
  size: a gradient norm, one spiking layer's firing statistics), and the sum over the 8 rules the compat
  monitor runs.
* ``healthy`` — healthy runs of 1,000 steps, several seeds: warning/critical alerts per run, and the
  largest value each default rule's statistic reached (the "healthy maxima" its threshold is set against):
  a ratio to the trailing median, a robust z-score, a level.
* ``shadow`` — the running Lyapunov estimate (``chaotic``) on healthy MLP runs and with the learning rate
  ×20, with ``Monitor(shadow=sw.Shadow(..., every=100))``.
* ``detect`` — detection delay: a fault (learning rate ×20, weights scaled, a NaN in the input) is
  injected at a step ``100 k + j``, ``k`` in 3..7, ``j`` in 1..79 (so in [301, 779], at least 21 steps
  before a multiple of 100, see ``detection``); the delay is the number of steps until the first alert
  whose reason fits the fault. With the default preset (update ratio every 10 steps) and with the update
  family every step.
* ``repeats`` — alerts and recoveries in the 300 steps after a fault, with the default cooldowns and
  clear levels and without them (``cooldown=0, clear_after=1``): how much repetition they remove, and
  that the first alert is not delayed.
* ``batch`` — the gradient condition number ``grad_condition`` of one layer against the batch size (the
  reason the ``ill_conditioned`` rule was retired), and the default rules on a run whose batch size
  changes from 8 to 255.
* ``rnn`` — the spectral radius is no test for exploding gradients: ``W = [[2, 2], [-2, -2]]`` has
  ρ = 0 and ‖W‖₂ = 4, and in a tanh RNN whose units saturate in turn the Jacobian ∂h_T/∂h_0 grows 2× per
  step.

Usage: ``python benchmarks/bench_alerts.py [--seeds 10] [--fault-seeds 5] [--only healthy,detect]``.
Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stabwatch as sw
from stabwatch.alerts import AlertEngine, RatioRule, Rule, SpikeRule, SustainedRule, ThresholdRule, default_rules
from stabwatch.alerts.base import Window
from stabwatch.alerts.rules.spike import MAD_TO_SIGMA
from stabwatch.compat import _RULES as _COMPAT_RULES
from tests.alerts.scenarios import EXPECTED, FAULTS, MODELS, make, run

SECTIONS = ("table", "cost", "rules", "healthy", "shadow", "detect", "repeats", "batch", "rnn")


def _num(x: float) -> str:
    return f"{x:g}"


def rule_row(rule: Rule) -> str:
    """One markdown row of the parameter table of docs/alerts.md for a default rule."""
    if isinstance(rule, RatioRule):
        cond = f"{'≥ ' if rule.direction == 'up' else '≤ 1/'}{_num(rule.factor)}× median"
        if rule.instant_factor is not None:
            cond += f" (or {_num(rule.instant_factor)}× once)"
        if rule.floor is not None:
            cond += f", ≥ {_num(rule.floor)}"
        window = f"{rule.window} (judged from {rule.min_history})"
        patience = str(rule.patience)
    elif isinstance(rule, SpikeRule):
        cond = f"z ≥ {_num(rule.z)} ({'log' if rule.log else 'linear'}, {rule.method})"
        if rule.instant_z is not None:
            cond += f" (or z ≥ {_num(rule.instant_z)} once)"
        if rule.min_ratio is not None:
            cond += f", ≥ {_num(rule.min_ratio)}× median"
        window = f"{rule.window} (judged from {rule.warmup})"
        patience = str(rule.patience)
    elif isinstance(rule, SustainedRule):
        cond = f"> {_num(rule.above)}" if rule.above is not None else f"< {_num(rule.below)}"  # type: ignore[arg-type]
        window = "-"
        patience = f"{rule.k} of {rule.n}"
    elif isinstance(rule, ThresholdRule):
        cond = f"> {_num(rule.above)}" if rule.above is not None else f"< {_num(rule.below)}"  # type: ignore[arg-type]
        if rule.clear is not None:
            cond += f" (clears at {_num(rule.clear)})"
        window = "-"
        patience = str(rule.patience)
    elif type(rule).__name__ == "TrendRule":
        r: Any = rule
        cond = f"fitted growth ≥ {_num(r.factor)}×, t ≥ {_num(r.min_t)}"
        if r.floor is not None:
            cond += f", ≥ {_num(r.floor)}"
        window = str(r.window)
        patience = str(rule.patience)
    else:
        cond, window, patience = "non-finite", "-", str(rule.patience)
    return (
        f"| `{rule.name}` | `{type(rule).__name__}` | `{rule.metric}` | {cond} | {window} | {patience} | "
        f"{rule.cooldown} | {rule.clear_after} | {rule.severity.value} |"
    )


def table() -> None:
    print("\n0. the default rules (markdown, as in docs/alerts.md)")
    print(
        "| rule | type | watches | condition | window (values) | patience | cooldown (steps) | clear_after | severity |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rule in default_rules():
        print(rule_row(rule))


def detection(fault_seeds: int) -> None:
    print("\n3. detection delay (steps from the fault to the first fitting alert; '-' = none in 20 steps)")
    rng = random.Random(0)
    # runs stop 20 steps after the fault; the fault step is kept 21+ steps before a multiple of 100, where
    # the default preset's spectral family runs (a NaN weight matrix there used to crash eigvals)
    draws = {(model, fault): [100 * rng.randrange(3, 8) + rng.randrange(1, 80) for _ in range(fault_seeds)]
             for model in MODELS for fault in FAULTS}  # fmt: skip
    every = sorted(at for ats in draws.values() for at in ats)
    print(f"   fault steps: 100 k + j, k in 3..7, j in 1..79 (range [301, 779]); drawn: {every[0]}..{every[-1]}")
    print(f"   {'model':<5} {'fault':<6} {'preset':<16} {'delays':<28} {'<=5 steps':>9} {'mean':>6} {'max':>5}")
    for model in MODELS:
        for fault in FAULTS:
            ats = draws[(model, fault)]
            for mode, opts in (("default", {}), ("update every 1", {"every": {"update": 1}})):
                delays, by = [], set()
                for seed, at in enumerate(ats):
                    r = run(model, seed, 1000, fault=fault, at=at, **opts)
                    delays.append(r.detection_delay())
                    d = delays[-1]
                    by |= {
                        a.rule for a in r.alerts if d is not None and a.step == at + d and a.reason in EXPECTED[fault]
                    }
                found = [d for d in delays if d is not None]
                shown = ",".join("-" if d is None else str(d) for d in delays)
                within = sum(1 for d in found if d <= 5)
                mean = f"{statistics.mean(found):.1f}" if found else "-"
                worst = str(max(found)) if len(found) == len(delays) else "-"
                print(
                    f"   {model:<5} {fault:<6} {mode:<16} {shown:<28} {within:>4}/{len(delays):<4} {mean:>6} {worst:>5}"
                    f"  first: {', '.join(sorted(by)) or '-'}"
                )


def _ratios(values: list[tuple[int, float]], window: int, min_history: int, up: bool = True) -> list[float]:
    """What `RatioRule` judges, value by value: value / trailing median (``up``) or median / value."""
    w, out = Window(window), []
    for step, v in values:
        if len(w) >= min_history:
            med = w.median()
            if med > 0 and v > 0:
                out.append(v / med if up else med / v)
        w.push(step, v)
    return out


def _zscores(values: list[tuple[int, float]], window: int, warmup: int, min_scale: float = 1e-3) -> list[float]:
    """What `SpikeRule(log=True, method="mad")` judges: the robust z-score of ln(value)."""
    w, out, n = Window(window), [], 0
    for step, v in values:
        if v <= 0:
            continue
        y = math.log(v)
        if n >= warmup:
            center = w.median()
            out.append((y - center) / max(MAD_TO_SIGMA * w.mad(center), min_scale))
        w.push(step, y)
        n += 1
    return out


def _two(xs: list[float]) -> float:
    """The largest value held on two consecutive judgements (``patience=2``)."""
    return max((min(a, b) for a, b in itertools.pairwise(xs)), default=float("nan"))


def _series(records: list[sw.StabilityMetrics], field: str, layer: str | None = None) -> list[tuple[int, float]]:
    out = []
    for r in records:
        v = getattr(r, field) if layer is None else r.layers.get(layer, {}).get(field)
        if v is not None and math.isfinite(v):
            out.append((r.step, float(v)))
    return out


def _healthy_stats(records: list[sw.StabilityMetrics]) -> dict[str, float]:
    """The largest value of each default rule's statistic on one healthy run."""
    nan = float("nan")
    g = _series(records, "grad_norm")
    up = _ratios(g, 50, 10)
    stats = {
        "grad_explode ratio, 1 step": max(up),
        "grad_explode ratio, 2 steps": _two(up),
        "grad_vanish drop": max(_ratios(g, 50, 10, up=False)),
    }
    z = _zscores(_series(records, "loss"), 100, 20)
    stats["loss_spike z, 1 step"], stats["loss_spike z, 2 steps"] = max(z), _two(z)
    u = _series(records, "update_ratio")
    ur = _ratios(u, 20, 10)
    stats["update_ratio"] = max(v for _, v in u)
    stats["update_jump ratio, 1"], stats["update_jump ratio, 2"] = max(ur), _two(ur)
    layers = sorted({name for r in records for name in r.layers})
    collapse = next(rule.binding.field for rule in default_rules() if rule.name == "collapse")
    per_layer: dict[str, list[float]] = {
        "grad_explode_layer ratio, 1": [], "grad_explode_layer ratio, 2": [], "spectral_radius": [],
        "dead_frac": [], "saturated_frac": [], f"collapse drop ({collapse})": [],
    }  # fmt: skip
    for name in layers:
        lr = _ratios(_series(records, "grad_norm", name), 50, 10)
        if lr:
            per_layer["grad_explode_layer ratio, 1"].append(max(lr))
            per_layer["grad_explode_layer ratio, 2"].append(_two(lr))
        for field in ("spectral_radius", "dead_frac", "saturated_frac"):
            per_layer[field] += [v for _, v in _series(records, field, name)]
        per_layer[f"collapse drop ({collapse})"] += _ratios(_series(records, collapse, name), 10, 3, up=False)
    stats.update({k: max(v) if v else nan for k, v in per_layer.items()})
    return stats


def healthy(seeds: int) -> None:
    print(f"\n2. healthy runs (1,000 steps, seeds 0..{seeds - 1}, default preset)")
    for model in MODELS:
        counts, infos, rules = [], 0, {}
        stats: dict[str, list[float]] = {}
        for seed in range(seeds):
            r = run(model, seed, 1000)
            counts.append(len(r.serious()))
            infos += len(r.alerts) - len(r.serious())
            for a in r.serious():
                rules[a.rule] = rules.get(a.rule, 0) + 1
            for k, v in _healthy_stats(r.records).items():
                stats.setdefault(k, []).append(v)
        runs_with = sum(1 for c in counts if c)
        print(
            f"   {model}: {sum(counts)} warning/critical alerts in {seeds} runs "
            f"({sum(counts) / (seeds * 1000) * 1000:.2f} per 1,000 steps; {runs_with}/{seeds} runs with any); "
            f"info alerts: {infos}; by rule: {rules or '-'}"
        )
        print(f"   {model}: largest value over the {seeds} runs of each rule's statistic (ratio = x / median)")
        for k, vs in stats.items():
            finite = [v for v in vs if math.isfinite(v)]
            print(f"      {k:<38} {max(finite):.3g}" if finite else f"      {k:<38} - (not measured)")


def shadow(seeds: int) -> None:
    from tests.alerts.scenarios import _loss

    print("\n4. chaotic: running Lyapunov estimates (nats/step), MLP, Shadow(every=100)")

    def lyap(seed: int, steps: int, lr_factor: float) -> list[tuple[int, float]]:
        net, opt, batch = make("mlp", seed)
        for group in opt.param_groups:
            group["lr"] *= lr_factor
        sh = sw.Shadow(lambda m, b: _loss("mlp", m(b[0]), b[1]), every=100)
        with sw.Monitor(net, opt, shadow=sh, preset="cheap", alerts=False) as mon:
            for step in range(steps):
                x, y = batch(step)
                opt.zero_grad()
                loss = _loss("mlp", net(x), y)
                loss.backward()
                opt.step()
                mon.step(loss=loss, batch=(x, y))
        return [(r.step, r.lyapunov) for r in mon.records if r.lyapunov is not None and math.isfinite(r.lyapunov)]

    def longest_above(values: list[float], level: float = 0.05) -> int:
        best = run_ = 0
        for v in values:
            run_ = run_ + 1 if v > level else 0
            best = max(best, run_)
        return best

    early, late, fast, runs_ok, runs_bad = [], [], [], [], []
    for seed in range(seeds):
        est = lyap(seed, 500, 1.0)
        early += [v for s, v in est if s < 20]
        late += [v for s, v in est if s >= 100]
        runs_ok.append(longest_above([v for _, v in est]))
        bad = [v for _, v in lyap(seed, 40, 20.0)]
        fast += bad
        runs_bad.append(longest_above(bad))
    print(
        f"   healthy (500 steps), seeds 0..{seeds - 1}: max in steps 0-19 {max(early):.3g}, "
        f"max from step 100 {max(late):.3g}; longest run of estimates > 0.05: {max(runs_ok)}"
    )
    print(
        f"   learning rate x20 (40 steps): estimates {min(fast):.3g} .. {max(fast):.3g}; "
        f"longest run > 0.05 per seed: {runs_bad}"
    )


def _quiet_rules() -> list[Rule]:
    rules = default_rules()
    for r in rules:
        r.cooldown, r.clear_after = 0, 1
    return rules


def repeats(fault_seeds: int) -> None:
    print("\n5. repeated alerts in the 300 steps after a fault (alerts + recoveries, summed over seeds)")
    head = f"   {'model':<5} {'fault':<6} {'defaults':>16} {'cooldown 0, clear 1':>22}"
    print(f"{head}  first alert (steps after the fault)")
    for model in MODELS:
        for fault in ("lr", "scale"):
            cells, firsts = [], []
            for rules in (default_rules, _quiet_rules):
                n_alerts = n_rec = 0
                first = []
                for seed in range(fault_seeds):
                    at = 311 + 100 * (seed % 4)
                    r = run(model, seed, 1000, fault=fault, at=at, stop_after=300,
                            alerts=AlertEngine(rules(), log_alerts=False))  # fmt: skip
                    n_rec += sum(1 for a in r.alerts if a.reason is sw.AlertReason.RECOVERED)
                    n_alerts += sum(1 for a in r.alerts if a.reason is not sw.AlertReason.RECOVERED)
                    first.append(r.detection_delay())
                cells.append(f"{n_alerts} + {n_rec}")
                firsts.append(",".join("-" if d is None else str(d) for d in first))
            print(f"   {model:<5} {fault:<6} {cells[0]:>16} {cells[1]:>22}  {firsts[0]} | {firsts[1]}")


def _one_layer_kappa(batch_sizes: tuple[int, ...], width: int = 256) -> list[tuple[int, float, float]]:
    """``[(B, rank, grad_condition of the first layer)]`` of ``Linear(width, width) -> tanh -> Linear(width, 1)``
    at initialisation, one batch of each size (random inputs and targets)."""
    from stabwatch.collectors import GradSVCollector

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # the same weights for every batch size
    g = torch.Generator().manual_seed(1)
    out = []
    with sw.Monitor(net, opt, preset="cheap", collectors=[GradSVCollector(every=1)], alerts=False) as mon:
        for b in batch_sizes:
            x, y = torch.randn(b, width, generator=g), torch.randn(b, 1, generator=g)
            opt.zero_grad()
            loss = (net(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            rec = mon.step(loss=loss)
            out.append((b, rec.layers["0"]["grad_rank"], rec.layers["0"]["grad_condition"]))
    return out


def batch_size() -> None:
    from stabwatch.collectors import GradSVCollector

    print("\n6. grad_condition of one layer (Linear(256, 256), same weights) against the batch size B")
    for b, rank, kappa in _one_layer_kappa((8, 32, 128, 255, 1024)):
        print(f"   B = {b:<5} rank {rank:<5.0f} grad_condition {kappa:.3g}")
    # a run whose batch size changes (a batch-size ramp): the retired rule fires, the default rules do not
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(2)
    retired = RatioRule("layers:grad_condition", factor=1000.0, window=10, min_history=3, name="ill_conditioned")
    engine = AlertEngine([*default_rules(), retired], log_alerts=False)
    with sw.Monitor(net, opt, preset="default", collectors=[GradSVCollector(every=1)], alerts=engine) as mon:
        for step in range(60):
            b = 4 if step < 30 else 255
            x, y = torch.randn(b, 256, generator=g), torch.randn(b, 1, generator=g)
            opt.zero_grad()
            loss = (net(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    fired = sorted({f"{a.rule}@{a.step}" for a in mon.alerts if a.reason is not sw.AlertReason.RECOVERED})
    kappa = _series(mon.records, "grad_condition", "0")
    before = statistics.median(v for s, v in kappa if s < 30)
    after = statistics.median(v for s, v in kappa if s >= 30)
    print(
        f"   a run with B = 4 for 30 steps, then 255: median grad_condition {before:.3g} -> {after:.3g} "
        f"({after / before:.0f}x); alerts: {', '.join(fired) or '-'} (ill_conditioned = the retired rule)"
    )


def rnn_counterexample(steps: int = 12) -> None:
    print("\n7. spectral radius vs gradients through time: h_t = tanh(W h_(t-1) + x_t), W = [[2, 2], [-2, -2]]")
    w = torch.tensor([[2.0, 2.0], [-2.0, -2.0]], dtype=torch.float64)
    rho = float(torch.linalg.eigvals(w).abs().max())
    print(f"   rho(W) = {rho:.2g}, ||W||_2 = {float(torch.linalg.matrix_norm(w, 2)):.3g}, W @ W = 0")
    norms = _jacobian_norms(w, steps)
    growth = [b / a for a, b in itertools.pairwise(norms)]
    print(f"   ||dh_T/dh_0||_2 for T = 1..{steps}: " + ", ".join(f"{n:.3g}" for n in norms))
    print(f"   growth per step: {min(growth):.4f} .. {max(growth):.4f}")


def _jacobian_norms(w: torch.Tensor, steps: int) -> list[float]:
    """‖∂h_T/∂h_0‖₂ for T = 1..steps of ``h_t = tanh(W h_(t-1) + x_t)``, the inputs chosen so that the two
    units saturate in turn (pre-activation 0 for one, 10 for the other), by autograd through the loop."""
    h0 = torch.zeros(2, dtype=torch.float64)
    xs, h = [], h0
    for t in range(steps):  # inputs that put the pre-activation at (0, 10), (10, 0), (0, 10), ...
        target = torch.tensor([0.0, 10.0] if t % 2 == 0 else [10.0, 0.0], dtype=torch.float64)
        xs.append(target - w @ h)
        h = torch.tanh(target)
    out = []
    for t_end in range(1, steps + 1):

        def f(h: torch.Tensor, t_end: int = t_end) -> torch.Tensor:
            for x in xs[:t_end]:
                h = torch.tanh(w @ h + x)
            return h

        jac = torch.autograd.functional.jacobian(f, h0)
        out.append(float(torch.linalg.matrix_norm(jac, 2)))
    return out


def cost(steps: int = 400) -> None:
    print("\n1. engine cost per record (default rules) vs a bare training step")
    from tests.alerts.scenarios import _loss

    for model in MODELS:
        net, opt, batch = make(model, 0)
        batches = [batch(s) for s in range(steps)]
        t0 = time.perf_counter()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, net(x), y)
            loss.backward()
            opt.step()
        bare = (time.perf_counter() - t0) / steps
        records = run(model, 1, steps, alerts=False, preset="default").records
        best = float("inf")
        for _ in range(3):
            engine = AlertEngine(default_rules(), log_alerts=False)
            t0 = time.perf_counter()
            for rec in records:
                engine.evaluate(rec)
            best = min(best, (time.perf_counter() - t0) / len(records))
        layers = len({layer for r in records for layer in r.layers})
        print(
            f"   {model}: bare step {bare * 1e3:.3f} ms, engine {best * 1e6:.1f} µs/record "
            f"({len(default_rules())} rules, {layers} layers) -> ratio {best / bare:.3f}"
        )


#: the default rules `stabwatch.compat.StabilityMonitor` runs (those that watch what its records hold)
COMPAT_RULES = _COMPAT_RULES


def compat_stream(n: int = 2000, seed: int = 0) -> list[sw.StabilityMetrics]:
    """Records as the compat monitor makes them at the "docs" size: a gradient norm with multiplicative
    noise, one spiking layer ("network") with its firing and membrane statistics, the Lyapunov estimate."""
    rng = random.Random(seed)
    out = []
    for step in range(n):
        fr = max(0.0, rng.gauss(0.15, 0.02))
        layer = {
            "firing_rate_mean": fr,
            "firing_rate_std": abs(rng.gauss(0.023, 0.003)),
            "dead_neuron_frac": rng.choice((0.0, 0.0, 0.0, 0.03)),
            "saturated_neuron_frac": 0.0,
            "membrane_mean": rng.gauss(0.0, 0.02),
            "membrane_std": abs(rng.gauss(1.0, 0.02)),
        }
        out.append(
            sw.StabilityMetrics(
                step=step,
                grad_norm=0.77 * math.exp(rng.gauss(0.0, 0.1)),
                layers={"network": layer},
                extra={"compat/lyapunov": 0.02},
                **{k: v for k, v in layer.items()},
            )
        )
    return out


def rule_cost(repeats: int = 7) -> None:
    """Each default rule alone: best of ``repeats`` passes (a fresh rule each) over 2,000 records."""
    from stabwatch.alerts.base import RecordView

    records = compat_stream()
    views = [RecordView(r) for r in records]
    print(f"\n1b. each default rule's cost per record, alone ({len(records)} compat-stream records, best of {repeats})")
    clock = time.perf_counter
    best: dict[str, float] = {}
    for _ in range(repeats):  # passes interleaved over the rules, so a busy moment hits them all alike
        for rule in default_rules():
            observe = rule.observe
            t0 = clock()
            for view in views:
                observe(view)
            dt = (clock() - t0) / len(views)
            best[rule.name] = min(best.get(rule.name, math.inf), dt)
    for name, dt in best.items():
        mark = "  (compat)" if name in COMPAT_RULES else ""
        print(f"   {name:<22}{dt * 1e6:6.2f} µs/record{mark}")
    total = sum(best[n] for n in COMPAT_RULES)
    print(f"   {'compat rules, sum':<22}{total * 1e6:6.2f} µs/record ({len(COMPAT_RULES)} rules)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10, help="healthy runs per model")
    p.add_argument("--fault-seeds", type=int, default=5, help="runs per model, fault and preset")
    p.add_argument("--shadow-seeds", type=int, default=3, help="shadow runs (healthy and learning rate x20)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    args = p.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    logging.getLogger("stabwatch").setLevel(logging.CRITICAL)  # alerts are logged at ERROR and below
    torch.set_num_threads(1)
    print(f"stabwatch alert benchmark: torch {torch.__version__}, {torch.get_num_threads()} thread")
    t0 = time.perf_counter()
    runs = {
        "table": table,
        "cost": cost,
        "rules": rule_cost,
        "healthy": lambda: healthy(args.seeds),
        "shadow": lambda: shadow(args.shadow_seeds),
        "detect": lambda: detection(args.fault_seeds),
        "repeats": lambda: repeats(args.fault_seeds),
        "batch": batch_size,
        "rnn": rnn_counterexample,
    }
    for name in SECTIONS:
        if name in only:
            runs[name]()
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
