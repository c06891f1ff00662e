"""Lyapunov-exponent math for a perturbed replica of a dynamical system (the shadow of training).

Pure functions: tensors in, tensors out; no hooks, no module state. The `stabwatch.Shadow` collector calls
them on the flattened training state s = (θ, optimizer state); `tangent_lyapunov` is the independent
reference (a Jacobian-vector-product estimate) the tests compare the shadow with.

The fused multi-tensor kernels used here (``torch._foreach_norm``, ``_foreach_sub(_)``, ``_foreach_mul_``,
``_foreach_add_``, ``_foreach_clamp_min_``) are the shadow's only private torch names (there is no public
multi-tensor API); `tests/test_shadow_functional.py` pins each against per-tensor math, so a change in
torch fails there first.

The estimator (Benettin et al. 1980). Advance the real state s_t and a shadow s̃_t = s_t + δ_t with the
same map F_t. Every ``m`` steps measure d = ‖δ‖, add ``log(d / d_0)`` to a float64 sum and rescale the
whole difference back to the target size d_0:

    s̃ ← s + (d_0 / d) · (s̃ − s).

After a transient, ``λ ≈ Σ log(d / d_0) / (number of steps)`` is the largest Lyapunov exponent of the
product of Jacobians J_t = ∂F_t/∂s, in nats per step (λ > 0: nearby trajectories separate, λ < 0: they
merge). For a linear map s ↦ A·s it is ``log ρ(A)``, the log of the spectral radius.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from stabwatch.errors import InputError

__all__ = [
    "TangentEstimate",
    "clamp_min_",
    "difference_norms",
    "global_norm",
    "min_relative_eps",
    "random_direction",
    "rescale_difference_",
    "scaled_difference",
    "tangent_lyapunov",
    "truncated_mean",
]


def min_relative_eps(dtype: torch.dtype) -> float:
    """Smallest relative perturbation ``ε = ‖δ‖/‖θ‖`` a state of this dtype resolves: ``100·u``.

    With a random direction every element moves by about ``ε·rms(θ)`` while rounding moves it by about
    ``u·|θ_i|`` (``u`` = the dtype's machine epsilon). Below ``100·u`` rounding noise is a sizeable part of
    the difference and the shadow collapses onto the real trajectory (measured: float32 needs ε ≥ 1e-5;
    1e-4…1e-3 is safe).

    Example:
        >>> f"{min_relative_eps(torch.float32):.2e}", f"{min_relative_eps(torch.float64):.1e}"
        ('1.19e-05', '2.2e-14')
    """
    return 100.0 * torch.finfo(dtype).eps


def _stack64(values: Sequence[torch.Tensor]) -> torch.Tensor:
    if len({v.dtype for v in values}) == 1:
        return torch.stack(list(values)).to(torch.float64)
    return torch.stack([v.to(torch.float64) for v in values])


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One L2 norm over all tensors, ``sqrt(Σ_i ‖t_i‖²)``, as a float64 0-d tensor on their device.

    Example:
        >>> global_norm([torch.tensor([3.0]), torch.tensor([[4.0]])])
        tensor(5., dtype=torch.float64)
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(_stack64(torch._foreach_norm(list(tensors), 2.0)))


def difference_norms(shadow: Sequence[torch.Tensor], real: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor ``‖s̃_i − s_i‖`` as a float64 1-D tensor (no host sync).

    Example:
        >>> difference_norms([torch.tensor([1.0, 1.0])], [torch.tensor([1.0, 0.0])])
        tensor([1.], dtype=torch.float64)
    """
    if len(shadow) != len(real):
        raise InputError(f"difference_norms: {len(shadow)} shadow tensors but {len(real)} real ones")
    if not shadow:
        return torch.zeros(0, dtype=torch.float64)
    diffs = torch._foreach_sub(list(shadow), list(real))
    return _stack64(torch._foreach_norm(diffs, 2.0))


def rescale_difference_(
    shadow: Sequence[torch.Tensor], real: Sequence[torch.Tensor], scale: torch.Tensor | float
) -> None:
    """Rescale the difference in place: ``s̃_i ← s_i + c·(s̃_i − s_i)`` for every pair.

    ``c`` may be a device tensor (no host sync). Tensors are grouped by dtype so each group gets the
    factor in its own precision; the caller re-measures the difference afterwards if it needs the exact
    size that rounding left.

    Example:
        >>> s, r = [torch.tensor([3.0, 5.0])], [torch.tensor([1.0, 1.0])]
        >>> rescale_difference_(s, r, 0.5); s[0]
        tensor([2., 3.])
    """
    groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for a, b in zip(shadow, real, strict=True):
        pair = groups.setdefault(a.dtype, ([], []))
        pair[0].append(a)
        pair[1].append(b)
    for dtype, (sh, re) in groups.items():
        c = scale.to(dtype) if isinstance(scale, torch.Tensor) else scale
        torch._foreach_sub_(sh, re)
        torch._foreach_mul_(sh, c)
        torch._foreach_add_(sh, re)


def scaled_difference(
    shadow: Sequence[torch.Tensor], real: Sequence[torch.Tensor], scale: torch.Tensor | float
) -> list[torch.Tensor]:
    """New tensors ``c·(s̃_i − s_i)`` for every pair (e.g. the unit difference a shadow ends a window with).

    ``c`` may be a device tensor (no host sync); each dtype group gets it in its own precision.

    Example:
        >>> scaled_difference([torch.tensor([3.0, 5.0])], [torch.tensor([1.0, 1.0])], 0.5)
        [tensor([1., 2.])]
    """
    if len(shadow) != len(real):
        raise InputError(f"scaled_difference: {len(shadow)} shadow tensors but {len(real)} real ones")
    if not shadow:
        return []
    out: list[torch.Tensor] = [*torch._foreach_sub(list(shadow), list(real))]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in out:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        torch._foreach_mul_(group, scale.to(dtype) if isinstance(scale, torch.Tensor) else scale)
    return out


def clamp_min_(tensors: Sequence[torch.Tensor], floor: float = 0.0) -> None:
    """Clamp every tensor from below in place, ``t ← max(t, floor)`` (e.g. second moments after a rescale).

    Example:
        >>> ts = [torch.tensor([-1.0, 2.0])]; clamp_min_(ts); ts[0]
        tensor([0., 2.])
    """
    if tensors:
        torch._foreach_clamp_min_(list(tensors), floor)


def random_direction(
    like: Sequence[torch.Tensor], generator: torch.Generator, norm: torch.Tensor | float = 1.0
) -> list[torch.Tensor]:
    """A Gaussian direction shaped like ``like``, scaled to one global L2 norm ``norm``.

    Drawn on the CPU from ``generator`` (the caller's own, so no other random stream moves) in float64,
    then cast to each tensor's dtype and device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> d = random_direction([torch.zeros(3), torch.zeros(2, 2)], g, norm=2.0)
        >>> round(float(global_norm(d)), 6)
        2.0
    """
    raw = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in like]
    total = torch.linalg.vector_norm(torch.cat([r.reshape(-1) for r in raw])) if raw else torch.ones(())
    factor = (norm.detach().to("cpu", torch.float64) if isinstance(norm, torch.Tensor) else norm) / total
    return [(r * factor).to(device=t.device, dtype=t.dtype) for r, t in zip(raw, like)]


def truncated_mean(values: torch.Tensor, max_cut: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of a series after an initial transient sized from the data (MSER, White 1997).

    The truncation point ``d`` minimises the marginal standard error of the mean of what is kept,

        MSER(d) = Σ_{i ≥ d} (x_i − x̄_d)² / (n − d)²,      x̄_d = mean(x_d … x_{n−1}),

    over ``0 ≤ d ≤ max_cut`` (default ``n // 2``: at least half the series is kept). A leading trend (the
    log growth of a shadow still aligning with the most expanding direction) raises the spread of every
    tail that contains it, so it is cut; a stationary series is cut little or not at all. Everything stays
    on the device (no host sync): the cut is returned as a 0-d tensor.

    Args:
        values: 1-D series (e.g. per-step log growth), any float dtype; computed in float64.
        max_cut: largest transient allowed (clamped to ``n − 1``).

    Returns:
        ``(mean of values[d:], d)``: a float64 0-d tensor and an int64 0-d tensor.

    Example:
        >>> x = torch.tensor([-3.0, -1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
        >>> mean, cut = truncated_mean(x); float(mean), int(cut)
        (1.0, 3)
    """
    if values.dim() != 1 or values.numel() == 0:
        raise InputError(f"truncated_mean: need a non-empty 1-D series, got shape {tuple(values.shape)}")
    n = values.numel()
    k = min(n // 2 if max_cut is None else max(int(max_cut), 0), n - 1)
    x64 = values.to(torch.float64)
    centre = x64.mean()
    x = x64 - centre  # centred: the suffix sums below lose little to cancellation
    s1 = x.flip(0).cumsum(0).flip(0)[: k + 1]  # Σ_{i ≥ d} x_i
    s2 = (x * x).flip(0).cumsum(0).flip(0)[: k + 1]
    count = torch.arange(n, n - k - 1, -1, dtype=torch.float64, device=x.device)
    tail_mean = s1 / count
    spread = (s2 - s1 * tail_mean).clamp_min(0.0)
    cut = torch.argmin(spread / count.square())
    return tail_mean[cut] + centre, cut


class TangentEstimate(NamedTuple):
    """Result of `tangent_lyapunov`.

    Attributes:
        lyapunov: ``Σ log growth / steps`` after the transient, nats per step (float64 arithmetic).
        local: the exponent of each renormalisation interval, transient included.
        log_growth: the summed log growth after the transient.
        steps: number of steps the estimate averages over.
    """

    lyapunov: float
    local: list[float]
    log_growth: float
    steps: int


def tangent_lyapunov(
    step: Callable[..., tuple[torch.Tensor, ...]],
    state: Sequence[torch.Tensor],
    direction: Sequence[torch.Tensor],
    steps: int,
    *,
    transient: int = 0,
    renorm: int = 1,
    step_args: Callable[[int], tuple[object, ...]] | None = None,
) -> TangentEstimate:
    """Largest Lyapunov exponent of ``s_{t+1} = step(*s_t, *step_args(t))`` by tangent propagation.

    The reference for the shadow replica: the tangent ``v`` is pushed with the exact Jacobian,
    ``v ← J_t·v`` (one forward-mode JVP per step, ``torch.func.jvp``; for a gradient step
    ``θ − η∇L(θ)`` this is ``v − η·H(θ)v``, a Hessian-vector product), renormalised to unit norm every
    ``renorm`` steps, and ``log‖v‖`` is summed in float64 after ``transient`` steps:

        λ = (1 / (T − t_0)) · Σ_{intervals after t_0} log ‖v_end‖ / ‖v_start‖.

    Args:
        step: pure function of the state tensors (plus optional extra arguments) returning the next state
            as a tuple of tensors (same shapes).
        state: the initial state.
        direction: the initial tangent (any non-zero size; only its direction matters).
        steps: number of map steps T.
        transient: steps before the averaging starts (the tangent aligns with the top direction).
        renorm: renormalise the tangent every this many steps.
        step_args: ``t -> extra positional arguments`` of step ``t`` (e.g. its batch), not differentiated.

    Returns:
        A `TangentEstimate`.

    Example:
        >>> A = torch.tensor([[0.5, 0.2], [0.0, -1.5]], dtype=torch.float64)
        >>> est = tangent_lyapunov(lambda x: (A @ x,), [torch.ones(2, dtype=torch.float64)],
        ...                        [torch.tensor([1.0, 1.0], dtype=torch.float64)], 60, transient=30)
        >>> round(est.lyapunov, 10) == round(math.log(1.5), 10)
        True
    """
    if steps < 1 or renorm < 1 or not 0 <= transient < steps:
        raise InputError(
            f"tangent_lyapunov: need steps ≥ 1, renorm ≥ 1, 0 ≤ transient < steps; got "
            f"steps={steps}, renorm={renorm}, transient={transient}"
        )
    s = tuple(t.detach() for t in state)
    v = tuple(t.detach() for t in direction)
    if len(v) != len(s):
        raise InputError(f"tangent_lyapunov: {len(s)} state tensors but {len(v)} direction tensors")
    norm0 = float(global_norm(v))
    if not norm0 > 0:
        raise InputError("tangent_lyapunov: the initial direction is zero")
    v = tuple(t / norm0 for t in v)
    log_sum = 0.0
    local: list[float] = []
    start_norm = 1.0
    last_mark = 0
    started = transient == 0
    for t in range(steps):
        extra = step_args(t) if step_args is not None else ()

        def _f(*xs: torch.Tensor, _extra: tuple[object, ...] = extra) -> tuple[torch.Tensor, ...]:
            return tuple(step(*xs, *_extra))

        out = torch.func.jvp(_f, s, v)
        s = tuple(x.detach() for x in out[0])
        v = tuple(out[1])
        n = t + 1
        if (n - last_mark) % renorm == 0 or (not started and n == transient):
            norm = float(global_norm(v))
            growth = math.log(norm) - math.log(start_norm)
            local.append(growth / (n - last_mark))
            if started:
                log_sum += growth
            v = tuple(x / norm for x in v)
            start_norm = 1.0
            last_mark = n
            if not started and n == transient:
                started = True
    if last_mark < steps:
        log_sum += math.log(float(global_norm(v))) - math.log(start_norm)
    averaged = steps - transient
    return TangentEstimate(log_sum / averaged, local, log_sum, averaged)
