"""How early and how rightly stabwatch names the classic spiking failures (issue #20's targets).

Runs every scenario of ``examples/snn_failures.py`` (three healthy seeds, dead start, saturation, a
too-steep surrogate, learning rate 0.5, a learning-rate jump at step 150, a slow and a fast death of the
hidden layer) for 300 steps, each watched at once by two monitors: the ``default`` preset, and the
default preset with the spiking family every step (``every={"spiking": 1}``); a monitor does not change
training, so both see the same run. For each run it prints the step the failure becomes visible in the
independent per-step measurements (the example's `visible_at`), stabwatch's first warning/critical
alert, the delay, the first-ranked cause of `stabwatch.diagnosis.analyse`, and whether the targets are
met:

* a failure is flagged (warning or critical) no earlier than it is induced and at most 10 steps after it
  becomes visible;
* the first-ranked cause names the induced mechanism (cause key containing ``dead``/``silent``,
  ``satur``, ``surrogate`` or ``step_size``) and gives no advice for non-spiking networks (ReLU, He or
  Xavier init, BatchNorm; clipping while gradients vanish under Adam);
* a healthy run raises no warning at all.

The table is also written, with the date and the run time, to ``--out`` (markdown).

Run: ``python benchmarks/bench_snn_diagnosis.py`` (``--jobs 2`` to run scenarios in parallel processes,
``--scenarios dead,lr-jump``, ``--configs default``, ``--steps``; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import logging
import multiprocessing
import os
import subprocess
import sys
import time
import warnings

import torch

import stabwatch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import snn_failures as ex

OUT = ""  # no file unless --out is given


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("stabwatch").setLevel(logging.CRITICAL + 1)


def _train(name: str, steps: int, configs: tuple[str, ...]) -> list[ex.Run]:
    return ex.train(ex.SCENARIOS[name], steps=steps, configs=configs)


def _flag(a: ex.Alert | None) -> str:
    if a is None:
        return "-"
    return f"{a.step} {a.rule}{f' [{a.layer}]' if a.layer else ''}"


def table(runs: list[ex.Run]) -> list[str]:
    """Markdown rows, one per run."""
    rows = [
        "| scenario | config | measured (independently) | visible at | first flag (warning/critical) | delay | "
        "first cause | false warnings | test acc | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        v = ex.judge(run)
        visible = "-" if run.scenario.mechanism is None else ("never" if v.visible is None else str(v.visible))
        delay = "-" if v.delay is None else f"{v.delay:+d}"
        cause = v.cause if run.scenario.mechanism is None or v.cause_ok else f"{v.cause} ✗"
        if not v.advice_ok:
            cause += " (non-spiking advice)"
        met = "met" if v.met else f"NOT met: {v.why}"
        rows.append(
            f"| {run.scenario.name} | {run.config} | {ex.what_happened(run)} | {visible} | {_flag(v.flag)} | "
            f"{delay} | {cause} | {v.false_flags} | {run.accuracy:.1%} | {met} |"
        )
    return rows


def criteria(runs: list[ex.Run]) -> list[str]:
    seen: dict[str, str] = {}
    for run in runs:
        if run.scenario.mechanism is not None and run.scenario.name not in seen:
            seen[run.scenario.name] = ex.visible_at(run)[1]
    return [f"- {name}: {crit}" for name, crit in seen.items()]


def said(runs: list[ex.Run], config: str) -> list[str]:
    """What stabwatch said on each failure under ``config``: the first flag, the first two causes."""
    out = []
    for run in runs:
        if run.config != config or run.scenario.mechanism is None:
            continue
        v = ex.judge(run)
        out.append(f"- **{run.scenario.name}** ({run.scenario.description}): first flag `{v.flag}`")
        causes = run.diagnosis.causes if run.diagnosis is not None else []
        for i, c in enumerate(causes[:2], 1):
            tries = "; ".join(c.actions[:3])
            out.append(f"  - cause {i} [{c.key}, score {c.score}] {c.title} — try: {tries}")
    return out


def _git() -> str:
    try:
        root = os.path.join(os.path.dirname(__file__), "..")
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
        return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> list[ex.Run]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=ex.STEPS)
    ap.add_argument("--scenarios", default=",".join(ex.SCENARIOS), help=f"of {', '.join(ex.SCENARIOS)}")
    ap.add_argument("--configs", default=",".join(ex.CONFIGS), help=f"of {', '.join(ex.CONFIGS)}")
    ap.add_argument("--jobs", type=int, default=1, help="scenarios trained in parallel processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", default=OUT, help="markdown file for the table ('' for none)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: healthy and dead, 30 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.scenarios, args.steps = "healthy,dead", 30
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    for kind, given, allowed in (("scenario", names, ex.SCENARIOS), ("config", configs, ex.CONFIGS)):
        unknown = [n for n in given if n not in allowed]
        if unknown:
            ap.error(f"unknown {kind}(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
    _init_worker(args.threads)
    if any(ex.SCENARIOS[n].mechanism in ("saturation", "surrogate") for n in names):
        ex.reference()  # the healthy levels those are judged against: computed once, forked workers inherit it
    print(
        f"torch {torch.__version__}, {args.threads} thread(s) x {args.jobs} job(s); {len(names)} scenarios x "
        f"{args.steps} steps, configs {', '.join(configs)}"
    )
    t0 = time.perf_counter()
    if args.jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=ctx, initializer=_init_worker, initargs=(args.threads,)
        ) as pool:
            futures = [pool.submit(_train, n, args.steps, configs) for n in names]
            per = [f.result() for f in futures]
    else:
        per = [_train(n, args.steps, configs) for n in names]
    wall = time.perf_counter() - t0
    runs = sorted(
        (r for rs in per for r in rs), key=lambda r: (configs.index(r.config or ""), names.index(r.scenario.name))
    )
    rows = table(runs)
    met = {c: sum(ex.judge(r).met for r in runs if r.config == c) for c in configs}
    total = {c: sum(1 for r in runs if r.config == c) for c in configs}
    train_s = sum(rs[0].seconds for rs in per)
    cpu_s = sum(rs[0].cpu_seconds for rs in per)
    tail = [
        "",
        "targets met: " + ", ".join(f"{c} {met[c]}/{total[c]}" for c in configs),
        f"run time {wall:.0f} s wall, {args.jobs} job(s); training loops {train_s:.0f} s wall, {cpu_s:.0f} s CPU",
    ]
    print("\n".join(rows + tail))
    if args.out:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cmd = "python benchmarks/bench_snn_diagnosis.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = [
            f"# SNN diagnosis benchmark — {stamp}",
            "",
            f"`{cmd.strip()}` on code {_git()} (stabwatch imported from "
            f"{os.path.dirname(os.path.dirname(stabwatch.__file__))}); torch {torch.__version__}.",
            "",
            *rows,
            *tail,
            "",
            "Visible at (independent per-step measurements, examples/snn_failures.py `visible_at`):",
            *criteria(runs),
            "",
            f"What stabwatch said ({configs[0]}):",
            *said(runs, configs[0]),
            "",
            "Target: flag (first warning/critical alert) no earlier than the onset and <= 10 steps after "
            "visibility; first-ranked cause key contains "
            + "; ".join(f"{m}: {'/'.join(k)}" for m, k in ex.MECHANISM_CAUSES.items())
            + f"; its title+actions contain none of {', '.join(ex.NON_SPIKING_ADVICE)} (nor 'clip' when a "
            "vanishing-gradient alert fired); healthy: 0 warning/critical alerts.",
            "",
        ]
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write("\n".join(text))
        print(f"written to {args.out}")
    return runs


if __name__ == "__main__":
    main()
