"""Sharpness: the top eigenvalues of a loss's Hessian, from Hessian-vector products, no Hessian formed.

The loss is a function of a tuple of parameter tensors, ``loss_fn(params) -> scalar`` (for a module, write
it with `torch.func.functional_call`). A Hessian-vector product (HVP) ``Hv = ∇(∇L·v)`` costs about two
backward passes:

* ``"double_backward"``: one forward and backward with ``create_graph=True`` gives ``g = ∇L`` as a
  differentiable graph; each product is one more backward, ``Hv = ∂(g·v)/∂θ``, through the same graph
  (the forward runs once: dropout masks are the same for every product);
* ``"forward_over_reverse"``: ``Hv = jvp(grad(L), θ, v)`` with `torch.func` (the forward runs once per
  product; ``loss_fn`` must be a pure function of its argument).

`hessian_top_eigenvalues` runs Lanczos on those products: a Krylov basis ``Q`` with full
reorthogonalisation (Gram-Schmidt twice against every earlier vector), the tridiagonal
``T = Qᵀ H Q`` in float64, its eigenvalues (Ritz values) as the estimates. The extreme eigenvalues converge
first and fast: the error of the top one falls like ``exp(−4 j sqrt(gap / spread))`` with the number of
products ``j``, typically to 1e-6 relative in 10-20 products. The residual of a Ritz pair ``(θ, y)`` is
``‖H y − θ y‖ = β_j |s_j|`` (``s_j`` the last entry of ``T``'s eigenvector): no extra product; the
iteration stops when the top-k residuals are at most ``tol · |θ_1|``. ``method="power"`` runs block
power (subspace) iteration instead: it finds the eigenvalues of largest *magnitude*, which on a
non-convex loss can be a negative one.

Preconditioned sharpness (Adam-type optimizers): the update ``θ ← θ − η P⁻¹ m`` sees the Hessian through
``P⁻¹H``, with ``P = diag(sqrt(v̂) + ε)`` (`adam_preconditioner`). ``P⁻¹H`` is similar to the symmetric
``P^{-1/2} H P^{-1/2}`` (same eigenvalues), which is what the Lanczos iteration runs on.

The edge of stability (Cohen et al., 2021 and 2022): gradient descent with step η on a quadratic with
Hessian H is stable iff every eigenvalue satisfies ``η λ < 2``; training with a fixed step tends to raise
``λ_max`` until ``η λ_max / 2`` reaches 1 and then hovers there. `edge_of_stability_ratio` gives
``λ_max`` over the exact stability threshold of SGD (with heavy-ball or Nesterov momentum, dampening)
and `adam_edge_of_stability_ratio` the preconditioned counterpart for Adam: a ratio above 1 means a
quadratic model of the loss with this curvature diverges along the top eigenvector.

Nothing here touches ``.grad``, the optimizer or the global RNG: products are taken with
`torch.autograd.grad` on detached copies of the parameters, random start vectors come from a
``torch.Generator`` (seeded 0 when none is given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from stabwatch.errors import ConfigError, InputError

__all__ = [
    "HessianEigen",
    "adam_edge_of_stability_ratio",
    "adam_preconditioner",
    "edge_of_stability_ratio",
    "hessian_top_eigenvalues",
    "hvp",
]

LossFn = Callable[[tuple[Tensor, ...]], Tensor]
HvpMode = Literal["double_backward", "forward_over_reverse"]
_MODES = ("double_backward", "forward_over_reverse")
_METHODS = ("lanczos", "power")


class HessianEigen(NamedTuple):
    """Top eigenvalues of a (preconditioned) Hessian.

    Attributes:
        values: ``[k]`` float64, the estimates, largest first (``method="power"``: largest magnitude
            first). NaN when the loss or a product was not finite.
        vectors: ``[k, n]`` unit eigenvector estimates, flattened over the parameters in their order
            (float32, or float64 for float64 parameters). With a preconditioner these are eigenvectors of
            the symmetric ``P^{-1/2} H P^{-1/2}``; ``P^{-1/2} y`` is the corresponding one of ``P⁻¹H``.
        residuals: ``[k]`` float64, ``‖A y − θ y‖`` of each pair (``A`` the operator the iteration ran on).
        n_hvp: Hessian-vector products taken.
        converged: every residual is at most ``tol · |values[0]|`` (or the Krylov space was exhausted).
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    n_hvp: int
    converged: bool


# -------------------------------------------------------------------------------------------- checks
def _check_params(params: Sequence[Tensor], where: str) -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    try:
        ps = list(params)
    except TypeError:
        raise InputError(f"{where}: params must be a sequence of tensors, got {type(params).__name__}") from None
    if not ps:
        raise InputError(f"{where}: params is empty; pass the tensors the loss depends on")
    for i, p in enumerate(ps):
        if not isinstance(p, Tensor):
            raise InputError(f"{where}: params[{i}] must be a tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise InputError(f"{where}: params[{i}] must be floating point, got {p.dtype} (shape {tuple(p.shape)})")
    return ps


def _compute_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """float64 if any parameter is float64, else float32 (a Krylov basis in bf16/fp16 loses orthogonality)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _scalar_loss(loss: Any, where: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise InputError(f"{where}: loss_fn must return a scalar tensor, got {shape}; reduce it (e.g. .mean())")
    if not loss.requires_grad:
        raise InputError(
            f"{where}: the loss does not depend on the parameters passed (it has no gradient); loss_fn must "
            "compute the loss from its argument, e.g. with torch.func.functional_call(model, params, x)"
        )
    return loss.reshape(())


# ------------------------------------------------------------------------------------------ products
class _Flat:
    """Flat vectors <-> per-parameter tensors."""

    def __init__(self, params: Sequence[Tensor], dtype: torch.dtype) -> None:
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.dtypes = [p.dtype for p in params]
        self.devices = [p.device for p in params]
        self.n = sum(self.numels)
        self.dtype = dtype
        self.device = params[0].device

    def split(self, v: Tensor) -> tuple[Tensor, ...]:
        parts = torch.split(v, self.numels)
        return tuple(
            part.reshape(shape).to(device=dev, dtype=dt)
            for part, shape, dev, dt in zip(parts, self.shapes, self.devices, self.dtypes, strict=True)
        )

    def join(self, parts: Sequence[Tensor | None]) -> Tensor:
        flat = [
            torch.zeros(n, dtype=self.dtype, device=self.device)
            if t is None
            else t.reshape(-1).to(device=self.device, dtype=self.dtype)
            for t, n in zip(parts, self.numels, strict=True)
        ]
        return torch.cat(flat)


def _operator(
    loss_fn: LossFn, params: Sequence[Tensor], mode: str, flat: _Flat, where: str
) -> Callable[[Tensor], Tensor]:
    """``v ↦ H v`` on flat vectors (the loss's Hessian at ``params``)."""
    if not callable(loss_fn):
        raise InputError(f"{where}: loss_fn must be callable loss_fn(params) -> scalar, got {type(loss_fn).__name__}")
    if mode not in _MODES:
        raise ConfigError(f"{where}: mode={mode!r} is not one of {', '.join(_MODES)}")
    leaves = tuple(p.detach().requires_grad_(True) for p in params)
    if mode == "double_backward":
        with torch.enable_grad():
            loss = _scalar_loss(loss_fn(leaves), where)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        if all(g is None for g in grads):
            raise InputError(
                f"{where}: the loss does not depend on the parameters passed; loss_fn must compute it from its "
                "argument (not from tensors it closes over)"
            )
        # a gradient with no graph (the loss is linear in that parameter, or unused): its Hessian rows are 0
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

        def matvec(v: Tensor) -> Tensor:
            if not live:
                return torch.zeros_like(v)
            vs = flat.split(v)
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    leaves,
                    grad_outputs=[vs[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
            return flat.join(hv)

        return matvec

    def _loss(ps: tuple[Tensor, ...]) -> Tensor:
        return loss_fn(ps).reshape(())

    grad_fn = torch.func.grad(_loss)
    frozen = tuple(p.detach() for p in params)
    with torch.enable_grad():  # checks the loss once (shape, dependence) before the products run
        _scalar_loss(loss_fn(leaves), where)

    def matvec_fwd(v: Tensor) -> Tensor:
        try:
            hv = torch.func.jvp(grad_fn, (frozen,), (flat.split(v),))[1]
        except RuntimeError as exc:
            if "ZeroTensor" not in str(exc):
                raise
            raise InputError(
                f"{where}: mode='forward_over_reverse' hit a torch bug ({exc}); F.mse_loss with "
                "reduction='mean' has it (pytorch/pytorch#123996): write ((pred - y) ** 2).mean(), or use "
                "mode='double_backward'"
            ) from None
        return flat.join(hv)

    return matvec_fwd


def hvp(
    loss_fn: LossFn, params: Sequence[Tensor], vectors: Sequence[Tensor], *, mode: HvpMode = "double_backward"
) -> tuple[Tensor, ...]:
    """The Hessian-vector product ``H v`` of ``loss_fn`` at ``params``, without forming ``H``.

    Args:
        loss_fn: ``loss_fn(params) -> scalar tensor``, a function of the tuple of tensors it is given.
        params: the point, a sequence of floating tensors (not modified; their ``.grad`` is not touched).
        vectors: ``v``, one tensor per parameter, same shapes.
        mode: ``"double_backward"`` or ``"forward_over_reverse"`` (see the module docstring).

    Returns:
        ``H v`` as one tensor per parameter (each parameter's dtype).

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> hvp(lambda ps: 0.5 * ps[0] @ a @ ps[0], [torch.zeros(2)], [torch.tensor([1.0, 0.0])])
        (tensor([2., 1.]),)
    """
    ps = _check_params(params, "hvp")
    vs = list(vectors) if not isinstance(vectors, Tensor) else [vectors]
    if len(vs) != len(ps) or any(v.shape != p.shape for v, p in zip(vs, ps, strict=False)):
        raise InputError(
            f"hvp: vectors must match params one to one in shape; params {[tuple(p.shape) for p in ps]}, "
            f"vectors {[tuple(getattr(v, 'shape', ())) for v in vs]}"
        )
    flat = _Flat(ps, _compute_dtype(ps))
    matvec = _operator(loss_fn, ps, mode, flat, "hvp")
    return flat.split(matvec(flat.join(vs)))


# --------------------------------------------------------------------------------------- eigensolvers
def _start(flat: _Flat, v0: Tensor | None, generator: torch.Generator | None) -> Tensor:
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    noise = torch.randn(flat.n, generator=gen, dtype=flat.dtype).to(flat.device)
    if v0 is None:
        return noise / noise.norm()
    v0 = v0.reshape(-1).to(device=flat.device, dtype=flat.dtype)
    norm = v0.norm()
    if v0.numel() != flat.n or not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return noise / noise.norm()
    # a warm start plus 1% noise: an exact eigenvector alone would span an invariant subspace at once
    v = v0 / norm + 0.01 * noise / noise.norm()
    return v / v.norm()


def _orthogonalise(w: Tensor, basis: Tensor) -> tuple[Tensor, float]:
    """``w`` minus its projection on the rows of ``basis`` (orthonormal), and its norm: full
    reorthogonalisation by classical Gram-Schmidt, a second pass only when the first cancelled more than
    ``1 − 1/√2`` of ``w`` (the DGKS criterion; "twice is enough"). After the three-term recurrence ``w`` is
    nearly orthogonal to the basis already, so one pass (two reads of the basis) is the usual cost."""
    before = float(w.norm())
    w.addmv_(basis.T, basis @ w, alpha=-1.0)
    after = float(w.norm())
    if after < before / math.sqrt(2.0):
        w.addmv_(basis.T, basis @ w, alpha=-1.0)
        after = float(w.norm())
    return w, after


def _lanczos(
    matvec: Callable[[Tensor], Tensor], flat: _Flat, k: int, n_iter: int, tol: float, v: Tensor
) -> HessianEigen:
    m = min(n_iter, flat.n)
    basis = torch.empty(m, flat.n, dtype=flat.dtype, device=flat.device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j]: the coupling of vector j and j + 1 (0.0 after a restart)
    eps = torch.finfo(flat.dtype).eps
    scale = 0.0
    q = v
    theta = s = torch.zeros(0, dtype=torch.float64)
    beta = 0.0
    converged = False
    n_hvp = 0
    gen = torch.Generator().manual_seed(1)  # restart vectors after a breakdown (deterministic)
    for j in range(m):
        basis[j] = q
        w = matvec(q)
        n_hvp += 1
        alpha = float(torch.dot(w, q))
        w.sub_(q, alpha=alpha)  # the three-term recurrence (w is a fresh tensor: in place is safe)
        if j > 0 and betas[-1] != 0.0:
            w.sub_(basis[j - 1], alpha=betas[-1])
        w, beta = _orthogonalise(w, basis[: j + 1])
        alphas.append(alpha)
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            nan = torch.full((k,), float("nan"), dtype=torch.float64)
            return HessianEigen(nan, torch.full((k, flat.n), float("nan"), dtype=flat.dtype), nan, n_hvp, False)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j > 0:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)
        theta, s = theta.flip(0), s.flip(1)  # largest first
        scale = max(scale, float(theta.abs().max()))
        found = min(k, j + 1)
        res = beta * s[-1, :found].abs()
        breakdown = beta <= 100 * eps * max(scale, eps)
        if j + 1 >= k and float(res.max()) <= tol * max(abs(float(theta[0])), eps):
            converged = True
            break
        if j + 1 == m:
            break
        if breakdown:  # the Krylov space is invariant: go on from a new random vector orthogonal to it
            if j + 1 >= k:
                converged = True
                break
            r = torch.randn(flat.n, generator=gen, dtype=flat.dtype).to(flat.device)
            for _ in range(2):
                r = r - basis[: j + 1].T @ (basis[: j + 1] @ r)
            betas.append(0.0)
            q = r / r.norm()
        else:
            betas.append(beta)
            q = w / beta
    found = min(k, len(alphas))
    vectors = s[:, :found].T.to(device=flat.device, dtype=flat.dtype) @ basis[: len(alphas)]
    residuals = beta * s[-1, :found].abs()
    return HessianEigen(theta[:found].clone(), vectors, residuals, n_hvp, converged)


def _power(matvec: Callable[[Tensor], Tensor], flat: _Flat, k: int, n_iter: int, tol: float, v: Tensor) -> HessianEigen:
    gen = torch.Generator().manual_seed(2)
    block = torch.randn(k, flat.n, generator=gen, dtype=flat.dtype).to(flat.device)
    block[0] = v
    q = torch.linalg.qr(block.T).Q.T  # [k, n] orthonormal rows
    n_hvp = 0
    theta = torch.zeros(k, dtype=torch.float64)
    vectors = q
    residuals = torch.full((k,), float("inf"), dtype=torch.float64)
    converged = False
    for _ in range(n_iter):
        aq = torch.stack([matvec(row) for row in q])
        n_hvp += k
        if not bool(torch.isfinite(aq).all()):
            nan = torch.full((k,), float("nan"), dtype=torch.float64)
            return HessianEigen(nan, torch.full((k, flat.n), float("nan"), dtype=flat.dtype), nan, n_hvp, False)
        small = (q @ aq.T).double()
        small = 0.5 * (small + small.T)
        vals, vecs = torch.linalg.eigh(small.cpu())
        order = vals.abs().argsort(descending=True)
        theta, vecs = vals[order], vecs[:, order]
        c = vecs.to(device=flat.device, dtype=flat.dtype)
        vectors = c.T @ q
        avec = c.T @ aq
        residuals = (
            (avec - theta.to(device=flat.device, dtype=flat.dtype)[:, None] * vectors).norm(dim=1).double().cpu()
        )
        if float(residuals.max()) <= tol * max(abs(float(theta[0])), torch.finfo(flat.dtype).eps):
            converged = True
            break
        q = torch.linalg.qr(avec.T).Q.T  # the next block: A·(current Ritz vectors), orthonormalised
    return HessianEigen(theta, vectors, residuals, n_hvp, converged)


def hessian_top_eigenvalues(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    k: int = 1,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    mode: HvpMode = "double_backward",
    preconditioner: Sequence[Tensor] | None = None,
    n_iter: int = 20,
    tol: float = 1e-6,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> HessianEigen:
    """The ``k`` largest eigenvalues of the loss's Hessian at ``params`` (optionally of ``P⁻¹H``).

    Lanczos (default): ``j`` products build an orthonormal Krylov basis ``Q_j`` of ``span{v, Hv, …}`` with
    full reorthogonalisation; the eigenvalues of the float64 tridiagonal ``T_j = Q_jᵀ H Q_j`` are the
    estimates. It stops after ``n_iter`` products, or once the top-k residuals ``β_j |s_{j,i}|`` are at
    most ``tol · |θ_1|`` (the eigenvalue error is then about ``residual² / gap``). In exact arithmetic a
    Krylov space sees each distinct eigenvalue once, so a repeated top eigenvalue shows once in the top-k.
    ``method="power"``: block power iteration with Rayleigh-Ritz, ``k`` products per iteration,
    eigenvalues of largest magnitude (on a non-convex loss that can be a negative one).

    Cost: one forward and backward (``create_graph=True``), then one backward through that graph per
    product (``mode="double_backward"``); memory: the graph plus ``min(n_iter, n)`` vectors the size of
    the parameters. One host sync per product (the convergence test).

    Args:
        loss_fn: ``loss_fn(params) -> scalar tensor``: the loss as a function of the tuple of tensors it
            is given (for a module: ``functional_call(model, dict(zip(names, params)), (x,))``).
        params: the point: floating tensors (not modified; ``.grad`` untouched).
        k: how many eigenvalues.
        method: ``"lanczos"`` or ``"power"``.
        mode: how products are taken, ``"double_backward"`` or ``"forward_over_reverse"``.
        preconditioner: ``P``'s diagonal, one positive tensor per parameter (e.g. `adam_preconditioner`):
            the eigenvalues of ``P⁻¹H``, computed as those of ``P^{-1/2} H P^{-1/2}``.
        n_iter: most products (Lanczos) or iterations of ``k`` products (power).
        tol: relative residual at which the iteration stops early.
        v0: a start vector (flat, ``n`` entries), e.g. the previous top eigenvector; 1% random noise is
            added. ``None``: random.
        generator: the random start's generator (never the global RNG; ``None``: one seeded with 0).

    Returns:
        A `HessianEigen`.

    Raises:
        InputError: ``params`` empty or not floating, ``loss_fn`` not returning a scalar that depends on
            them, a ``preconditioner`` of other shapes or not positive, ``v0`` of the wrong size.
        ConfigError: an unknown ``method``/``mode``, ``k < 1``, ``n_iter < k`` (Lanczos) or ``tol <= 0``.

    Example:
        >>> h = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> res = hessian_top_eigenvalues(lambda ps: 0.5 * ps[0] @ h @ ps[0], [torch.zeros(3)], k=2)
        >>> [round(v, 6) for v in res.values.tolist()], res.n_hvp
        ([3.0, 1.0], 3)
    """
    where = "hessian_top_eigenvalues"
    ps = _check_params(params, where)
    if method not in _METHODS:
        raise ConfigError(f"{where}: method={method!r} is not one of {', '.join(_METHODS)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{where}: k must be an int >= 1, got {k!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ConfigError(f"{where}: n_iter must be an int >= 1, got {n_iter!r}")
    flat = _Flat(ps, _compute_dtype(ps))
    if k > flat.n:
        raise ConfigError(f"{where}: k={k} exceeds the number of parameters ({flat.n})")
    if method == "lanczos" and n_iter < min(k, flat.n):
        raise ConfigError(f"{where}: n_iter={n_iter} < k={k}: Lanczos needs at least k products for k eigenvalues")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise ConfigError(f"{where}: tol must be a number > 0, got {tol!r}")
    if v0 is not None and (not isinstance(v0, Tensor) or v0.numel() != flat.n):
        raise InputError(
            f"{where}: v0 must be a tensor with {flat.n} entries (the parameters flattened), got "
            f"{tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__}"
        )
    matvec = _operator(loss_fn, ps, mode, flat, where)
    if preconditioner is not None:
        inv_sqrt = _inverse_sqrt(preconditioner, ps, flat, where)
        plain = matvec

        def matvec(v: Tensor) -> Tensor:
            return inv_sqrt * plain(inv_sqrt * v)

    v = _start(flat, v0, generator)
    solver = _lanczos if method == "lanczos" else _power
    return solver(matvec, flat, k, n_iter, float(tol), v)


def _inverse_sqrt(preconditioner: Sequence[Tensor], params: Sequence[Tensor], flat: _Flat, where: str) -> Tensor:
    pre = list(preconditioner) if not isinstance(preconditioner, Tensor) else [preconditioner]
    if len(pre) != len(params) or any(
        not isinstance(d, Tensor) or d.shape != p.shape for d, p in zip(pre, params, strict=False)
    ):
        raise InputError(
            f"{where}: preconditioner must hold one tensor per parameter with its shape; params "
            f"{[tuple(p.shape) for p in params]}, preconditioner {[tuple(getattr(d, 'shape', ())) for d in pre]}"
        )
    diag = flat.join(pre)
    if not bool((diag > 0).all()) or not bool(torch.isfinite(diag).all()):
        raise InputError(f"{where}: the preconditioner's diagonal must be finite and > 0 (min {float(diag.min()):.3g})")
    return diag.rsqrt()


# ---------------------------------------------------------------------------------- optimizer readouts
def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor] | None:
    """Adam's diagonal preconditioner ``P = sqrt(v̂) + ε`` for each of ``params``, from the optimizer state.

    ``v̂ = v / (1 − β₂^t)`` is the bias-corrected second moment (``max_exp_avg_sq`` with ``amsgrad``), as
    `torch.optim.Adam` / `torch.optim.AdamW` divide by it: the update is ``θ ← θ − η m̂ / P``.

    Returns:
        One tensor per parameter, or ``None`` when a parameter has no second moment yet (before the
        optimizer's first step).

    Raises:
        InputError: the optimizer is not an Adam-type one (no ``betas``), or a parameter is not in it.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.Adam([w], eps=1e-8)
        >>> adam_preconditioner(opt, [w]) is None
        True
        >>> w.grad = torch.tensor([3.0, -4.0]); opt.step()
        >>> adam_preconditioner(opt, [w])[0]  # sqrt(v̂) = |g| after one step
        tensor([3.0000, 4.0000])
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: list[Tensor] = []
    for i, p in enumerate(params):
        group = groups.get(id(p))
        if group is None:
            raise InputError(f"adam_preconditioner: params[{i}] (shape {tuple(p.shape)}) is not in the optimizer")
        if "betas" not in group or "eps" not in group:
            raise InputError(
                f"adam_preconditioner: {type(optimizer).__name__} is not an Adam-type optimizer (no betas/eps in "
                "its param groups)"
            )
        state = optimizer.state.get(p, {})
        v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
        if v is None or "step" not in state:
            return None
        step = float(state["step"])
        if step < 1:
            return None
        bias2 = 1.0 - float(group["betas"][1]) ** step
        out.append((v.detach() / bias2).sqrt() + float(group["eps"]))
    return out


def _check_unit(name: str, value: float, low: float, high: float) -> None:
    if not low <= value < high:
        raise ConfigError(f"edge of stability: {name}={value!r} must be in [{low}, {high})")


def edge_of_stability_ratio(
    sharpness: float, lr: float, *, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False
) -> float:
    """``λ_max`` over the largest curvature SGD (as `torch.optim.SGD` steps) is stable at.

    On a quadratic with Hessian eigenvalue λ the iteration is linear; it is stable iff (Jury's test on its
    2×2 recursion, ``μ`` the momentum, ``d`` the dampening, ``η`` the learning rate)

        plain / heavy ball:  η (1 − d) λ < 2 + 2μ        ratio = η (1 − d) λ / (2 + 2μ)
        Nesterov:            η (1 + 2μ) λ < 2 + 2μ        ratio = η (1 + 2μ) λ / (2 + 2μ)

    so without momentum the ratio is ``η λ / 2``. Above 1 the quadratic model along the top eigenvector
    diverges (oscillating); full-batch training tends to hover at 1 (the edge of stability). Weight decay
    is not included (it adds ``wd`` to λ).

    Example:
        >>> edge_of_stability_ratio(50.0, 0.04), round(edge_of_stability_ratio(50.0, 0.04, momentum=0.9), 4)
        (1.0, 0.5263)
    """
    lr = float(lr)
    _check_unit("momentum", float(momentum), 0.0, 1.0)
    _check_unit("dampening", float(dampening), 0.0, 1.0)
    mu = float(momentum)
    gain = (1.0 + 2.0 * mu) if nesterov else (1.0 - float(dampening))
    return lr * gain * float(sharpness) / (2.0 + 2.0 * mu)


def adam_edge_of_stability_ratio(sharpness: float, lr: float, beta1: float = 0.9) -> float:
    """The preconditioned counterpart for Adam: ``λ_max(P⁻¹H)`` over ``(2 + 2β₁) / ((1 − β₁) η)``.

    Adam's momentum is an exponential average, ``m ← β₁ m + (1 − β₁) g``, then ``θ ← θ − η P⁻¹ m``: with
    ``P`` frozen this is heavy ball with dampening ``β₁`` in the coordinates ``P^{1/2}θ``, stable iff
    ``η (1 − β₁) λ < 2 + 2β₁`` for every eigenvalue λ of ``P⁻¹H`` (Cohen et al., 2022: "adaptive edge of
    stability", 38/η for β₁ = 0.9). The bias correction of ``m`` (→ 1 after a few hundred steps) and
    weight decay are not included.

    Example:
        >>> round(adam_edge_of_stability_ratio(38_000.0, 1e-3), 12)
        1.0
    """
    _check_unit("beta1", float(beta1), 0.0, 1.0)
    b = float(beta1)
    return float(lr) * (1.0 - b) * float(sharpness) / (2.0 + 2.0 * b)
