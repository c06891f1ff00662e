"""The key reference (``keys.md``), generated from the keys a real run emits, so it cannot drift.

Two ways in:

* **MkDocs hook** (``hooks: [docs/hooks/keys.py]`` in ``mkdocs.yml``): ``on_files`` adds the generated
  page ``keys.md`` to the site (nothing is written to ``docs/``).
* **Script**: ``python docs/hooks/keys.py`` prints the page; ``-o FILE`` writes it.

How: a `stabwatch.Monitor` with the ``full`` preset, ``per_layer`` on and a per-layer `stabwatch.Shadow`
runs a few steps of `reference_model` (Linear, Conv2d, LayerNorm, LSTM, GRU, ReLU/Tanh/Sigmoid and, where
snntorch is installed, a ``Leaky`` spiking layer); a tiny `stabwatch.analysis.StabilityAnalyzer` run adds
the analyzer's keys; a `stabwatch.sinks.LayerKeyPolicy` adds the tracker sinks' summaries across layers.
Every ``record.to_dict()`` key is collected, per-layer keys are grouped into patterns
``<family>_layers/<metric>/<module.path>`` (`pattern`), and each pattern is joined with its description
in `DESCRIPTIONS`. A pattern without a description, or a description whose key no run emits, is an error
(the build fails; ``tests/test_docs.py`` checks it too, and that every key of a differently shaped
``full`` run matches a documented pattern).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.plugins.stabwatch.keys")

LAYER = "<module.path>"
#: the module-path placeholder of per-layer patterns, and what `pattern` makes of top-k indices
TOP = re.compile(r"^top\d+$")

#: pattern -> (meaning, unit and cadence). Written by hand, checked against what a real run emits.
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    # the loss and the monitor itself
    "loss/value": ("The loss passed to `Monitor.step(loss=...)`.", "your loss's unit; per step"),
    "monitor/overhead_ms": (
        "Host wall time the monitor spent in its hooks and in `Monitor.step` since the previous record. On a "
        "GPU it includes the wait, at the record's one device→host copy, for the training kernels still "
        "queued (backward, optimizer step): an upper bound there, not the monitor's own cost.",
        "milliseconds; per record",
    ),
    "nonfinite/any": (
        "1 if a NaN or ±inf was seen in the loss, a gradient or a checked module output at this step, else 0. "
        "The record's `nonfinite_source` (not a metric) names where it appeared first: a module path, "
        "`gradients` or `loss`. Checked at every step whatever `every=` says (a period only turns it on).",
        "0/1; every step",
    ),
    # grad
    "grad/norm": (
        "Global L2 norm of all gradients the optimizer uses in the step, `sqrt(Σ_p ‖g_p‖²)` (after "
        "accumulation, AMP unscaling and clipping).",
        "gradient units; per step",
    ),
    "grad_layers/norm/<module.path>": (
        "L2 norm of the gradients of the parameters the module owns directly.",
        "gradient units; per step",
    ),
    # update
    "update/ratio": (
        "Update-to-weight ratio across the optimizer step, `‖θ_t − θ_{t−1}‖ / ‖θ_{t−1}‖`, all parameters "
        "(all of them zero before the step: `/ ‖θ_t‖`, i.e. 1 if they moved, 0 if not).",
        "dimensionless (healthy ≈ 1e-3); per measured step",
    ),
    "update/norm": ("Size of the update, `‖θ_t − θ_{t−1}‖` (the ratio's numerator).", "weight units; per step"),
    "update/weight_norm": ("`‖θ_{t−1}‖` over all parameters (the ratio's denominator).", "weight units"),
    "update_layers/ratio/<module.path>": (
        "The update-to-weight ratio of the parameters the module owns; where they are all zero before the "
        "step (LoRA `B`, a zero-initialised head) `‖θ_t − θ_{t−1}‖ / ‖θ_t‖`: 1 if they moved, 0 if not.",
        "dimensionless; per measured step",
    ),
    "update_layers/weight_norm/<module.path>": ("`‖θ_{t−1}‖` of the module's parameters.", "weight units"),
    # grad_sv
    "grad_sv/max": (
        "Largest singular value of any 2-D weight gradient (conv kernels reshaped to `[out, in·k]`).",
        "gradient units",
    ),
    "grad_sv/min": (
        "Smallest non-zero singular value (above `σ₁·max(m, n)·eps`) over the layers with an exact spectrum.",
        "gradient units",
    ),
    "grad_sv/condition": (
        "Largest per-layer condition number `σ₁ / σ_min` over the layers with an exact spectrum. "
        "The batch gradient has rank ≤ B, so this follows the batch size; it is not the Hessian's condition number.",
        "dimensionless",
    ),
    "grad_sv/rank": (
        "Smallest numerical rank of any layer's weight gradient, over the layers with an exact spectrum "
        "(bounded by the narrowest such layer and by the batch size: read its drops, not its level).",
        "count",
    ),
    "grad_sv_layers/max/<module.path>": ("Largest singular value of the module's weight gradient.", "gradient units"),
    "grad_sv_layers/min/<module.path>": (
        "Smallest non-zero singular value of the module's weight gradient (exact layers only: "
        "`min(m, n) ≤ exact_max_dim`).",
        "gradient units",
    ),
    "grad_sv_layers/condition/<module.path>": (
        "Condition number `σ₁ / σ_min` of the module's weight gradient (exact layers only). "
        "The batch gradient has rank ≤ B, so this follows the batch size; it is not the Hessian's condition number.",
        "dimensionless",
    ),
    "grad_sv_layers/rank/<module.path>": (
        "Numerical rank of the module's weight gradient (a batch of B samples gives rank ≤ B; exact layers only).",
        "count",
    ),
    "grad_sv_layers/top<i>/<module.path>": (
        "The i-th largest singular value of the module's weight gradient, i = 1…`top_k` "
        "(`GradSVCollector(top_k=3)`); exact, or by block Krylov iteration for large matrices.",
        "gradient units",
    ),
    # weight
    "weight/spectral_norm": (
        "Largest spectral norm (largest singular value) of any 2-D weight, by warm-started power iteration.",
        "weight units",
    ),
    "weight/spectral_radius": (
        "Largest |eigenvalue| of the recurrent weights (RNN/LSTM/GRU hidden-to-hidden gate blocks).",
        "dimensionless (> 1: a linearised recurrence can grow)",
    ),
    "weight_layers/spectral_norm/<module.path>": (
        "Spectral norm of the module's weight (a parameter not named `weight` keeps its name: `rnn.weight_ih_l0`).",
        "weight units",
    ),
    "weight_layers/spectral_radius/<module.path>": (
        "Spectral radius of one recurrent weight block; the layer is `<module>.weight_hh_l<k>.<gate>` "
        "(LSTM gates `i f g o`, GRU `r z n`, RNN: no gate suffix).",
        "dimensionless",
    ),
    # activation
    "activation/mean": ("Mean over hooked layers of each layer's mean output.", "activation units"),
    "activation/std": (
        "Mean over hooked layers of each layer's output std, pooled over batch × units.",
        "activation units",
    ),
    "activation/batch_std": (
        "Mean over hooked layers of each layer's spread across the batch: per unit the std over the "
        "samples, root mean square over the units. ≈ 0 when every sample gives the same output "
        "(collapse); not emitted for a batch of one sample.",
        "activation units",
    ),
    "activation/dead_frac": (
        "Mean over ReLU/ReLU6 layers of the fraction of units that are ≤ 0 for the whole batch (no "
        "gradient flows through them; LeakyReLU/RReLU/PReLU are never dead and not counted).",
        "fraction in [0, 1]",
    ),
    "activation/saturated_frac": (
        "Mean over tanh/sigmoid layers of the fraction of outputs in the flat tails (|y| > 0.99; sigmoid "
        "outside [0.01, 0.99]).",
        "fraction in [0, 1]",
    ),
    "activation_layers/mean/<module.path>": ("Mean of the activation module's output.", "activation units"),
    "activation_layers/std/<module.path>": (
        "Std of the activation module's output, pooled over batch × units.",
        "activation units",
    ),
    "activation_layers/batch_std/<module.path>": (
        "Spread of the activation module's output across the batch: each unit's std over the samples, "
        "root mean square over the units (`sqrt(mean_u var_b(x_bu))`).",
        "activation units",
    ),
    "activation_layers/dead_frac/<module.path>": (
        "Fraction of the ReLU/ReLU6 layer's units that are ≤ 0 for the whole batch (no gradient flows).",
        "fraction in [0, 1]",
    ),
    "activation_layers/saturated_frac/<module.path>": (
        "Fraction of the tanh/sigmoid layer's outputs in the flat tails.",
        "fraction in [0, 1]",
    ),
    # spiking
    "spiking/firing_rate_mean": (
        "Mean over all neurons of all spiking layers, pooled (a layer weighs by its neuron count; "
        "unlike `activation/*`, an unweighted mean over layers), of the firing rate `r_j = spikes_j / (T·B)`.",
        "spikes per neuron per time step, in [0, 1]; per step",
    ),
    "spiking/firing_rate_std": (
        "Std over all neurons of all layers, pooled, of `r_j`.",
        "spikes per neuron per time step",
    ),
    "spiking/dead_neuron_frac": (
        "Fraction of all neurons of all layers, pooled, with `r_j < dead_threshold` (0.01).",
        "fraction",
    ),
    "spiking/saturated_neuron_frac": (
        "Fraction of all neurons of all layers, pooled, with `r_j > saturated_threshold` (0.9).",
        "fraction",
    ),
    "spiking/membrane_mean": (
        "Mean of every membrane potential element of every spiking layer seen in the step, pooled.",
        "membrane units",
    ),
    "spiking/membrane_std": (
        "Std of every membrane potential element of every spiking layer seen in the step, pooled.",
        "membrane units",
    ),
    "spiking/membrane_threshold_distance": (
        "Mean of `threshold − v` (positive: below threshold; a silent layer shows a large value).",
        "membrane units",
    ),
    "spiking_layers/firing_rate_mean/<module.path>": ("Mean firing rate of the layer's neurons.", "in [0, 1]"),
    "spiking_layers/firing_rate_std/<module.path>": ("Std of the layer's firing rates.", "in [0, 1]"),
    "spiking_layers/dead_neuron_frac/<module.path>": ("Fraction of the layer's neurons with `r_j < 0.01`.", "fraction"),
    "spiking_layers/saturated_neuron_frac/<module.path>": (
        "Fraction of the layer's neurons with `r_j > 0.9`.",
        "fraction",
    ),
    "spiking_layers/membrane_mean/<module.path>": ("Mean of the layer's membrane potential.", "membrane units"),
    "spiking_layers/membrane_std/<module.path>": ("Std of the layer's membrane potential.", "membrane units"),
    "spiking_layers/membrane_threshold_distance/<module.path>": (
        "Mean of `threshold − v` over the layer's membrane elements.",
        "membrane units",
    ),
    "spiking/surrogate_grad": (
        "Mean surrogate derivative `σ'(v − threshold)` of each layer's own spike function on a sample of its membrane "
        "values, pooled over layers by neuron count: how much gradient the surrogate lets through (snntorch "
        "fast_sigmoid slope 25 on the digits SNN: 0.021–0.035; slope 500: 0.0004–0.0028).",
        "in [0, 1] (surrogates peaking at 1 at the threshold)",
    ),
    "spiking/near_threshold_frac": (
        "Fraction of sampled membrane values inside the surrogate's half-maximum window around the threshold "
        "(`σ'(u) ≥ σ'(0)/2`), pooled over layers by neuron count.",
        "fraction",
    ),
    "spiking_layers/surrogate_grad/<module.path>": ("The layer's mean surrogate derivative.", "in [0, 1]"),
    "spiking_layers/near_threshold_frac/<module.path>": (
        "Fraction of the layer's sampled membrane values inside its surrogate's half-maximum window.",
        "fraction",
    ),
    # attention
    "attention/max_logit": (
        "Largest pre-softmax attention logit `scale·q·kᵀ` over every attention layer, head, sampled sequence, "
        "query and attended key (`AttentionCollector(samples=2)`: the first sequences of the batch). Grows "
        "without bound in the attention-logit instability of Wortsman et al. (2023).",
        "logit units (healthy: tens); per measured step",
    ),
    "attention/entropy_min": (
        "Smallest head entropy over all attention layers: `−Σ_j p_ij log p_ij` of `softmax(scale·q·kᵀ + mask)`, "
        "the mean over the head's query rows. Near 0: the head attends to one key (entropy collapse).",
        "nats (uniform over n keys: log n); per measured step",
    ),
    "attention/entropy_mean": ("Mean head entropy over all attention layers and heads.", "nats"),
    "attention/q_norm_max": (
        "Largest mean query-vector norm `mean_i ‖q_i‖` of any head (what drives the logits up).",
        "activation units",
    ),
    "attention/k_norm_max": ("Largest mean key-vector norm `mean_j ‖k_j‖` of any head.", "activation units"),
    "attention/z_mean": (
        "Mean log-partition `z = log Σ_v exp(y_v)` of the output head's logits over the sampled sequences' "
        "positions (what a z-loss keeps near 0).",
        "nats; per measured step",
    ),
    "attention/z_max": ("Largest log-partition `z` of the output logits over the sampled positions.", "nats"),
    "attention_layers/max_logit/<module.path>": (
        "Largest pre-softmax logit of the attention layer (over its heads); with `per_head=True` also per head, "
        "`<module.path>:h<i>`.",
        "logit units",
    ),
    "attention_layers/entropy_min/<module.path>": ("Smallest head entropy of the attention layer.", "nats"),
    "attention_layers/entropy_mean/<module.path>": (
        "Mean head entropy of the attention layer (per head: that head's entropy).",
        "nats",
    ),
    "attention_layers/q_norm/<module.path>": ("Largest mean query norm of the layer's heads.", "activation units"),
    "attention_layers/k_norm/<module.path>": ("Largest mean key norm of the layer's heads.", "activation units"),
    # lyapunov_spectrum
    "lyapunov_spectrum/max": (
        "Largest Lyapunov exponent λ_1 over the model's recurrent modules (nn.RNN/LSTM/GRU), each run with its "
        "current weights over a fixed probe batch (QR method, `LyapunovSpectrumCollector`). > 0: the state "
        "forgets its past chaotically (exploding sensitivity); ≪ 0: it forgets fast (vanishing memory).",
        "nats per time step of the network; per measured step",
    ),
    "lyapunov_spectrum_layers/top<i>/<module.path>": (
        "The i-th largest Lyapunov exponent of the recurrent module (its full state: (h, c) for an LSTM, every "
        "layer of a stack), mean over the probe sequences; i = 1..`top_k`.",
        "nats per time step of the network",
    ),
    # sharpness
    "sharpness/max": (
        "Largest eigenvalue λ_max of the loss's Hessian on the probe batch (`SharpnessCollector(loss_fn=..., "
        "probe=...)`), at the parameters after the optimizer step; Lanczos on Hessian-vector products, no "
        "Hessian formed.",
        "loss units per (parameter unit)²; per measured step (default every 2000)",
    ),
    "sharpness/eos_ratio": (
        "Edge-of-stability ratio: λ_max over the largest curvature the optimizer is stable at on a quadratic. "
        "SGD `η(1−d)λ_max/(2+2μ)` (`ηλ_max/2` without momentum), Nesterov `η(1+2μ)λ_max/(2+2μ)`, Adam/AdamW "
        "`η(1−β₁)λ_max(P⁻¹H)/(2+2β₁)`. ≈ 1: training is at the edge of stability; > 1: a quadratic model of the"
        " loss with this curvature diverges.",
        "dimensionless; per measured step",
    ),
    "sharpness/preconditioned_max": (
        "Adam/AdamW: largest eigenvalue of `P⁻¹H`, P = diag(sqrt(v̂) + ε) from the optimizer's second moments "
        "(the curvature Adam's update sees).",
        "loss units per (parameter unit · gradient unit); per measured step",
    ),
    # ftle
    "ftle/mean": (
        "Mean over the probe inputs of the maximal input-space finite-time Lyapunov exponent "
        "λ(x) = (1/L)·log σ_max(∂output/∂x) (`FTLECollector`, docs/ftle.md): > 0, the network amplifies small "
        "input perturbations; ≪ 0, signals and gradients die with depth. Training tends to centre it near 0.",
        "nats per layer; per measured step",
    ),
    "ftle/max": (
        "The largest λ(x) over the probe inputs: the most sensitive input (a ridge of the FTLE field, "
        "typically near the decision boundary).",
        "nats per layer; per measured step",
    ),
    # shadow
    "shadow/lyapunov": (
        "From a `Monitor` with a `Shadow`: the running finite-time Lyapunov exponent of training over the "
        "open window, the mean log growth per step after its transient (data-sized by default); windows "
        "start from the previous window's direction. The offline analyzer's per-epoch exponent is "
        "`analysis/lyapunov`.",
        "nats per optimizer step",
    ),
    "shadow/lyapunov_local": (
        "The exponent of the renormalisation interval that just ended, `log(‖δθ_end‖/‖δθ_start‖) / renorm`.",
        "nats per optimizer step",
    ),
    "shadow/divergence": (
        "Relative distance of the shadow replica, `‖θ̃_t − θ_t‖ / ‖θ_t‖`, before renormalisation.",
        "dimensionless (≈ eps after a renormalisation)",
    ),
    "shadow_layers/divergence/<module.path>": (
        "`‖θ̃_l − θ_l‖ / ‖θ‖` over the module's parameters (`Shadow(per_layer=True)`); their squares sum "
        "to the global one's.",
        "dimensionless",
    ),
    # analysis
    "analysis/spread": (
        "`StabilityAnalyzer(sinks=...)`: spread of the perturbed replicas, `sqrt(mean_{i<j} ‖θ_i − θ_j‖²)`, "
        "at the checkpoint.",
        "weight units; per checkpoint (step = epoch)",
    ),
    "analysis/lyapunov": (
        "`StabilityAnalyzer(sinks=...)`: the exponent of the replicas' spread from the first checkpoint to "
        "this one, `log(s(t)/s(t_0)) / (t − t_0)`; at the last checkpoint it is `results.lyapunov`. Per "
        "epoch, so it is not `shadow/lyapunov` (per optimizer step) and no alert rule reads it.",
        "nats per epoch (checkpoint-time unit; per `record_checkpoint()` call in manual mode); from the "
        "second checkpoint on (step = epoch)",
    ),
    "analysis/lyapunov_local": (
        "`StabilityAnalyzer(sinks=...)`: the exponent of the interval ending at the checkpoint, "
        "`log(s(t_{k+1})/s(t_k)) / (t_{k+1} − t_k)`.",
        "nats per epoch (step = epoch)",
    ),
    # compat
    "compat/lyapunov": (
        "The Lyapunov exponent you pass to `stabwatch.compat.StabilityMonitor.compute(lyapunov=...)` (your "
        "model's own estimate, e.g. from its forward pass), kept apart from `shadow/lyapunov`, which "
        'stabwatch measures. The record holds it in `extra` (`record.extra["compat/lyapunov"]`).',
        "your estimate's unit; per `compute` call",
    ),
}

#: summaries across layers that the tracker sinks' layer-key policy adds (not in ``record.to_dict()``)
SUMMARY = re.compile(r"^layers:(min|max|p[0-9.]+)$")
STAT = "layers:<stat>"


def pattern(key: str) -> str:
    """The documented pattern of a key: per-layer keys get the ``<module.path>`` placeholder.

    ``grad_layers/norm/encoder.0`` -> ``grad_layers/norm/<module.path>``, ``grad_sv_layers/top2/fc`` ->
    ``grad_sv_layers/top<i>/<module.path>``, ``grad_layers/norm/layers:p50`` ->
    ``grad_layers/norm/layers:<stat>``; a global key is its own pattern.
    """
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[0].endswith("_layers"):
        metric = "top<i>" if TOP.match(parts[1]) else parts[1]
        layer = STAT if SUMMARY.match(parts[2]) else LAYER
        return f"{parts[0]}/{metric}/{layer}"
    return key


def reference_model(spiking: bool | None = None) -> Any:
    """A small model with one of every layer kind the collectors treat differently."""
    import torch
    from torch import nn

    if spiking is None:
        try:
            import snntorch  # noqa: F401

            spiking = True
        except ImportError:
            spiking = False

    class Reference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.proj = nn.Linear(64, 16)
            self.norm = nn.LayerNorm(16)
            self.tanh = nn.Tanh()
            self.lstm = nn.LSTM(16, 16, batch_first=True)
            self.gru = nn.GRU(16, 16, batch_first=True)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.gate = nn.Sequential(nn.Linear(16, 16), nn.Sigmoid())
            self.lif: nn.Module | None = None
            if spiking:
                import snntorch

                self.lif = snntorch.Leaky(beta=0.9)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.relu(self.conv(x)).flatten(1)
            h = self.tanh(self.norm(self.proj(h)))
            seq = torch.stack([h, h], dim=1)
            seq = self.lstm(seq)[0]
            seq = seq + self.attn(seq, seq, seq)[0]
            h = self.gru(seq)[0][:, -1]
            h = h * self.gate(h)
            if self.lif is not None:
                mem = self.lif.init_leaky()
                rate = torch.zeros_like(h)
                for _ in range(3):
                    spk, mem = self.lif(h, mem)
                    rate = rate + spk / 3
                h = h + rate
            return self.head(h)

    torch.manual_seed(0)
    return Reference()


def _batches(n: int, seed: int = 0) -> list[tuple[Any, Any]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _loss(model: Any, batch: tuple[Any, Any]) -> Any:
    import torch

    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


class _Keep:
    """A sink that keeps the records it is given (the analyzer emits through sinks)."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def write(self, record: Any) -> None:
        self.records.append(record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def monitor_keys(model: Any = None, steps: int = 4, batches: Iterable[Any] | None = None) -> set[str]:
    """Every key of the records of a ``full`` run (per-layer on, a per-layer Shadow), plus the layer-key
    policy's summaries."""
    import torch

    import stabwatch as sw

    model = reference_model() if model is None else model
    data = list(batches) if batches is not None else _batches(steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    shadow = sw.Shadow(loss_fn=_loss, every=2, window=2, per_layer=True)
    keys: set[str] = set()
    policy = sw.sinks.LayerKeyPolicy("quantiles")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sw.Monitor(model, opt, preset="full", shadow=shadow, alerts=False, per_layer=True) as mon:
            for batch in data:
                opt.zero_grad()
                loss = _loss(model, batch)
                loss.backward()
                opt.step()
                rec = mon.step(loss=loss, batch=batch)
                if rec is not None:
                    keys |= set(rec.to_dict())
                    keys |= set(policy.select(rec))
    finally:
        torch.set_num_threads(threads)
    return keys


def analyzer_keys() -> set[str]:
    """Every key a tiny `StabilityAnalyzer` run sends to its sinks."""
    import functools

    import torch

    from stabwatch.analysis import StabilityAnalyzer, TrainStep

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(2)]
    sink = _Keep()
    step = TrainStep(
        loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    with StabilityAnalyzer(model, n_trajectories=3, verbose=False, sinks=[sink]) as analyzer:
        analyzer.analyze(step, loader, n_epochs=2)
    keys: set[str] = set()
    for rec in sink.records:
        keys |= set(rec.to_dict())
    return keys


def compat_keys() -> set[str]:
    """Every key of the records of the SNN-monitor drop-in (`stabwatch.compat.StabilityMonitor`)."""
    import torch

    from stabwatch.compat import StabilityMonitor

    model = torch.nn.Linear(4, 3)
    model(torch.ones(2, 4)).sum().backward()
    spikes = (torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    with StabilityMonitor() as mon:
        m = mon.compute(model, lyapunov=0.1, spikes=spikes, membrane=torch.randn(2, 5, 3), compute_sv=True)
    return set(m.record.to_dict()) if m.record is not None else set()


def probe_keys() -> set[str]:
    """The keys of the probe families (``ftle``, ``lyapunov_spectrum``, ``sharpness``): in no preset, so a
    small recurrent model of their own, each family every step (sharpness needs the loss function; Adam adds
    the preconditioned value)."""
    import torch

    import stabwatch as sw

    class _Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.RNN(4, 6, batch_first=True)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, x: Any) -> Any:
            return self.head(self.rnn(x)[0][:, -1])

    def loss_fn(model: Any, batch: tuple[Any, Any]) -> Any:
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    keys: set[str] = set()
    for name in ("SGD", "Adam"):
        torch.manual_seed(0)
        model = _Probe()
        opt = getattr(torch.optim, name)(model.parameters(), lr=1e-2)
        batch = (torch.randn(5, 3, 4), torch.randint(0, 3, (5,)))
        sharp = sw.collectors.SharpnessCollector(1, loss_fn=loss_fn, probe=batch)
        every = {"ftle": 1, "lyapunov_spectrum": 1}
        with sw.Monitor(model, opt, preset="cheap", every=every, collectors=[sharp], alerts=False) as mon:
            for _ in range(2):
                opt.zero_grad()
                loss = loss_fn(model, batch)
                loss.backward()
                opt.step()
                rec = mon.step(loss=loss, batch=batch)
                if rec is not None:
                    keys |= set(rec.to_dict())
    return keys


def emitted_patterns() -> dict[str, set[str]]:
    """``{pattern: {sources}}`` over the reference runs (sources: ``Monitor``, ``StabilityAnalyzer``,
    ``compat.StabilityMonitor``)."""
    found: dict[str, set[str]] = {}
    runs = (
        ("Monitor", monitor_keys()),
        ("Monitor", probe_keys()),
        ("StabilityAnalyzer", analyzer_keys()),
        ("compat.StabilityMonitor", compat_keys()),
    )
    for source, keys in runs:
        for key in keys:
            found.setdefault(pattern(key), set()).add(source)
    return found


def check(found: dict[str, set[str]]) -> list[str]:
    """Problems: emitted patterns without a description, descriptions no run emits."""
    problems = [
        f"emitted but not described: {p!r} (add it to DESCRIPTIONS in docs/hooks/keys.py)"
        for p in found
        if not p.endswith(STAT) and p not in DESCRIPTIONS
    ]
    problems += [f"described but never emitted: {p!r}" for p in DESCRIPTIONS if p not in found]
    return sorted(problems)


def _cell(text: str) -> str:
    """Escape the table separator (a ``|`` in a formula)."""
    return text.replace("|", "\\|")


def _field_of(pat: str) -> str:
    """The record attribute behind a key pattern."""
    from stabwatch.metrics import FIELD_KEYS, parse_key

    name, layer = parse_key(pat)
    field = {v: k for k, v in FIELD_KEYS.items()}.get(name)
    if field is not None:
        return f"`{field}`" if layer is None else f'`layers[...]["{field}"]`'
    if name.startswith("grad_sv/top"):
        return '`extra["grad_sv/top<i>/<layer>"]`'
    return f'`extra["{name}"]`'


def _schedules() -> list[str]:
    from stabwatch.collectors import FAMILIES, PRESETS

    presets = {name: {c.family: c.every for c in make()} for name, make in PRESETS.items()}
    rows = ["| family | `cheap` | `default` | `full` | collector |", "|---|---|---|---|---|"]
    for family, cls in FAMILIES.items():
        cells = []
        for name in ("cheap", "default", "full"):
            every = presets[name].get(family)
            cells.append("off" if not every else ("every step" if every == 1 else f"every {every}"))
        rows.append(f"| `{family}` | {' | '.join(cells)} | `stabwatch.collectors.{cls.__name__}` |")
    rows.append(
        "| `shadow` | off | off | off | `stabwatch.Shadow`, on when passed as `Monitor(shadow=...)`; its own "
        "`every` (200) and `window` (20) |"
    )
    return rows


_TITLES = {
    "loss": "Loss",
    "grad": "Gradient norms (`grad`)",
    "nonfinite": "Non-finite values (`nonfinite`)",
    "update": "Updates (`update`)",
    "grad_sv": "Gradient singular values (`grad_sv`)",
    "weight": "Weight spectra (`weight`)",
    "activation": "Activations (`activation`)",
    "spiking": "Spiking layers (`spiking`)",
    "attention": "Attention and output logits (`attention`)",
    "lyapunov_spectrum": "Lyapunov spectrum of recurrent modules (`lyapunov_spectrum`)",
    "ftle": "Input-space FTLE (`ftle`)",
    "sharpness": "Sharpness and the edge of stability (`sharpness`)",
    "shadow": "Lyapunov exponent of training (`shadow`)",
    "monitor": "The monitor",
    "analysis": "Offline analyzer (`stabwatch.analysis`)",
    "compat": "The SNN-monitor drop-in (`stabwatch.compat`)",
}


def render(found: dict[str, set[str]] | None = None) -> str:
    """The markdown page (raises `RuntimeError` when `check` finds a problem)."""
    import stabwatch

    found = emitted_patterns() if found is None else found
    problems = check(found)
    if problems:
        raise RuntimeError("key reference: " + "; ".join(problems))
    families: dict[str, list[str]] = {}
    summaries: list[str] = []
    for pat in sorted(found):
        if pat.endswith(STAT):
            summaries.append(pat)
            continue
        families.setdefault(pat.split("/", 1)[0].removesuffix("_layers"), []).append(pat)
    order = [f for f in _TITLES if f in families] + sorted(f for f in families if f not in _TITLES)
    n_keys = len(found) - len(summaries)
    lines = [
        "# Key reference",
        "",
        "<!-- generated by docs/hooks/keys.py when the site is built: edit DESCRIPTIONS there, not this page -->",
        "",
        f"Every key a record can carry (stabwatch {stabwatch.__version__}: {n_keys} key patterns), found by "
        "running the code rather than written by hand. When the site is built, a `full`-preset `Monitor` "
        "(per-layer values on, a per-layer `Shadow`) trains a model with Linear, Conv2d, LayerNorm, LSTM, GRU, "
        "ReLU/Tanh/Sigmoid and an snntorch `Leaky` layer for a few steps, and a small `StabilityAnalyzer` "
        "runs; every key of every `record.to_dict()` is collected and the per-layer ones are grouped into "
        "patterns. The build fails when a key has no description or a description matches no key, and "
        "`tests/test_docs.py` checks that every key of a differently shaped `full` run is listed here.",
        "",
        "* `<module.path>` is the module's name in `model.named_modules()` (`encoder.0`, `blocks.3.attn`); "
        "a character outside `A-Z a-z 0-9 _ - . : space` becomes `_`, so parameters owned by the model "
        "itself are under `_root_`.",
        "* How keys are built, and why no key is a prefix of another: [Metrics and keys](metrics.md#keys). "
        "What each metric means, how to read it and what it costs: [Concepts](concepts.md).",
        "* A key is present in a record only when its family ran at that step (schedules below); the record "
        "field is `None` otherwise. *Per step* values describe one optimizer step: the gradients it used, "
        "the update it made. The analyzer's records are per checkpoint, with `step` = the epoch.",
        "",
        "## Default schedules",
        "",
        "Periods in optimizer steps, from `stabwatch.collectors.PRESETS`; override with "
        '`Monitor(every={"grad_sv": 10})`.',
        "",
        *_schedules(),
        "",
    ]
    for family in order:
        lines += [
            f"## {_TITLES.get(family, f'`{family}`')}",
            "",
            "| key | record field | meaning | unit |",
            "|---|---|---|---|",
        ]
        for pat in sorted(families[family], key=lambda p: (p.split("/")[0].endswith("_layers"), p)):
            meaning, unit = DESCRIPTIONS[pat]
            if found[pat] == {"StabilityAnalyzer"}:
                unit += "; `StabilityAnalyzer` only"
            lines.append(f"| `{pat}` | {_field_of(pat)} | {_cell(meaning)} | {_cell(unit)} |")
        lines.append("")
    if summaries:
        lines += [
            "## Summaries across layers (tracker sinks)",
            "",
            "Not in `record.to_dict()`: the tracker sinks' layer-key policy (`stabwatch.sinks.LayerKeyPolicy`, "
            'mode `"quantiles"`, or `"auto"` above `max_layers` = 64 layers) sends, instead of one key per layer, '
            "`<family>_layers/<metric>/layers:<stat>` with `<stat>` one of `min`, `p50`, `p90`, `max` (the "
            "quantiles are configurable: `p99` for 0.99). See [Sinks](sinks.md#many-layers-the-per-layer-key-policy). "
            "Keys that get them:",
            "",
            *[f"* `{pat}`" for pat in summaries],
            "",
        ]
    return "\n".join(lines)


# MkDocs hook -------------------------------------------------------------------------------------------
def on_files(files: Any, config: Any) -> Any:
    """Add the generated ``keys.md`` (replacing a file of that name in ``docs/``, if any)."""
    from mkdocs.structure.files import File

    content = render()
    existing = files.get_file_from_path("keys.md")
    if existing is not None:
        files.remove(existing)
    files.append(File.generated(config, "keys.md", content=content))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-o", "--output", type=Path, help="write the page here instead of printing it")
    args = parser.parse_args(argv)
    page = render()
    if args.output is None:
        sys.stdout.write(page)
    else:
        args.output.write_text(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
