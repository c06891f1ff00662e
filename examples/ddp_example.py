"""DDP on the CPU: two processes (gloo), one monitor per rank, one JSONL file written by rank 0.

Every rank builds its records (`Monitor.records`): the gradient norms are those of the synchronised
gradient, and the loss and activation statistics are reduced over both ranks' batches, so the records
are the same on both ranks. Only rank 0 writes to its sinks (``all_ranks=True`` would let every rank
write), and an alert that stops rank 0 (``raise_on``) stops every rank at the same step.

Run: ``python examples/ddp_example.py [--steps 50] [--out runs/ddp.jsonl]``. The script starts its two
processes itself (``torch.multiprocessing.spawn``); under ``torchrun --nproc-per-node 2`` it runs as the
rank torchrun gives it instead.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import stabwatch as sw
from stabwatch import distributed as swd


def train(rank: int, world: int, steps: int, out: str, rendezvous: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo",
            init_method=rendezvous,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(100 + rank)  # each rank draws its own batches
    # the sink may be built on every rank: only rank 0 opens its file
    sinks = [sw.sinks.JsonlSink(out)]
    try:
        # monitor the inner module: the same parameters, and layer names without DDP's "module." prefix
        with sw.Monitor(model, opt, sinks=sinks, raise_on="critical", every={"activation": 10}) as mon:
            for _ in range(steps):
                x = torch.randn(32, 16, generator=data)
                y = x[:, :4].sin()
                opt.zero_grad()
                loss = nn.functional.mse_loss(ddp(x), y)
                loss.backward()
                opt.step()
                mon.step(loss=loss)
    except sw.InstabilityError as exc:  # raised on every rank at the same step
        print(f"rank {swd.rank()}: stopped at step {exc.step}")
    if swd.is_main():
        last = mon.records[-1]
        print(f"rank 0 of {swd.world_size()}: {len(mon.records)} records, last: {last}")
        print(f"rank 0 wrote {sum(1 for _ in sw.sinks.read_jsonl(out))} lines to {out}")
    # leave together, and free DDP (its reducer holds the process group) before the group is destroyed:
    # a process group torn down under a live DDP can abort the process at exit
    dist.barrier()
    del ddp, opt, mon
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="runs/ddp.jsonl")
    args = ap.parse_args()
    if "RANK" in os.environ:  # started by torchrun: one rank per process, env:// rendezvous
        dist.init_process_group("gloo")
        train(dist.get_rank(), dist.get_world_size(), args.steps, args.out, "env://")
        return
    # rendezvous through a file: no port to pick (and none another program can take in between)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(train, args=(2, args.steps, args.out, f"file://{tmp}/rendezvous"), nprocs=2, join=True)


if __name__ == "__main__":
    main()
