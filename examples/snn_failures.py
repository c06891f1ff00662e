"""The classic spiking-network failures, induced one at a time, and what stabwatch says about each.

An snntorch classifier ``Linear(64, 256) -> Leaky -> Linear(256, 10) -> Leaky`` (β 0.9, threshold 1,
fast-sigmoid surrogate of slope 25) on scikit-learn's digits, scaled to [0, 1] and rate-coded over
T = 25 steps; Adam 2e-3, batch 64, 300 steps; about 96 % test accuracy when healthy. Scenarios:

===================  ====================================================================================
``healthy``          as above (seeds 0, 1, 2: ``healthy``, ``healthy-s1``, ``healthy-s2``)
``dead``             hidden threshold 10× (10), input gain 0.25: the hidden layer starts silent
``saturated``        hidden threshold 0.01, hidden β 1 (no leak), input gain 10: the hidden layer fires
                     at a high rate and its membrane sits above the threshold
``surrogate``        fast-sigmoid slope 500 (20× steeper): the surrogate lets almost no gradient through
``lr-high``          learning rate 0.5 from step 0
``lr-jump``          learning rate 2e-3, raised to 0.2 at step 150
``slow-death``       ``fc1.bias`` lowered by 0.02 after every step from step 50
``fast-death``       ``fc1.bias`` lowered by 0.04 after every step from step 100
===================  ====================================================================================

Every run is measured **independently of stabwatch**, every step: the model itself keeps each layer's
spike counts per neuron and the hidden membrane's distance to the threshold (`SNN.forward`), and the
loop reads the gradient norm of each weight and the update ratio ``‖Δw‖ / ‖w‖`` around
``optimizer.step()``. From that trace, `visible_at` gives the step at which the failure becomes
visible (the definition per mechanism is printed with it). The same run is monitored by
`stabwatch.Monitor` (``default`` preset, or with ``every={"spiking": 1}``); `judge` compares the first
warning/critical alert with the visible step, and `Monitor.diagnose`'s first-ranked cause with the
mechanism that was induced. ``benchmarks/bench_snn_diagnosis.py`` runs all of them and prints the table.

Run: ``python examples/snn_failures.py`` (``--scenarios dead,lr-high``, ``--steps 100``,
``--spiking-every 1``, ``--full`` for the whole diagnosis text).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import stabwatch as sw
from stabwatch.diagnosis import Diagnosis, analyse
from stabwatch.metrics import Alert, AlertReason, Severity, StabilityMetrics

T = 25
HIDDEN = 256
BATCH = 64
STEPS = 300
LR = 2e-3


class SNN(nn.Module):
    """``Linear(64, 256) -> Leaky -> Linear(256, 10) -> Leaky`` with its own per-step measurements.

    In training mode each forward call adds, under ``torch.no_grad()``, the hidden and output spike
    counts per neuron, the hidden membrane's summed distance to the threshold and the element count to
    `counts` (cleared by `reset_counts`). These are the independent measurements: plain tensors read
    from what ``snn.Leaky`` returns, no hooks and nothing of stabwatch's.
    """

    def __init__(
        self,
        *,
        hidden_threshold: float = 1.0,
        hidden_beta: float = 0.9,
        slope: float = 25.0,
        gain: float = 1.0,
    ) -> None:
        super().__init__()
        import snntorch as snn
        from snntorch import surrogate

        grad = surrogate.fast_sigmoid(slope=slope)
        self.gain = gain
        self.fc1 = nn.Linear(64, HIDDEN)
        self.lif1 = snn.Leaky(beta=hidden_beta, threshold=hidden_threshold, spike_grad=grad)
        self.fc2 = nn.Linear(HIDDEN, 10)
        self.lif2 = snn.Leaky(beta=0.9, threshold=1.0, spike_grad=grad)
        self.counts: dict[str, torch.Tensor] = {}

    def reset_counts(self) -> None:
        self.counts = {
            "spk1": torch.zeros(HIDDEN),
            "spk2": torch.zeros(10),
            "dist1": torch.zeros(()),
            "samples": torch.zeros(()),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: spikes ``[T, B, 64]``; returns output spikes ``[T, B, 10]``."""
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = []
        measure = self.training and bool(self.counts)
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(self.gain * x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk2)
            if measure:
                with torch.no_grad():
                    self.counts["spk1"] += spk1.detach().sum(0)
                    self.counts["spk2"] += spk2.detach().sum(0)
                    self.counts["dist1"] += (self.lif1.threshold - mem1.detach()).sum()
                    self.counts["samples"] += spk1.shape[0]
        return torch.stack(out)


@dataclass(frozen=True)
class Scenario:
    """One way to train the classifier; ``mechanism`` names the failure (``None``: healthy)."""

    name: str
    description: str
    mechanism: str | None = None
    seed: int = 0
    hidden_threshold: float = 1.0
    hidden_beta: float = 0.9
    slope: float = 25.0
    gain: float = 1.0
    lr: float = LR
    lr_change: tuple[int, float] | None = None  # (step, new learning rate)
    bias_drift: tuple[int, float] | None = None  # (first step, change of fc1.bias after each step)

    @property
    def onset(self) -> int:
        """The step the failure is induced at (0: from the start)."""
        if self.lr_change is not None:
            return self.lr_change[0]
        if self.bias_drift is not None:
            return self.bias_drift[0]
        return 0


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("healthy", "default setup, seed 0"),
        Scenario("healthy-s1", "default setup, seed 1", seed=1),
        Scenario("healthy-s2", "default setup, seed 2", seed=2),
        Scenario("dead", "hidden threshold 10x, input gain 0.25", "dead", hidden_threshold=10.0, gain=0.25),
        Scenario(
            "saturated",
            "hidden threshold 0.01, beta 1, input gain 10",
            "saturation",
            hidden_threshold=0.01,
            hidden_beta=1.0,
            gain=10.0,
        ),
        Scenario("surrogate", "fast-sigmoid slope 500", "surrogate", slope=500.0),
        Scenario("lr-high", "learning rate 0.5 from step 0", "step_size", lr=0.5),
        Scenario("lr-jump", "learning rate 2e-3 -> 0.2 at step 150", "step_size", lr_change=(150, 0.2)),
        Scenario("slow-death", "fc1 bias -0.02/step from step 50", "dead", bias_drift=(50, -0.02)),
        Scenario("fast-death", "fc1 bias -0.04/step from step 100", "dead", bias_drift=(100, -0.04)),
    )
}

#: the cause keys (`stabwatch.diagnosis.Cause.key`, substrings) that name each mechanism
MECHANISM_CAUSES: dict[str, tuple[str, ...]] = {
    "dead": ("dead", "silent"),
    "saturation": ("satur",),
    "surrogate": ("surrogate",),
    "step_size": ("step_size",),
}
#: advice for non-spiking networks, wrong in a first-ranked cause of a spiking failure
NON_SPIKING_ADVICE: tuple[str, ...] = ("ReLU", "He init", "He for", "Xavier", "BatchNorm")
#: configurations of the monitored run: name -> ``Monitor(every=...)``
CONFIGS: dict[str, dict[str, Any]] = {"default": {}, "spiking@1": {"spiking": 1}}


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1] (the firing probability per time step); train / test split 80 / 20."""
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32) / 16.0
    y = torch.tensor(y_np, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def rate_code(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli spike trains ``[T, B, 64]`` with per-step probability ``x``."""
    return (torch.rand(T, *x.shape, generator=generator) < x).float()


def accuracy(model: SNN, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        counts = model(rate_code(x, torch.Generator().manual_seed(1))).sum(0)
    model.train()
    return float((counts.argmax(1) == y).float().mean())


@dataclass
class Run:
    """One training run: the independent trace and, when monitored, what stabwatch said."""

    scenario: Scenario
    config: str | None
    trace: list[dict[str, float]]
    accuracy: float
    seconds: float
    alerts: list[Alert] = field(default_factory=list)
    records: list[StabilityMetrics] = field(default_factory=list)
    diagnosis: Diagnosis | None = None
    diagnosis_text: str = ""
    cpu_seconds: float = 0.0

    @property
    def real_alerts(self) -> list[Alert]:
        return [a for a in self.alerts if a.reason is not AlertReason.RECOVERED]

    @property
    def first_alert(self) -> Alert | None:
        return min(self.real_alerts, key=lambda a: a.step, default=None)

    @property
    def first_flag(self) -> Alert | None:
        """The first warning or critical alert."""
        flags = [a for a in self.real_alerts if a.severity is not Severity.INFO]
        return min(flags, key=lambda a: a.step, default=None)

    @property
    def n_flags(self) -> int:
        return sum(1 for a in self.real_alerts if a.severity is not Severity.INFO)


def train(scenario: Scenario, steps: int = STEPS, configs: Sequence[str] = ("default",)) -> list[Run]:
    """Train one scenario, watched by one `stabwatch.Monitor` per entry of ``configs`` (keys of `CONFIGS`;
    empty: no monitor); returns one `Run` per configuration (one unmonitored `Run` for none).

    Several monitors on one run see the same training as one monitor each would, since a monitor does
    not change training (``tests/spiking/test_snn_failures_example.py`` checks that the alerts agree);
    the benchmark uses this to train each scenario once for both of its configurations.
    """
    torch.manual_seed(scenario.seed)
    x_train, y_train, x_test, y_test = load_digits_split(0)
    model = SNN(
        hidden_threshold=scenario.hidden_threshold,
        hidden_beta=scenario.hidden_beta,
        slope=scenario.slope,
        gain=scenario.gain,
    )
    opt = torch.optim.Adam(model.parameters(), lr=scenario.lr)
    g = torch.Generator().manual_seed(scenario.seed)
    alerts: dict[str, list[Alert]] = {c: [] for c in configs}
    monitors = {c: sw.Monitor(model, opt, every=dict(CONFIGS[c]), on_alert=alerts[c].append).start() for c in configs}
    weights = {"fc1": model.fc1.weight, "fc2": model.fc2.weight}
    trace: list[dict[str, float]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for step in range(steps):
            if scenario.lr_change is not None and step == scenario.lr_change[0]:
                for group in opt.param_groups:
                    group["lr"] = scenario.lr_change[1]
            idx = torch.randint(0, len(y_train), (BATCH,), generator=g)
            opt.zero_grad()
            model.reset_counts()
            counts = model(rate_code(x_train[idx], g)).sum(0)
            loss = nn.functional.cross_entropy(counts, y_train[idx])
            loss.backward()
            row = _measure(model, weights, float(loss.detach()))
            before = {k: w.detach().clone() for k, w in weights.items()}
            opt.step()
            if scenario.bias_drift is not None and step >= scenario.bias_drift[0]:
                with torch.no_grad():
                    model.fc1.bias.add_(scenario.bias_drift[1])
            for k, w in weights.items():
                row[f"update_ratio/{k}"] = float((w.detach() - before[k]).norm() / before[k].norm())
            trace.append(row)
            for mon in monitors.values():
                mon.step(loss=loss)
    finally:
        for mon in monitors.values():
            mon.close()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.counts = {}
    acc = accuracy(model, x_test, y_test)
    if not configs:
        return [Run(scenario, None, trace, acc, seconds, cpu_seconds=cpu)]
    runs = []
    for c, mon in monitors.items():
        run = Run(scenario, c, trace, acc, seconds, alerts[c], list(mon.records), cpu_seconds=cpu)
        run.diagnosis = analyse(list(mon.records), alerts[c])
        run.diagnosis_text = mon.diagnose()
        runs.append(run)
    return runs


def _measure(model: SNN, weights: dict[str, torch.Tensor], loss: float) -> dict[str, float]:
    c = model.counts
    n = float(c["samples"])  # batch x time steps: spike opportunities per neuron
    rate1, rate2 = c["spk1"] / n, c["spk2"] / n
    row = {
        "loss": loss,
        "rate/hidden": float(rate1.mean()),
        "dead/hidden": float((rate1 < 0.01).float().mean()),
        "saturated/hidden": float((rate1 > 0.9).float().mean()),
        "rate/out": float(rate2.mean()),
        "dead/out": float((rate2 < 0.01).float().mean()),
        "saturated/out": float((rate2 > 0.9).float().mean()),
        "threshold_distance/hidden": float(c["dist1"] / (n * HIDDEN)),
    }
    for k, w in weights.items():
        row[f"grad/{k}"] = float(w.grad.norm()) if w.grad is not None else 0.0
    return row


# ------------------------------------------------------------------------------------------------
# when a failure becomes visible, in the independent trace

#: healthy reference levels (median over the first 20 steps of healthy seed 0), filled by `reference`
_REFERENCE: dict[str, float] = {}


def reference() -> dict[str, float]:
    """Healthy levels to compare with: hidden firing rate and fc1 gradient norm, steps 0-19 of seed 0."""
    if not _REFERENCE:
        (run,) = train(SCENARIOS["healthy"], steps=20, configs=())
        for key in ("rate/hidden", "grad/fc1"):
            _REFERENCE[key] = float(torch.tensor([r[key] for r in run.trace]).median())
    return _REFERENCE


def _median(values: list[float]) -> float:
    return float(torch.tensor(values).median()) if values else float("nan")


def visible_at(run: Run) -> tuple[int | None, str]:
    """The step at which the scenario's failure shows in the independent trace, and the criterion."""
    s, tr = run.scenario, run.trace
    mech = s.mechanism
    if mech is None:
        return None, "-"
    if mech == "dead" and s.onset == 0:
        crit = "hidden > 50% dead (rate < 0.01)"
        return next((i for i, r in enumerate(tr) if r["dead/hidden"] > 0.5), None), crit
    if mech == "dead":
        base = _median([r["rate/hidden"] for r in tr[max(0, s.onset - 20) : s.onset]])
        crit = f"hidden rate < half its level before step {s.onset} ({base:.3f})"
        hit = next((i for i in range(s.onset, len(tr)) if tr[i]["rate/hidden"] < 0.5 * base), None)
        return hit, crit
    if mech == "saturation":
        ref = reference()["rate/hidden"]
        crit = f"hidden rate > 3x healthy ({3 * ref:.2f}), > 10% saturated, or membrane above threshold"
        hit = next(
            (
                i
                for i, r in enumerate(tr)
                if r["rate/hidden"] > 3 * ref or r["saturated/hidden"] > 0.1 or r["threshold_distance/hidden"] < 0
            ),
            None,
        )
        return hit, crit
    if mech == "surrogate":
        ref = reference()["grad/fc1"]
        crit = f"fc1 gradient < 1/10 of healthy ({ref / 10:.2g})"
        return next((i for i, r in enumerate(tr) if r["grad/fc1"] < ref / 10), None), crit
    if mech == "step_size":
        crit = "an update > 10% of the weights, or loss > 3x its median over the 20 steps before"
        for i in range(s.onset, len(tr)):
            r = tr[i]
            past = [q["loss"] for q in tr[max(0, i - 20) : i]]
            if max(r["update_ratio/fc1"], r["update_ratio/fc2"]) > 0.1 or (past and r["loss"] > 3 * _median(past)):
                return i, crit
        return None, crit
    raise ValueError(f"unknown mechanism {mech!r}")


# ------------------------------------------------------------------------------------------------
# judging what stabwatch said


@dataclass
class Verdict:
    """A monitored run against the targets of issue #20.

    Attributes:
        visible / criterion: `visible_at`.
        flag: the first warning/critical alert at or after the onset.
        false_flags: warning/critical alerts before the onset (all of them in a healthy run).
        delay: ``flag.step - visible``.
        cause: the first-ranked cause's key (``-``: none); cause_ok / advice_ok: it names the induced
            mechanism / it gives no advice for non-spiking networks.
        met: all targets met; why: which are not.
    """

    visible: int | None
    criterion: str
    flag: Alert | None
    false_flags: int
    delay: int | None
    cause: str
    cause_ok: bool
    advice_ok: bool
    met: bool
    why: str


def judge(run: Run) -> Verdict:
    """Flagged (warning/critical) within 10 steps of visibility, with no warning before the onset; first
    cause the induced mechanism with no non-spiking advice; healthy: no warning at all."""
    visible, crit = visible_at(run)
    s = run.scenario
    flags = sorted((a for a in run.real_alerts if a.severity is not Severity.INFO), key=lambda a: a.step)
    onset = s.onset if s.mechanism is not None else len(run.trace)
    false_flags = sum(1 for a in flags if a.step < onset)
    flag = next((a for a in flags if a.step >= onset), None)
    causes = run.diagnosis.causes if run.diagnosis is not None else []
    first = causes[0] if causes else None
    cause = first.key if first is not None else "-"
    if s.mechanism is None:
        met = false_flags == 0
        note = "" if met else f"{false_flags} warning(s)"
        return Verdict(None, crit, None, false_flags, None, cause, True, True, met, note)
    delay = None if flag is None or visible is None else flag.step - visible
    text = " ".join([first.title, *first.actions]) if first is not None else ""
    bad = [w for w in NON_SPIKING_ADVICE if w in text]
    vanished = any(a.reason is AlertReason.VANISHING_GRADIENT for a in run.real_alerts)
    if vanished and "clip" in text.lower():
        bad.append("clipping under Adam while gradients vanish")
    cause_ok = first is not None and any(k in first.key for k in MECHANISM_CAUSES[s.mechanism])
    why = []
    if visible is None:
        why.append("never visible")
    if false_flags:
        why.append(f"{false_flags} warning(s) before the onset ({s.onset})")
    if flag is None:
        why.append("not flagged")
    elif delay is not None and delay > 10:
        why.append(f"flagged {delay} steps late")
    if not cause_ok:
        why.append(f"cause {cause}")
    if bad:
        why.append("advice: " + ", ".join(bad))
    return Verdict(visible, crit, flag, false_flags, delay, cause, cause_ok, not bad, not why, "; ".join(why))


def what_happened(run: Run) -> str:
    """The failure in the independent measurements, in a few numbers."""
    s, tr = run.scenario, run.trace
    last = tr[-20:]

    def avg(key: str, rows: list[dict[str, float]]) -> float:
        return sum(r[key] for r in rows) / max(1, len(rows))

    if s.mechanism == "dead" and s.onset == 0:
        silent = next((i for i, r in enumerate(tr) if r["rate/hidden"] > 0), len(tr))
        return f"hidden layer silent for {silent} steps, {tr[-1]['dead/hidden']:.0%} dead at the end"
    if s.mechanism == "dead":
        base = _median([r["rate/hidden"] for r in tr[max(0, s.onset - 20) : s.onset]])
        half = next((i for i in range(s.onset, len(tr)) if tr[i]["rate/hidden"] < 0.5 * base), None)
        dead = next((i for i in range(s.onset, len(tr)) if tr[i]["dead/hidden"] > 0.5), None)
        return f"rate halves at {half}, > 50% dead at {dead}, {tr[-1]['dead/hidden']:.0%} dead at the end"
    if s.mechanism == "saturation":
        return (
            f"hidden rate {avg('rate/hidden', last):.2f}, {avg('saturated/hidden', last):.0%} saturated, "
            f"membrane-threshold distance {avg('threshold_distance/hidden', last):+.2f} (last 20 steps)"
        )
    if s.mechanism == "surrogate":
        ref = reference()["grad/fc1"]
        return f"fc1 gradient {ref / max(tr[0]['grad/fc1'], 1e-30):.0f}x below healthy at step 0"
    if s.mechanism == "step_size":
        i = s.onset
        nxt = tr[i + 1]["loss"] if i + 1 < len(tr) else float("nan")
        return (
            f"update ratio {tr[i]['update_ratio/fc1']:.2g} at step {i}, loss {tr[i]['loss']:.2f} -> "
            f"{nxt:.2f}; output {avg('saturated/out', last):.0%} saturated at the end"
        )
    return f"hidden rate {avg('rate/hidden', last):.2f}, {avg('dead/hidden', last):.0%} dead (last 20 steps)"


def summary(run: Run) -> str:
    """A few lines: what was visible when, what stabwatch flagged, its first cause."""
    v = judge(run)
    s = run.scenario
    lines = [f"== {s.name}: {s.description} [{run.config}] — test accuracy {run.accuracy:.1%}"]
    lines.append(f"  measured: {what_happened(run)}")
    if s.mechanism is not None:
        lines.append(f"  visible at step {v.visible} ({v.criterion})")
    first = run.first_alert
    lines.append(f"  first alert: {first if first is not None else 'none'}")
    if v.flag is not None and v.flag is not first:
        lines.append(f"  first warning after the onset: {v.flag}")
    d = run.diagnosis
    if d is not None:
        lines.append(f"  verdict {d.verdict.upper()}, {run.n_flags} warning/critical alert(s)")
        for c in d.causes[:2]:
            lines.append(f"  cause [{c.key}] {c.title}; try: {c.actions[0] if c.actions else '-'}")
    lines.append(f"  target {'met' if v.met else 'NOT met: ' + v.why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Run]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--spiking-every", type=int, default=None, help="run the spiking family every N steps")
    ap.add_argument("--full", action="store_true", help="print the whole diagnosis of each run")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    config = "default"
    if args.spiking_every is not None:
        CONFIGS[f"spiking@{args.spiking_every}"] = {"spiking": args.spiking_every}
        config = f"spiking@{args.spiking_every}"
    runs = []
    for name in names:
        (run,) = train(SCENARIOS[name], steps=args.steps, configs=(config,))
        print(summary(run))
        if args.full:
            print(run.diagnosis_text)
        print()
        runs.append(run)
    return runs


if __name__ == "__main__":
    logging.getLogger("stabwatch").setLevel(logging.ERROR)  # the alerts are summarised by `main` instead
    warnings.filterwarnings("ignore", category=UserWarning)
    main(sys.argv[1:])
