"""Top-k gradient singular values: randomized block Krylov vs full ``torch.linalg.svdvals``.

Target (issue #2): top-k on a 2048x2048 gradient >= 10x faster than full svdvals, top-1 within 1e-3.
Prints times, the speed-up ratio measured in one run, and the top-1 relative error, on a real-looking
gradient (decaying spectrum, as gradients have) and on a Gaussian matrix (flat top: the hard case).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, time_per_step

from stabwatch.functional import randomized_singular_values


def main() -> None:
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
            {"svdvals": lambda _, f=full: time_per_step(f, 1), "topk": lambda _, f=topk: time_per_step(f, 3)},
            repeats=3,
        )
        print(
            f"{name}: svdvals {med['svdvals'] * 1e3:.1f} ms, top-{k} (n_iter={iters}) {med['topk'] * 1e3:.1f} ms, "
            f"speed-up {med['svdvals'] / med['topk']:.1f}x, top-1 rel. error {err:.1e}"
        )


if __name__ == "__main__":
    main()
