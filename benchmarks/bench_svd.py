"""Gradient singular values: what `GradSVCollector` runs against a plain ``torch.linalg.svdvals``.

Two parts, each printing the times and the speed-up measured in the same run (interleaved repeats,
medians; `_common.interleaved`):

* **top-k** (matrices larger than ``exact_max_dim``): randomized block Krylov vs a full float32
  ``svdvals`` on a 2048x2048 real-looking gradient (decaying spectrum, as gradients have) and on a
  Gaussian matrix (flat top: the hard case), with the top-1 relative error. Target (issue #2): >= 10x
  faster, top-1 within 1e-3.
* **exact** (``min(m, n) <= exact_max_dim``): `functional.batched_singular_values` (the float64 Gram
  route for float32 gradients) vs a float32 ``svdvals`` of the same batch, per shape, with the largest
  relative error of the smallest singular value against a float64 ``svdvals``.
* **accuracy**: the Krylov path's top-1 relative error by depth on a 512x512 gradient made of two
  Gaussian factors (batch 128, a flat top: the hard realistic case), cold and warm-started.

Run: ``python benchmarks/bench_svd.py`` (about a minute on 2 CPU cores), ``--part exact`` or
``--part topk`` / ``--part accuracy`` for one part, ``--repeats N`` for more samples, ``--cpu-time`` on a machine shared
with other jobs (one thread, timed by the process's CPU time: with other jobs running, two threads
spin-wait and small kernels take tens of milliseconds of wall time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, time_per_step

from stabwatch.functional import randomized_singular_values
from stabwatch.functional.spectral import batched_singular_values

#: the clock the timings use: wall time by default, process CPU time with ``--cpu-time``
CLOCK: list[Callable[[], float]] = [time.perf_counter]

#: (batch, m, n) of the exact part: gradient shapes up to the default ``exact_max_dim`` (256), square
#: and wide, alone and stacked as `GradSVCollector` stacks same-shape gradients
EXACT_SHAPES = (
    (1, 64, 64),
    (1, 64, 512),
    (1, 128, 128),
    (1, 128, 1024),
    (1, 256, 256),
    (1, 256, 1024),
    (1, 256, 2048),
    (8, 128, 128),
    (8, 256, 256),
)


def _calls_for(fn: object, budget: float = 0.05) -> int:
    """How many calls of ``fn`` take about ``budget`` seconds (at least 1)."""
    once = time_per_step(fn, 1, CLOCK[0])  # type: ignore[arg-type]
    return max(1, int(budget / max(once, 1e-6)))


def exact_part(repeats: int) -> None:
    print("exact spectra: functional.batched_singular_values (float64 Gram route) vs float32 svdvals")
    g = torch.Generator().manual_seed(0)
    for b, m, n in EXACT_SHAPES:
        a = torch.randn(b, m, n, generator=g) @ torch.diag(torch.logspace(0, -3, n))  # a spread spectrum
        ref = torch.linalg.svdvals(a.double())
        err = float(((batched_singular_values(a).double() - ref).abs() / ref)[..., -1].max())
        err32 = float(((torch.linalg.svdvals(a).double() - ref).abs() / ref)[..., -1].max())

        def gram(a: torch.Tensor = a) -> None:
            batched_singular_values(a)

        def svd32(a: torch.Tensor = a) -> None:
            torch.linalg.svdvals(a)

        gram()  # warm up: first calls pay for allocations and library initialisation
        svd32()
        calls = _calls_for(svd32)
        med = interleaved(
            {
                "svdvals": lambda _, f=svd32, c=calls: time_per_step(f, c, CLOCK[0]),
                "gram": lambda _, f=gram, c=calls: time_per_step(f, c, CLOCK[0]),
            },
            repeats=repeats,
        )
        print(
            f"  {b}x{m}x{n}: svdvals {med['svdvals'] * 1e3:.2f} ms, Gram route {med['gram'] * 1e3:.2f} ms, "
            f"speed-up {med['svdvals'] / med['gram']:.2f}x; smallest singular value rel. error "
            f"{err:.0e} (float32 svdvals {err32:.0e})"
        )


def topk_part(repeats: int) -> None:
    n, k = 2048, 3
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(n, 256, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, 256, generator=g)).Q
    s = torch.logspace(0, -4, 256)
    decaying = (u * s) @ v.T + 1e-6 * torch.randn(n, n, generator=g)
    gaussian = torch.randn(n, n, generator=g)
    for name, a, iters in (
        ("gradient-like (decaying spectrum)", decaying, 4),
        ("Gaussian (flat top)", gaussian, 10),
    ):
        exact = torch.linalg.svdvals(a)
        gen = torch.Generator().manual_seed(1)
        top, _ = randomized_singular_values(a, k, n_iter=iters, generator=gen)
        err = abs(float(top[0]) - float(exact[0])) / float(exact[0])

        def full(a: torch.Tensor = a) -> None:
            torch.linalg.svdvals(a)

        def topk(a: torch.Tensor = a, iters: int = iters, gen: torch.Generator = gen) -> None:
            randomized_singular_values(a, k, n_iter=iters, generator=gen)

        med = interleaved(
            {
                "svdvals": lambda _, f=full: time_per_step(f, 1, CLOCK[0]),
                "topk": lambda _, f=topk: time_per_step(f, 3, CLOCK[0]),
            },
            repeats=repeats,
        )
        print(
            f"top-k, 2048x2048 {name}: svdvals {med['svdvals'] * 1e3:.1f} ms, "
            f"top-{k} (n_iter={iters}) {med['topk'] * 1e3:.1f} ms, "
            f"speed-up {med['svdvals'] / med['topk']:.1f}x, top-1 rel. error {err:.1e}"
        )


def accuracy_part(seeds: int = 5) -> None:
    """Top-1 relative error of the Krylov path against ``svdvals`` by depth, on the hard realistic case."""
    print(
        "top-1 accuracy of block Krylov (top 3 + 8 probes) by depth, against svdvals; a 512x512 gradient made"
        f" of two Gaussian factors (batch 128: flat top spectrum), {seeds} seeds"
    )
    errors: dict[str, list[float]] = {}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(100 + seed)
        grads = [torch.randn(512, 128, generator=g) @ torch.randn(128, 512, generator=g) for _ in range(2)]
        exact = [float(torch.linalg.svdvals(a.double())[0]) for a in grads]
        for depth in (1, 2, 4):
            top, _ = randomized_singular_values(grads[0], 3, n_iter=depth, generator=g)
            errors.setdefault(f"depth {depth}, cold start", []).append(abs(float(top[0]) - exact[0]) / exact[0])
        _, basis = randomized_singular_values(grads[0], 3, n_iter=4, generator=g)
        top, _ = randomized_singular_values(grads[1], 3, n_iter=1, init=basis)
        errors.setdefault("depth 1, from the previous gradient's basis", []).append(
            abs(float(top[0]) - exact[1]) / exact[1]
        )
    for name, errs in errors.items():
        print(f"  {name}: top-1 rel. error {min(errs):.1e} to {max(errs):.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["exact", "topk", "accuracy", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved samples per timing (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU time (implies --threads 1): for a machine shared with other jobs",
    )
    args = ap.parse_args()
    if args.cpu_time:
        CLOCK[0] = time.process_time
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = "process CPU time" if args.cpu_time else "wall time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock: {clock}")
    if args.part in ("exact", "both"):
        exact_part(args.repeats)
    if args.part in ("topk", "both"):
        topk_part(args.repeats)
    if args.part in ("accuracy", "both"):
        accuracy_part()


if __name__ == "__main__":
    main()
