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
        >>> activation_statistics(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), "relu").tolist()
        [1.0, 1.4142135381698608, 0.5, nan]
    """
    x = x.detach()
    xf = x.float()
    mean = xf.mean()
    std = xf.std() if xf.numel() > 1 else torch.zeros((), device=x.device)
    nan = torch.full((), float("nan"), device=x.device)
    dead, sat = nan, nan
    if kind == "relu":
        units = xf.reshape(xf.shape[0], -1) if xf.ndim > 1 else xf.reshape(-1, 1)
        dead = (units <= 0).all(dim=0).float().mean()
    elif kind == "tanh":
        sat = (xf.abs() > saturation).float().mean()
    elif kind == "sigmoid":
        sat = ((xf > saturation) | (xf < 1.0 - saturation)).float().mean()
    return torch.stack([mean, std, dead, sat])
