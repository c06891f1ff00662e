"""Per-rank bodies of the distributed tests, importable by ``torch.multiprocessing`` spawn, and the launcher.

`launch` starts two processes on the CPU (gloo, file rendezvous), runs one scenario function in
each and returns what every rank returned (JSON through files); it joins with a timeout and kills both
processes when they hang, so a hang fails the test instead of blocking CI. `reference` trains the same
model in one process on the combined batch and measures every checked number independently with
``torch.linalg``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import stabwatch as sw
from stabwatch import distributed as swd
from stabwatch.collectors import Collector, Readout, SpikingCollector
from stabwatch.collectors.spiking import SpikingAdapter
from stabwatch.errors import ConfigError, InstabilityError

WORLD = 2
PER_RANK = 4  # samples per rank; the combined batch is WORLD * PER_RANK
STEPS = 3
LR = 0.1


# the model and the data (the same on every rank and in the reference) ----------------------------------
def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def make_data(steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, WORLD * PER_RANK, 6, generator=g, dtype=torch.float64) * 2
    y = torch.randn(steps, WORLD * PER_RANK, 3, generator=g, dtype=torch.float64)
    return x, y


def local(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * PER_RANK : (rank + 1) * PER_RANK]


# launcher -----------------------------------------------------------------------------------------------
def _entry(rank: int, scenario: str, out_dir: str, options: dict[str, Any]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/rendezvous",  # no port to pick, none to lose to another program
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = globals()[scenario](rank, Path(out_dir), **options)
    except Exception:  # noqa: BLE001 - reported to the test in the parent process
        result = {"error": traceback.format_exc()}
    Path(out_dir, f"result{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(scenario: str, out_dir: Path, timeout: float = 60.0, **options: Any) -> list[dict[str, Any]]:
    """Run ``scenario(rank, out_dir, **options)`` on two gloo ranks; the per-rank results (dicts)."""
    ctx = mp.start_processes(
        _entry,
        args=(scenario, str(out_dir), options),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                errors = [p.read_text() for p in sorted(Path(out_dir).glob("result*.json"))]
                raise TimeoutError(f"{scenario}: the ranks did not finish within {timeout:.0f} s (a hang); {errors}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [json.loads(Path(out_dir, f"result{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


# what the tests compare ----------------------------------------------------------------------------------
_CHECKED_FIELDS = (
    "loss",
    "grad_norm",
    "update_ratio",
    "weight_norm",
    "update_norm",
    "spectral_norm",
    "grad_max_sv",
    "activation_mean",
    "activation_std",
    "saturated_frac",
)


def _summary(records: list[Any]) -> list[dict[str, Any]]:
    out = []
    for r in records:
        d: dict[str, Any] = {f: getattr(r, f) for f in _CHECKED_FIELDS}
        d["step"] = r.step
        d["layers"] = {layer: dict(v) for layer, v in r.layers.items()}
        out.append(d)
    return out


def _train(
    rank: int, model: nn.Module, wrapped: nn.Module, mon: sw.Monitor, opt: torch.optim.Optimizer, **poison: Any
) -> tuple[int | None, str]:
    """STEPS training steps on this rank's part of the data; (step of an InstabilityError, its message)."""
    x_all, y_all = make_data()
    for step in range(STEPS):
        x, y = local(x_all[step], rank).clone(), local(y_all[step], rank)
        if poison.get("nan_step") == step and rank == poison.get("nan_rank", 0):
            x[0, 0] = float("nan")
        opt.zero_grad()
        loss = nn.functional.mse_loss(wrapped(x), y)
        loss.backward()
        opt.step()
        try:
            mon.step(loss=loss)
        except InstabilityError as exc:
            return exc.step, str(exc)
    return None, ""


class ProbeCollector(Collector):
    """Adds this rank's number under each reduction; with ``extra_on_rank1`` rank 1 adds one more entry
    (a layout that differs between ranks, as when a collector fails on one rank)."""

    family = "probe"

    def __init__(self, extra_on_rank1: bool = False) -> None:
        super().__init__(1)
        self.extra_on_rank1 = extra_on_rank1

    def collect(self, step: int, readout: Readout, loss: Any, batch: Any) -> None:
        r = float(dist.get_rank())
        for op in ("mean", "sum", "max", "min"):
            readout.add_extra(f"probe/{op}", r + 1, reduce=op)
        if self.extra_on_rank1 and r == 1:
            readout.add_extra("probe/only_rank1", 7.0, reduce="max")


class ThresholdNeuron(nn.Module):
    """A spiking layer in a few lines: spikes where the input is above 0; the membrane is the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.v = x
        return (x > 0.0).to(x.dtype)


SPIKING_FIELDS = (
    "firing_rate_mean",
    "firing_rate_std",
    "dead_neuron_frac",
    "membrane_mean",
    "membrane_std",
    "membrane_threshold_distance",
)


def make_spiking() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(6, 16), ThresholdNeuron(), nn.Linear(16, 3)).double()


def spiking_reference() -> list[dict[str, float]]:
    """Firing and membrane statistics of the combined batch, one forward per step, computed directly."""
    model = make_spiking()
    x_all, _ = make_data()
    out = []
    for step in range(STEPS):
        v = model[0](x_all[step]).detach()
        rates = (v > 0).double().mean(0)
        out.append(
            {
                "firing_rate_mean": float(rates.mean()),
                "firing_rate_std": float(rates.std()),
                "dead_neuron_frac": float((rates < 0.01).double().mean()),
                "membrane_mean": float(v.mean()),
                "membrane_std": float(v.std()),
                "membrane_threshold_distance": float((0.0 - v).mean()),
            }
        )
    return out


# scenarios (run on every rank) -----------------------------------------------------------------------------
def ddp_scenario(rank: int, out: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict[str, Any] = {}
    # 1. values against the single-process reference; rank 0 alone writes its JSONL sink
    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    sink = sw.sinks.JsonlSink(out / f"rank{rank}.jsonl")
    with sw.Monitor(model, opt, sinks=[sink], preset="full", alerts=False) as mon:
        _train(rank, model, ddp, mon, opt)
    res["records"] = _summary(list(mon.records))
    res["writes"] = mon._pipeline.writes

    # 2. raise_on: a NaN in rank 0's batch at step 1; both ranks stop there (the loss is averaged)
    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    with sw.Monitor(model, opt, preset="cheap", raise_on="warning") as mon:
        res["raise_on"] = _train(rank, model, ddp, mon, opt, nan_step=1)

    # 3. rank 0 decides: only rank 0's callback stops (at the first alert); rank 1 stops with it
    def stop_on_rank0(alert: sw.Alert) -> None:
        if rank == 0:
            raise InstabilityError(f"callback on rank 0: {alert.rule}", alerts=[alert], step=alert.step)

    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    with sw.Monitor(model, opt, preset="cheap", on_alert=stop_on_rank0) as mon:
        res["callback"] = _train(rank, model, ddp, mon, opt, nan_step=2, nan_rank=1)
    dist.barrier()  # both ranks got here: nobody hangs in a collective the other skipped

    # 4. all_ranks=True: every rank writes its own sink
    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    with sw.Monitor(model, opt, sinks=[sw.sinks.JsonlSink(out / f"all{rank}.jsonl")], all_ranks=True) as mon:
        _train(rank, model, ddp, mon, opt)

    # 5. custom entries with each reduction; then a layout that differs between the ranks
    for mismatch in (False, True):
        with sw.Monitor(model, opt, preset="cheap", collectors=[ProbeCollector(mismatch)]) as mon:
            _train(rank, model, ddp, mon, opt)
        res[f"probe_mismatch={mismatch}"] = [dict(r.extra, grad_norm=r.grad_norm) for r in mon.records]

    # 6. spiking statistics of the combined batch (forward passes only, no optimizer)
    adapter = SpikingAdapter(ThresholdNeuron, spikes=0, membrane="v", threshold=0.0)
    spiking = make_spiking()
    x_all, _ = make_data()
    with sw.Monitor(spiking, collectors=[SpikingCollector(1, adapters=[adapter])], alerts=False) as mon:
        for step in range(STEPS):
            mon.step(loss=spiking(local(x_all[step], rank)).square().mean())
    res["spiking"] = [
        {f: getattr(r, f) for f in SPIKING_FIELDS} | {f"1/{f}": r.layers["1"][f] for f in SPIKING_FIELDS}
        for r in mon.records
    ]

    # 7. the shadow replica is refused with more than one process
    try:
        sw.Monitor(model, opt, shadow=sw.Shadow(loss_fn=lambda m, b: m(b).sum(), every=5, window=2))
        res["shadow"] = "accepted"
    except ConfigError as exc:
        res["shadow"] = str(exc)
    return res


def fsdp_scenario(rank: int, out: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sink = sw.sinks.JsonlSink(out / f"rank{rank}.jsonl")
    with sw.Monitor(model, opt, sinks=[sink], preset="full", alerts=False) as mon:
        _train(rank, model, model, mon, opt)
    sharded = all(swd.is_sharded(p) for p in model.parameters())
    local_sq = sum(float(swd.local_tensor(p.grad).square().sum()) for p in model.parameters())
    return {"records": _summary(list(mon.records)), "sharded": sharded, "local_grad_sq": local_sq}


# the single-process reference ------------------------------------------------------------------------------
def reference() -> list[dict[str, Any]]:
    """The same training on the combined batch in one process, each number measured with ``torch.linalg``."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x_all, y_all = make_data()
    acts: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.ReLU, nn.Tanh)):
            m.register_forward_hook(lambda mod, a, o, name=name: acts.__setitem__(name, o.detach()))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x_all[step]), y_all[step])
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        layers: dict[str, dict[str, float]] = {}
        for n, m in linears:
            gs = [m.weight.grad, m.bias.grad]
            ws = [m.weight.detach(), m.bias.detach()]
            layers[n] = {
                "grad_norm": float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in gs]))),
                "weight_norm": float(torch.linalg.vector_norm(torch.cat([w.reshape(-1) for w in ws]))),
                "grad_max_sv": float(torch.linalg.svdvals(m.weight.grad)[0]),
            }
        for n, a in acts.items():
            layers[n] = {"activation_mean": float(a.mean()), "activation_std": float(a.std())}
            if n == "3":
                layers[n]["saturated_frac"] = float((a.abs() > 0.99).double().mean())
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
        delta = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before, strict=True)])
        w_before = torch.cat([b.reshape(-1) for b in before])
        for n, m in linears:  # the record is made after the step: spectra of the updated weights
            layers[n]["spectral_norm"] = float(torch.linalg.matrix_norm(m.weight.detach(), 2))
            i = [k for k, (name, _) in enumerate(model.named_parameters()) if name.startswith(n + ".")]
            d = torch.cat([delta_part.reshape(-1) for delta_part in _split(delta, model, i)])
            w = torch.cat([b.reshape(-1) for k, b in enumerate(before) if k in i])
            layers[n]["update_ratio"] = float(torch.linalg.vector_norm(d) / torch.linalg.vector_norm(w))
        out.append(
            {
                "loss": float(loss.detach()),
                "grad_norm": float(torch.linalg.vector_norm(grads)),
                "weight_norm": float(torch.linalg.vector_norm(w_before)),
                "update_ratio": float(torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(w_before)),
                "spectral_norm": max(v["spectral_norm"] for n, v in layers.items() if "spectral_norm" in v),
                "layers": layers,
            }
        )
    return out


def _split(flat: torch.Tensor, model: nn.Module, keep: list[int]) -> list[torch.Tensor]:
    parts, pos = [], 0
    for k, p in enumerate(model.parameters()):
        if k in keep:
            parts.append(flat[pos : pos + p.numel()])
        pos += p.numel()
    return parts


def close(a: float | None, b: float, rel: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
