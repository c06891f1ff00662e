"""Singular values, spectral norms and spectral radii of weight and gradient matrices.

All functions run on the tensor's own device and never touch the global RNG: random probes take an
explicit ``torch.Generator``.
"""

from __future__ import annotations

import torch

__all__ = [
    "as_matrix",
    "condition_number",
    "randomized_singular_values",
    "singular_values",
    "spectral_norm",
    "spectral_radius",
]


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a weight (or its gradient) as a 2-D matrix: conv kernels ``[out, in, *k]`` -> ``[out, in*k]``."""
    if t.ndim < 2:
        raise ValueError(f"expected a tensor with >= 2 dims, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


def _as_float(a: torch.Tensor) -> torch.Tensor:
    return a if a.dtype in (torch.float32, torch.float64) else a.float()


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """All singular values of a matrix (descending), exactly, via ``torch.linalg.svdvals``.

    Tall-skinny inputs are first reduced with a QR (``R`` has the same singular values), which is several
    times cheaper for ``m >> n``.

    Example:
        >>> singular_values(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).tolist()
        [3.0, 2.0, 1.0]
    """
    a = _as_float(as_matrix(a))
    m, n = a.shape
    if m < n:
        a, m, n = a.T, n, m
    if m >= 2 * n:
        a = torch.linalg.qr(a, mode="r")[1]
    return torch.linalg.svdvals(a)


def randomized_singular_values(
    a: torch.Tensor,
    k: int,
    *,
    oversample: int = 8,
    n_iter: int = 4,
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top-``k`` singular values by randomized subspace iteration (Halko, Martinsson & Tropp 2011).

    With :math:`\ell = k + p` probe vectors :math:`\Omega \in \mathbb{R}^{n\times\ell}`, ``n_iter``
    rounds of :math:`Q \leftarrow \operatorname{orth}(A\,\operatorname{orth}(A^\top Q))` and
    :math:`\sigma(Q^\top A)`. The error of :math:`\sigma_1` decays like
    :math:`(\sigma_{\ell+1}/\sigma_1)^{2q+1}`. Passing the returned basis back as ``init`` warm-starts the
    next call: across training steps, where the gradient changes slowly, the iterations accumulate.

    Args:
        a: matrix ``[m, n]`` (higher-dim tensors are flattened with `as_matrix`).
        k: how many leading singular values to return.
        oversample: extra probe vectors ``p``.
        n_iter: power (subspace) iterations ``q``.
        generator: RNG for the probes (never the global one).
        init: ``[n, k + oversample]`` starting basis from a previous call.

    Returns:
        ``(values, basis)``: the ``k`` largest singular values (descending) and the right basis to pass
        as ``init`` next time.
    """
    a = _as_float(as_matrix(a))
    m, n = a.shape
    ell = min(k + oversample, m, n)
    if init is not None and init.shape == (n, ell) and init.device == a.device:
        omega = init.to(a.dtype)
    else:
        omega = torch.randn(n, ell, generator=generator, device="cpu", dtype=a.dtype).to(a.device)
    q = torch.linalg.qr(a @ omega).Q
    right = omega
    for _ in range(n_iter):
        right = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ right).Q
    s = torch.linalg.svdvals(q.T @ a)
    return s[: min(k, s.numel())], right


def condition_number(s: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Smallest non-zero singular value, numerical rank and condition number from a full spectrum.

    A gradient of a layer fed a batch of ``B`` samples has rank at most ``B``; its trailing singular
    values are round-off. Values at or below :math:`\text{tol} = \sigma_1 \max(m,n)\,\epsilon` count as
    zero (the ``numpy.linalg.matrix_rank`` rule), so the condition number
    :math:`\kappa = \sigma_1 / \sigma_{\min>tol}` describes the subspace the gradient actually spans.

    Args:
        s: all singular values, descending (`singular_values`).
        shape: the matrix shape ``(m, n)``.

    Returns:
        ``(s_min_nonzero, rank, kappa)`` as 0-d tensors (``s_min`` = 0 and ``kappa`` = inf for a zero
        matrix).
    """
    eps = torch.finfo(s.dtype).eps
    tol = s[0] * max(shape) * eps
    nonzero = s > tol
    rank = nonzero.sum()
    big = torch.full_like(s, float("inf"))
    s_min = torch.where(nonzero, s, big).min()
    s_min = torch.where(rank > 0, s_min, torch.zeros_like(s_min))
    kappa = torch.where(rank > 0, s[0] / s_min, torch.full_like(s_min, float("inf")))
    return s_min, rank.to(s.dtype), kappa


def spectral_norm(
    w: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Largest singular value by warm-started power iteration (as ``nn.utils.spectral_norm`` does).

    :math:`v \leftarrow W^\top u/\|W^\top u\|,\ u \leftarrow W v/\|W v\|,\ \sigma = u^\top W v`.
    Keep the returned ``u`` and pass it back next time: after the first call, one or two iterations per
    step track :math:`\sigma_1` as the weights drift.

    Returns:
        ``(sigma, u)``: a 0-d tensor and the left vector to reuse.

    Example:
        >>> s, u = spectral_norm(torch.diag(torch.tensor([2.0, 5.0, 1.0])), n_iter=50)
        >>> round(float(s), 4)
        5.0
    """
    w = _as_float(as_matrix(w.detach()))
    m, _ = w.shape
    if u is None or u.shape != (m,) or u.device != w.device:
        u = torch.randn(m, generator=generator, device="cpu", dtype=w.dtype).to(w.device)
        u = u / u.norm().clamp_min(1e-30)
    u = u.to(w.dtype)
    v = w.T @ u
    for _ in range(max(1, n_iter)):
        v = w.T @ u
        v = v / v.norm().clamp_min(1e-30)
        u = w @ v
        u = u / u.norm().clamp_min(1e-30)
    sigma = torch.dot(u, w @ v)
    return sigma.abs(), u


def spectral_radius(w: torch.Tensor) -> torch.Tensor:
    r"""Largest eigenvalue modulus :math:`\rho(W) = \max_i |\lambda_i(W)|` of a square matrix.

    Computed exactly from ``torch.linalg.eigvals`` (power iteration does not converge for the complex
    conjugate leading pairs that recurrent weights usually have).

    Example:
        >>> float(spectral_radius(torch.tensor([[0.0, -2.0], [2.0, 0.0]])))  # eigenvalues +-2i
        2.0
    """
    w = w.detach()
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"spectral_radius needs a square matrix, got shape {tuple(w.shape)}")
    return torch.linalg.eigvals(_as_float(w)).abs().max()
