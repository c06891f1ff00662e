"""Rank, world and reductions: what is global in a record and what is per rank.

Everything here is a no-op without an initialised ``torch.distributed`` process group (or with a world
of one): `rank` is 0, `world_size` is 1, `is_main` is true, and the reductions hand their input back
untouched, so single-process code paths are exactly those of a plain run.

With a process group (``torch.distributed.init_process_group``, e.g. under ``torchrun``), the
`stabwatch.pipeline.RecordPipeline` makes each record global where it claims to be:

* values that differ per rank and claim a global value (the loss, activation and spiking statistics,
  the norms of FSDP-sharded gradients and parameters) are reduced across ranks with one all-gather per
  record (`reduce_columns`), after a four-number check that every rank contributes the same entries;
* only rank 0 writes to sinks (``Monitor(all_ranks=True)`` lets every rank write);
* rank 0's alert decision is broadcast (`agree_stop`) so that every rank raises
  `stabwatch.InstabilityError` at the same step.

See ``docs/distributed.md`` for the per-entry table.

Example:
    >>> rank(), world_size(), is_main()
    (0, 1, True)
    >>> reduce_columns(torch.tensor([1.0, 2.0]), ["mean", None]).tolist()  # no process group: unchanged
    [1.0, 2.0]
"""

from __future__ import annotations

import logging
import sys
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from stabwatch.errors import ConfigError, InstabilityError

__all__ = [
    "REDUCE_OPS",
    "agree_stop",
    "check_sharding",
    "full_tensor",
    "is_main",
    "is_sharded",
    "local_tensor",
    "rank",
    "reduce_columns",
    "replication",
    "signature",
    "world_size",
]

log = logging.getLogger("stabwatch")

#: how an entry that differs per rank is combined: ``None`` means already global (the same on every rank)
REDUCE_OPS = ("mean", "sum", "max", "min")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """How many processes the default process group has (1 without one)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this is rank 0 (always true without a process group): the rank that writes to sinks."""
    return rank() == 0


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 ``fully_shard`` parameter or gradient, a tensor-parallel one)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: ``t.to_local()`` for a ``DTensor``, ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t``: ``t.full_tensor()`` for a ``DTensor`` (an all-gather: every rank must call it, in
    the same order), ``t`` itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]


def replication(t: torch.Tensor) -> int:
    """On how many ranks each element of ``t`` is held: the product of the mesh sizes of the ``DTensor``'s
    ``Replicate`` placements (1 for a plain tensor, for FSDP2's ``Shard(0)``, for tensor parallelism).

    A sum of squares of local shards divided by this and summed over the ranks of the mesh counts every
    element once (HSDP replicates each shard over the replica dim).
    """
    if not is_sharded(t):
        return 1
    from torch.distributed.tensor import Replicate

    factor = 1
    mesh = t.device_mesh  # type: ignore[attr-defined]
    for dim, placement in enumerate(t.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Replicate):
            factor *= mesh.size(dim)
    return factor


def check_sharding(model: torch.nn.Module) -> None:
    """Refuse FSDP1 (``FullyShardedDataParallel``): its shards are slices of a flat parameter held as plain
    tensors, which cannot be told from whole ones, so a norm would silently be that of a local shard.

    Raises:
        ConfigError: ``model`` holds a ``FullyShardedDataParallel`` module.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # a model can only hold FSDP1 modules once it is imported
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    if isinstance(cls, type) and any(isinstance(m, cls) for m in model.modules()):
        raise ConfigError(
            "Monitor: FSDP1 (FullyShardedDataParallel) is not supported: its parameter shards are plain tensors "
            "and their norms would be those of this rank's shard; shard with FSDP2 instead "
            "(torch.distributed.fsdp.fully_shard), whose DTensor shards are reduced across ranks"
        )


def signature(parts: Sequence[object]) -> int:
    """A 32-bit checksum of ``parts`` (names, ops, sizes): equal on every rank when the layouts agree."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def _device_for(t: torch.Tensor) -> torch.device:
    """Where the default group's backend takes tensors: the CPU for gloo, the current CUDA device for NCCL."""
    backend = str(dist.get_backend())
    if "nccl" in backend or "xccl" in backend:
        if t.device.type != "cpu":
            return t.device
        if backend in ("nccl", "xccl") and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(t: torch.Tensor) -> torch.Tensor:
    """``[world, *t.shape]``: every rank's ``t`` (one all-gather)."""
    out = torch.empty((world_size(), *t.shape), dtype=t.dtype, device=t.device)
    dist.all_gather(list(out.unbind(0)), t)
    return out


def _layouts_agree(n: int, check: int, device: torch.device) -> bool:
    """One small all-reduce: do all ranks have ``n`` values with the checksum ``check``?

    Every rank learns the same answer, so all of them go on to gather or all skip (a gather of tensors of
    different sizes aborts the process under gloo).
    """
    probe = torch.tensor([n, -n, check, -check], dtype=torch.float64, device=device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX)
    return bool(probe[0] == -probe[1] and probe[2] == -probe[3] and probe[0] == n and probe[2] == check)


def reduce_columns(values: torch.Tensor, ops: Sequence[str | None], *, check: int | None = None) -> torch.Tensor:
    """Combine a 1-D float tensor across ranks entry by entry: ``ops[i]`` says how entry ``i`` is reduced.

    ``"mean"`` / ``"sum"`` / ``"max"`` / ``"min"`` over the ranks' values (NaN propagates); ``None`` keeps
    the local value (already global). One all-gather of the vector, preceded by a layout check (a
    four-number all-reduce) unless ``check`` is ``None``. Without a process group, or with one rank,
    ``values`` is returned as it is.

    Returns:
        The reduced vector (float64, on ``values``' device).

    Raises:
        RuntimeError: the ranks' layouts differ (``check`` given): nothing was gathered, on any rank.
    """
    if world_size() == 1:
        return values
    if len(ops) != values.numel():
        raise ValueError(f"reduce_columns: {values.numel()} values but {len(ops)} ops")
    home = values.device
    dev = _device_for(values)
    local = values.detach().to(dev, torch.float64).reshape(-1)
    if check is not None and not _layouts_agree(local.numel(), check, dev):
        raise RuntimeError("the ranks' record layouts differ")
    if local.numel() == 0:
        return values.to(torch.float64)
    table = _gather(local)  # [world, n]
    out = local.clone()
    for op in REDUCE_OPS:
        idx = [i for i, o in enumerate(ops) if o == op]
        if not idx:
            continue
        cols = table[:, idx]
        if op == "mean":
            red = cols.mean(0)
        elif op == "sum":
            red = cols.sum(0)
        elif op == "max":
            red = cols.amax(0)
        else:
            red = cols.amin(0)
        out[idx] = red
    return out.to(home)


def agree_stop(error: InstabilityError | None) -> InstabilityError | None:
    """Rank 0's stop decision, on every rank: ``error`` on rank 0, a copy of rank 0's error elsewhere.

    One broadcast of a flag per call; when rank 0 stops, a second broadcast carries its message, step and
    alerts. Every rank must call this at the same record (the pipeline calls it once per record when its
    alert engine can stop). A decision taken on another rank alone is dropped (logged at debug level):
    rank 0 decides.
    """
    if world_size() == 1:
        return error
    dev = _device_for(torch.empty(0))
    flag = torch.tensor([1.0 if (error is not None and is_main()) else 0.0], device=dev)
    dist.broadcast(flag, src=0)
    if not bool(flag.item()):
        if error is not None:
            log.debug("stabwatch: rank %d would stop (%s) but rank 0 decides; going on", rank(), error)
        return None
    payload: list[Any] = [None]
    if is_main():
        assert error is not None
        payload = [(str(error), error.step, list(error.alerts))]
    dist.broadcast_object_list(payload, src=0)
    message, step, alerts = payload[0]
    if is_main():
        return error
    return InstabilityError(f"rank 0 stopped training: {message}", alerts=alerts, step=step)
