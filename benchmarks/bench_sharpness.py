"""Sharpness: Lanczos accuracy against the explicitly formed Hessian, and what `SharpnessCollector` costs.

Parts:

* **accuracy**: small tanh MLPs (``4-16-16-1``, 369 parameters, float64 and float32, several seeds): the
  top Hessian eigenvalue from `stabwatch.functional.hessian_top_eigenvalues` (Lanczos, cold random start,
  at most 20 Hessian-vector products) against ``torch.linalg.eigvalsh`` of the Hessian formed with
  ``torch.func.hessian``. Target (issue #13): within 1e-3 in ≤ 20 products. Printed: the absolute and
  relative error, the products taken, the time of the Lanczos run vs forming the Hessian.
* **overhead**: a ``784-256-256-10`` MLP (batch 128) trained with SGD (momentum) or Adam; in lockstep
  (`_common.lockstep`, one step of each config per round, windows of ``every`` rounds so each window holds
  exactly one measurement): a bare loop, a ``cheap``-preset `Monitor`, and the same monitor plus
  `SharpnessCollector` on its default schedule (a fixed probe batch of 128). Target (issue #13): the
  collector costs ≤ 5 % of the steps it amortises over, i.e. ``(t[cheap+sharpness] − t[cheap]) / t[bare]``.
  Also printed: one measurement's time in bare steps and the products it took (warm-started).

Run: ``python benchmarks/bench_sharpness.py`` (a few minutes on 2 CPU cores); ``--part accuracy`` or
``--part overhead``; ``--quick`` for a smoke run; ``--cpu-time`` on a machine shared with other jobs (one
thread, process CPU time); ``--device cuda``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(__file__))
from _common import lockstep

import stabwatch as sw
from stabwatch.collectors import SharpnessCollector
from stabwatch.functional import hessian_top_eigenvalues

CLOCK: list[Callable[[], float]] = [time.perf_counter]


# ------------------------------------------------------------------------------------------ accuracy
def _small_mlp(seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(64, 4, generator=g).to(dtype)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(64, 1, generator=g).to(dtype)
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach() for p in net.parameters()]

    def loss(ps):
        return ((functional_call(net, dict(zip(names, ps, strict=True)), (x,)) - y) ** 2).mean()

    return loss, params


def accuracy(seeds: int, max_hvp: int) -> None:
    print(f"\n## accuracy: Lanczos (cold start, ≤ {max_hvp} products) vs eigvalsh(torch.func.hessian)\n")
    print(
        "| dtype | seed | λ_max exact | abs error | rel error | products | Lanczos ms | explicit ms "
        "| tol=1e-3 (the collector's): rel error, products |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for dtype in (torch.float64, torch.float32):
        for seed in range(seeds):
            loss, params = _small_mlp(seed, dtype)
            sizes = [p.numel() for p in params]
            t0 = CLOCK[0]()
            ref_loss, ref_params = _small_mlp(seed, torch.float64)

            def flat(w, ref_loss=ref_loss, ref_params=ref_params, sizes=sizes):
                parts = torch.split(w, sizes)
                return ref_loss([a.reshape(p.shape) for a, p in zip(parts, ref_params, strict=True)])

            h = torch.func.hessian(flat)(torch.cat([p.reshape(-1) for p in ref_params]))
            exact = float(torch.linalg.eigvalsh(h)[-1])
            t1 = CLOCK[0]()
            res = hessian_top_eigenvalues(
                loss, params, n_iter=max_hvp, tol=1e-7, generator=torch.Generator().manual_seed(seed)
            )
            t2 = CLOCK[0]()
            err = abs(float(res.values[0]) - exact)
            worst = max(worst, err)
            loose = hessian_top_eigenvalues(
                loss, params, n_iter=max_hvp, tol=1e-3, generator=torch.Generator().manual_seed(seed)
            )
            loose_err = abs(float(loose.values[0]) - exact) / abs(exact)
            print(
                f"| {str(dtype).removeprefix('torch.')} | {seed} | {exact:.6f} | {err:.2e} | {err / abs(exact):.2e} | "
                f"{res.n_hvp} | {1e3 * (t2 - t1):.1f} | {1e3 * (t1 - t0):.1f} | {loose_err:.1e}, {loose.n_hvp} |"
            )
    verdict = "met" if worst <= 1e-3 else "NOT met"
    print(f"\nworst absolute error {worst:.2e} (target ≤ 1e-3 in ≤ {max_hvp} products: {verdict}); n = {sum(sizes)}")


# ------------------------------------------------------------------------------------------ overhead
def _setup(opt_name: str, device: str, kind: str, every: int | None, probe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(128, 784, generator=g).to(device), torch.randint(0, 10, (128,), generator=g).to(device))
        for _ in range(8)
    ]

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    mon = None
    collector = None
    if kind != "bare":
        collectors = []
        if kind == "sharpness":
            collector = (
                SharpnessCollector(loss_fn=loss_fn, probe=probe)
                if every is None
                else SharpnessCollector(every, loss_fn=loss_fn, probe=probe)
            )
            collectors.append(collector)
            _time_collect(collector)
        mon = sw.Monitor(model, opt, preset="cheap", collectors=collectors, alerts=False).start()
    i = [0]

    def step() -> None:
        batch = data[i[0] % len(data)]
        i[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(loss=loss, batch=batch)
        if device == "cuda":
            torch.cuda.synchronize()

    return step, mon, collector


def _time_collect(collector: SharpnessCollector) -> None:
    """Time every measurement the collector makes (``collector.timings``: seconds, products of each)."""
    inner = collector.collect
    collector.timings = []  # type: ignore[attr-defined]

    def timed(*args, **kwargs):
        before = {k: id(v) for k, v in collector.last.items()}
        t0 = CLOCK[0]()
        inner(*args, **kwargs)
        took = CLOCK[0]() - t0
        fresh = [r.n_hvp for k, r in collector.last.items() if before.get(k) != id(r)]
        if fresh:
            collector.timings.append((took, sum(fresh)))  # type: ignore[attr-defined]

    collector.collect = timed  # type: ignore[method-assign]


def overhead(opt_names: list[str], rounds_in_windows: int, every: int | None, device: str) -> None:
    period = every or SharpnessCollector.default_every
    print(f"\n## overhead: SharpnessCollector every {period} steps, 784-256-256-10 MLP, batch 128, {device}\n")
    print(
        "| optimizer | bare step ms | measurements | one measurement (bare steps) | products | its share "
        "| lockstep: cheap | cheap + sharpness |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for opt_name in opt_names:
        g = torch.Generator().manual_seed(2)
        probe = (torch.randn(128, 784, generator=g).to(device), torch.randint(0, 10, (128,), generator=g).to(device))
        configs = {
            k: _setup(opt_name, device, "bare" if k.startswith("bare") else k, every, probe)
            for k in ("bare", "bare2", "cheap", "sharpness")
        }
        steps = {k: v[0] for k, v in configs.items()}
        collector = configs["sharpness"][2]
        assert collector is not None
        for s in steps.values():  # warm up (and the collector's first, cold measurement at step 0)
            s()
        collector.timings.clear()  # type: ignore[attr-defined]
        rounds = rounds_in_windows * period
        res = lockstep(steps, ("bare", "bare2"), rounds=rounds, window=period, clock=CLOCK[0])
        bare = res["bare"][0] * 0.5 + res["bare2"][0] * 0.5
        timings = collector.timings  # type: ignore[attr-defined]
        # the measurements' own time over the bare steps of the same rounds: what the collector adds
        share = sum(t for t, _ in timings) / (rounds * bare)
        one = statistics.median(t for t, _ in timings) / bare
        products = "/".join(str(n) for _, n in timings)
        print(
            f"| {opt_name} | {1e3 * bare:.2f} | {len(timings)} | {one:.1f} | {products} | {100 * share:.2f} % "
            f"| {res['cheap'][3]:.3f}× | {res['sharpness'][3]:.3f}× |"
        )
        for _, m, _ in configs.values():
            if m is not None:
                m.close()
    print(
        "\ntarget: the share ≤ 5 %. share = the measurements' own time (timed around the collector's collect) / "
        "the bare loop's time over the same rounds; products per measurement (Adam: plain + preconditioned). "
        "The lockstep columns are whole-loop ratios to the bare loop (their difference is within the few-% "
        "noise between model instances)."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "accuracy", "overhead"), default="all")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--max-hvp", type=int, default=20)
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--windows", type=int, default=3, help="lockstep windows of `every` rounds each")
    ap.add_argument("--every", type=int, default=None, help="override the collector's default schedule")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds, every=50, 2 windows")
    ap.add_argument("--cpu-time", action="store_true", help="one thread, timed by the process's CPU time")
    args = ap.parse_args(argv)
    if args.cpu_time:
        torch.set_num_threads(1)
        CLOCK[0] = time.process_time
    seeds, windows, every = args.seeds, args.windows, args.every
    if args.quick:
        seeds, windows, every = 2, 2, every or 50
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock={CLOCK[0].__name__}")
    if args.part in ("all", "accuracy"):
        accuracy(seeds, args.max_hvp)
    if args.part in ("all", "overhead"):
        overhead([o.strip() for o in args.optimizers.split(",") if o.strip()], windows, every, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
