"""Cost of the attention collector on a tiny decoder-only transformer, vs a bare training step.

The model of issue 18: character-level, 2 pre-LN blocks, d = 128, 4 heads, context 64, fused attention
(``F.scaled_dot_product_attention``, causal), AdamW, batch 32, on CPU. Configs run in lockstep
(`_common.lockstep`), and each is printed as its step time's ratio to the bare loops of the same run:

* ``stabwatch:nothing`` — every family off: the cost of `Monitor.step` itself;
* ``stabwatch:attention@default`` — the attention family alone on its default schedule;
* ``stabwatch:attention@1`` — the attention family at every step;
* ``stabwatch:default`` — the default preset (which includes the attention family).

The attention family's cost is its ratio minus ``stabwatch:nothing``'s (target: <= 2 % at its default
schedule). Run: ``python benchmarks/bench_attention.py`` (``--quick`` for a smoke run; ``--cpu-time`` on
a shared machine).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import lockstep

import stabwatch as sw
from stabwatch.collectors import FAMILIES, AttentionCollector

VOCAB, D, HEADS, LAYERS, CONTEXT, BATCH = 96, 128, 4, 2, 64, 32


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = CausalSelfAttention()
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(CONTEXT, D)
        self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))


def _runner(kind: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    mon = None
    if kind.startswith("stabwatch:"):
        spec = kind.split(":", 1)[1]
        off = {f: None for f in FAMILIES}
        if spec == "nothing":
            mon = sw.Monitor(model, opt, preset="cheap", every=off, alerts=False)
        elif spec.startswith("attention@"):
            period = spec.split("@")[1]
            every = AttentionCollector.default_every if period == "default" else int(period)
            mon = sw.Monitor(model, opt, preset="cheap", every={**off, "attention": every}, alerts=False)
        else:
            mon = sw.Monitor(model, opt, preset=spec, alerts=False)
        mon.start()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(loss=loss)

    for _ in range(3):
        step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200, help="lockstep rounds (one step of every config each)")
    ap.add_argument("--window", type=int, default=50, help="rounds per ratio window (a multiple of the period)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few rounds")
    ap.add_argument("--cpu-time", action="store_true", help="time process CPU (one torch thread)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.window = 20, 10
    logging.getLogger("stabwatch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g)
    y = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g)
    kinds = ["stabwatch:nothing", "stabwatch:attention@default", "stabwatch:attention@1", "stabwatch:default"]
    steps = {"bare": _runner("bare", x, y), "bare-2": _runner("bare", x, y)}
    steps.update({k: _runner(k, x, y) for k in kinds})
    print(
        f"tiny decoder-only transformer ({LAYERS} layers, d={D}, {HEADS} heads, context {CONTEXT}, batch {BATCH}), "
        f"{args.rounds} lockstep rounds, {args.threads} thread(s), clock {'process CPU' if args.cpu_time else 'wall'}"
    )
    res = lockstep(steps, ("bare", "bare-2"), args.rounds, args.window, clock=clock)
    print(f"bare step {res['bare'][0] * 1e3:.2f} ms")
    for k, (sec, r, iqr, total) in res.items():
        print(f"  {k:<30} {sec * 1e3:8.2f} ms   {r:6.3f}x  (iqr {iqr:.3f}, total {total:.3f}x)")
    base = res["stabwatch:nothing"][1]
    for k in kinds[1:3]:
        print(f"  {k[10:]} above the monitor's own per-step cost: {res[k][1] - base:+.2%}")


if __name__ == "__main__":
    main()
