"""Sharpness during training: the top Hessian eigenvalue of the loss and the edge-of-stability ratio.

At a scheduled step (after ``optimizer.step()``, so at the parameters the next step starts from) the
collector evaluates ``loss_fn(model, probe)`` once with ``create_graph=True`` and runs Lanczos on
Hessian-vector products through that graph (`stabwatch.functional.hessian_top_eigenvalues`), warm-started
from the previous record's eigenvector. The optimizer's hyperparameters turn ``λ_max`` into the
edge-of-stability ratio (`stabwatch.functional.edge_of_stability_ratio`): above 1, a quadratic model of
the loss with this curvature diverges along its top eigenvector; full-batch gradient descent tends to
hover at 1 ("the edge of stability", Cohen et al. 2021). For Adam/AdamW the update sees ``P⁻¹H`` with
``P = diag(sqrt(v̂) + ε)`` from the optimizer state, and a second Lanczos run gives its top eigenvalue
and the ratio that governs Adam (`stabwatch.functional.adam_edge_of_stability_ratio`).

Keys (``record.extra``; empty on unscheduled steps):

* ``sharpness/max``: ``λ_max`` of the loss's Hessian on the probe batch (loss units per parameter unit²);
* ``sharpness/eos_ratio``: the edge-of-stability ratio of the optimizer: SGD ``η(1−d)λ_max / (2+2μ)``
  (``η λ_max / 2`` without momentum; Nesterov ``η(1+2μ)λ_max / (2+2μ)``); Adam/AdamW
  ``η(1−β₁)λ_max(P⁻¹H) / (2+2β₁)``. Not emitted for other optimizers, for parameter groups with different
  hyperparameters, or for Adam before its first step;
* ``sharpness/preconditioned_max``: ``λ_max(P⁻¹H)`` (Adam/AdamW, ``preconditioned=True``).

Training is unchanged (weights bit for bit, tested): the Hessian is taken on detached copies of the
parameters through `torch.func.functional_call` (``.grad`` and the optimizer are never touched), buffers
are cloned for the probe's forward (BatchNorm's running statistics are not updated), the global RNG is
forked around it (dropout draws the same numbers it would have), the monitor's own module hooks are paused,
and modules' train/eval flags are restored. Hooks the user registered on the model do see the probe's
forward pass.

Cost per record: one forward and backward with ``create_graph=True`` plus up to ``n_iter`` backward
passes through that graph (about two backward passes' work each), twice for Adam; memory: the
double-backward graph, ``n_iter`` vectors the size of the trainable parameters during the call and one
(two for Adam) kept between records for the warm start.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.errors import ConfigError
from stabwatch.functional.hessian import (
    HessianEigen,
    adam_edge_of_stability_ratio,
    adam_preconditioner,
    edge_of_stability_ratio,
    hessian_top_eigenvalues,
)

__all__ = ["SharpnessCollector"]

log = logging.getLogger("stabwatch")

#: offset of this collector's generator seed from the monitor's seed (its own stream of random starts)
_SEED_OFFSET = 0x5A49


class _LossOf(nn.Module):
    """``loss_fn(model, batch)`` as a module whose forward is that loss, so `torch.func.functional_call`
    can swap the model's parameters and buffers for the call."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = [loss_fn]  # a list: a loss that is itself a module is not made a submodule

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_fn[0](self.model, batch)


class SharpnessCollector(Collector):
    """Top Hessian eigenvalue of the loss on a probe batch, and the edge-of-stability ratio, on a schedule.

    Off in the ``cheap`` and ``default`` presets; pass it configured::

        sharp = sw.collectors.SharpnessCollector(every=500, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                                                 probe=fixed_batch)
        with sw.Monitor(model, opt, collectors=[sharp]) as mon: ...

    Without a ``loss_fn`` (e.g. ``Monitor(every={"sharpness": 100})``) it measures nothing and says so once.

    Args:
        every: the schedule (default 2000 steps: 1.6 % (SGD) and 2.2 % (Adam) of the training time of a
            784-256-256-10 MLP, measured by ``benchmarks/bench_sharpness.py``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``, the training loss of ``model`` on ``batch``; it
            must call the ``model`` it is given (the collector swaps its parameters for the call).
        probe: the batch the loss is evaluated on (drawn once, e.g. with a generator of your own). ``None``:
            the step's own batch, ``Monitor.step(batch=...)``. A fixed probe makes records comparable
            across steps; the step's batch follows the data the optimizer saw.
        n_iter: at most this many Hessian-vector products per Lanczos run.
        tol: stop a run when the top residual ``‖Hy − θy‖`` is at most ``tol · θ`` (error of θ about
            ``tol² θ² / gap``).
        preconditioned: for Adam/AdamW also compute ``λ_max(P⁻¹H)`` and take the ratio from it.
        eval_mode: evaluate the probe with the model in eval mode (dropout off, BatchNorm running
            statistics). Default: the model's own mode (in training: dropout on, with the masks the next
            training step would draw; BatchNorm batch statistics).

    Example:
        >>> import torch, stabwatch as sw
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 1, bias=False); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x = torch.randn(64, 3); y = x.sum(1, keepdim=True)
        >>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> sharp = sw.collectors.SharpnessCollector(every=4, loss_fn=mse, probe=(x, y))
        >>> with sw.Monitor(model, opt, preset="cheap", collectors=[sharp], alerts=False) as mon:
        ...     for _ in range(5):
        ...         opt.zero_grad(); loss = mse(model, (x, y)); loss.backward(); opt.step()
        ...         rec = mon.step(loss=loss)
        >>> exact = torch.linalg.eigvalsh(2 * x.T @ x / 64).max()  # the Hessian of least squares
        >>> abs(rec.get("sharpness/max") - exact.item()) < 1e-4, rec.get("sharpness/eos_ratio") < 1
        (True, True)
    """

    family = "sharpness"
    default_every = 2000

    class Options(CollectorOptions):
        loss_fn: Callable[..., Any] | None = None
        probe: Any = None
        n_iter: int = Field(default=20, ge=1)
        tol: float = Field(default=1e-3, gt=0)
        preconditioned: bool = True
        eval_mode: bool = False

    loss_fn: Callable[..., Any] | None
    probe: Any
    n_iter: int
    tol: float
    preconditioned: bool
    eval_mode: bool

    def __init__(self, every: Any = 2000, **options: Any) -> None:
        super().__init__(every, **options)
        self._generator: torch.Generator | None = None
        self._vectors: dict[str, torch.Tensor] = {}  # warm starts: "plain", "preconditioned"
        #: the last measurement's full results (`stabwatch.functional.HessianEigen`: values, residuals,
        #: products taken, converged), by run: ``"plain"`` and, for Adam, ``"preconditioned"``
        self.last: dict[str, HessianEigen] = {}
        self._restore: dict[str, Any] | None = None
        self._warned: set[str] = set()

    # ----------------------------------------------------------------------------------- lifecycle
    def setup(self, ctx: MonitorContext) -> None:
        self._generator = torch.Generator().manual_seed((ctx.generator.initial_seed() + _SEED_OFFSET) % 2**63)
        self._warned = set()
        if self._restore is not None:
            self._apply(self._restore)
            self._restore = None
        else:
            self._vectors = {}
        if self.loss_fn is None:
            self._warn(
                "no_loss",
                "stabwatch: the sharpness family has no loss_fn and measures nothing; pass "
                "collectors=[sw.collectors.SharpnessCollector(loss_fn=lambda model, batch: ..., probe=batch)]",
            )

    def _warn(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def state_dict(self) -> dict[str, Any]:
        """The warm-start eigenvectors and the generator of random starts: a resumed run measures what an
        uninterrupted one does. ``{"vectors": {name: tensor}, "generator": tensor or None}``."""
        gen = self._generator.get_state() if self._generator is not None else None
        return {"vectors": dict(self._vectors), "generator": gen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output, before or after the monitor starts."""
        if not isinstance(state, dict) or not isinstance(state.get("vectors", {}), dict):
            raise ConfigError(
                "SharpnessCollector.load_state_dict: expected {'vectors': {name: tensor}, 'generator': tensor}, "
                f"got {state!r:.80}"
            )
        if self.ctx is None:
            self._restore = state
        else:
            self._apply(state)

    def _apply(self, state: dict[str, Any]) -> None:
        self._vectors = {str(k): v for k, v in state.get("vectors", {}).items() if isinstance(v, torch.Tensor)}
        gen = state.get("generator")
        if isinstance(gen, torch.Tensor) and self._generator is not None:
            self._generator.set_state(gen)

    # ------------------------------------------------------------------------------------- collect
    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        ctx = self.ctx
        if ctx is None or self.loss_fn is None or not ctx.params:
            return
        data = self.probe if self.probe is not None else batch
        if data is None:
            self._warn(
                "no_batch",
                "stabwatch: SharpnessCollector has no probe batch and Monitor.step got no batch=; pass "
                "probe= to the collector or batch= to Monitor.step (sharpness stays empty)",
            )
            return
        reduce = None if self.probe is not None else "mean"  # each rank's own batch: average over ranks
        params = [p for _, p in ctx.params]
        hyper = self._hyperparameters(ctx, params)
        plain = self._top(ctx, data, params, None, "plain")
        readout.add_extra("sharpness/max", plain.values[0], reduce=reduce)
        if hyper is None:
            return
        if hyper[0] == "sgd":
            _, lr, momentum, dampening, nesterov = hyper
            ratio = edge_of_stability_ratio(
                float(plain.values[0]), lr, momentum=momentum, dampening=dampening, nesterov=nesterov
            )
            readout.add_extra("sharpness/eos_ratio", _f64(ratio), reduce=reduce)
            return
        if not self.preconditioned:
            return
        _, lr, beta1 = hyper
        assert ctx.optimizer is not None
        pre = adam_preconditioner(ctx.optimizer, params)
        if pre is None:  # before the first step: no second moment yet
            return
        precond = self._top(ctx, data, params, pre, "preconditioned")
        readout.add_extra("sharpness/preconditioned_max", precond.values[0], reduce=reduce)
        ratio = adam_edge_of_stability_ratio(float(precond.values[0]), lr, beta1)
        readout.add_extra("sharpness/eos_ratio", _f64(ratio), reduce=reduce)

    def _top(
        self, ctx: MonitorContext, data: Any, params: list[nn.Parameter], pre: Sequence[torch.Tensor] | None, name: str
    ) -> HessianEigen:
        names = [n for n, _ in ctx.params]
        wrapper = _LossOf(ctx.model, self.loss_fn)  # type: ignore[arg-type]
        with self._isolated(ctx):
            # clones: a forward in training mode updates BatchNorm's running statistics in place
            buffers = {f"model.{n}": b.clone() for n, b in ctx.model.named_buffers()}

            def loss_of(ps: tuple[torch.Tensor, ...]) -> torch.Tensor:
                swapped = {f"model.{n}": p for n, p in zip(names, ps, strict=True)}
                return torch.func.functional_call(wrapper, {**swapped, **buffers}, (data,))

            result = hessian_top_eigenvalues(
                loss_of,
                params,
                1,
                preconditioner=pre,
                n_iter=self.n_iter,
                tol=self.tol,
                v0=self._vectors.get(name),
                generator=self._generator,
            )
        self.last[name] = result
        if bool(torch.isfinite(result.values).all()):
            self._vectors[name] = result.vectors[0].detach()
        if not result.converged:
            log.debug("stabwatch: sharpness (%s) not converged in %d products", name, result.n_hvp)
        return result

    @contextlib.contextmanager
    def _isolated(self, ctx: MonitorContext) -> Iterator[None]:
        """The probe's forward and backward passes leave no trace: monitor hooks paused, RNG forked, modes kept."""
        model = ctx.model
        modes = [(m, m.training) for m in model.modules()]
        devices = sorted({p.device.index or 0 for _, p in ctx.params if p.device.type == "cuda"})
        with ctx.hooks_paused(), torch.random.fork_rng(devices=devices), torch.enable_grad():
            try:
                if self.eval_mode:
                    model.eval()
                yield
            finally:
                for m, training in modes:
                    m.training = training

    def _hyperparameters(self, ctx: MonitorContext, params: list[nn.Parameter]) -> tuple[Any, ...] | None:
        """``("sgd", lr, momentum, dampening, nesterov)``, ``("adam", lr, beta1)`` or ``None`` (no ratio)."""
        opt = ctx.optimizer
        if opt is None:
            return None
        groups = {id(p): g for g in opt.param_groups for p in g["params"]}
        mine = [groups.get(id(p)) for p in params]
        if any(g is None for g in mine):
            self._warn(
                "not_in_optimizer",
                "stabwatch: some trainable parameters are not in the optimizer; sharpness/eos_ratio is not emitted",
            )
            return None
        if isinstance(opt, torch.optim.SGD):
            keys: tuple[str, ...] = ("lr", "momentum", "dampening", "nesterov")
            kind = "sgd"
        elif isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            keys = ("lr", "betas")
            kind = "adam"
        else:
            return None
        settings = {tuple(_plain(g[k]) for k in keys) for g in mine if g is not None}
        if len(settings) != 1:
            self._warn(
                "groups",
                "stabwatch: the optimizer's parameter groups have different %s; sharpness/eos_ratio is not emitted",
                "/".join(keys),
            )
            return None
        (values,) = settings
        if kind == "sgd":
            lr, momentum, dampening, nesterov = values
            return ("sgd", float(lr), float(momentum), float(dampening), bool(nesterov))
        lr, betas = values
        return ("adam", float(lr), float(betas[0]))


def _f64(value: float) -> torch.Tensor:
    """A host float as a float64 tensor (`Readout` would make a float32 one)."""
    return torch.tensor(value, dtype=torch.float64)


def _plain(value: Any) -> Any:
    """A hyperparameter as a hashable plain value (a tensor learning rate becomes a float)."""
    if isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value
