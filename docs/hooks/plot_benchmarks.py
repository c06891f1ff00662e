"""Draw the benchmark figures of ``docs/benchmarks.md`` into ``docs/img/`` from the measured numbers.

The numbers are the last measured ones (2-core shared CPU machine; see docs/benchmarks.md for the
commands and the dates). After re-running a benchmark, update `FIGURES` and the page's tables, then run
``python docs/hooks/plot_benchmarks.py`` (needs matplotlib) and commit the images.
"""

from __future__ import annotations

from pathlib import Path

IMG = Path(__file__).resolve().parents[1] / "img"

#: ratio of the step time to a bare step (bench_overhead.py, bench_snn.py; lockstep, 300 rounds)
OVERHEAD: dict[str, dict[str, float]] = {
    "MLP 8×512\n(bare 19 ms)": {"default": 1.08, "full": 2.45, ".item() loop": 0.99, ".item() + SVD": 9.8,
                                "wandb.watch": 3.07},
    "CNN\n(bare 17 ms)": {"default": 1.07, "full": 1.51, ".item() loop": 0.97, ".item() + SVD": 2.19,
                          "wandb.watch": 1.76},
    "SNN T=25\n(bare 36 ms)": {"default": 1.09, "full": 1.47, "hand-written\nSNN monitor": 1.13},
}  # fmt: skip

#: ms per step on the MLP, each family alone every step, self-timed (bench_overhead.py)
FAMILY_MS: dict[str, float] = {
    "Monitor.step\n(nothing)": 0.2,
    "nonfinite": 0.15,
    "grad": 0.9,
    "weight": 2.6,
    "activation": 2.6,
    "update": 3.4,
    "grad_sv": 18.8,
}

#: in-loop cost per step vs writing synchronously, ms (bench_sinks.py, 50-metric record)
SINKS_MS: dict[str, tuple[float, float]] = {
    "JSONL": (0.002, 0.015),
    "MLflow (HTTP)": (0.018, 26.0),
    "W&B offline": (0.010, 0.97),
    "TensorBoard": (0.004, 1.35),
}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(exist_ok=True)
    colors = {"default": "#2a7ab0", "full": "#7fb3d5", ".item() loop": "#bbbbbb", ".item() + SVD": "#888888",
              "wandb.watch": "#e59866", "hand-written\nSNN monitor": "#888888"}  # fmt: skip

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    x = 0.0
    ticks, labels, seen = [], [], set()
    for workload, ratios in OVERHEAD.items():
        start = x
        for name, ratio in ratios.items():
            ax.bar(x, ratio, color=colors[name], label=None if name in seen else name.replace("\n", " "))
            ax.text(x, ratio * 1.04, f"{ratio:g}×", ha="center", fontsize=7)
            seen.add(name)
            x += 1
        ticks.append((start + x - 1) / 2)
        labels.append(workload)
        x += 1
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("step time / bare step")
    ax.set_xticks(ticks, labels)
    ax.set_title("Monitoring overhead (CPU, 2 cores; lower is better)")
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.tight_layout()
    fig.savefig(IMG / "bench-overhead.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3), dpi=120)
    names = list(FAMILY_MS)
    ax.barh(names, [FAMILY_MS[n] for n in names], color="#2a7ab0")
    for i, n in enumerate(names):
        ax.text(FAMILY_MS[n] * 1.15, i, f"{FAMILY_MS[n]:g} ms", va="center", fontsize=7)
    ax.axvline(19.0, color="#c0392b", lw=1, ls="--")
    ax.text(19.0, len(names) - 0.6, " bare step 19 ms", color="#c0392b", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(0.1, 80)
    ax.set_xlabel("ms per measured step (MLP 8×512, batch 128), each family alone")
    ax.set_title("Where the time goes")
    fig.tight_layout()
    fig.savefig(IMG / "bench-families.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 2.8), dpi=120)
    names = list(SINKS_MS)
    ys = range(len(names))
    ax.barh(
        [y + 0.2 for y in ys],
        [SINKS_MS[n][0] for n in names],
        height=0.4,
        color="#2a7ab0",
        label="stabwatch sink (in the training loop)",
    )
    ax.barh([y - 0.2 for y in ys], [SINKS_MS[n][1] for n in names], height=0.4, color="#bbbbbb",
            label="writing the record synchronously")  # fmt: skip
    ax.set_yticks(list(ys), names)
    ax.set_xscale("log")
    ax.set_xlabel("ms per step (50-metric record)")
    ax.set_title("What a tracker costs the training loop")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(IMG / "bench-sinks.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
