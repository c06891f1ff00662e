"""Singular values, spectral norms and spectral radii of weight and gradient matrices.

All functions run on the tensor's own device and never touch the global RNG: random probes take an
explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from stabwatch.errors import InputError
from stabwatch.numeric import round32

__all__ = [
    "SpectrumSummary",
    "as_matrix",
    "batched_singular_values",
    "batched_spectral_norm",
    "block_krylov_singular_values",
    "condition_number",
    "group_matrices",
    "randomized_singular_values",
    "singular_values",
    "spectral_norm",
    "spectral_radius",
    "spectrum_summary",
    "spectrum_summary_rows",
]


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a weight (or its gradient) as a 2-D matrix: conv kernels ``[out, in, *k]`` -> ``[out, in*k]``."""
    if t.ndim < 2:
        raise InputError(f"expected a tensor with >= 2 dims, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


def _as_float(a: torch.Tensor) -> torch.Tensor:
    return a if a.dtype in (torch.float32, torch.float64) else a.float()


def _finite_or_zero(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, finite)`` for a matrix or a batch ``[..., m, n]`` of them, each non-finite matrix replaced by
    zeros, without a host sync (``finite`` has the batch shape; 0-d for one matrix).

    LAPACK must never see a NaN/Inf: ``svd`` raises on one, and MKL's ``geev`` (``eigvals``) aborts the
    whole process. Results computed from the zero stand-in are replaced by NaN with `_nan_unless`.
    """
    finite = torch.isfinite(a).flatten(-2).all(-1)
    return torch.where(finite[..., None, None], a, torch.zeros((), dtype=a.dtype, device=a.device)), finite


def _nan_unless(finite: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (per matrix: ``finite``'s shape, plus trailing dims) with NaN where not ``finite``."""
    mask = finite.reshape(finite.shape + (1,) * (values.ndim - finite.ndim))
    return torch.where(mask, values, torch.full((), float("nan"), dtype=values.dtype, device=values.device))


#: on the CPU a float32 matrix whose short side is at most this, or with at most `_SMALL_ELEMENTS` elements,
#: gets a float64 ``svdvals`` (faster there than the Gram route: fewer kernels around a tiny LAPACK call)
_SMALL_SHORT_SIDE = 16
_SMALL_ELEMENTS = 1024


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """All singular values of a matrix (descending), exactly (see `batched_singular_values` for how).

    Example:
        >>> singular_values(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).tolist()
        [3.0, 2.0, 1.0]
    """
    return batched_singular_values(_as_float(as_matrix(a))[None])[0]


def batched_singular_values(a: torch.Tensor) -> torch.Tensor:
    """`singular_values` of a batch ``[..., m, n]`` of matrices; NaN rows where a matrix holds a NaN/Inf
    (LAPACK never sees it).

    float32 (and half) matrices go through the float64 Gram matrix of their short side and a symmetric
    eigensolver: about as fast as ``svdvals`` on square matrices and 2.6-4.4x faster on wide ones on
    the CPU (``benchmarks/bench_svd.py --part exact``) and, because the float32 entries are exact in
    float64, more accurate for the small singular values than a float32 SVD (a value at the
    ``sigma_1 * max(m, n) * eps`` rank tolerance comes out to ~1e-9 relative instead of ~1e-3). The
    values are returned in the input's precision. float64 matrices use ``svdvals``.

    On the CPU, where reading a flag costs no device sync, a batch with no NaN/Inf skips the zero stand-in
    and the NaN masking (same values, fewer small kernels); and small float32 matrices (short side at most
    `_SMALL_SHORT_SIDE`, or at most `_SMALL_ELEMENTS` elements) go through ``svdvals`` in float64, faster
    there at those sizes than the Gram route and at least as accurate (the float32 entries are exact in
    float64, and an SVD does not square the condition number as the Gram matrix does).
    """
    a = _as_float(a)
    s, finite = _raw_singular_values(a)
    s = s.to(a.dtype)
    return s if finite is None else _nan_unless(finite, s)


def _raw_singular_values(a: torch.Tensor, assume_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`batched_singular_values` of a float32/float64 batch before its last two steps: ``(s, finite)``, ``s``
    in float64 (to be cast back to ``a``'s dtype) and ``finite`` the per-matrix mask when a matrix with a
    NaN/Inf was replaced by zeros (``None`` when none was). ``assume_finite``: the caller knows every
    matrix is finite (e.g. from its norm), so the check is skipped."""
    finite: torch.Tensor | None = None
    if not assume_finite and (not a.is_cpu or not np.isfinite(a.detach().numpy()).all()):  # numpy: no kernel
        a, finite = _finite_or_zero(a)
    m, n = a.shape[-2:]
    if m < n:
        a, m, n = _t(a), n, m
    if a.dtype == torch.float64:
        if m >= 4 * n and m * n >= 65536:
            a = torch.linalg.qr(a, mode="r")[1]
        s = torch.linalg.svdvals(a)
    elif a.is_cpu and (n <= _SMALL_SHORT_SIDE or m * n <= _SMALL_ELEMENTS):
        s = torch.linalg.svdvals(a.double())
    else:
        d = a.double()
        s = torch.linalg.eigvalsh(_t(d) @ d).flip(-1).clamp_min(0).sqrt()
    return s, finite


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


def _orthonormal_or_zero(y: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Thin-QR ``Q`` of ``y`` with the columns that are round-off zeroed.

    Where a new Krylov direction lies (numerically) in the span found so far, as it does once the
    basis is wider than the rank of ``A`` (the gradient of a small batch), its residual after the
    projection is round-off, and normalising it would give a vector that is not orthogonal to the
    basis. Such columns (``|R_jj|`` below ``1e-4`` of the column's norm before the projection, or of the
    block's largest) are set to zero instead: they add nothing to the Rayleigh-Ritz problem.
    """
    q, r = torch.linalg.qr(y)
    diag = r.diagonal(dim1=-2, dim2=-1).abs()
    scale = torch.linalg.vector_norm(before, dim=-2)
    scale = torch.maximum(scale, scale.amax(-1, keepdim=True) * 1e-3)
    keep = diag > 1e-4 * scale
    return q * keep[..., None, :].to(q.dtype)


def block_krylov_singular_values(
    a: torch.Tensor, omega: torch.Tensor, n_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Leading singular values of a batch of matrices by block Krylov iteration (the kernel of
    `randomized_singular_values`; see there).

    Args:
        a: ``[..., m, n]`` float32/float64 matrices (a batch runs as one batched product per step).
        omega: ``[..., n, l]`` starting blocks.
        n_iter: Krylov depth.

    Returns:
        ``(values [..., L], basis [..., n, l], finite [...])``: all ``L`` Ritz values (descending), the
        leading right Ritz vectors (the start block for the next call), and whether each matrix was
        finite (values are NaN where not).
    """
    m = a.shape[-2]
    ell = omega.shape[-1]
    y = a @ omega
    blocks = [_orthonormal_or_zero(y, y)]
    for _ in range(n_iter):
        if ell * len(blocks) >= m:
            break  # the basis already spans the whole column space
        # Aᵀq written as (qᵀA)ᵀ: a product with A's transposed view is up to 13x slower on the CPU
        y0 = a @ _orthonormal(_t(_t(blocks[-1]) @ a))
        q = torch.cat(blocks, dim=-1)
        y = y0
        for _ in range(2):  # block classical Gram-Schmidt, twice ("twice is enough")
            y = y - q @ (_t(q) @ y)
        blocks.append(_orthonormal_or_zero(y, y0))
    q = torch.cat(blocks, dim=-1) if len(blocks) > 1 else blocks[0]
    b = (_t(q) @ a).double()  # [..., L, n]
    gram = b @ _t(b)
    gram, finite = _finite_or_zero(gram)  # a NaN/Inf in `a` reaches every Gram entry
    evals, vecs = torch.linalg.eigh(gram)  # ascending
    evals, vecs = evals.flip(-1), vecs.flip(-1)
    s = evals.clamp_min(0).sqrt()
    top = s[..., :ell]
    basis = (_t(b) @ vecs[..., :ell]) / top.clamp_min(torch.finfo(torch.float64).tiny)[..., None, :]  # right Ritz
    return _nan_unless(finite, s).to(a.dtype), basis.to(a.dtype), finite


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

    With :math:`\ell = k + p` probe vectors :math:`\Omega \in \mathbb{R}^{n\times\ell}` an orthonormal
    basis :math:`Q` of the Krylov space :math:`[A\Omega,\ (AA^\top)A\Omega,\ \dots,\ (AA^\top)^q A\Omega]`
    is built block by block (each new block orthogonalised against the earlier ones twice, then
    orthonormalised by a thin QR), and the singular values of :math:`B = Q^\top A` are returned
    (Rayleigh-Ritz), from the eigenvalues of the small Gram matrix :math:`BB^\top` in float64. Unlike plain
    subspace iteration, whose error decays like :math:`(\sigma_{\ell+1}/\sigma_1)^{2q+1}` and stalls on flat
    spectra, block Krylov converges at a gap-independent rate: ``n_iter=4`` gives :math:`\sigma_1` to
    ~1e-7 relative on a decaying spectrum and ~1e-3 on a gradient made of Gaussian factors (flat top);
    a Gaussian 2048x2048 matrix needs ~10 for 1e-3. Cost: ``2 n_iter + 2`` products with ``A`` or
    ``A^T`` against ``l`` vectors and thin QRs of ``l`` columns, versus :math:`O(mn\min(m,n))` for a full
    SVD. `block_krylov_singular_values` runs a batch of same-shape matrices at once.

    Passing the returned basis back as ``init`` warm-starts the next call.

    Args:
        a: matrix ``[m, n]`` (higher-dim tensors are flattened with `as_matrix`).
        k: how many leading singular values to return.
        oversample: extra probe vectors ``p``.
        n_iter: Krylov depth ``q``.
        generator: RNG for the probes (never the global one).
        init: ``[n, k + oversample]`` starting block from a previous call.

    Returns:
        ``(values, basis)``: the ``k`` largest singular values (descending; NaN if ``a`` holds a
        NaN/Inf) and the ``[n, l]`` leading right Ritz vectors, to pass as ``init`` next time.

    Example:
        >>> a = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1]))
        >>> values, basis = randomized_singular_values(a, 2, oversample=1, generator=torch.Generator().manual_seed(0))
        >>> values.round(decimals=4).tolist(), tuple(basis.shape)
        ([5.0, 3.0], (5, 3))
    """
    a = _as_float(as_matrix(a))
    m, n = a.shape
    ell = min(k + oversample, m, n)
    if init is not None and init.shape == (n, ell) and init.device == a.device:
        omega = init.to(a.dtype)
    else:
        omega = torch.randn(n, ell, generator=generator, device="cpu", dtype=a.dtype).to(a.device)
    s, basis, _ = block_krylov_singular_values(a, omega, n_iter)
    return s[: min(k, s.numel())], basis.contiguous()


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
        ``(s_min_nonzero, rank, kappa)``, 0-d tensors (one per matrix for a batch ``[..., r]`` of spectra;
        ``s_min`` = 0 and ``kappa`` = inf for a zero
        matrix).
    """
    if s.device.type == "cpu" and s.shape[-1] > 0 and s.dtype in (torch.float32, torch.float64):
        return _condition_number_host(s, shape)
    eps = torch.finfo(s.dtype).eps
    tol = s[..., :1] * max(shape) * eps
    nonzero = s > tol
    rank = nonzero.sum(-1)
    big = torch.full_like(s, float("inf"))
    s_min = torch.where(nonzero, s, big).min(-1).values
    s_min = torch.where(rank > 0, s_min, torch.zeros_like(s_min))
    kappa = torch.where(rank > 0, s[..., 0] / s_min, torch.full_like(s_min, float("inf")))
    return s_min, rank.to(s.dtype), kappa


def _condition_number_host(s: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`condition_number` of a CPU spectrum with numpy on the same memory: the same IEEE operations in the
    same precision (so the same bits), at ~1 us per operation instead of a torch kernel launch each."""
    v = s.detach().numpy()
    f = v.dtype.type
    with np.errstate(invalid="ignore", divide="ignore"):
        tol = v[..., :1] * f(max(shape)) * f(torch.finfo(s.dtype).eps)
        nonzero = v > tol
        rank = nonzero.sum(-1)
        s_min = np.where(nonzero, v, f(np.inf)).min(-1)
        s_min = np.where(rank > 0, s_min, f(0)).astype(v.dtype)
        kappa = np.where(rank > 0, v[..., 0] / s_min, f(np.inf)).astype(v.dtype)
    out = (s_min, rank.astype(v.dtype), kappa)
    return tuple(torch.from_numpy(np.asarray(x)) for x in out)  # type: ignore[return-value]


class SpectrumSummary(NamedTuple):
    """What `spectrum_summary` returns, per matrix (batch dims ``...``)."""

    top: torch.Tensor  #: ``[..., k]`` the leading singular values, descending
    s_min: torch.Tensor  #: ``[...]`` the smallest non-zero singular value
    rank: torch.Tensor  #: ``[...]`` the numerical rank
    kappa: torch.Tensor  #: ``[...]`` the condition number over the non-zero singular values


def spectrum_summary(a: torch.Tensor, top_k: int) -> SpectrumSummary:
    r"""Exact top-``k`` singular values, smallest non-zero one, numerical rank and condition number.

    `batched_singular_values` (the whole spectrum), then `condition_number` (values at or below
    :math:`\sigma_1 \max(m,n)\,\epsilon` count as zero). What the gradient singular-value collector and
    the SNN drop-in both report for a matrix small enough for an exact spectrum.

    Args:
        a: a matrix ``[m, n]`` or a batch ``[..., m, n]`` (float32/float64; others are cast to float32).
        top_k: how many leading values to keep (fewer when ``min(m, n) < top_k``).

    Example:
        >>> top, s_min, rank, kappa = spectrum_summary(torch.diag(torch.tensor([4.0, 2.0, 0.0])), 2)
        >>> top.tolist(), s_min.item(), rank.item(), kappa.item()
        ([4.0, 2.0], 2.0, 2.0, 2.0)
    """
    a = _as_float(a)
    s = batched_singular_values(a)
    s_min, rank, kappa = condition_number(s, (a.shape[-2], a.shape[-1]))
    return SpectrumSummary(s[..., :top_k], s_min, rank, kappa)


def spectrum_summary_rows(
    a: torch.Tensor, top_k: int, *, assume_finite: bool = False
) -> list[tuple[list[float], float, float, float]]:
    """`spectrum_summary` of a CPU batch ``[b, m, n]`` as plain floats, one ``(top_k values, s_min, rank,
    kappa)`` per matrix: the same numbers, bit for bit.

    The spectra are `batched_singular_values`' (cast back to the input's precision with numpy, the same
    rounding); the condition number is then taken per matrix on Python floats with the results of the
    same IEEE operations as `condition_number` in the spectrum's dtype (``tol = s_1 * max(m, n) * eps``,
    the smallest value above it, ``s_1 / s_min``), with no tensor made per value. For a caller that wants
    host numbers at once (the SNN drop-in). ``assume_finite``: the caller knows every matrix is free of
    NaN/Inf (a finite norm says so), so the check is skipped; a wrong promise hands LAPACK a NaN.

    Example:
        >>> spectrum_summary_rows(torch.diag(torch.tensor([4.0, 2.0, 0.0]))[None], 2)
        [([4.0, 2.0], 2.0, 2.0, 2.0)]
    """
    a = _as_float(a)
    if not a.is_cpu or a.ndim != 3 or min(a.shape[-2:]) == 0:
        top, s_min, rank, kappa = spectrum_summary(a, top_k)
        return list(zip(top.tolist(), s_min.tolist(), rank.tolist(), kappa.tolist(), strict=True))
    raw, finite = _raw_singular_values(a, assume_finite)
    single = a.dtype == torch.float32
    spectra = raw.numpy().astype(np.float32) if single else raw.numpy()  # `.to(a.dtype)`, the same rounding
    if finite is not None:
        spectra[~finite.numpy()] = np.nan  # `_nan_unless`
    # `condition_number` on Python floats: in float32, every product and quotient below is exact or
    # correctly rounded in float64 (operands of 24 bits), so rounding it to float32 gives the float32 result
    r = round32 if single else float
    size = r(max(a.shape[-2:]))
    eps = torch.finfo(a.dtype).eps
    rows: list[tuple[list[float], float, float, float]] = []
    for values in spectra.tolist():
        s1 = values[0]
        tol = r(r(s1 * size) * eps)
        above = [v for v in values if v > tol]  # a NaN spectrum (non-finite matrix) has none
        if above:
            s_min = min(above)
            rows.append((values[:top_k], s_min, float(len(above)), r(s1 / s_min)))
        else:
            rows.append((values[:top_k], 0.0, 0.0, math.inf))
    return rows


def group_matrices(tensors: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """Stack the tensors that have the same matrix shape, dtype and device, to run each group as one batch.

    Each tensor is viewed as a matrix with `as_matrix` (conv kernels ``[out, in, *k]`` -> ``[out, in*k]``)
    and cast to float32 unless it is float32 or float64.

    Returns:
        ``[(indices into tensors, stack [b, m, n])]``, groups in order of first appearance (a group of one
        is a view of its tensor, not a copy).

    Example:
        >>> groups = group_matrices([torch.ones(2, 3), torch.ones(4, 4), torch.zeros(2, 3)])
        >>> [(idx, tuple(stack.shape)) for idx, stack in groups]
        [([0, 2], (2, 2, 3)), ([1], (1, 4, 4))]
    """
    members: dict[tuple[object, ...], list[tuple[int, torch.Tensor]]] = {}
    for i, t in enumerate(tensors):
        m = _as_float(t.detach() if t.requires_grad else t)
        if m.ndim != 2:
            m = as_matrix(m)
        members.setdefault((tuple(m.shape), m.dtype, m.device), []).append((i, m))
    return [
        ([i for i, _ in group], torch.stack([m for _, m in group]) if len(group) > 1 else group[0][1][None])
        for group in members.values()
    ]


def spectral_norm(
    w: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Largest singular value by warm-started power iteration (as ``nn.utils.spectral_norm`` does).

    :math:`v \leftarrow W^\top u/\|W^\top u\|,\ \sigma = \|W v\|,\ u \leftarrow W v/\sigma`
    (:math:`\sigma = u^\top W v`). Keep the returned ``u`` and pass it back next time: after the first
    call, one or two iterations per step track :math:`\sigma_1` as the weights drift. Each iteration
    reads ``W`` twice.

    Returns:
        ``(sigma, u)``: a 0-d tensor and the left vector to reuse.

    Example:
        >>> s, u = spectral_norm(torch.diag(torch.tensor([2.0, 5.0, 1.0])), n_iter=50)
        >>> round(float(s), 4)
        5.0
    """
    w = _as_float(as_matrix(w.detach()))
    sigma, u = batched_spectral_norm(w[None], None if u is None else u[None], n_iter=n_iter, generator=generator)
    return sigma[0], u[0]


def batched_spectral_norm(
    w: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`spectral_norm` of a batch ``[b, m, n]`` of matrices with left vectors ``[b, m]`` (batched products)."""
    w = _as_float(w)
    b, m, _ = w.shape
    if u is None or u.shape != (b, m) or u.device != w.device:
        u = torch.randn(b, m, generator=generator, device="cpu", dtype=w.dtype).to(w.device)
    u = u.to(w.dtype)[..., None]  # [b, m, 1]
    sigma = torch.zeros(b, dtype=w.dtype, device=w.device)
    for _ in range(max(1, n_iter)):
        v = _t(_t(u) @ w)  # Wᵀu as (uᵀW)ᵀ: a batched product with W's transposed view is ~25x slower on the CPU
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(1e-30)
        u = w @ v
        sigma = torch.linalg.vector_norm(u, dim=-2, keepdim=True)
        u = u / sigma.clamp_min(1e-30)
    return sigma.reshape(b), u[..., 0]


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
        raise InputError(f"spectral_radius needs a square matrix, got shape {tuple(w.shape)}")
    w, finite = _finite_or_zero(_as_float(w))
    return _nan_unless(finite, torch.linalg.eigvals(w).abs().max())
