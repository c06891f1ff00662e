"""Input Jacobians of batched maps without forming them: top singular value and vector per sample.

The map is a *batched* function ``f: [B, *in] -> [B, *out]`` whose rows do not interact (sample ``b``'s
output depends on sample ``b``'s input only: a model in eval mode; BatchNorm in train mode couples rows).
Its Jacobian is then block diagonal, one block ``J_b = ∂f(x)_b / ∂x_b`` (``[prod(out), prod(in)]``) per
sample, and one Jacobian-vector product with a tangent ``v = [v_1, …, v_B]`` returns every ``J_b v_b`` at
once.

Two ways to the top singular triple of every ``J_b``:

* `exact_top_singular` (small inputs): every ``J_b`` formed with ``vmap(jacfwd)`` (`input_jacobian`: one
  forward-mode pass with ``prod(in)`` tangents) and an SVD in float64. Cost ~ ``prod(in)`` forward passes,
  memory ``B · prod(out) · prod(in)``.
* `power_top_singular` (large inputs: images, embeddings): power iteration on ``J_bᵀJ_b`` with one JVP
  (forward mode, ``torch.func.jvp``) and one VJP (reverse mode, reused ``torch.func.vjp`` closure) per
  iteration; no Jacobian is formed. The estimate ``σ_b,k = ‖J_b v_b,k‖`` rises monotonically to σ_max,
  its log by steps ``δ_k`` that shrink geometrically with ratio ``q ≈ (σ_2/σ_1)²``; the iteration stops
  when every sample's estimated remaining error of ``log σ``,

      e_b = δ_k · q_k / (1 − q_k),      q_k = δ_k / δ_{k−1}  (clamped to [0, 0.95]),

  is at most ``tol`` (nats; after at least 3 iterations). The direction converges only as ``√q`` per
  iteration: ``direction_tol`` also requires the residual

      r_b = ‖J_bᵀJ_b v_b − σ_b² v_b‖ / σ_b²      (v_b unit, σ_b² = ‖J_b v_b‖²)

  to be at most it (the angle to the top right singular vector is then at most ~``r_b·σ_b²/gap``,
  ``gap = σ_1² − σ_2²``). Models whose operations have no
  forward-mode derivative (custom ``autograd.Function`` without ``jvp``, e.g. surrogate spikes) fall back
  to reverse mode only: ``Jv`` as the derivative of the linear map ``u ↦ Jᵀu`` (double backward).

Directions are unit vectors with a fixed sign (their largest-magnitude component positive), so both paths
return the same vector for a simple top singular value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from stabwatch.errors import ConfigError, InputError

__all__ = [
    "TopSingular",
    "exact_top_singular",
    "input_jacobian",
    "lanczos_top_singular",
    "power_top_singular",
    "top_singular_of",
]

BatchedFn = Callable[[Tensor], Tensor]
Backend = Literal["auto", "func", "autograd"]


class TopSingular(NamedTuple):
    """The top singular triple of each sample's input Jacobian.

    Attributes:
        sigma: ``[B]`` float64, the largest singular value σ_b of ``J_b``.
        right: ``[B, *in]`` unit top right singular vector (the most stretched input direction), in the
            input's dtype, sign fixed (largest-magnitude component positive).
        iterations: power iterations taken (0 for the exact path).
        converged: ``[B]`` bool, ``error ≤ tol`` (and ``residual ≤ direction_tol`` when given); all
            ``True`` for the exact path.
        residual: ``[B]`` float64, ``‖JᵀJv − σ²v‖/σ²`` at the returned ``v`` (0 for the exact path).
        error: ``[B]`` float64, the estimated remaining error of ``log σ`` (0 for the exact path).
        spectrum: ``[B, min(out, in)]`` float64, all singular values, descending (exact path only, else
            ``None``).
        backend: ``"exact"``, ``"func"`` (JVP + VJP) or ``"autograd"`` (double backward).
    """

    sigma: Tensor
    right: Tensor
    iterations: int
    converged: Tensor
    residual: Tensor
    error: Tensor
    spectrum: Tensor | None
    backend: str


def _check_input(x: Tensor, where: str) -> None:
    if not isinstance(x, Tensor):
        raise InputError(f"{where}: x must be a tensor [batch, *input_shape], got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise InputError(
            f"{where}: x must have a batch dimension and at least one sample, [batch, *input_shape]; "
            f"got shape {tuple(x.shape)} (a single input: x.unsqueeze(0))"
        )
    if not x.is_floating_point():
        raise InputError(f"{where}: x must be floating point (a Jacobian needs a differentiable input), got {x.dtype}")


def _check_output(y: Tensor, x: Tensor, where: str) -> None:
    if not isinstance(y, Tensor):
        raise InputError(f"{where}: the function must return a tensor, got {type(y).__name__}")
    if y.ndim < 1 or y.shape[0] != x.shape[0]:
        raise InputError(
            f"{where}: the function must keep the batch dimension first: input {tuple(x.shape)} gave output "
            f"{tuple(y.shape)}"
        )


def _fix_sign(v: Tensor) -> Tensor:
    """Flip each row so that its largest-magnitude component is positive."""
    flat = v.reshape(v.shape[0], -1)
    idx = flat.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(flat.gather(1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (flat * sign).reshape(v.shape)


def _row_norm(t: Tensor) -> Tensor:
    """Per-row Euclidean norm in float64, ``[B]``."""
    return t.reshape(t.shape[0], -1).to(torch.float64).norm(dim=1)


def input_jacobian(f: Callable[[Tensor], Any], x: Tensor) -> Any:
    """Every sample's input Jacobian, ``[B, prod(out), prod(in)]``, by ``vmap(jacfwd)``.

    ``J[b, i, j] = ∂f(x)[b, i] / ∂x[b, j]`` (output and input flattened). Each sample runs through ``f``
    as a batch of one under `torch.func.vmap`; forward mode costs ~``prod(in)`` tangent passes, so this is
    the path for small inputs. ``f`` may also return a tuple of tensors (several layers): the result is
    then a tuple of Jacobians.

    Example:
        >>> W = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
        >>> J = input_jacobian(lambda x: x @ W.T, torch.zeros(4, 2))
        >>> J.shape, bool(torch.equal(J[0], W))
        (torch.Size([4, 3, 2]), True)
    """
    _check_input(x, "input_jacobian")

    def one(xi: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = f(xi.unsqueeze(0))
        if isinstance(out, tuple):
            return tuple(o.reshape(-1) for o in out)
        return out.reshape(-1)

    with torch.no_grad():
        jac = torch.func.vmap(torch.func.jacfwd(one))(x)
    if isinstance(jac, tuple):
        return tuple(j.reshape(x.shape[0], j.shape[1], -1) for j in jac)  # type: ignore[return-value]
    return jac.reshape(x.shape[0], jac.shape[1], -1)


def exact_top_singular(f: BatchedFn, x: Tensor) -> TopSingular:
    """Top singular value and right vector of each sample's input Jacobian, formed exactly (small inputs).

    ``J_b`` from `input_jacobian`, SVD in float64 (`torch.linalg.svd`). Also returns the whole spectrum.

    Example:
        >>> W = torch.diag(torch.tensor([0.5, 4.0]))
        >>> top = exact_top_singular(lambda x: torch.tanh(x @ W.T), torch.zeros(3, 2))
        >>> top.sigma.tolist(), top.right[0].tolist()
        ([4.0, 4.0, 4.0], [0.0, 1.0])
    """
    _check_input(x, "exact_top_singular")
    with torch.no_grad():
        _check_output(f(x[:1]), x[:1], "exact_top_singular")
    return top_singular_of(input_jacobian(f, x), x)


def top_singular_of(jac: Tensor, x: Tensor) -> TopSingular:
    """The `TopSingular` of formed Jacobians ``jac`` (``[B, m, prod(in)]``, e.g. from `input_jacobian`) of
    the map at inputs ``x`` (``[B, *in]``: gives the directions' shape and dtype); SVD in float64."""
    if jac.ndim != 3 or jac.shape[0] != x.shape[0] or jac.shape[2] != x[0].numel():
        raise InputError(
            f"top_singular_of: expected Jacobians [B, m, prod(in)] = [{x.shape[0]}, m, {x[0].numel()}], "
            f"got {tuple(jac.shape)}"
        )
    _, s, vh = torch.linalg.svd(jac.to(torch.float64), full_matrices=False)
    right = _fix_sign(vh[:, 0, :]).to(x.dtype).reshape(x.shape)
    zeros = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    ones = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return TopSingular(s[:, 0], right, 0, ones, zeros, zeros, s, "exact")


def _func_products(f: BatchedFn, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(f(x), v ↦ Jv, u ↦ Jᵀu)`` by ``torch.func`` (one forward pass for the VJP closure)."""
    with torch.no_grad():
        y, vjp_fn = torch.func.vjp(f, x)[:2]

    def jv(v: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.func.jvp(f, (x,), (v,))[1]

    def jtu(u: Tensor) -> Tensor:
        with torch.no_grad():
            return vjp_fn(u)[0]

    return y, jv, jtu


def _autograd_products(
    f: BatchedFn, x: Tensor
) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(f(x), v ↦ Jv, u ↦ Jᵀu)`` by reverse mode only: ``Jv = ∂/∂u ⟨Jᵀu, v⟩`` (double backward)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = f(xg)
        if not y.requires_grad:
            raise InputError("power_top_singular: the output does not depend on the input (no gradient flows)")
        dummy = torch.zeros_like(y, requires_grad=True)
        (g,) = torch.autograd.grad(y, xg, dummy, create_graph=True)

    def jv(v: Tensor) -> Tensor:
        with torch.enable_grad():
            (out,) = torch.autograd.grad(g, dummy, v, retain_graph=True)
        return out.detach()

    def jtu(u: Tensor) -> Tensor:
        with torch.enable_grad():
            (out,) = torch.autograd.grad(y, xg, u, retain_graph=True)
        return out.detach()

    return y.detach(), jv, jtu


def _check_options(tol: float, direction_tol: float | None, max_iter: int, backend: str, where: str) -> None:
    """The iterative paths' common options, with errors that name the function."""
    if not tol > 0:
        raise ConfigError(f"{where}: tol must be > 0, got {tol!r}")
    if direction_tol is not None and not direction_tol > 0:
        raise ConfigError(f"{where}: direction_tol must be > 0 or None, got {direction_tol!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"{where}: max_iter must be a positive int, got {max_iter!r}")
    if backend not in ("auto", "func", "autograd"):
        raise ConfigError(f"{where}: backend must be 'auto', 'func' or 'autograd', got {backend!r}")


def power_top_singular(
    f: BatchedFn,
    x: Tensor,
    *,
    tol: float = 1e-4,
    direction_tol: float | None = None,
    max_iter: int = 100,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> TopSingular:
    """Top singular value and right vector of each sample's input Jacobian by power iteration on ``JᵀJ``.

    Per iteration one JVP and one VJP for the whole batch; no Jacobian is formed. Stops when every
    sample's estimated error of ``log σ`` is at most ``tol`` (and, with ``direction_tol``, its residual
    ``‖JᵀJv − σ²v‖/σ²`` at most that), or after ``max_iter`` iterations (then ``converged`` says which
    samples did not make it). A sample whose Jacobian is zero gets σ = 0.

    Args:
        f: batched map ``[B, *in] -> [B, *out]`` with independent rows.
        x: the inputs, ``[B, *in]``.
        tol: tolerance on the estimated error of ``log σ`` (nats, see the module docstring).
        direction_tol: also require the residual (relative) to be at most this, for the direction.
        max_iter: most iterations.
        v0: start vectors ``[B, *in]`` (e.g. the previous call's directions); default Gaussian.
        generator: draws the Gaussian start (on the CPU; default: a generator seeded with 0); the global
            RNG is never used.
        backend: ``"func"`` (``torch.func.jvp`` + ``vjp``), ``"autograd"`` (double backward), or
            ``"auto"``: ``"func"``, falling back to ``"autograd"`` when an operation has no forward-mode or
            functorch rule.

    Example:
        >>> W = torch.diag(torch.tensor([0.5, 4.0, 1.0]))
        >>> top = power_top_singular(lambda x: x @ W.T, torch.zeros(2, 3), generator=torch.Generator().manual_seed(0))
        >>> round(float(top.sigma[0]), 4), bool(top.converged.all())
        (4.0, True)
    """
    _check_input(x, "power_top_singular")
    _check_options(tol, direction_tol, max_iter, backend, "power_top_singular")
    if v0 is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
    else:
        if v0.shape != x.shape:
            raise InputError(
                f"power_top_singular: v0 must have the input's shape {tuple(x.shape)}, got {tuple(v0.shape)}"
            )
        v = v0.detach().to(x.device, x.dtype)

    y, jv, jtu, used = _products(f, x, v, backend, "power_top_singular")
    _check_output(y, x, "power_top_singular")

    n = x.shape[0]
    shape = (n,) + (1,) * (x.ndim - 1)
    norm = _row_norm(v)
    v = v / norm.clamp_min(torch.finfo(torch.float64).tiny).to(v.dtype).reshape(shape)
    sigma2 = torch.zeros(n, dtype=torch.float64, device=x.device)
    inf = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
    residual, error, converged = inf, inf, torch.zeros(n, dtype=torch.bool, device=x.device)
    log_prev = step_prev = inf
    it = 0
    for it in range(1, max_iter + 1):
        u = jv(v)
        w = jtu(u)  # JᵀJ v
        sigma2 = _row_norm(u) ** 2
        scale = sigma2.clamp_min(torch.finfo(torch.float64).tiny)
        resid_vec = w.to(torch.float64) - sigma2.reshape(shape) * v.to(torch.float64)
        residual = torch.where(sigma2 > 0, _row_norm(resid_vec) / scale, torch.zeros_like(sigma2))
        log_s = 0.5 * torch.log(scale)
        step = (log_s - log_prev).abs() if it > 1 else inf
        if it > 2:
            q = torch.where(step_prev > 0, step / step_prev, torch.zeros_like(step)).clamp(0.0, 0.95)
            error = torch.where(sigma2 > 0, step * q / (1 - q), torch.zeros_like(step))
        log_prev, step_prev = log_s, step
        converged = error <= tol
        if direction_tol is not None:
            converged &= residual <= direction_tol
        if bool(converged.all()) or it == max_iter:
            break
        wn = _row_norm(w)
        # a zero Jacobian (or v in its null space) keeps v
        v = torch.where(
            (wn > 0).reshape(shape), w / wn.clamp_min(torch.finfo(torch.float64).tiny).to(w.dtype).reshape(shape), v
        )
    return TopSingular(sigma2.sqrt(), _fix_sign(v), it, converged, residual, error, None, used)


def _products(
    f: BatchedFn, x: Tensor, v: Tensor, backend: Backend, where: str
) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], str]:
    """The JVP/VJP pair for ``backend`` (``"auto"``: torch.func, else double backward)."""
    if backend == "autograd":
        y, jv, jtu = _autograd_products(f, x)
        return y, jv, jtu, "autograd"
    try:
        y, jv, jtu = _func_products(f, x)
        jv(v)  # fail here (not mid-iteration) when forward mode is missing
        return y, jv, jtu, "func"
    except (RuntimeError, NotImplementedError) as exc:
        if backend == "func":
            raise InputError(
                f"{where}: torch.func could not differentiate the model ({type(exc).__name__}: {exc}); "
                "use backend='autograd'"
            ) from exc
    y, jv, jtu = _autograd_products(f, x)
    return y, jv, jtu, "autograd"


def lanczos_top_singular(
    f: BatchedFn,
    x: Tensor,
    *,
    tol: float = 1e-4,
    direction_tol: float | None = None,
    max_iter: int = 100,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> TopSingular:
    """Top singular value and right vector of each sample's input Jacobian by Lanczos on ``JᵀJ``.

    The same products as `power_top_singular` (one JVP and one VJP for the whole batch per iteration, no
    Jacobian formed), but every iterate is kept: after ``k`` iterations the top Ritz value of the Krylov
    space ``span{v, JᵀJv, …, (JᵀJ)^{k−1}v}`` (full reorthogonalisation, a ``k × k`` tridiagonal
    eigenproblem per sample) converges like ``exp(−2k·√(gap))`` instead of power iteration's ``q^k`` — a
    few tens of iterations where power iteration needs hundreds when the top singular values are close.

    Convergence: with θ_1 ≥ θ_2 the top Ritz values and ``r`` the top Ritz pair's residual
    ``‖JᵀJy − θ_1 y‖`` (``β_k·|s_k|``, free), the error of ``log σ_max`` is bounded (Kato–Temple, with
    θ_2 standing in for σ_2²) by

        e = r² / (2·θ_1·(θ_1 − θ_2)),

    and the iteration stops when every sample's ``e ≤ tol`` (and ``r/θ_1 ≤ direction_tol`` when given),
    or after ``max_iter`` iterations or ``prod(in)`` (the Krylov space is then the whole input space).
    Memory: the basis, ``B · iterations · prod(in)`` numbers in the input's dtype.

    Args: as `power_top_singular`.

    Example:
        >>> W = torch.diag(torch.tensor([1.0, 3.9, 4.0, 0.5], dtype=torch.float64))
        >>> top = lanczos_top_singular(lambda x: x @ W.T, torch.zeros(2, 4, dtype=torch.float64))
        >>> round(float(top.sigma[0]), 10), [round(c, 8) for c in top.right[0].tolist()], top.iterations <= 4
        (4.0, [0.0, -0.0, 1.0, 0.0], True)
    """
    _check_input(x, "lanczos_top_singular")
    _check_options(tol, direction_tol, max_iter, backend, "lanczos_top_singular")
    n, d = x.shape[0], x[0].numel()
    if v0 is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        start = torch.randn((n, d), generator=gen, dtype=torch.float64).to(x.device)
    else:
        if v0.shape != x.shape:
            raise InputError(
                f"lanczos_top_singular: v0 must have the input's shape {tuple(x.shape)}, got {tuple(v0.shape)}"
            )
        start = v0.detach().reshape(n, d).to(x.device, torch.float64)
    start = start / start.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    y, jv, jtu, used = _products(f, x, start.to(x.dtype).reshape(x.shape), backend, "lanczos_top_singular")
    _check_output(y, x, "lanczos_top_singular")

    tiny = torch.finfo(torch.float64).tiny
    eps = torch.finfo(x.dtype).eps
    basis: list[Tensor] = [start]  # float64 [n, d] each
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    steps = min(max_iter, d)
    theta = torch.zeros(n, dtype=torch.float64, device=x.device)
    vec = start
    residual = error = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
    converged = torch.zeros(n, dtype=torch.bool, device=x.device)
    k = 0
    for k in range(1, steps + 1):
        q = basis[-1]
        w = jtu(jv(q.to(x.dtype).reshape(x.shape))).reshape(n, d).to(torch.float64)
        alpha = (q * w).sum(1)
        w = w - alpha[:, None] * q - (betas[-1][:, None] * basis[-2] if betas else 0.0)
        stack = torch.stack(basis, dim=1)  # [n, k, d]
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - torch.einsum("nkd,nk->nd", stack, torch.einsum("nkd,nd->nk", stack, w))
        beta = w.norm(dim=1)
        alphas.append(alpha)
        tri = torch.diag_embed(torch.stack(alphas, dim=1))
        if k > 1:
            off = torch.stack(betas, dim=1)
            tri = tri + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
        evals, evecs = torch.linalg.eigh(tri)
        theta = evals[:, -1].clamp_min(0)
        top = evecs[:, :, -1]
        vec = torch.einsum("nkd,nk->nd", stack, top)
        # an exhausted Krylov space (β ≈ 0: an invariant subspace, e.g. JᵀJ = a²·I) is exact
        exhausted = beta <= 10 * eps * theta.clamp_min(tiny) ** 0.5 * (1 + alpha.abs().sqrt())
        residual_abs = torch.where(exhausted, torch.zeros_like(beta), beta * top[:, -1].abs())
        residual = torch.where(theta > 0, residual_abs / theta.clamp_min(tiny), torch.zeros_like(theta))
        second = evals[:, -2].clamp_min(0) if k > 1 else torch.zeros_like(theta)
        gap = (theta - second).clamp_min(tiny)
        bound = residual_abs**2 / (2 * theta.clamp_min(tiny) * gap)
        error = torch.where((theta > 0) & (k > 1) | exhausted, bound, torch.full_like(bound, float("inf")))
        error = torch.where(exhausted | (theta == 0), torch.zeros_like(error), error)
        converged = error <= tol
        if direction_tol is not None:
            converged &= residual <= direction_tol
        if bool(converged.all()) or k == steps:
            break
        betas.append(torch.where(exhausted, torch.zeros_like(beta), beta))
        nxt = torch.where(exhausted[:, None], torch.zeros_like(w), w / beta.clamp_min(tiny)[:, None])
        basis.append(nxt)
    if k == d:  # the whole space: the Ritz pair is exact up to rounding
        converged = torch.ones_like(converged)
    vec = vec / vec.norm(dim=1, keepdim=True).clamp_min(tiny)
    right = _fix_sign(vec).to(x.dtype).reshape(x.shape)
    return TopSingular(theta.sqrt(), right, k, converged, residual, error, None, used)
