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

Accuracy (``--accuracy``): least squares with 500 parameters (a 1000×500 Gaussian design, full-batch SGD,
float64 and float32), exact exponent ``log max_i |1 − η·h_i|`` from ``torch.linalg.eigvalsh`` of the
Hessian, η·h_max = 2.1 (diverging, +0.0953) and 1.9 (contracting, −0.0631); the windows of the default
``Shadow(loss_fn=...)`` against the former defaults (``carry=False, transient=0``: a fresh random direction
per window, nothing discarded).

Cost per window (``--per-window``): the default window (``window=20``: carried direction, data-sized
transient) against the former one (``carry=False, transient=0``: a random draw per spawn, a plain sum),
``every=40`` so one run holds many windows; timed in process CPU time (``time.process_time``, robust to
other processes on a shared machine), repeated and interleaved, medians; per window = (t − t_monitor) /
windows.

Run: ``python benchmarks/bench_shadow.py [--steps 400] [--repeats 3] [--threads 1] [--accuracy]
[--per-window]``.
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


def _run(
    batches,
    width: int,
    steps: int,
    shadow_kw: dict[str, Any] | None,
    monitor: bool,
    amp: bool = False,
    clock: Any = time.perf_counter,
) -> float:
    model = _model(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # a GradScaler on the CPU: the loss-scaling path of AMP (the scale is replayed by the shadow)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=amp)
    amp_kw: dict[str, Any] = {"scaler": scaler} if amp else {}
    shadow = sw.Shadow(loss_fn=_loss, **shadow_kw, **amp_kw) if shadow_kw is not None else None

    def loop(mon: sw.Monitor | None) -> float:
        t0 = clock()
        for t in range(steps):
            batch = batches[t % len(batches)]
            opt.zero_grad()
            loss = _loss(model, batch)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if mon is not None:
                mon.step(loss=loss, batch=batch)
        return clock() - t0

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

    def measured(shadow: sw.Shadow | None) -> tuple[int, int]:
        """Live tensor bytes after step 0 (a window open: spawned at step 0) and after step 2 (between)."""
        with sw.Monitor(model, opt, preset="cheap", alerts=False, shadow=shadow, max_records=0) as mon:
            sizes = []
            for t in range(3):
                batch = batches[t % len(batches)]
                opt.zero_grad()
                loss = _loss(model, batch)
                loss.backward()
                opt.step()
                mon.step(loss=loss, batch=batch)
                # all measured at the same point of a step (after mon.step), so what the other collectors
                # hold between the optimizer step and mon.step is in all or in none
                if t in (0, 2):
                    sizes.append(_tensor_bytes())
        return sizes[0], sizes[1]

    _, none = measured(None)
    for offload, carry in ((False, True), (False, False), (True, True)):
        open_, between = measured(sw.Shadow(loss_fn=_loss, every=4, window=2, offload=offload, carry=carry))
        tag = f"offload={offload} carry={carry}"
        out[f"{tag}: open − no shadow MB"] = (open_ - none) / 2**20
        out[f"{tag}: between − no shadow MB"] = (between - none) / 2**20
    return out


def _least_squares(eta_h_max: float, steps: int, dtype: torch.dtype, **settings: Any) -> tuple[float, list[float]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 500, generator=g, dtype=torch.float64)
    y = torch.randn(1000, 1, generator=g, dtype=torch.float64)
    h = torch.linalg.eigvalsh(2.0 / x.shape[0] * x.T @ x)
    lr = eta_h_max / float(h.max())
    exact = float(torch.log((1.0 - lr * h).abs().max()))
    torch.manual_seed(0)
    model = nn.Linear(500, 1, bias=False).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batch = (x.to(dtype), y.to(dtype))

    def mse(m: nn.Module, b: Any) -> torch.Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean()

    shadow = sw.Shadow(loss_fn=mse, **settings)
    with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False, max_records=0) as mon:
        for _ in range(steps):
            opt.zero_grad()
            loss = mse(model, batch)
            loss.backward()
            opt.step()
            mon.step(loss=loss, batch=batch)
    return exact, [e.lyapunov for e in shadow.estimates]


def accuracy() -> None:
    print("least squares, 500 parameters, full-batch SGD; windows of Shadow(loss_fn) (every=200, window=20):")
    for eta_h, dtype, steps in (
        (2.1, torch.float64, 1820),
        (2.1, torch.float32, 420),  # θ grows as 1.1^t: float32 overflows past ~900 steps
        (1.9, torch.float64, 1820),
        (1.9, torch.float32, 1820),
    ):
        for name, settings in (
            ("defaults", {}),
            ("former (carry=False, transient=0)", {"carry": False, "transient": 0}),
        ):
            exact, est = _least_squares(eta_h, steps, dtype, **settings)
            shown = " ".join(f"{v:+.4f}" for v in est)
            print(f"  η·h_max={eta_h} {str(dtype)[6:]:7s} exact {exact:+.4f} {name:34s} {shown}")


def per_window(batches, width: int, steps: int, repeats: int) -> None:
    settings = {
        "defaults (carry, transient='auto')": {"every": 40, "window": 20},
        "former (carry=False, transient=0)": {"every": 40, "window": 20, "carry": False, "transient": 0},
    }
    windows = steps // 40
    clock = time.process_time
    _run(batches, width, 50, None, monitor=False)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "monitor": [], **{k: [] for k in settings}}
    for _ in range(repeats):
        times["plain"].append(_run(batches, width, steps, None, monitor=False, clock=clock))
        times["monitor"].append(_run(batches, width, steps, None, monitor=True, clock=clock))
        for name, kw in settings.items():
            times[name].append(_run(batches, width, steps, kw, monitor=True, clock=clock))
    med = {k: statistics.median(v) for k, v in times.items()}
    plain_step = med["plain"] / steps
    print(
        f"cost per 20-step window, CPU time, {steps} steps × {repeats} repeats, {windows} windows per run; "
        f"plain step {plain_step * 1e3:.3f} ms"
    )
    for name in settings:
        extra = (med[name] - med["monitor"]) / windows
        spread = [(t - m) / windows * 1e3 for t, m in zip(times[name], times["monitor"])]
        print(
            f"  {name:36s} {extra * 1e3:8.3f} ms/window = {extra / plain_step:6.2f} plain steps "
            f"(runs: {', '.join(f'{v:.2f}' for v in spread)})"
        )
    print("  the parts that differ, timed alone (CPU ms per window):")
    for name, ms in _window_parts(batches, width).items():
        print(f"    {name:52s} {ms:7.3f} ms = {ms / (plain_step * 1e3):5.2f} plain steps")


def _window_parts(batches, width: int) -> dict[str, float]:
    """CPU time of what the default window does differently from the former one, on the benchmark's model."""
    from stabwatch.functional.lyapunov import difference_norms, random_direction, scaled_difference, truncated_mean

    model = _model(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for batch in batches[:2]:
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    params = [p.detach() for p in model.parameters()]
    state = [v for st in opt.state.values() for k, v in st.items() if k != "step"]
    shadow, shadow_state = [p.clone() for p in params], [v.clone() for v in state]
    carried, carried_state = [torch.randn_like(p) for p in params], [torch.randn_like(v) for v in state]
    gen = torch.Generator().manual_seed(0)
    growth = torch.randn(20, dtype=torch.float64)

    def draw() -> None:  # former spawn: a Gaussian direction
        for sp, dp in zip(shadow, random_direction(params, gen, 1e-3)):
            sp.add_(dp)

    def carry() -> None:  # default spawn: the kept direction, parameters and optimizer state
        for t, c in zip(shadow + shadow_state, carried + carried_state):
            t.add_(c, alpha=1e-3)

    def keep() -> None:  # default close: the unit difference for the next window
        inv = 1.0 / difference_norms(shadow, params).square().sum().sqrt()
        scaled_difference(shadow, params, inv)
        scaled_difference(shadow_state, state, inv)

    def mser() -> None:  # default steps: the data-sized transient re-sized at each of 20 steps
        for n in range(1, 21):
            truncated_mean(growth[:n])

    def timed(fn: Any, n: int = 100) -> float:
        fn()
        t0 = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t0) / n * 1e3

    parts = {
        "former: random direction at spawn": timed(draw),
        "default: carried direction at spawn": timed(carry),
        "default: keep the direction at close": timed(keep),
        "default: MSER transient, 20 steps": timed(mser),
    }
    parts["default − former"] = (
        parts["default: carried direction at spawn"]
        + parts["default: keep the direction at close"]
        + parts["default: MSER transient, 20 steps"]
        - parts["former: random direction at spawn"]
    )
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="a multiple of 200 keeps the duty exact")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--accuracy", action="store_true", help="only the least-squares accuracy table")
    parser.add_argument("--per-window", action="store_true", help="only the cost per window, defaults vs former")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.accuracy:
        accuracy()
        return
    if args.per_window:
        per_window(_data(128), args.width, args.steps, args.repeats)
        return
    batches = _data(128)
    settings: dict[str, dict[str, Any]] = {
        "every=200 window=20 (duty 0.10)": {"every": 200, "window": 20},
        "  former: carry=False transient=0": {"every": 200, "window": 20, "carry": False, "transient": 0},
        "every=100 window=50 (duty 0.50)": {"every": 100, "window": 50},
        "continuous (duty 1.00)": {"every": 200, "window": 20, "continuous": True},
        "continuous renorm=10 (duty 1.00)": {"every": 200, "window": 20, "continuous": True, "renorm": 10},
        "every=1 window=1 (spawn each step)": {"every": 1, "window": 1},
    }
    duty = {
        "every=200 window=20 (duty 0.10)": 0.1,
        "  former: carry=False transient=0": 0.1,
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
        print(f"  {key:46s} {value:8.3f}")


if __name__ == "__main__":
    main()
