"""Lyapunov spectrum of a 256-unit LSTM over 1,000 steps: `stabwatch.analysis.lyapunov_spectrum` (Q ← J·Q as
batched JVPs, no Jacobian formed) against a baseline that forms each step's Jacobian row by row with
autograd (one backward pass per row) and then multiplies it into the frame. Target (issue #13): ≥ 20×.

Two runs on one sequence, QR every step: the top k = 64 exponents (a readout) and the full spectrum
(k = 2N = 512: the LSTM state is (h, c)). The baseline forms the whole n×n Jacobian whatever k is (n backward
passes), then multiplies it into the n×k frame. The baseline is timed over its first ``--baseline-steps``
steps (a full 1,000 would take minutes) and its per-step time compared with the per-step time of the
stabwatch run over all ``--steps``; the exponents of both over those first steps are compared too (same
map, same frame: they agree, up to float32 round-off in the far tail of the full spectrum).

Run: ``python benchmarks/bench_rnn_spectrum.py`` (a few minutes on 2 CPU cores), ``--cpu-time`` on a machine
shared with other jobs (one thread, process CPU time), ``--quick`` for a smoke run, ``--device cuda``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from stabwatch.analysis import lyapunov_spectrum
from stabwatch.functional.recurrent import qr_lyapunov, recurrent_params, recurrent_step


def _baseline(lstm: nn.LSTM, xs: torch.Tensor, frame: torch.Tensor, steps: int) -> torch.Tensor:
    """``[k]`` sums of log|R_ii| over ``steps`` steps, each Jacobian formed row by row with autograd."""
    step = recurrent_step(recurrent_params(lstm))
    n = frame.shape[1]
    state = torch.zeros(1, n, dtype=xs.dtype, device=xs.device)
    q = torch.linalg.qr(frame).Q
    log_r = torch.zeros(frame.shape[2], dtype=torch.float64, device=xs.device)
    for t in range(steps):
        s = state.detach().requires_grad_(True)
        out = step(s, xs[t])[0]
        rows = [torch.autograd.grad(out[i], s, retain_graph=True)[0][0] for i in range(n)]
        jac = torch.stack(rows)  # J[i, j] = ∂s'_i / ∂s_j
        state = out.detach()[None]
        q, r = torch.linalg.qr(jac @ q[0])
        q = q[None]
        log_r += r.diagonal().abs().double().log()
    return log_r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--k", type=int, nargs="+", default=[64, 0], help="exponents per run; 0: all 2N")
    parser.add_argument("--baseline-steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-time", action="store_true", help="one thread, process CPU time")
    parser.add_argument("--quick", action="store_true", help="hidden 32, 100 steps: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.steps, args.baseline_steps = 32, 100, 5
    clock: Callable[[], float] = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.process_time
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    lstm = nn.LSTM(32, args.hidden).to(dev)
    n = 2 * args.hidden
    xs = torch.randn(args.steps, 1, 32, generator=torch.Generator().manual_seed(1)).to(dev)
    step = recurrent_step(recurrent_params(lstm))
    print(
        f"LSTM(32, {args.hidden}) on {dev}, state n = 2N = {n}, one sequence, QR every step"
        f"{' (one thread, CPU time)' if args.cpu_time else ''}"
    )
    for k in [k or n for k in args.k]:
        frame = torch.randn(1, n, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        frame = frame.float().to(dev)
        lyapunov_spectrum(lstm, xs[:3], k=k, warmup=0, check=False)  # warm up kernels
        sync()
        t0 = clock()
        spec = lyapunov_spectrum(lstm, xs, k=k, warmup=0, check=False)
        sync()
        ours = (clock() - t0) / args.steps
        t0 = clock()
        base_log_r = _baseline(lstm, xs, frame, args.baseline_steps)
        sync()
        base = (clock() - t0) / args.baseline_steps
        # the same first steps with stabwatch's loop and the same frame: the exponents agree
        with torch.no_grad():
            short = qr_lyapunov(step, torch.zeros(1, n, device=dev), xs[: args.baseline_steps], frame)
        top = min(k, args.hidden)  # float32 resolves the leading ones; the tail (≈ -13 nats/step) is lost
        diff = float((short.log_r[0, :top] - base_log_r[:top]).abs().max() / args.baseline_steps)
        print(f"k = {k}:")
        print(f"  stabwatch (vmap'd JVPs):        {ours * 1e3:9.2f} ms/step over {args.steps} steps")
        print(f"  baseline (autograd row by row): {base * 1e3:9.2f} ms/step over {args.baseline_steps} steps")
        print(f"  speed-up: {base / ours:.1f}x  (target >= 20x)")
        print(f"  agreement, first {args.baseline_steps} steps, top {top}: max |Δλ| = {diff:.1e} nats/step")
        print(f"  λ_1 = {spec.max:+.4f}, λ_{k} = {float(spec.mean[-1]):+.4f} nats/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
