"""Shadow replica: measured overhead against its duty cycle (window / every), and its memory, on CPU.

Trains an MLP on scikit-learn's digits (no download) with Adam, and times whole training runs:

* ``plain``: no monitor;
* ``monitor``: ``Monitor(preset="cheap")`` without a shadow;
* one run per shadow setting, on top of the same monitor;
* ``every=1 window=1``: a new shadow at every step, so ``(t − t_continuous) / steps`` is the cost of one
  spawn (the deep copy with the monitor's hooks paused and registered again, the optimizer clone);
* with ``GradScaler`` (``--amp`` rows): the same loop with loss scaling, the shadow replaying the scale;
  its extra is taken against the monitor with the same scaler.

The shadow's extra cost is ``(t_shadow − t_monitor) / t_plain``. Each shadow step is a forward, a
backward and an optimizer step, plus the renormalisation (a few fused passes over the parameters and
optimizer state), so the expectation is ``duty × (1 + bookkeeping)`` plus one model copy per window.
Runs are interleaved and repeated; medians are printed.

Memory: bytes of live tensors (found through ``gc``) with a window open and between windows, against the
bytes of the model and its optimizer state.

Run: ``python benchmarks/bench_shadow.py [--steps 400] [--repeats 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch
from torch import nn

import stabwatch as sw


def _data(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(x.shape[0], generator=g)
    return [(x[order[i : i + batch]], y[order[i : i + batch]]) for i in range(0, x.shape[0] - batch + 1, batch)]


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _run(batches, width: int, steps: int, shadow_kw: dict[str, Any] | None, monitor: bool, amp: bool = False) -> float:
    model = _model(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # a GradScaler on the CPU: the loss-scaling path of AMP (the scale is replayed by the shadow)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=amp)
    amp_kw: dict[str, Any] = {"scaler": scaler} if amp else {}
    shadow = sw.Shadow(loss_fn=_loss, **shadow_kw, **amp_kw) if shadow_kw is not None else None

    def loop(mon: sw.Monitor | None) -> float:
        t0 = time.perf_counter()
        for t in range(steps):
            batch = batches[t % len(batches)]
            opt.zero_grad()
            loss = _loss(model, batch)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if mon is not None:
                mon.step(loss=loss, batch=batch)
        return time.perf_counter() - t0

    if not monitor:
        return loop(None)
    with sw.Monitor(model, opt, preset="cheap", alerts=False, shadow=shadow, max_records=0) as mon:
        return loop(mon)


def _tensor_bytes() -> int:
    import warnings

    gc.collect()
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - meta/sparse tensors
            continue
        key = storage.data_ptr()
        if key in seen or key == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _memory(batches, width: int) -> dict[str, float]:
    model = _model(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for batch in batches[:2]:  # materialise Adam's state
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    state_bytes = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    out: dict[str, float] = {"model+optimizer MB": (model_bytes + state_bytes) / 2**20}
    for offload in (False, True):
        shadow = sw.Shadow(loss_fn=_loss, every=4, window=2, offload=offload)
        with sw.Monitor(model, opt, preset="cheap", alerts=False, shadow=shadow, max_records=0) as mon:
            base = base_open = None
            for t in range(8):
                batch = batches[t % len(batches)]
                opt.zero_grad()
                loss = _loss(model, batch)
                loss.backward()
                opt.step()
                mon.step(loss=loss, batch=batch)
                # both measured at the same point of a step (after mon.step), so what the other collectors
                # hold between the optimizer step and mon.step is in both or in neither
                if t == 0:
                    base_open = _tensor_bytes()  # window open (spawned at step 0), after its first step
                if t == 2:
                    base = _tensor_bytes()  # between windows (the window closed at step 1)
            assert base is not None and base_open is not None
        tag = "offload" if offload else "free"
        out[f"{tag}: open − between windows MB"] = (base_open - base) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="a multiple of 200 keeps the duty exact")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = _data(128)
    settings: dict[str, dict[str, Any]] = {
        "every=200 window=20 (duty 0.10)": {"every": 200, "window": 20},
        "every=100 window=50 (duty 0.50)": {"every": 100, "window": 50},
        "continuous (duty 1.00)": {"every": 200, "window": 20, "continuous": True},
        "continuous renorm=10 (duty 1.00)": {"every": 200, "window": 20, "continuous": True, "renorm": 10},
        "every=1 window=1 (spawn each step)": {"every": 1, "window": 1},
    }
    duty = {
        "every=200 window=20 (duty 0.10)": 0.1,
        "every=100 window=50 (duty 0.50)": 0.5,
        "continuous (duty 1.00)": 1.0,
        "continuous renorm=10 (duty 1.00)": 1.0,
        "every=1 window=1 (spawn each step)": 1.0,
    }
    amp_name = "continuous + GradScaler (duty 1.00)"
    _run(batches, args.width, 50, None, monitor=False)  # warm-up
    times: dict[str, list[float]] = {
        "plain": [],
        "monitor": [],
        "monitor+amp": [],
        amp_name: [],
        **{k: [] for k in settings},
    }
    for _ in range(args.repeats):
        times["plain"].append(_run(batches, args.width, args.steps, None, monitor=False))
        times["monitor"].append(_run(batches, args.width, args.steps, None, monitor=True))
        for name, kw in settings.items():
            times[name].append(_run(batches, args.width, args.steps, kw, monitor=True))
        times["monitor+amp"].append(_run(batches, args.width, args.steps, None, monitor=True, amp=True))
        amp_kw = settings["continuous (duty 1.00)"]
        times[amp_name].append(_run(batches, args.width, args.steps, amp_kw, monitor=True, amp=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    plain, mon = med["plain"], med["monitor"]
    n_params = sum(p.numel() for p in _model(args.width).parameters())
    print(
        f"MLP 64-{args.width}-{args.width}-10 ({n_params} parameters), Adam, batch 128, digits; "
        f"{args.steps} steps × {args.repeats} repeats, {args.threads} thread(s); medians"
    )
    print(f"  plain step: {plain / args.steps * 1e3:.3f} ms; monitor(cheap) step: {mon / args.steps * 1e3:.3f} ms")
    print(f"  {'setting':36s} {'step ms':>8s} {'extra/plain':>12s} {'duty':>6s} {'extra/duty':>11s}")
    for name in settings:
        extra = (med[name] - mon) / plain
        print(
            f"  {name:36s} {med[name] / args.steps * 1e3:8.3f} {extra:12.3f} {duty[name]:6.2f} "
            f"{extra / duty[name]:11.3f}"
        )
    amp_extra = (med[amp_name] - med["monitor+amp"]) / plain
    print(
        f"  {amp_name:36s} {med[amp_name] / args.steps * 1e3:8.3f} {amp_extra:12.3f} {1.0:6.2f} {amp_extra:11.3f}"
        f"   (vs monitor+GradScaler step {med['monitor+amp'] / args.steps * 1e3:.3f} ms)"
    )
    spawn = (med["every=1 window=1 (spawn each step)"] - med["continuous (duty 1.00)"]) / args.steps
    print(f"  one spawn (copy with hooks paused + optimizer clone): {spawn * 1e3:.3f} ms")
    print("memory:")
    for key, value in _memory(batches, args.width).items():
        print(f"  {key:36s} {value:8.3f}")


if __name__ == "__main__":
    main()
