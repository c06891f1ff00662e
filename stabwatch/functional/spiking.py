r"""Firing rates, dead / saturated neuron fractions and membrane statistics of spiking layers.

Conventions (shared by `stabwatch.collectors.spiking` and `stabwatch.compat.StabilityMonitor`):

* A **neuron** is one position of the per-sample feature shape: for spikes ``[T, B, C, H, W]`` each
  ``(c, h, w)`` is a neuron.
* ``time_dim`` says where time is: ``None`` for a per-step call ``[B, *features]`` (one forward call
  per time step, as snntorch's ``Leaky`` or spikingjelly's ``step_mode='s'``), ``0`` for time-major
  ``[T, B, *features]`` (norse ``LIF``, spikingjelly ``step_mode='m'``), ``1`` for batch-major
  ``[B, T, *features]``. The batch dim is the first of the leading two dims that is not time.
* The **firing rate** of neuron :math:`j` over everything seen in one training step is

  .. math:: r_j = \frac{1}{N_s} \sum_{\text{calls}} \sum_{t, b} s_{t, b, j},
     \qquad N_s = \sum_{\text{calls}} T \cdot B

  (spike values are summed as given, so graded spikes count by their size).
* A neuron is **dead** when :math:`r_j < \theta_{dead}` (default 0.01) and **saturated** when
  :math:`r_j > \theta_{sat}` (default 0.9), the thresholds of the common hand-written SNN monitors.
* Membrane statistics pool every element of every membrane tensor seen:
  :math:`\bar v = \frac{1}{n}\sum v`, :math:`s_v^2 = \frac{1}{n-1}(\sum v^2 - n \bar v^2)`, and the
  mean signed gap to threshold :math:`\overline{\vartheta - v}` (positive: below threshold; a layer
  whose membrane sits far below its threshold is silent). They come from running sums
  :math:`(\sum v, \sum v^2, \sum \vartheta)`: each call reduces its membrane in float32 (cascaded
  summation) and the sums accumulate in float64, so a step of many calls costs a few small kernels per
  call. The one-pass variance loses relative accuracy like :math:`10^{-7} (\bar v / s_v)^2`: fine unless
  the membrane's std is below ~0.1 % of its mean.

* **Surrogate-gradient health.** A surrogate-gradient SNN trains through :math:`\partial s / \partial v
  = \sigma'(v - \vartheta)`, the derivative of the layer's own surrogate spike function :math:`\sigma` at
  the membrane's distance to threshold :math:`u = v - \vartheta`. `surrogate_statistics` gives, over a
  sample of :math:`u`, the mean derivative :math:`\overline{\sigma'(u)}` (how much gradient the layer lets
  through, relative to a surrogate peaking at 1 at the threshold, as snntorch's and spikingjelly's do)
  and the fraction of :math:`u` inside the surrogate's half-maximum window,
  :math:`\sigma'(u) \ge \sigma'(0)/2` (`near_threshold_fraction` does the same for a fixed half-width
  when the surrogate is not known). For snntorch's ``fast_sigmoid(slope=k)``,
  :math:`\sigma'(u) = 1 / (1 + k|u|)^2` and the window is :math:`|u| \le (\sqrt2 - 1)/k`.

Everything here is pure tensor math on the input's device: no hooks, no state, no host sync (the
surrogate derivative runs one small autograd pass of its own, with the global RNG state restored).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from stabwatch.errors import InputError

__all__ = [
    "firing_rates",
    "firing_statistics",
    "layer_firing_statistics",
    "layer_membrane_statistics",
    "membrane_moments",
    "membrane_statistics",
    "near_threshold_fraction",
    "pooled_membrane_statistics",
    "sample_dims",
    "spike_counts",
    "surrogate_derivative",
    "surrogate_statistics",
]


def sample_dims(ndim: int, time_dim: int | None) -> tuple[int, ...]:
    """The dims of a spike tensor that index samples (time steps and batch), not neurons.

    Args:
        ndim: the tensor's number of dims.
        time_dim: ``None`` (``[B, *f]``), ``0`` (``[T, B, *f]``) or ``1`` (``[B, T, *f]``).

    Returns:
        ``(0,)`` for a per-step call, ``(0, 1)`` for a time-major or batch-major one.

    Raises:
        ValueError: ``time_dim`` not in ``None, 0, 1``, or too few dims for the layout.

    Example:
        >>> sample_dims(3, 0), sample_dims(2, None)
        ((0, 1), (0,))
    """
    if time_dim is None:
        if ndim < 1:
            raise InputError(f"a per-step spike tensor needs a batch dim [B, ...], got {ndim} dims")
        return (0,)
    if time_dim not in (0, 1):
        raise InputError(f"time_dim must be None, 0 ([T, B, ...]) or 1 ([B, T, ...]), got {time_dim!r}")
    if ndim < 2:
        raise InputError(f"time_dim={time_dim} needs a tensor [T, B, ...] or [B, T, ...], got {ndim} dims")
    return (0, 1)


def spike_counts(spikes: torch.Tensor, time_dim: int | None = None) -> tuple[torch.Tensor, int]:
    """Spike count of every neuron, summed over time steps and batch, and how many samples that is.

    Args:
        spikes: ``[B, *f]``, ``[T, B, *f]`` or ``[B, T, *f]`` (see ``time_dim``); bool, integer or
            floating (graded spikes are summed by value).
        time_dim: where time is (module docstring).

    Returns:
        ``(counts, n)``: a float32 tensor of the feature shape ``f`` (a 0-d tensor when there is no
        feature dim) and the number of (time step, sample) pairs ``n = T * B``.

    Example:
        >>> counts, n = spike_counts(torch.tensor([[[1., 0.], [1., 1.]], [[0., 0.], [1., 0.]]]), time_dim=0)
        >>> counts.tolist(), n
        ([3.0, 1.0], 4)
    """
    dims = sample_dims(spikes.ndim, time_dim)
    s = spikes.detach()
    n = 1
    for d in dims:
        n *= s.shape[d]
    return s.sum(dim=dims, dtype=torch.float32), n


def firing_rates(spikes: torch.Tensor, time_dim: int | None = None) -> torch.Tensor:
    r"""Firing rate :math:`r_j = \frac{1}{T B}\sum_{t,b} s_{t,b,j}` of every neuron of one spike tensor (float64).

    Example:
        >>> firing_rates(torch.tensor([[1., 0., 1.], [1., 0., 0.]])).tolist()
        [1.0, 0.0, 0.5]
    """
    counts, n = spike_counts(spikes, time_dim)
    return counts.double() / max(n, 1)


def firing_statistics(
    rates: torch.Tensor,
    dead_threshold: float = 0.01,
    saturated_threshold: float = 0.9,
) -> torch.Tensor:
    """Mean and std of the firing rates over neurons, and the dead and saturated fractions.

    The std is the unbiased one over neurons (0 for a single neuron), as ``torch.Tensor.std``.

    Args:
        rates: per-neuron firing rates, any shape (every element is a neuron).
        dead_threshold: a neuron with ``rate < dead_threshold`` is dead.
        saturated_threshold: a neuron with ``rate > saturated_threshold`` is saturated.

    Returns:
        A float64 vector ``[mean, std, dead_frac, saturated_frac]`` on ``rates``' device.

    Example:
        >>> firing_statistics(torch.tensor([0.0, 0.5, 1.0, 0.5])).tolist()
        [0.5, 0.408248290463863, 0.25, 0.25]
    """
    r = rates.detach().reshape(-1).double()
    if r.numel() == 0:
        return torch.full((4,), float("nan"), dtype=torch.float64, device=r.device)
    std = r.std() if r.numel() > 1 else torch.zeros((), dtype=torch.float64, device=r.device)
    return torch.stack(
        [
            r.mean(),
            std,
            (r < dead_threshold).double().mean(),
            (r > saturated_threshold).double().mean(),
        ]
    )


def layer_firing_statistics(
    counts: Sequence[torch.Tensor],
    samples: Sequence[int],
    dead_threshold: float = 0.01,
    saturated_threshold: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""`firing_statistics` of several layers at once, and of all their neurons pooled.

    One set of reductions for all layers (segment sums with ``index_add_``), instead of one per layer.
    Layer :math:`\ell`'s rates are ``counts[l] / samples[l]``; the pooled row treats all neurons of all
    layers as one population.

    Args:
        counts: per-layer spike counts (any shapes; every element is a neuron), on one device.
        samples: per-layer number of (time step, sample) pairs the counts were summed over.
        dead_threshold / saturated_threshold: as in `firing_statistics`.

    Returns:
        ``(per_layer, pooled)``: float64 ``[L, 4]`` and ``[4]`` with columns
        ``[mean, std, dead_frac, saturated_frac]``.

    Example:
        >>> per, pooled = layer_firing_statistics([torch.tensor([0., 2.]), torch.tensor([4.])], [4, 4])
        >>> per.double().round(decimals=6).tolist(), pooled[0].item()
        ([[0.25, 0.353553, 0.5, 0.0], [1.0, 0.0, 0.0, 1.0]], 0.5)
    """
    if len(counts) != len(samples) or not counts:
        raise InputError(f"need one sample count per layer, got {len(counts)} counts and {len(samples)} samples")
    device = counts[0].device
    rates = torch.cat(
        [c.detach().reshape(-1).to(device, torch.float64) / max(int(n), 1) for c, n in zip(counts, samples)]
    )
    sizes = [c.numel() for c in counts]
    n_layers = len(sizes)
    size_t = torch.tensor(sizes, dtype=torch.float64, device=device)
    seg = torch.repeat_interleave(
        torch.arange(n_layers, device=device), torch.tensor(sizes, device=device), output_size=rates.numel()
    )

    def seg_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_layers, dtype=torch.float64, device=device).index_add_(0, seg, values)

    dead = (rates < dead_threshold).double()
    sat = (rates > saturated_threshold).double()
    mean = seg_sum(rates) / size_t
    var = seg_sum((rates - mean[seg]).square()) / (size_t - 1).clamp_min(1)
    per_layer = torch.stack([mean, var.sqrt(), seg_sum(dead) / size_t, seg_sum(sat) / size_t], dim=1)
    pooled_std = rates.std() if rates.numel() > 1 else torch.zeros((), dtype=torch.float64, device=device)
    pooled = torch.stack([rates.mean(), pooled_std, dead.mean(), sat.mean()])
    return per_layer, pooled


def membrane_moments(
    membrane: torch.Tensor, threshold: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor | float | None, int]:
    r"""Running-sum moments of one membrane tensor: :math:`(\sum v, \sum v^2)` and :math:`\sum \vartheta`.

    :math:`\sum \vartheta` is the threshold summed over the elements of ``membrane`` it broadcasts to
    (a scalar or per-neuron threshold). The two membrane sums are reduced in the membrane's precision
    (float32 for half types) with PyTorch's cascaded summation; accumulate them in float64.

    Args:
        membrane: the membrane potential, any shape.
        threshold: a float, or a tensor that broadcasts to ``membrane`` (scalar or per-neuron).

    Returns:
        ``(moments, threshold_sum, n)``: a vector ``[sum v, sum v^2]`` on the membrane's device, the
        threshold sum (a float for a float threshold, a 0-d tensor for a tensor one, ``None`` without
        a threshold) and ``n = membrane.numel()``.

    Raises:
        ValueError: the threshold does not broadcast to the membrane's shape.

    Example:
        >>> m, th, n = membrane_moments(torch.tensor([[0.5, 1.5], [0.0, 1.0]]), torch.tensor([1.0, 2.0]))
        >>> m.tolist(), float(th), n
        ([3.0, 3.5], 6.0, 4)
    """
    v = membrane.detach()
    n = v.numel()
    flat = v.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    moments = torch.stack([flat.sum(), torch.dot(flat, flat)])
    th: torch.Tensor | float | None
    if threshold is None:
        th = None
    elif isinstance(threshold, torch.Tensor):
        t = threshold.detach()
        if t.numel() != 1:
            try:
                shape = torch.broadcast_shapes(t.shape, v.shape)
            except RuntimeError:
                shape = None
            if shape != v.shape:
                raise InputError(
                    f"threshold of shape {tuple(t.shape)} does not broadcast to the membrane {tuple(v.shape)}"
                )
        # broadcasting repeats every threshold element the same number of times
        th = t.sum(dtype=torch.float64) * (n // max(t.numel(), 1))
    else:
        th = float(threshold) * n
    return moments, th, n


def layer_membrane_statistics(moments: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    r"""Membrane mean, std and mean gap to threshold from accumulated moments, for many rows at once.

    .. math:: \bar v = \frac{S_1}{n},\quad s_v = \sqrt{\frac{S_2 - n\bar v^2}{n - 1}},\quad
        \overline{\vartheta - v} = \frac{S_\vartheta - S_1}{n}

    Args:
        moments: ``[..., 3]`` rows of :math:`(S_1, S_2, S_\vartheta)` from `membrane_moments` (summed).
        counts: ``[...]`` element counts :math:`n` per row.

    Returns:
        float64 ``[..., 3]``: ``[mean, std, threshold_distance]`` (std 0 when ``n = 1``; NaN rows for
        ``n = 0``).
    """
    m = moments.double()
    n = counts.to(m.device, torch.float64)
    mean = m[..., 0] / n
    var = ((m[..., 1] - n * mean.square()) / (n - 1).clamp_min(1)).clamp_min(0)
    gap = (m[..., 2] - m[..., 0]) / n
    return torch.stack([mean, var.sqrt(), gap], dim=-1)


def pooled_membrane_statistics(
    moments: torch.Tensor, counts: torch.Tensor, with_threshold: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""`layer_membrane_statistics` of several layers at once, and of all their elements pooled.

    The pooled mean and std treat every element of every row as one population (the rows' moments and
    counts summed); the pooled gap to threshold pools only the rows that have a threshold:
    :math:`\sum_{\ell \in th}(S_{\vartheta,\ell} - S_{1,\ell}) / \sum_{\ell \in th} n_\ell`.

    Args:
        moments: ``[L, 3]`` rows of :math:`(S_1, S_2, S_\vartheta)`, one per layer (NaN :math:`S_\vartheta`
            for a layer without a threshold).
        counts: ``[L]`` element counts.
        with_threshold: ``[L]`` bool, the rows that have a threshold (default: :math:`S_\vartheta` not NaN).

    Returns:
        ``(per_layer, pooled)``: float64 ``[L, 3]`` and ``[3]``, columns ``[mean, std, threshold_distance]``
        (a NaN pooled distance when no row has a threshold).

    Example: a layer with the values 0, 1 and threshold 1, and one with the values 3, 3 and no threshold:

        >>> rows = torch.tensor([[1.0, 1.0, 2.0], [6.0, 18.0, float("nan")]], dtype=torch.float64)
        >>> per, pooled = pooled_membrane_statistics(rows, torch.tensor([2.0, 2.0]))
        >>> per[:, 0].tolist(), pooled.tolist()
        ([0.5, 3.0], [1.75, 1.5, 0.5])
    """
    m = moments.double()
    n = counts.to(m.device, torch.float64)
    per_layer = layer_membrane_statistics(m, n)
    pooled = layer_membrane_statistics(m.sum(0), n.sum())
    has = ~torch.isnan(m[:, 2]) if with_threshold is None else with_threshold.to(m.device, torch.bool)
    zero = torch.zeros((), dtype=torch.float64, device=m.device)
    gap = (torch.where(has, m[:, 2], zero).sum() - torch.where(has, m[:, 0], zero).sum()) / torch.where(
        has, n, zero
    ).sum()
    return per_layer, torch.cat([pooled[:2], gap.reshape(1)])


def membrane_statistics(membrane: torch.Tensor, threshold: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean, unbiased std and mean signed gap to threshold (``threshold - v``) of one membrane tensor.

    Returns:
        float64 ``[mean, std, threshold_distance]``; the distance is NaN without a threshold.

    Example:
        >>> membrane_statistics(torch.tensor([0.25, 0.75]), threshold=1.0).round(decimals=6).tolist()
        [0.5, 0.353553, 0.5]
    """
    moments, th, n = membrane_moments(membrane, threshold)
    th_t = torch.as_tensor(float("nan") if th is None else th, dtype=torch.float64).to(moments.device)
    row = torch.cat([moments.double(), th_t.reshape(1)])
    return layer_membrane_statistics(row, torch.tensor(float(n)))


def surrogate_derivative(spike_fn: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    r"""The derivative :math:`\sigma'(u)` of a surrogate spike function at every element of ``u``.

    ``spike_fn`` is what the layer applies to :math:`u = v - \vartheta` to spike (snntorch's
    ``module.spike_grad``, spikingjelly's ``module.surrogate_function``, norse's ``threshold`` with the
    layer's ``method`` and ``alpha``): its forward is a step, its backward the surrogate. It is
    differentiated with one autograd pass on a detached copy of ``u`` (elementwise, so a vector of ones
    as the output gradient gives every element's own derivative). Nothing else is touched: training's
    graph, ``u`` and the global RNG (stochastic surrogates draw from it; its state is restored).

    Args:
        spike_fn: an elementwise function ``Tensor -> Tensor`` with a surrogate backward.
        u: membrane minus threshold, any shape.

    Returns:
        float32 tensor of ``u``'s shape: zeros when ``spike_fn`` has no gradient (a bare Heaviside
        step lets none through).

    Raises:
        InputError: ``spike_fn`` is not callable or returns a tensor of another shape.

    Example: a smooth stand-in, :math:`\sigma(u) = s(4u)` with the logistic sigmoid :math:`s`, so
    :math:`\sigma'(u) = 4 s(4u) (1 - s(4u))`:

        >>> spike_fn = lambda u: torch.sigmoid(4 * u)
        >>> [round(g, 4) for g in surrogate_derivative(spike_fn, torch.tensor([0.0, 0.5, -1.0])).tolist()]
        [1.0, 0.42, 0.0707]
    """
    if not callable(spike_fn):
        raise InputError(f"surrogate_derivative: spike_fn must be callable (u -> spikes), got {spike_fn!r}")
    x = u.detach().to(torch.float32).clone().requires_grad_(True)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        y = spike_fn(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            raise InputError(
                f"surrogate_derivative: spike_fn must map u {tuple(x.shape)} to spikes of the same shape, got "
                f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
            )
        if not y.requires_grad:
            return torch.zeros_like(x, requires_grad=False)
        (g,) = torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y), allow_unused=True)
    if g is None:
        return torch.zeros_like(x, requires_grad=False)
    return g.detach().to(torch.float32)


def surrogate_statistics(
    spike_fn: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    r"""Mean surrogate derivative over ``u`` and the fraction of ``u`` inside the surrogate's window.

    .. math:: g = \frac{1}{n}\sum_i \sigma'(u_i), \qquad
        f = \frac{1}{n}\,\#\{i : \sigma'(u_i) \ge \tfrac12 \sigma'(0)\}

    Args:
        spike_fn: the surrogate spike function (see `surrogate_derivative`).
        u: a sample of membrane minus threshold, any shape (every element counts once).
        sizes: split the flattened ``u`` into consecutive segments of these sizes (layers sharing one
            spike function) and return one row per segment: one autograd pass for all of them.

    Returns:
        float64 ``[g, f]`` on ``u``'s device, or ``[len(sizes), 2]`` with ``sizes`` (NaN for an empty
        segment; ``f`` is NaN when :math:`\sigma'(0) = 0`, a surrogate without a window).

    Raises:
        InputError: ``sizes`` do not add up to ``u.numel()``.

    Example: ``sigmoid(4u)`` (derivative 1 at the threshold, half of it at :math:`|u| \approx 0.44`):

        >>> stats = surrogate_statistics(lambda u: torch.sigmoid(4 * u), torch.tensor([0.0, 0.3, 0.5, -1.0]))
        >>> [round(v, 4) for v in stats.tolist()]
        [0.5506, 0.5]
        >>> surrogate_statistics(lambda u: torch.sigmoid(4 * u), torch.tensor([0.0, 0.3, 0.5, -1.0]), [1, 3])[:, 1]
        tensor([1.0000, 0.3333], dtype=torch.float64)
    """
    flat = u.detach().reshape(-1)
    lengths = [flat.numel()] if sizes is None else [int(n) for n in sizes]
    if sum(lengths) != flat.numel() or any(n < 0 for n in lengths):
        raise InputError(f"surrogate_statistics: sizes {lengths} do not add up to the {flat.numel()} values of u")
    g = surrogate_derivative(spike_fn, torch.cat([flat.to(torch.float32), flat.new_zeros(1, dtype=torch.float32)]))
    peak = g[-1]
    both = torch.stack([g[:-1], (g[:-1] >= 0.5 * peak).to(torch.float32)])  # [2, n]
    totals = torch.stack([part.sum(dim=1) for part in both.split(lengths, dim=1)]).double()  # [L, 2]
    n = torch.tensor(lengths, dtype=torch.float64, device=totals.device)
    out = totals / n[:, None]  # an empty segment: 0 / 0 = NaN
    out[:, 1] = torch.where(peak > 0, out[:, 1], float("nan"))  # no window without a peak
    return out[0] if sizes is None else out


def near_threshold_fraction(u: torch.Tensor, width: float) -> torch.Tensor:
    r"""Fraction of ``u`` (membrane minus threshold) with :math:`|u| \le` ``width`` (float64, 0-d).

    The surrogate-free stand-in for `surrogate_statistics`'s window fraction: with ``width`` the
    surrogate's half-width at half maximum it is the same number.

    Example:
        >>> near_threshold_fraction(torch.tensor([0.0, 0.01, 0.04, -1.0]), 0.0166).item()
        0.5
    """
    if not width > 0:
        raise InputError(f"near_threshold_fraction: width must be > 0, got {width!r}")
    flat = u.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.full((), float("nan"), dtype=torch.float64, device=u.device)
    return (flat.abs() <= width).double().mean()
