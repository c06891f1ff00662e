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


def _finite_or_zero(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a or zeros, finite)`` without a host sync.

    LAPACK must never see a NaN/Inf: ``svd`` raises on one, and MKL's ``geev`` (``eigvals``) aborts the
    whole process. Results computed from the zero stand-in are replaced by NaN with ``finite``.
    """
    finite = torch.isfinite(a).all()
    return torch.where(finite, a, torch.zeros((), dtype=a.dtype, device=a.device)), finite


def _nan_unless(finite: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, values, torch.full((), float("nan"), dtype=values.dtype, device=values.device))


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """All singular values of a matrix (descending), exactly, via ``torch.linalg.svdvals``.

    Large tall-skinny inputs (``m >= 4n``, ``mn >= 65536``) are first reduced with a QR (``R`` has the
    same singular values), which is cheaper there; small ones go straight to ``svdvals``.

    Example:
        >>> singular_values(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).tolist()
        [3.0, 2.0, 1.0]
    """
    a, finite = _finite_or_zero(_as_float(as_matrix(a)))
    m, n = a.shape
    if m < n:
        a, m, n = a.T, n, m
    if m >= 4 * n and m * n >= 65536:
        a = torch.linalg.qr(a, mode="r")[1]
    return _nan_unless(finite, torch.linalg.svdvals(a))


def randomized_singular_values(
    a: torch.Tensor,
    k: int,
    *,
    oversample: int = 8,
    n_iter: int = 4,
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top-``k`` singular values by randomized block Krylov iteration (Musco & Musco 2015).

    With :math:`\ell = k + p` probe vectors :math:`\Omega \in \mathbb{R}^{n\times\ell}` the Krylov
    space :math:`[A\Omega,\ (AA^\top)A\Omega,\ \dots,\ (AA^\top)^q A\Omega]` is built (each block
    orthonormalised for stability), orthonormalised as a whole into :math:`Q`, and the singular values
    of :math:`Q^\top A` are returned (Rayleigh-Ritz). Unlike plain subspace iteration, whose error
    decays like :math:`(\sigma_{\ell+1}/\sigma_1)^{2q+1}` and stalls on flat spectra, block Krylov
    converges at a gap-independent rate: ``n_iter=4`` gives :math:`\sigma_1` to ~1e-6 relative on
    real gradients; ~8 are needed on a Gaussian 2048x2048 matrix (flat top of the spectrum) for 1e-3.
    Cost: ``2 n_iter + 2`` products with ``A`` or ``A^T`` against ``l`` vectors, versus
    :math:`O(mn\min(m,n))` for a full SVD.

    Passing the returned basis back as ``init`` warm-starts the next call: across training steps, where
    the gradient drifts slowly, one iteration then suffices.

    Args:
        a: matrix ``[m, n]`` (higher-dim tensors are flattened with `as_matrix`).
        k: how many leading singular values to return.
        oversample: extra probe vectors ``p``.
        n_iter: Krylov depth ``q``.
        generator: RNG for the probes (never the global one).
        init: ``[n, k + oversample]`` starting block from a previous call.

    Returns:
        ``(values, basis)``: the ``k`` largest singular values (descending) and the ``[n, l]`` block of
        leading right singular vectors to pass as ``init`` next time.
    """
    a, finite = _finite_or_zero(_as_float(as_matrix(a)))
    m, n = a.shape
    ell = min(k + oversample, m, n)
    if init is not None and init.shape == (n, ell) and init.device == a.device:
        omega = init.to(a.dtype)
    else:
        omega = torch.randn(n, ell, generator=generator, device="cpu", dtype=a.dtype).to(a.device)
    y = torch.linalg.qr(a @ omega).Q
    blocks = [y]
    for _ in range(n_iter):
        z = torch.linalg.qr(a.T @ y).Q
        y = torch.linalg.qr(a @ z).Q
        blocks.append(y)
    q = torch.linalg.qr(torch.cat(blocks, dim=1)).Q if len(blocks) > 1 else y
    _, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return _nan_unless(finite, s[: min(k, s.numel())]), vh[:ell].T.contiguous()


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
        >>> round(float(spectral_radius(torch.tensor([[0.0, -2.0], [2.0, 0.0]]))), 5)  # eigenvalues +-2i
        2.0
    """
    w = w.detach()
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"spectral_radius needs a square matrix, got shape {tuple(w.shape)}")
    w, finite = _finite_or_zero(_as_float(w))
    return _nan_unless(finite, torch.linalg.eigvals(w).abs().max())
