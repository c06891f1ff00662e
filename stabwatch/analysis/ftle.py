"""Input-space finite-time Lyapunov exponents (FTLE) of deep networks (Storm et al., PRL 2024).

A network maps an input ``x`` layer by layer, ``x → h_1 → … → h_L``, a discrete dynamical system whose
"time" is the layer index. ``J_ℓ(x) = ∂h_ℓ/∂x`` is the Jacobian from the input to layer ℓ; the maximal
finite-time Lyapunov exponent at ``x`` is

    λ_ℓ(x) = (1/ℓ) · log σ_max(J_ℓ(x)),

the per-layer log growth rate of the most amplified small input perturbation, and the *stretching
direction* is the top right singular vector of ``J_ℓ(x)`` (unit norm): the input direction along which a
perturbation grows most. Ridges of large λ in input space mark the decision boundaries of a trained
classifier; a network with λ ≈ 0 everywhere neither amplifies nor damps input perturbations.

`ftle` computes it for a batch of inputs and a set of layers; `ftle_field` on a grid of a 2-D input
space and `plot_ftle_field` draws it (the paper's Fig. 2); `ftle_uncertainty` relates λ to the
classification error and the predictive entropy on a labelled set (Fig. 4). See ``docs/ftle.md``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from stabwatch.errors import ConfigError, InputError
from stabwatch.functional.jacobian import (
    TopSingular,
    input_jacobian,
    lanczos_top_singular,
    power_top_singular,
    top_singular_of,
)

__all__ = [
    "FTLEField",
    "FTLEResult",
    "FTLEUncertainty",
    "ftle",
    "ftle_field",
    "ftle_uncertainty",
    "plot_ftle_field",
    "sequential_layers",
]

Method = Literal["auto", "exact", "power", "lanczos"]
LayerSpec = str | Callable[[Tensor], Tensor]

#: inputs with at most this many components get the exact path under ``method="auto"``
EXACT_MAX_DIM = 64


@dataclass(frozen=True)
class FTLEResult:
    """The maximal FTLE of every input at every chosen layer.

    Attributes:
        exponents: ``[batch, layers]`` float64, ``λ_ℓ(x) = log σ_max(J_ℓ(x)) / depth_ℓ`` (``-inf`` where the
            Jacobian is zero, e.g. every ReLU off).
        singular_values: ``[batch, layers]`` float64, ``σ_max(J_ℓ(x))``.
        directions: ``[batch, layers, *input_shape]``, the top right singular vectors (unit norm, sign
            fixed: largest-magnitude component positive), in the input's dtype.
        layers: the layers' names (module paths for ``nn.Sequential`` and named modules, ``"output"`` for
            the model's output, ``"fn<i>"`` for callables).
        depths: the ℓ each exponent is divided by.
        method: ``"exact"``, ``"lanczos"`` or ``"power"``.
        converged: ``[batch, layers]`` bool (power path: estimated error of ``log σ`` ≤ ``tol``, and
            residual ≤ ``direction_tol`` when given; exact: all ``True``).
        residual: ``[batch, layers]`` float64, ``‖JᵀJv − σ²v‖/σ²`` at the returned direction (exact: 0).
        error: ``[batch, layers]`` float64, the power path's estimated error of ``log σ`` (exact: 0); the
            exponent's is this divided by the depth.
        iterations: power iterations per layer (exact: zeros).
        spectra: exact path only, one ``[batch, k_ℓ]`` float64 tensor per layer with *all* singular values
            of ``J_ℓ`` (descending); ``None`` on the power path.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> res = ftle(net, torch.randn(5, 2))
        >>> res.layers, res.depths, tuple(res.exponents.shape), tuple(res.directions.shape)
        (['1', '3', '4'], [1, 2, 3], (5, 3), (5, 3, 2))
    """

    exponents: Tensor
    singular_values: Tensor
    directions: Tensor
    layers: list[str]
    depths: list[int]
    method: str
    converged: Tensor
    residual: Tensor
    error: Tensor
    iterations: list[int]
    spectra: list[Tensor] | None = None

    def layer(self, name: str) -> Tensor:
        """The exponents ``[batch]`` of one layer, by name."""
        if name not in self.layers:
            raise InputError(f"FTLEResult.layer: no layer {name!r}; layers: {self.layers}")
        return self.exponents[:, self.layers.index(name)]


def _weight_module(m: nn.Module) -> bool:
    """Holds a weight matrix (a parameter with ≥ 2 dims): Linear, Conv, Bilinear, RNN, … (not norms)."""
    return any(p.ndim >= 2 for p in m.parameters())


def sequential_layers(model: nn.Sequential) -> list[str]:
    """The layer boundaries `ftle` uses for an ``nn.Sequential``: the names of the modules whose outputs
    are ``h_1, …, h_L``.

    The modules are grouped into blocks, each starting at a module that holds a weight matrix (a
    parameter with ≥ 2 dims: ``Linear``, ``Conv*``, ``Embedding``…; norms and activations do not start
    one); a block runs up to the next such module, so it is "affine map + whatever follows it" (norm,
    nonlinearity, dropout). Layer ℓ is the output of block ℓ, named after the block's last module.
    Modules before the first weight module (``Flatten``) join the first block. A Sequential with no
    weight module: every module is a layer.

    Example:
        >>> sequential_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.Softmax(-1)))
        ['2', '4']
    """
    names = [name for name, _ in model.named_children()]
    starts = [i for i, (_, m) in enumerate(model.named_children()) if _weight_module(m)]
    if not starts:
        return names
    ends = [s - 1 for s in starts[1:]] + [len(names) - 1]
    return [names[e] for e in ends]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the measurement (rows must not interact, no dropout); each module's flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _layer_functions(
    model: nn.Module, layers: Sequence[LayerSpec] | None
) -> tuple[list[str], list[Callable[[Tensor], Tensor]], Callable[[Tensor], tuple[Tensor, ...]]]:
    """Names, one batched function ``x -> h_ℓ(x)`` per chosen layer, and one ``x -> (h_1, …, h_L)``
    computing all of them in a single forward pass."""
    if isinstance(model, nn.Sequential) and (layers is None or all(isinstance(s, str) for s in layers)):
        children = dict(model.named_children())
        names = sequential_layers(model) if layers is None else [str(s) for s in layers]
        order = list(children)
        unknown = [n for n in names if n not in children]
        if unknown:
            raise InputError(f"ftle: {unknown} are not children of the nn.Sequential; its children: {order}")
        if len(set(names)) != len(names):
            raise InputError(f"ftle: layers named twice: {names}")
        stop = max(order.index(n) for n in names)
        wanted = set(names)

        def joint_seq(x: Tensor) -> tuple[Tensor, ...]:
            outs: dict[str, Tensor] = {}
            h = x
            for k in order[: stop + 1]:
                h = children[k](h)
                if k in wanted:
                    outs[k] = h
            return tuple(outs[n] for n in names)

        fns: list[Callable[[Tensor], Tensor]] = [
            nn.Sequential(*[children[k] for k in order[: order.index(n) + 1]]) for n in names
        ]
        return names, fns, joint_seq
    if layers is None:
        return ["output"], [model], lambda x: (model(x),)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise InputError(f"ftle: layers must be a non-empty list of module paths or callables, got {layers!r}")
    modules = dict(model.named_modules())
    names, fns = [], []
    for i, spec in enumerate(layers):
        if isinstance(spec, str):
            if spec not in modules:
                near = [n for n in modules if n][:12]
                raise InputError(f"ftle: no module {spec!r} in the model; module paths include: {near}")
            names.append(spec)
            fns.append(_hooked(model, {spec: modules[spec]}))
        elif callable(spec):
            names.append(f"fn{i}")
            fns.append(spec)
        else:
            raise InputError(f"ftle: layers[{i}] must be a module path (str) or a callable, got {type(spec).__name__}")
    paths = {n: modules[n] for n in names if isinstance(n, str) and n in modules and not n.startswith("fn")}
    hooked_all = _hooked(model, paths) if paths else None

    def joint(x: Tensor) -> tuple[Tensor, ...]:
        seen = hooked_all(x, all_=True) if hooked_all is not None else {}  # type: ignore[call-arg]
        return tuple(seen[n] if n in seen else fn(x) for n, fn in zip(names, fns, strict=True))

    return names, fns, joint


def _hooked(model: nn.Module, modules: dict[str, nn.Module]) -> Any:
    """``x -> output`` of the module(s) by forward hooks on a full forward pass of ``model``; with
    ``all_=True`` a dict of every module's output."""

    def fn(x: Tensor, all_: bool = False) -> Any:
        seen: dict[str, Tensor] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
                seen[name] = out[0] if isinstance(out, tuple) else out

            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        for n in modules:
            if n not in seen:
                raise InputError(f"ftle: module {n!r} was not called in the forward pass")
            if not isinstance(seen[n], Tensor):
                raise InputError(f"ftle: module {n!r} returned {type(seen[n]).__name__}, not a tensor")
        return seen if all_ else next(iter(seen.values()))

    return fn


def ftle(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    layers: Sequence[LayerSpec] | None = None,
    *,
    depths: Sequence[int] | None = None,
    method: Method = "auto",
    exact_max_dim: int = EXACT_MAX_DIM,
    tol: float = 1e-4,
    direction_tol: float | None = None,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    backend: Literal["auto", "func", "autograd"] = "auto",
) -> FTLEResult:
    """Maximal finite-time Lyapunov exponent ``λ_ℓ(x) = (1/ℓ) log σ_max(J_ℓ(x))`` per input and layer.

    Layers:

    * ``nn.Sequential`` (``layers=None``): one layer per block "module with a weight matrix + what
      follows it up to the next one" (`sequential_layers`), so ``Linear, Tanh, Linear, Tanh, Linear``
      has layers ``"1"``, ``"3"``, ``"4"`` with depths 1, 2, 3 — ℓ counts weight layers, as in the paper.
      Or name the children to use (``layers=["1", "3"]``; depths are then their block numbers).
    * any other model: ``layers=None`` measures the model's output with depth 1 (``log σ_max``); name
      module paths (``layers=["encoder.2", "head"]``, read by forward hooks on a full forward pass) or
      pass callables ``x -> h`` (batched). Depths default to 1, 2, … in the order given; pass
      ``depths=`` for the real layer counts.

    Inputs: ``x`` is ``[batch, *input_shape]``; rows must not interact (the model runs in eval mode for
    the measurement, each module's train/eval flag restored after). The model's parameters are not
    changed and get no ``.grad``.

    Method: ``"exact"`` forms each ``J_ℓ(x)`` (``vmap(jacfwd)``) and takes an SVD in float64 (small
    inputs; also returns every singular value). ``"lanczos"`` (`stabwatch.functional.lanczos_top_singular`)
    and ``"power"`` (`stabwatch.functional.power_top_singular`) iterate on ``JᵀJ`` with one JVP and one
    VJP per step, no Jacobian formed, until the estimated error of ``log σ_max`` is at most ``tol`` (large
    inputs; ``converged``, ``error`` and ``residual`` say how it went); Lanczos needs far fewer steps when
    the top singular values are close. ``"auto"``: exact when the input has at most ``exact_max_dim``
    (64) components and ``vmap(jacfwd)`` can differentiate the model, else Lanczos. Logs are taken in
    float64. An iterative method sees only what its random start vector reaches: when the start is
    nearly orthogonal to the top singular vector and σ_2 is close to σ_1, it can settle on σ_2 with a
    small error estimate (rare; the exact path is the reference).

    Args:
        model: an ``nn.Module`` (or a batched callable when ``layers`` gives callables).
        x: inputs ``[batch, *input_shape]``, floating point.
        layers: see above.
        depths: the ℓ of each layer (positive ints), overriding the defaults.
        method: ``"auto"``, ``"exact"``, ``"lanczos"`` or ``"power"``.
        exact_max_dim: the ``"auto"`` threshold on the input size.
        tol: iterative paths: tolerance on the estimated error of ``log σ_max`` (nats; the exponent's error is
            this over ℓ).
        direction_tol: iterative paths: also iterate until the residual ``‖JᵀJv − σ²v‖/σ²`` is at most this
            (directions converge more slowly than exponents; ``None``: no requirement).
        max_iter: iterative paths: most iterations per layer.
        generator: iterative paths: the start vectors' ``torch.Generator`` (default: seeded with 0, so results
            are reproducible; the global RNG is never used).
        backend: iterative paths: ``"func"`` (JVP + VJP), ``"autograd"`` (double backward, for operations
            without forward-mode rules) or ``"auto"`` (the first, falling back to the second).

    Returns:
        `FTLEResult`.

    Raises:
        InputError: a malformed ``x``, unknown layer names, a layer whose output lost the batch dimension.
        ConfigError: a bad ``method``, ``depths``, ``tol`` or ``max_iter``.
    """
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] == 0 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(
            f"ftle: x must be a floating-point tensor [batch, *input_shape] with at least one sample, got {shape}"
            " (a single input: x.unsqueeze(0))"
        )
    if method not in ("auto", "exact", "power", "lanczos"):
        raise ConfigError(f"ftle: method must be 'auto', 'exact', 'lanczos' or 'power', got {method!r}")
    if not isinstance(model, nn.Module):
        if layers is None or not all(callable(s) and not isinstance(s, str) for s in layers):
            if not callable(model):
                raise InputError(f"ftle: model must be an nn.Module or a callable, got {type(model).__name__}")
            layers = [model]
        model = nn.Module()  # callables carry their own parameters
    names, fns, joint = _layer_functions(model, layers)
    if depths is None:
        depths = list(range(1, len(names) + 1))
        if isinstance(model, nn.Sequential) and layers is not None and all(isinstance(s, str) for s in layers):
            blocks = sequential_layers(model)
            children = list(dict(model.named_children()))
            depths = [sum(children.index(b) < children.index(n) for b in blocks) + 1 for n in names]
    depths = list(depths)
    if len(depths) != len(names) or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in depths):
        raise ConfigError(f"ftle: depths must be {len(names)} positive ints (one per layer {names}), got {depths!r}")
    use_exact = method == "exact" or (method == "auto" and x[0].numel() <= exact_max_dim)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    tops: list[TopSingular] = []
    with _eval_mode(model):
        if use_exact:
            with torch.no_grad():
                outs = joint(x[:1])
            for name, out in zip(names, outs, strict=True):
                if not isinstance(out, Tensor) or out.ndim < 1 or out.shape[0] != 1:
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise InputError(
                        f"ftle: layer {name!r} must keep the batch dimension first; a batch of 1 gave {got}"
                    )
            try:
                jacs = input_jacobian(joint, x)
            except (RuntimeError, NotImplementedError) as exc:
                if method == "exact":
                    raise InputError(
                        f"ftle: vmap(jacfwd) could not differentiate the model ({type(exc).__name__}: {exc}); "
                        "use method='power' (it falls back to reverse mode)"
                    ) from exc
                use_exact = False  # "auto": no functorch/forward-mode rule for some operation
            else:
                tops = [top_singular_of(j, x) for j in jacs]
        if not use_exact:
            iterate = power_top_singular if method == "power" else lanczos_top_singular
            for name, fn in zip(names, fns, strict=True):
                try:
                    tops.append(
                        iterate(
                            fn,
                            x,
                            tol=tol,
                            direction_tol=direction_tol,
                            max_iter=max_iter,
                            generator=gen,
                            backend=backend,
                        )
                    )
                except InputError as exc:
                    raise InputError(f"ftle: layer {name!r}: {exc}") from exc
    sigma = torch.stack([t.sigma for t in tops], dim=1)
    depth_t = torch.tensor(depths, dtype=torch.float64, device=sigma.device)
    return FTLEResult(
        exponents=torch.log(sigma) / depth_t,
        singular_values=sigma,
        directions=torch.stack([t.right for t in tops], dim=1),
        layers=names,
        depths=depths,
        method="exact" if use_exact else "power" if method == "power" else "lanczos",
        converged=torch.stack([t.converged for t in tops], dim=1),
        residual=torch.stack([t.residual for t in tops], dim=1),
        error=torch.stack([t.error for t in tops], dim=1),
        iterations=[t.iterations for t in tops],
        spectra=[t.spectrum for t in tops if t.spectrum is not None] if use_exact else None,
    )


@dataclass(frozen=True)
class FTLEField:
    """The maximal FTLE on a grid of a two-dimensional input space.

    Attributes:
        xs: ``[nx]`` grid coordinates of the first input component.
        ys: ``[ny]`` grid coordinates of the second.
        exponents: ``[ny, nx]`` float64, λ at the chosen layer (row ``i`` is ``ys[i]``).
        directions: ``[ny, nx, 2]`` stretching directions (unit vectors, defined up to sign).
        layer: the layer's name; depth: its ℓ.
    """

    xs: Tensor
    ys: Tensor
    exponents: Tensor
    directions: Tensor
    layer: str
    depth: int


def _resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(res) != 2 or any(not isinstance(r, int) or isinstance(r, bool) or r < 2 for r in res):
        raise ConfigError(f"ftle_field: resolution must be an int ≥ 2 or (nx, ny), got {resolution!r}")
    return res[0], res[1]


def ftle_field(
    model: nn.Module,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    resolution: int | tuple[int, int] = 100,
    *,
    layer: str | None = None,
    batch_size: int = 4096,
    **kwargs: Any,
) -> FTLEField:
    """λ and the stretching direction on a ``resolution`` grid over ``xlim × ylim`` (2-D inputs).

    Args:
        model: a model taking ``[batch, 2]`` inputs.
        xlim, ylim: ``(low, high)`` of each input component.
        resolution: points per axis (or ``(nx, ny)``).
        layer: which layer (default: the last of `ftle`'s layers, i.e. the output for ``nn.Sequential``).
        batch_size: grid points per `ftle` call.
        kwargs: passed to `ftle` (``layers``, ``depths``, ``method``…).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> field = ftle_field(net, (-1, 1), (-1, 1), 5)
        >>> tuple(field.exponents.shape), tuple(field.directions.shape), field.layer
        ((5, 5), (5, 5, 2), '2')
    """
    nx, ny = _resolution(resolution)
    for lim, nm in ((xlim, "xlim"), (ylim, "ylim")):
        if len(lim) != 2 or not lim[0] < lim[1]:
            raise ConfigError(f"ftle_field: {nm} must be (low, high) with low < high, got {lim!r}")
    param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    xs = torch.linspace(float(xlim[0]), float(xlim[1]), nx, dtype=dtype, device=device)
    ys = torch.linspace(float(ylim[0]), float(ylim[1]), ny, dtype=dtype, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    exps, dirs = [], []
    name, depth = "", 1
    for chunk in pts.split(batch_size):
        res = ftle(model, chunk, **kwargs)
        idx = len(res.layers) - 1 if layer is None else res.layers.index(layer) if layer in res.layers else -2
        if idx == -2:
            raise InputError(f"ftle_field: no layer {layer!r}; layers: {res.layers}")
        name, depth = res.layers[idx], res.depths[idx]
        exps.append(res.exponents[:, idx])
        dirs.append(res.directions[:, idx].reshape(-1, 2))
    return FTLEField(xs, ys, torch.cat(exps).reshape(ny, nx), torch.cat(dirs).reshape(ny, nx, 2), name, depth)


def plot_ftle_field(
    field: FTLEField,
    path: str | Path | None = None,
    *,
    points: Tensor | None = None,
    labels: Tensor | None = None,
    arrows: int = 20,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Draw the field (color: λ, diverging around 0) with its stretching directions (line segments,
    as the direction is defined up to sign) and optionally labelled points; save a PNG at ``path``.

    Needs matplotlib (``pip install matplotlib``). Returns the matplotlib ``Figure``.
    """
    try:
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from stabwatch.errors import MissingExtraError

        raise MissingExtraError("plot_ftle_field needs matplotlib: pip install matplotlib") from exc
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 4.4))
    else:
        fig = ax.figure
    lam = field.exponents.detach().cpu().double()
    finite = lam[torch.isfinite(lam)]
    vmax = float(finite.abs().max()) if finite.numel() else 1.0
    xs, ys = field.xs.detach().cpu().double(), field.ys.detach().cpu().double()
    mesh = ax.pcolormesh(xs.numpy(), ys.numpy(), lam.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, shading="auto")
    fig.colorbar(mesh, ax=ax, label=f"λ (layer {field.layer}, ℓ = {field.depth})")
    sx = max(1, len(xs) // arrows)
    sy = max(1, len(ys) // arrows)
    d = field.directions.detach().cpu().double()[::sy, ::sx]
    gx, gy = torch.meshgrid(ys[::sy], xs[::sx], indexing="ij")
    ax.quiver(
        gy.numpy(), gx.numpy(), d[..., 0].numpy(), d[..., 1].numpy(),
        pivot="middle", headwidth=0, headlength=0, headaxislength=0, color="k", alpha=0.6, width=0.003,
    )  # fmt: skip
    if points is not None:
        p = points.detach().cpu()
        c = None if labels is None else labels.detach().cpu().numpy()
        ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), c=c, s=4, cmap="coolwarm", edgecolors="none", alpha=0.5)
    ax.set_xlim(float(xs[0]), float(xs[-1]))
    ax.set_ylim(float(ys[0]), float(ys[-1]))
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


@dataclass(frozen=True)
class FTLEUncertainty:
    """λ against classification error and predictive entropy on a labelled set (binned by λ).

    Attributes:
        exponents: ``[n]`` float64, λ of each sample at the chosen layer.
        correct: ``[n]`` bool, the prediction (argmax, or ``output > 0`` for one output) is the label.
        entropy: ``[n]`` float64, predictive entropy in nats (softmax; sigmoid for one output).
        bin_edges: ``[bins + 1]`` λ quantile edges (equal-count bins).
        error_rate: ``[bins]`` fraction misclassified per bin; mean_entropy: ``[bins]``.
        counts: ``[bins]`` samples per bin.
        corr_error: Spearman rank correlation of λ with the 0/1 error; corr_entropy: with the entropy.
    """

    exponents: Tensor
    correct: Tensor
    entropy: Tensor
    bin_edges: Tensor
    error_rate: Tensor
    mean_entropy: Tensor
    counts: Tensor
    corr_error: float
    corr_entropy: float


def _rank(t: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), float64."""
    order = torch.argsort(t, stable=True)
    ranks = torch.empty_like(t, dtype=torch.float64)
    ranks[order] = torch.arange(t.numel(), dtype=torch.float64, device=t.device)
    uniq, inv = torch.unique(t, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64, device=t.device).index_add_(0, inv, ranks)
    cnt = torch.zeros(uniq.numel(), dtype=torch.float64, device=t.device).index_add_(0, inv, torch.ones_like(ranks))
    return (sums / cnt)[inv]


def _spearman(a: Tensor, b: Tensor) -> float:
    ra, rb = _rank(a.double()), _rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def ftle_uncertainty(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    *,
    bins: int = 10,
    layer: str | None = None,
    **kwargs: Any,
) -> FTLEUncertainty:
    """Relate λ(x) to the classification error and the predictive entropy on a labelled set.

    The model's output on ``x`` gives the prediction and its entropy (``[n, C]`` logits: softmax;
    ``[n]``/``[n, 1]``: a logit of class 1, sigmoid); λ comes from `ftle` at ``layer`` (default the last).
    Samples are binned into ``bins`` equal-count λ bins; a classifier whose errors sit on FTLE ridges has
    an error rate rising with λ and a positive ``corr_error``.
    """
    if not isinstance(labels, Tensor) or labels.shape[:1] != x.shape[:1]:
        raise InputError(
            f"ftle_uncertainty: labels must be a tensor with one label per input ({x.shape[0]}), "
            f"got {tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    if not isinstance(bins, int) or bins < 1:
        raise ConfigError(f"ftle_uncertainty: bins must be a positive int, got {bins!r}")
    res = ftle(model, x, **kwargs)
    idx = len(res.layers) - 1 if layer is None else res.layers.index(layer) if layer in res.layers else -1
    if layer is not None and layer not in res.layers:
        raise InputError(f"ftle_uncertainty: no layer {layer!r}; layers: {res.layers}")
    lam = res.exponents[:, idx]
    with _eval_mode(model), torch.no_grad():
        out = model(x).detach().to(torch.float64)
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        z = out.reshape(-1)
        p1 = torch.sigmoid(z)
        probs = torch.stack([1 - p1, p1], dim=1)
        pred = (z > 0).long()
    elif out.ndim == 2:
        probs = torch.softmax(out, dim=1)
        pred = out.argmax(dim=1)
    else:
        raise InputError(f"ftle_uncertainty: expected logits [n, C] or [n], got output shape {tuple(out.shape)}")
    correct = pred.cpu() == labels.reshape(-1).long().cpu()
    entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(dim=1).cpu()
    lam_c = lam.cpu()
    finite = torch.isfinite(lam_c)
    q = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    edges = torch.quantile(lam_c[finite], q) if bool(finite.any()) else torch.zeros(bins + 1, dtype=torch.float64)
    which = torch.bucketize(lam_c.contiguous(), edges[1:-1].contiguous(), right=True).clamp(0, bins - 1)
    counts = torch.bincount(which, minlength=bins).double()
    errors = torch.bincount(which, weights=(~correct).double(), minlength=bins)
    ent = torch.bincount(which, weights=entropy, minlength=bins)
    safe = counts.clamp_min(1)
    err_rate = torch.where(counts > 0, errors / safe, torch.full_like(counts, math.nan))
    mean_ent = torch.where(counts > 0, ent / safe, torch.full_like(counts, math.nan))
    lam_r = torch.where(finite, lam_c, torch.full_like(lam_c, -1e300))
    return FTLEUncertainty(
        exponents=lam,
        correct=correct,
        entropy=entropy,
        bin_edges=edges,
        error_rate=err_rate,
        mean_entropy=mean_ent,
        counts=counts.long(),
        corr_error=_spearman(lam_r, (~correct).double()),
        corr_entropy=_spearman(lam_r, entropy),
    )
