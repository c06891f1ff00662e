"""Input-space FTLE: `stabwatch.analysis.ftle` against a Python loop over inputs with
``torch.autograd.functional.jacobian``, and the power path's accuracy against the exact one.

Parts (times are medians of interleaved repeats, `_common.interleaved`; ratios are from the same run):

* **speed**: λ_ℓ(x) at every layer of an 8-layer tanh MLP (input ``--dim``, width ``--width``) for a
  batch of ``--batch`` inputs. Baseline: for each input, the Jacobian of every layer's output with
  ``torch.autograd.functional.jacobian`` (one call returning all layers, as a user would write it) and
  ``torch.linalg.svdvals`` of each. Target (issue #13): stabwatch's path ≥ 20× faster. The baseline is
  timed on ``--baseline-inputs`` inputs and scaled to the batch (it is a loop: its time is linear in the
  batch). Both exact (``vmap(jacfwd)``) and power (JVP/VJP, ``tol=1e-3``) paths are timed.
* **accuracy**: the power path's error against the exact path on the same batch, by tolerance:
  max |Δλ| over inputs and layers, the worst ``1 − |cos|`` of the directions, and iterations.

Run: ``python benchmarks/bench_ftle.py`` (about a minute on 2 CPU cores); ``--quick`` for a smoke run;
``--cpu-time`` on a machine shared with other jobs (one thread, process CPU time); ``--device cuda``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, time_per_step

from stabwatch.analysis import ftle
from stabwatch.analysis.ftle import sequential_layers

CLOCK: list[Callable[[], float]] = [time.perf_counter]


def mlp(dim: int, width: int, depth: int = 8, device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(dim, width), nn.Tanh()]
    for _ in range(depth - 2):
        mods += [nn.Linear(width, width), nn.Tanh()]
    mods.append(nn.Linear(width, 2))
    return nn.Sequential(*mods).to(device).eval()


def baseline(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """λ per input and layer, one input at a time with torch.autograd.functional.jacobian."""
    names = sequential_layers(model)
    children = dict(model.named_children())
    order = list(children)

    def layers_of(xi: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs, h = [], xi.unsqueeze(0)
        for k in order:
            h = children[k](h)
            if k in names:
                outs.append(h[0])
        return tuple(outs)

    rows = []
    for xi in x:
        jacs = torch.autograd.functional.jacobian(layers_of, xi)
        rows.append(torch.stack([torch.log(torch.linalg.svdvals(j.double())[0]) / (i + 1) for i, j in enumerate(jacs)]))
    return torch.stack(rows)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def speed(args: argparse.Namespace) -> None:
    model = mlp(args.dim, args.width, device=args.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.dim, generator=g).to(args.device)
    few = x[: args.baseline_inputs]
    # agreement first: the baseline and both paths measure the same numbers
    ref = baseline(model, few)
    exact = ftle(model, few, method="exact").exponents
    lanczos = ftle(model, few, method="lanczos", tol=1e-3).exponents
    print(
        f"agreement on {len(few)} inputs: exact vs loop max|Δλ| = {float((exact.cpu() - ref.cpu()).abs().max()):.2e}, "
        f"lanczos(tol=1e-3) vs loop max|Δλ| = {float((lanczos.cpu() - ref.cpu()).abs().max()):.2e}"
    )

    def run(fn: Callable[[], object]) -> Callable[[int], float]:
        def timed(_: int) -> float:
            def step() -> None:
                fn()
                _sync(args.device)

            return time_per_step(step, 1, CLOCK[0])

        return timed

    configs = {
        "loop": run(lambda: baseline(model, few)),
        "exact": run(lambda: ftle(model, x, method="exact")),
        "lanczos": run(lambda: ftle(model, x, method="lanczos", tol=1e-3)),
        "power": run(lambda: ftle(model, x, method="power", tol=1e-3)),
    }
    run(lambda: ftle(model, x, method="exact"))(0)  # warm-up
    med = interleaved(configs, args.repeats)
    loop = med["loop"] * args.batch / len(few)
    print(
        f"\nFTLE of {args.batch} inputs through an 8-layer MLP (dim {args.dim}, width {args.width}, "
        f"{len(sequential_layers(model))} layers), device {args.device}:"
    )
    print(
        f"  python loop, torch.autograd.functional.jacobian: {loop:8.3f} s  "
        f"(measured {med['loop']:.3f} s on {len(few)} inputs, scaled)"
    )
    for k in ("exact", "lanczos", "power"):
        print(f"  stabwatch ftle(method={k!r}):{' ' * (22 - len(k))}{med[k]:8.3f} s   {loop / med[k]:7.1f}× faster")


def accuracy(args: argparse.Namespace) -> None:
    model = mlp(args.dim, args.width, device=args.device)
    x = torch.randn(min(args.batch, 256), args.dim, generator=torch.Generator().manual_seed(2)).to(args.device)
    exact = ftle(model, x, method="exact")
    print(f"\niterative paths vs exact, {len(x)} inputs x {len(exact.layers)} layers (8-layer MLP, dim {args.dim}):")
    print("  method   tol    |Δλ| p50   |Δλ| p99   |Δλ| max   misconverged   1-|cos| p50   iterations (max)")
    for method in ("lanczos", "power"):
        for tol in (1e-2, 1e-3, 1e-4):
            p = ftle(model, x, method=method, tol=tol, max_iter=1000)
            dl = (p.exponents - exact.exponents).abs().flatten().cpu()
            bad = int((dl > 10 * tol).sum())  # settled on a lower singular value (see docs/ftle.md)
            cos = (p.directions.double() * exact.directions.double()).sum(-1).abs().flatten().cpu()
            q = torch.quantile(dl, torch.tensor([0.5, 0.99], dtype=torch.float64))
            print(
                f"  {method:8s} {tol:.0e}  {float(q[0]):9.2e}  {float(q[1]):9.2e}  {float(dl.max()):9.2e}   "
                f"{bad:4d}/{dl.numel()}      {float(torch.quantile(1 - cos, 0.5)):9.2e}     {max(p.iterations):5d}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["speed", "accuracy", "all"], default="all")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--baseline-inputs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cpu-time", action="store_true", help="one thread, process CPU time")
    ap.add_argument("--quick", action="store_true", help="a smoke run: small batch, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.baseline_inputs, args.repeats = 64, 8, 1
    if args.cpu_time:
        torch.set_num_threads(1)
        CLOCK[0] = time.process_time
    if args.part in ("speed", "all"):
        speed(args)
    if args.part in ("accuracy", "all"):
        accuracy(args)


if __name__ == "__main__":
    main()
