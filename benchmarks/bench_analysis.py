"""Perturbation-trajectory analysis: stabwatch.analysis against deep-lyapunov 0.1.2, same work, one run.

**Time.** The workload of the issue: a 784-128-10 MLP, 2,048 samples, batch 64 (shuffled), 5
trajectories, 3 epochs, plain SGD (lr 0.1, no momentum, so deep-lyapunov re-creating the optimizer
every epoch changes nothing). Three contestants do the same training and report the same metrics:

* ``deep-lyapunov``: ``StabilityAnalyzer.analyze(train_fn, loader, 3)``;
* ``stabwatch TrainStep``: the loss as a function of ``(model, batch)``: one ``vmap`` pass per batch
  for all replicas, one data pass per epoch;
* ``stabwatch train_fn``: the very same ``train_fn`` as deep-lyapunov (drop-in path).

Every measurement runs in a fresh subprocess (imports excluded) that first trains a throwaway model
for one epoch, so that one-time library start-up (allocator, kernels, the optimizer's first import)
is paid by nobody; it then times ``analyze()`` twice: the first call (what a one-off analysis costs,
including ``vmap``'s own start-up) and the second. Tools are interleaved and repeated; the median
and the best repeat are printed (on a shared machine the best is the least disturbed run).

Two thread settings: the machine's default (what users get) and one thread everywhere
(``OMP/MKL/OPENBLAS_NUM_THREADS=1``). With one thread the training arithmetic, identical for all
three, dominates, so this setting shows the floor of the speed-up. With several threads, the
vectorised step's larger kernels use the cores better, and deep-lyapunov's time also contains
torch's and numpy's thread pools competing during its scikit-learn PCA. Both effects, and the cost
of any other load on the machine, vary from run to run: the load average is printed.

**Memory.** A 1024-4096-2048-10 MLP (12.6 M parameters), 256 samples, batch 64, 5 trajectories,
2 epochs. Each tool runs alone in a fresh process; the number is the process's peak resident set
(``getrusage(RUSAGE_SELF).ru_maxrss``, i.e. VmHWM) minus the peak it had already reached after
imports, data, model and the warm-up: what the analysis itself added, tensors and numpy arrays alike
(``tracemalloc`` would miss torch's allocations).

deep-lyapunov is optional: without it (``pip install deep-lyapunov==0.1.2 --no-deps`` plus
scikit-learn and matplotlib) the peer rows are skipped with a message.

``--cpu-time`` also prints the workers' CPU seconds (``time.process_time``) of the same runs: with one
thread that is the work itself, which other processes on a shared machine inflate far less than the
wall-clock time (with several threads it is their sum, not a duration).

Run: ``python benchmarks/bench_analysis.py [--repeats 2] [--threads default,1] [--skip-memory] [--cpu-time]``
(about 4 minutes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

TOOLS = ("deep-lyapunov", "stabwatch TrainStep", "stabwatch train_fn")
RESULT = "RESULT "


# ------------------------------------------------------------------------------------------- workers


def _train_fn(lr: float):
    import torch
    import torch.nn.functional as F

    def train_fn(model, loader, n_epochs):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        losses = []
        for _ in range(n_epochs):
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return {"loss": losses}

    return train_fn


def _analyze(tool: str, model, loader, n_epochs: int, lr: float) -> Any:
    import functools

    import torch
    import torch.nn.functional as F

    if tool == "deep-lyapunov":
        from deep_lyapunov import StabilityAnalyzer as DeepLyapunov

        return DeepLyapunov(model, n_trajectories=5, device="cpu", verbose=False).analyze(
            _train_fn(lr), loader, n_epochs
        )
    from stabwatch.analysis import StabilityAnalyzer, TrainStep

    analyzer = StabilityAnalyzer(model, n_trajectories=5, device="cpu", verbose=False)
    if tool == "stabwatch train_fn":
        return analyzer.analyze(_train_fn(lr), loader, n_epochs)
    step = TrainStep(lambda m, b: F.cross_entropy(m(b[0]), b[1]), functools.partial(torch.optim.SGD, lr=lr))
    return analyzer.analyze(step, loader, n_epochs)


def _summary(results: Any) -> dict[str, float]:
    return {
        "convergence_ratio": float(results.convergence_ratio),
        "lyapunov": float(results.lyapunov),
        "effective_dimensionality": float(results.effective_dimensionality),
    }


def _worker_time(tool: str) -> dict[str, Any]:
    import warnings

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    warnings.simplefilter("ignore")
    if tool == "deep-lyapunov":
        import deep_lyapunov  # noqa: F401 - import cost excluded, as for stabwatch
    else:
        import stabwatch.analysis  # noqa: F401
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2048, 784, generator=g), torch.randint(0, 10, (2048,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=g)

    def model() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))

    _train_fn(0.1)(model(), loader, 1)  # warm-up: library start-up paid by nobody
    times, cpu = [], []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        results = _analyze(tool, model(), loader, 3, 0.1)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"first": times[0], "second": times[1], "first_cpu": cpu[0], "second_cpu": cpu[1], **_summary(results)}


def _worker_memory(tool: str) -> dict[str, Any]:
    import resource
    import warnings

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    warnings.simplefilter("ignore")
    if tool == "deep-lyapunov":
        import deep_lyapunov  # noqa: F401
    else:
        import stabwatch.analysis  # noqa: F401
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1024, generator=g), torch.randint(0, 10, (256,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 2048), nn.ReLU(), nn.Linear(2048, 10))
    tiny = nn.Linear(8, 10)
    _train_fn(0.01)(tiny, [(torch.randn(4, 8), torch.randint(0, 10, (4,)))], 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    results = _analyze(tool, model, loader, 2, 0.01)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "baseline_mib": before / 1024,
        "peak_mib": peak / 1024,
        "delta_mib": (peak - before) / 1024,
        "seconds": seconds,
        "pca_method": getattr(results, "pca_method", "sklearn PCA of stored trajectories"),
        **_summary(results),
    }


# ------------------------------------------------------------------------------------------- driver


def _run(kind: str, tool: str, threads: str, timeout: int) -> dict[str, Any]:
    env = dict(os.environ)
    if threads != "default":
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = threads
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--tool", tool]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def _best(rows: list[dict[str, Any]], key: str) -> float:
    """The fastest repeat: the run least disturbed by whatever else the machine was doing."""
    values = [r[key] for r in rows if key in r]
    return min(values) if values else float("nan")


def _print_times(
    tools: list[str], rows: dict[str, list[dict[str, Any]]], clock: str, first_key: str, second_key: str
) -> None:
    print(f"    {clock}")
    print(f"    {'tool':<22} {'1st call: median / best':>24} {'2nd call: median / best':>24} {'λ':>8}")
    for tool in tools:
        errors = [r["error"] for r in rows[tool] if "error" in r]
        if errors:
            print(f"    {tool:<22} failed: {errors[0]}")
            continue
        first = f"{_median(rows[tool], first_key):.3f} / {_best(rows[tool], first_key):.3f}"
        second = f"{_median(rows[tool], second_key):.3f} / {_best(rows[tool], second_key):.3f}"
        print(f"    {tool:<22} {first:>24} {second:>24} {_median(rows[tool], 'lyapunov'):>8.4f}")
    if "deep-lyapunov" in tools and not any("error" in r for r in rows["deep-lyapunov"]):
        peer = rows["deep-lyapunov"]
        for tool in tools[1:]:
            if any("error" in r for r in rows[tool]):
                continue
            ratios = [
                f"{_median(peer, k) / _median(rows[tool], k):.2f}x / {_best(peer, k) / _best(rows[tool], k):.2f}x"
                for k in (first_key, second_key)
            ]
            print(f"    speed-up of {tool} over deep-lyapunov (median / best): 1st {ratios[0]}, 2nd {ratios[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", default="default,1", help="comma-separated: 'default' and/or a count")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="also print the workers' CPU seconds (time.process_time): with one thread, the figure a loaded "
        "machine disturbs least (with several threads it sums them)",
    )
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        out = _worker_time(args.tool) if args.worker == "time" else _worker_memory(args.tool)
        print(RESULT + json.dumps(out), flush=True)
        return

    import torch

    tools = list(TOOLS)
    if importlib.util.find_spec("deep_lyapunov") is None:
        print("deep-lyapunov is not installed: skipping the peer (pip install deep-lyapunov==0.1.2 --no-deps)")
        tools.remove("deep-lyapunov")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {_load()} at start")
    started = time.perf_counter()

    if not args.skip_time:
        print("\nTIME: 784-128-10 MLP, 2048 samples, batch 64, 5 trajectories, 3 epochs (median / best)")
        for threads in args.threads.split(","):
            rows: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
            for _ in range(args.repeats):
                for tool in tools:
                    rows[tool].append(_run("time", tool, threads, timeout=300))
            print(f"  threads={threads} ({_load()})")
            clocks = [("wall-clock seconds", "first", "second")]
            if args.cpu_time:
                clocks.append(("CPU seconds (process_time)", "first_cpu", "second_cpu"))
            for clock, first_key, second_key in clocks:
                _print_times(tools, rows, clock, first_key, second_key)

    if not args.skip_memory:
        print("\nMEMORY: 1024-4096-2048-10 MLP (12.6 M parameters), 5 trajectories, 2 epochs, 1 thread")
        print(f"    {'tool':<22} {'peak - baseline':>16} {'seconds':>8} {'eff. dim':>9}  PCA")
        mem: dict[str, dict[str, Any]] = {}
        for tool in tools:
            mem[tool] = _run("memory", tool, "1", timeout=600)
            r = mem[tool]
            if "error" in r:
                print(f"    {tool:<22} failed: {r['error']}")
                continue
            print(
                f"    {tool:<22} {r['delta_mib']:>12.0f} MiB {r['seconds']:>8.1f} "
                f"{r['effective_dimensionality']:>9.3f}  {r['pca_method']}"
            )
        if "deep-lyapunov" in tools and "error" not in mem["deep-lyapunov"]:
            for tool in tools[1:]:
                if "error" not in mem[tool]:
                    ratio = mem["deep-lyapunov"]["delta_mib"] / mem[tool]["delta_mib"]
                    print(f"    deep-lyapunov needed {ratio:.1f}x the memory of {tool}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s, {_load()} at end")


if __name__ == "__main__":
    main()
