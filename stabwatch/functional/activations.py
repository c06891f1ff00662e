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
    r"""Mean, std, dead-unit fraction, saturated fraction and batch spread of one activation ``[B, ...]``.

    A *unit* is one position of the per-sample output (all dims but the batch dim 0): ``x`` is read as
    ``B`` samples of ``U`` units, :math:`x_{bu}`, with :math:`N = BU` elements.

    * mean and std: *pooled* over all ``N`` elements (batch × units), std with ``N - 1``.
    * batch std (the spread across the batch): each unit's std over the ``B`` samples, combined over
      units as their root mean square,

      .. math:: \sigma_{\text{batch}} = \sqrt{\tfrac{1}{U}\textstyle\sum_u \tfrac{1}{B-1}
                \sum_b (x_{bu} - \bar x_u)^2}.

      ``0`` when every sample is the same vector (a collapsed batch), however varied that vector is
      (its pooled std is then the spread across units). NaN when ``B = 1`` (no spread is defined).
    * dead fraction (``kind="relu"``): units whose output is ``<= 0`` for every sample in the batch.
    * saturated fraction: elements in the flat tail of the nonlinearity, ``|y| > saturation`` for
      ``"tanh"``; ``y < 1 - saturation`` or ``y > saturation`` for ``"sigmoid"``.

    Fractions that do not apply to ``kind`` are NaN (the collector leaves them out).

    Numerics: two passes. The unit means :math:`\bar x_u` come first; the squares are summed over the
    centred values :math:`x_{bu} - \bar x_u` (one BLAS dot), never as :math:`\sum x^2 - N\bar x^2`,
    which in float32 cancels to noise when the spread is small next to the mean (an activation at
    0.99 with spread 1e-4). The pooled variance is the sum of the within-unit and the between-unit
    squares, :math:`\big(\sum_u SS_u + B \sum_u (\bar x_u - \bar x)^2\big) / (N - 1)`, the latter from
    the ``U`` unit means in float64. Half-precision inputs are read in float32.

    Returns:
        A float32 vector ``[mean, std, dead_frac, saturated_frac, batch_std]`` on ``x``'s device.

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
        >>> [round(v, 5) for v in activation_statistics(x, "relu").tolist()]
        [1.0, 1.41421, 0.5, nan, 1.0]
        >>> activation_statistics(torch.tensor([[1.0, 5.0], [1.0, 5.0]]))[[1, 4]].tolist()  # collapsed
        [2.309401035308838, 0.0]
    """
    x = x.detach()
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    units = xf.reshape(xf.shape[0], -1) if xf.ndim > 1 else xf.reshape(-1, 1)  # [B, U]
    b, u = units.shape
    n = b * u
    unit_mean = units.mean(dim=0)  # [U]
    centred = (units - unit_mean).reshape(-1)
    within = torch.dot(centred, centred).double()  # sum_u SS_u
    m64 = unit_mean.double()
    mean = m64.mean()
    if n > 1:
        between = b * (m64 - mean).square().sum()
        std = ((within + between) / (n - 1)).clamp_min(0).sqrt()
    else:
        std = torch.zeros((), dtype=torch.float64, device=x.device)
    nan = torch.full((), float("nan"), dtype=torch.float64, device=x.device)
    batch_std = (within / (u * (b - 1))).sqrt() if b > 1 else nan
    dead, sat = nan, nan
    if kind == "relu":
        dead = (units.amax(dim=0) <= 0).sum().double() / u
    elif kind == "tanh":
        sat = torch.count_nonzero(xf.abs() > saturation).double() / n
    elif kind == "sigmoid":
        sat = torch.count_nonzero((xf - 0.5).abs() > saturation - 0.5).double() / n
    return torch.stack([mean, std, dead, sat, batch_std]).float()
