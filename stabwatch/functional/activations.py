"""Statistics of a layer's output (activations)."""

from __future__ import annotations

import torch

__all__ = ["activation_statistics"]


def activation_statistics(
    x: torch.Tensor,
    kind: str = "linear",
    *,
    saturation: float = 0.99,
) -> torch.Tensor:
    r"""Mean, std, dead-unit fraction and saturated fraction of one activation tensor ``[B, ...]``.

    A *unit* is one position of the per-sample output (all dims but the batch dim 0).

    * dead fraction (``kind="relu"``): units whose output is ``<= 0`` for every sample in the batch.
    * saturated fraction: elements in the flat tail of the nonlinearity, ``|y| > saturation`` for
      ``"tanh"``; ``y < 1 - saturation`` or ``y > saturation`` for ``"sigmoid"``.

    Fractions that do not apply to ``kind`` are NaN (the collector leaves them out).

    Returns:
        A float32 vector ``[mean, std, dead_frac, saturated_frac]`` on ``x``'s device.

    Example:
        >>> [round(v, 5) for v in activation_statistics(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), "relu").tolist()]
        [1.0, 1.41421, 0.5, nan]
    """
    x = x.detach()
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    flat = xf.reshape(-1)
    n = flat.numel()
    # one pass for the sum and one BLAS dot for the sum of squares (the variance then comes from
    # float64 scalars); much cheaper than std()'s two passes on the CPU, and exact enough for
    # activations whose mean is not orders of magnitude above their spread
    s1 = flat.sum().double()  # float32 sum: torch reduces it pairwise (accurate); a float64 sum is ~10x slower
    s2 = (torch.dot(flat, flat) if flat.is_contiguous() else flat.square().sum()).double()
    mean = s1 / n
    if n > 1:
        std = ((s2 - s1 * mean) / (n - 1)).clamp_min(0).sqrt()
    else:
        std = torch.zeros((), dtype=torch.float64, device=x.device)
    nan = torch.full((), float("nan"), dtype=torch.float64, device=x.device)
    dead, sat = nan, nan
    if kind == "relu":
        units = xf.reshape(xf.shape[0], -1) if xf.ndim > 1 else xf.reshape(-1, 1)
        dead = (units.amax(dim=0) <= 0).sum().double() / units.shape[1]
    elif kind == "tanh":
        sat = torch.count_nonzero(xf.abs() > saturation).double() / n
    elif kind == "sigmoid":
        sat = torch.count_nonzero((xf - 0.5).abs() > saturation - 0.5).double() / n
    return torch.stack([mean, std, dead, sat]).float()
