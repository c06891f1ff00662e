"""The shadow replica: the largest Lyapunov exponent of the training dynamics, measured online.

A copy of the model *and* its optimizer state (momentum, Adam moments, step counts) is perturbed by a
random direction of relative size ε and trained in lockstep with the real model: the same batch, the
same dropout masks (the real step's RNG state is replayed), the same hyperparameters (learning-rate
schedules are followed), the same AMP loss scale. Training is a map s_{t+1} = F_t(s_t) on the state
s = (θ, optimizer state); the shadow measures how it stretches a small difference δ = s̃ − s.

Benettin renormalisation: every ``renorm`` steps the log growth of the parameter divergence is added to a
float64 sum and the whole difference (parameters and optimizer state) is scaled back to ``ε·‖θ_t‖``:

    λ_local = log(‖δθ_end‖ / ‖δθ_start‖) / renorm,       λ = Σ log growth / steps.

λ > 0: small differences amplified over the steps measured; λ < 0: they died out. A window gives a
*finite-time* exponent: the growth rate over its steps from the direction it started with, which tends to
the asymptotic (largest Lyapunov) exponent only as the direction aligns and the steps add up. For
full-batch gradient descent on least squares, θ ↦ (I − ηH)θ + ηb, the asymptotic value is
λ = log max_i |1 − η·h_i|; a finite window can differ from it, even in sign (momentum's non-normal
transient makes 20 steps from rest read positive on a convex quadratic, see ``docs/shadow.md``).

Windows are short (20 steps by default) and spaced (every 200), so each window starts from the difference
the previous one ended with (``carry``) — the direction keeps aligning from window to window — and the
average leaves out a transient sized from the window's own per-step log growth (``transient="auto"``).

The real model's training is unchanged bit for bit on CPU: the replica has its own tensors and optimizer,
the monitor's hooks are not copied into it, and the global RNG is restored after each shadow step.

This module is the policy: when windows open and close, the perturbation, the renormalisation, the
log-growth sums and the transient. The mechanism (copying the model without the monitor's hooks, pairing
its tensors, cloning the optimizer, replaying the RNG and the AMP loss scale) is
`stabwatch.collectors._replica`, each piece tested on its own in ``tests/test_shadow_replica.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from stabwatch.collectors._replica import (
    Replica,
    RngState,
    ScaledStep,
    StatePairs,
    clone_optimizer,
    follow_hyperparameters,
    fused_step_skipped,
    is_grad_scaler,
    isolated_rng,
    loss_scale,
    paired_state,
)
from stabwatch.collectors.base import Collector, MonitorContext, Readout
from stabwatch.errors import ConfigError, StabwatchError
from stabwatch.functional.lyapunov import (
    clamp_min_,
    difference_norms,
    global_norm,
    min_relative_eps,
    random_direction,
    rescale_difference_,
    scaled_difference,
    truncated_mean,
)

__all__ = ["Shadow", "ShadowEstimate"]

log = logging.getLogger("stabwatch")

#: offset of the shadow's generator seed from the monitor's seed
_SEED_OFFSET = 0x5AD0

LossFn = Callable[[nn.Module, Any], torch.Tensor]
StepFn = Callable[[nn.Module, torch.optim.Optimizer, Any], Any]


class ShadowEstimate(NamedTuple):
    """One finished window.

    Attributes:
        start: the step whose forward pass the shadow first took (it was spawned just before it).
        stop: the last step the shadow took.
        lyapunov: the window's estimate, nats per optimizer step.
        steps: how many steps the estimate averages over (window − transient).
    """

    start: int
    stop: int
    lyapunov: float
    steps: int


@dataclass
class _Window:
    """A shadow in flight: its replica, optimizer and the renormalisation bookkeeping."""

    start: int
    replica: Replica
    optimizer: torch.optim.Optimizer
    real_params: list[torch.Tensor]
    shadow_params: list[torch.Tensor]
    layers: list[str]  # owners of the parameters, for per-layer divergence
    owner_idx: torch.Tensor
    log_sum: torch.Tensor  # float64, summed log growth after the transient
    d_start: torch.Tensor  # float64, ‖δθ‖ at the last renormalisation (or transient end)
    d_prev: torch.Tensor  # float64, ‖δθ‖ at the end of the previous step (after any renormalisation)
    started: bool
    n: int = 0  # map steps taken
    n_start: int = 0  # step count when averaging started
    last_mark: int = 0  # step count of the last renormalisation
    stop: int = -1
    growth: torch.Tensor | None = None  # transient="auto": float64 log growth of each step so far
    cut: torch.Tensor | None = None  # transient="auto": the data-sized transient of the steps so far


@dataclass
class _Direction:
    """The difference a closed window ended with, scaled to ‖δθ‖ = 1: where the next window starts."""

    params: list[torch.Tensor]  # one per trainable parameter, in optimizer order
    state: list[torch.Tensor]  # the paired floating optimizer state (`paired_state` order)


class Shadow(Collector):
    """A perturbed replica trained in lockstep: the online Lyapunov exponent of training.

    Every ``every`` steps a shadow is spawned from the current model and optimizer state, perturbed by a
    difference δ with ``‖δθ‖ = eps·‖θ‖`` (one global norm over all parameters the optimizer updates), and
    advanced with the real batches for ``window`` steps. ``continuous=True`` keeps one shadow for the whole
    run. Every ``renorm`` steps the difference is measured, its log growth summed in float64, and the whole
    difference (parameters and floating optimizer state shaped like them) rescaled to ``eps·‖θ_t‖``:

        λ_local = log(‖δθ_t‖ / ‖δθ_{t−m}‖) / m,      λ = Σ_{after transient} log growth / (n − transient).

    The starting direction (``carry=True``, the default): the first window starts along a Gaussian
    direction, drawn from a ``torch.Generator`` seeded with the monitor's seed (never the global RNG, and
    not the monitor's generator itself, so other collectors' random probes do not change). When a window
    closes, the difference it ended with — parameters *and* optimizer state, scaled to ``‖δθ‖ = 1`` — is
    kept, and the next window starts from it at ``eps·‖θ‖``. A random direction holds only ~1/n of its
    size along the most expanding direction, and 20 steps from it measure the random direction rather
    than the dynamics (on 500-parameter least squares with λ = +0.095 the former fresh-direction windows
    read −0.03…−0.09); a carried direction has been aligned by every earlier window's steps, so window k
    starts ~20·(k−1) steps aligned at no extra cost. The optimizer state's difference rides along because a
    momentum difference reset to zero restarts momentum's transient each window (heavy ball: −0.029 for
    an exact −0.053). A window that was dropped (a failure) leaves no direction: the next starts random.

    The transient (``transient="auto"``, the default): the per-step log growth of the window is kept (one
    float64 per step) and the average leaves out the leading steps that `truncated_mean` (MSER) finds to
    be a transient — the cut that minimises the standard error of what is left, at most half the steps.
    Aligning from a random direction is a rising trend and is cut; a carried, aligned window is
    stationary and is averaged whole (a slowly rising one still loses up to half its steps, which costs
    variance, not bias). ``continuous=True`` sizes it once, from the first ``window`` steps. An integer
    ``transient`` fixes it instead (the former behaviour with ``transient=0, carry=False``).

    Accuracy at the defaults (``tests/test_shadow_defaults.py``, ``benchmarks/bench_shadow.py --accuracy``):
    on least squares with 500 parameters, exact +0.0953, the windows read +0.069, +0.092, +0.094, +0.095
    (within 0.001 from the third window); exact −0.0631 (the top exponent at the dense lower edge of the
    spectrum), −0.102, −0.082, −0.074, −0.070, −0.068 (within 0.005 from the fifth). The sign is right from
    the first window in both; a single value is a finite-time exponent (see ``docs/shadow.md``).

    Keys (emitted at every step a shadow advanced; empty otherwise):

    * ``shadow/divergence`` (``shadow_divergence``): ``‖θ̃_t − θ_t‖ / ‖θ_t‖`` before renormalisation;
    * ``shadow/lyapunov`` (``lyapunov``): the running estimate of the window, nats per step (after the
      transient);
    * ``shadow/lyapunov_local`` (``lyapunov_local``): the exponent of the interval that just ended (at
      renormalisation steps);
    * ``shadow_layers/divergence/<module>`` (``layers[module]["shadow_divergence"]``, with ``per_layer=True``):
      ``‖θ̃_l − θ_l‖ / ‖θ‖`` for the parameters module ``l`` owns (their squares sum to the global one's).

    Finished windows are kept in `estimates` (`ShadowEstimate`).

    Checkpoints: `state_dict` (part of ``Monitor.state_dict()``) saves an open window whole — the
    replica's parameters and buffers, its optimizer state and the renormalisation bookkeeping — and the
    carried direction between windows, so a run
    resumed from a checkpoint continues the window and emits the ``shadow/*`` values an uninterrupted
    run would, bit for bit. A state taken after the monitor closed has no window (closing frees the
    replica): the next window then starts at the next scheduled step.

    Cost: while a window is open, one extra forward + backward + optimizer step per step and one copy of
    the model and optimizer state; the duty cycle is ``window / every``. Between windows, with ``carry``,
    the kept direction (the size of the parameters plus the optimizer state shaped like them). Spawning
    deep-copies the model (``offload=True`` keeps the copy's structure on the CPU between windows and
    refreshes its tensors).
    No host sync per step except with a ``scaler`` (its scale is read with ``GradScaler.get_scale()``, and
    the replica's ``GradScaler`` step checks its gradients for overflow).

    Args:
        loss_fn: ``loss_fn(model, batch) -> loss`` computing the training loss of ``model`` on ``batch``
            (the value passed to ``Monitor.step(batch=...)``). It must use its ``model`` argument.
        every: spawn a shadow every this many steps (or a ``step -> bool`` schedule).
        window: steps each shadow is trained for (≤ ``every``).
        eps: relative size of the perturbation and of the renormalised difference, ‖δ‖/‖θ‖. Must be at
            least ``100 × machine epsilon`` of the parameters' dtype (1.2e-5 for float32); 1e-4…1e-3 is
            safe in float32.
        renorm: renormalise every this many steps; ``None`` never (the raw divergence over the window).
        transient: ``"auto"``: the steps at the start of each window left out of ``lyapunov`` are sized
            from the window's per-step log growth (MSER, at most half the window); an int: that many
            steps, fixed.
        carry: start each window from the difference the previous one ended with (parameters and
            optimizer state), instead of a new random direction. Between windows this keeps one unit
            copy of the trainable parameters and of the optimizer state shaped like them (on the CPU with
            ``offload=True``).
        continuous: one shadow for the whole run (re-spawned at the next ``every`` step if it had to be
            dropped).
        per_layer: also emit the per-module divergence.
        offload: keep the replica on the CPU between windows instead of freeing it.
        scaler: the ``torch.amp.GradScaler`` of the training loop (read through ``get_scale()`` and
            ``is_enabled()``): the replica's loss is scaled by the scale the real step used and unscaled
            by a ``GradScaler`` holding it, the real step's arithmetic. With a fused optimizer call
            ``Monitor.step`` after ``scaler.update()`` (a skipped step shows in the backed-off scale).
        step_fn: instead of ``loss_fn``, ``step_fn(model, optimizer, batch)`` performing one full training
            step on the replica (for clipping, closures, several backward passes).
        saturation: warn (once) when the divergence exceeds this fraction of ‖θ‖.

    Raises:
        StabwatchError: on settings that cannot work (see the message), also at ``Monitor`` start: no
            optimizer, no parameters, an ``eps`` below what the parameters' dtype resolves.

    Example:
        >>> import torch, stabwatch as sw
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x = torch.randn(32, 3); y = x.sum(1, keepdim=True)
        >>> mse = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> shadow = sw.Shadow(loss_fn=mse, every=10, window=10)  # transient="auto", carry=True
        >>> with sw.Monitor(model, opt, shadow=shadow, preset="cheap", alerts=False) as mon:
        ...     for _ in range(10):
        ...         opt.zero_grad(); loss = mse(model, (x, y)); loss.backward(); opt.step()
        ...         rec = mon.step(loss=loss, batch=(x, y))
        >>> rec.lyapunov < 0  # gradient descent on a convex quadratic contracts
        True
    """

    family = "shadow"
    always_collect = True  # a window advances at every step, emitted or not

    def __init__(
        self,
        loss_fn: LossFn | None = None,
        *,
        every: Any = 200,
        window: int = 20,
        eps: float = 1e-3,
        renorm: int | None = 1,
        transient: int | str = "auto",
        carry: bool = True,
        continuous: bool = False,
        per_layer: bool = False,
        offload: bool = False,
        scaler: Any = None,
        step_fn: StepFn | None = None,
        saturation: float = 0.1,
    ) -> None:
        if (loss_fn is None) == (step_fn is None):
            raise StabwatchError(
                "Shadow: pass exactly one of loss_fn(model, batch) -> loss or step_fn(model, optimizer, "
                f"batch); got loss_fn={loss_fn!r}, step_fn={step_fn!r}"
            )
        for name, fn in (("loss_fn", loss_fn), ("step_fn", step_fn)):
            if fn is not None and not callable(fn):
                raise StabwatchError(f"Shadow: {name} must be callable, got {type(fn).__name__}")
        if every is None or every == 0:
            raise StabwatchError(
                "Shadow: every must be a positive int or a step -> bool schedule, got "
                f"{every!r} (to turn the shadow off, do not pass one to Monitor)"
            )
        super().__init__(every)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise StabwatchError(f"Shadow: window must be an int ≥ 1, got {window!r}")
        if isinstance(every, int) and not continuous and window > every:
            raise StabwatchError(
                f"Shadow: window ({window}) must be ≤ every ({every}), windows cannot overlap; use "
                "continuous=True for one shadow over the whole run"
            )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0:
            raise StabwatchError(f"Shadow: eps is relative to ‖θ‖ and must be in (0, 1), got {eps!r}")
        if renorm is not None and (isinstance(renorm, bool) or not isinstance(renorm, int) or renorm < 1):
            raise StabwatchError(f"Shadow: renorm must be None (never) or an int ≥ 1, got {renorm!r}")
        if transient != "auto" and (isinstance(transient, bool) or not isinstance(transient, int) or transient < 0):
            raise StabwatchError(f'Shadow: transient must be "auto" or an int ≥ 0, got {transient!r}')
        if not isinstance(carry, bool):
            raise StabwatchError(f"Shadow: carry must be True or False, got {carry!r}")
        if isinstance(transient, int) and not continuous and transient >= window:
            raise StabwatchError(f"Shadow: transient ({transient}) must be < window ({window}), or no step is averaged")
        if not isinstance(saturation, (int, float)) or not saturation > 0:
            raise StabwatchError(f"Shadow: saturation must be > 0, got {saturation!r}")
        if scaler is not None and not is_grad_scaler(scaler):
            raise StabwatchError(f"Shadow: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.loss_fn = loss_fn
        self.step_fn = step_fn
        self.window = window
        self.eps = float(eps)
        self.renorm = renorm
        self.transient = transient
        self._auto = transient == "auto"
        self.carry = carry
        self.continuous = continuous
        self.per_layer = per_layer
        self.offload = offload
        self.scaler = scaler
        self.saturation = float(saturation)
        #: finished windows, oldest first
        self.estimates: list[ShadowEstimate] = []
        self._window: _Window | None = None
        self._cached: Replica | None = None
        self._generator: torch.Generator | None = None
        #: a state loaded before the monitor attached the shadow, applied in `setup`
        self._restore: dict[str, Any] | None = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._rng_state: RngState | None = None
        self._real_steps = 0
        self._scale: float | None = None
        self._closed_now: tuple[int, int, int] | None = None
        self._warned: set[str] = set()
        self._spawned = False
        self._windows_opened = 0
        #: the unit difference the last closed window ended with (``carry=True``), the next one's start
        self._direction: _Direction | None = None

    # ------------------------------------------------------------------------------------- lifecycle
    def setup(self, ctx: MonitorContext) -> None:
        if ctx.optimizer is None:
            raise StabwatchError(
                "Shadow: the monitor has no optimizer; the shadow replays the optimizer's steps, pass it "
                "as Monitor(model, optimizer, shadow=...)"
            )
        params = [p for g in ctx.optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params or sum(p.numel() for p in params) == 0:
            raise StabwatchError(
                f"Shadow: {type(ctx.model).__name__} has no trainable parameters in the optimizer; there is no "
                "training state to perturb"
            )
        not_float = sorted({str(p.dtype) for p in params if not p.is_floating_point()})
        if not_float:
            raise StabwatchError(f"Shadow: parameters must be floating point, got dtypes {not_float}")
        coarse = max({p.dtype for p in params}, key=lambda d: torch.finfo(d).eps)
        floor = min_relative_eps(coarse)
        if self.eps < floor:
            raise StabwatchError(
                f"Shadow: eps={self.eps:g} is below what {coarse} parameters resolve (relative ε ≥ "
                f"100·machine-eps = {floor:.2g}): each element would move by about {self.eps:g}·rms(θ) "
                f"while rounding moves it by {torch.finfo(coarse).eps:.2g}·|θ_i|, and the shadow collapses "
                "onto the real model; use eps in 1e-4…1e-3 for float32"
            )
        self._cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        if self._cuda_devices:
            if torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32:
                log.warning(
                    "stabwatch: Shadow on CUDA with TF32 matmuls/convolutions enabled: TF32 rounds inputs "
                    "to ~1e-3 relative, as large as the shadow's perturbation; set "
                    "torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False"
                )
            if not torch.are_deterministic_algorithms_enabled():
                log.info(
                    "stabwatch: Shadow on CUDA without deterministic algorithms; non-deterministic kernels "
                    "add round-off noise between the real model and the shadow"
                )
        # the monitor's seed, its own stream: drawing perturbations leaves the other collectors' random
        # probes (and training's global RNG) exactly as they are without the shadow
        self._generator = torch.Generator().manual_seed((ctx.generator.initial_seed() + _SEED_OFFSET) % 2**63)
        self._reset_run_state()
        # the RNG state at the start of the real forward pass, for the replica's dropout masks: first among
        # the root's pre-hooks; registered through the base class, so it is paused while the model is copied
        # and removed on detach (it returns at once while no window is open)
        self.add_hook(ctx.model.register_forward_pre_hook, self.guard(self._capture_rng), prepend=True)
        if self._restore is not None:  # load_state_dict ran before the monitor started
            self.load_state_dict(self._restore)

    def teardown(self) -> None:
        self._close(keep=False)
        self._cached = None

    # ------------------------------------------------------------------------------ optimizer hooks
    def before_optimizer_step(self) -> None:
        if self._window is None or self.scaler is None:
            return
        # the scale of this step's backward: update() has not run yet (one host sync per shadow step)
        self._scale = loss_scale(self.scaler)

    def after_optimizer_step(self) -> None:
        if self._window is not None:
            self._real_steps += 1

    def _capture_rng(self, module: nn.Module, args: Any) -> None:
        if self._window is None or self._rng_state is not None:
            return
        self._rng_state = RngState.capture(self._cuda_devices)

    # ----------------------------------------------------------------------------------- the window
    def begin_step(self, step: int) -> None:
        self._rng_state = None
        self._real_steps = 0
        self._scale = None
        self._closed_now = None
        if self._window is not None or self.ctx is None:
            return
        due = self.scheduled(step) or (self.continuous and not self._spawned)
        if due:
            self._spawned = True
            self._open(step)

    @contextlib.contextmanager
    def _monitor_hooks_paused(self) -> Iterator[None]:
        """Every collector's model hooks off the model (this one's too, even if the context does not list it)."""
        ctx = self.ctx
        assert ctx is not None
        with ctx.hooks_paused():
            own = self.suspend_hooks()
            try:
                yield
            finally:
                if own:
                    self.resume_hooks()

    def _replica(self, model: nn.Module) -> Replica:
        cached, self._cached = self._cached, None
        if cached is not None:
            cached.refresh()
            return cached
        return Replica.build(model, without=self._monitor_hooks_paused)

    def _open(self, step: int) -> None:
        ctx = self.ctx
        assert ctx is not None and ctx.optimizer is not None
        with torch.no_grad():
            replica = self._replica(ctx.model)
            opt = clone_optimizer(ctx.optimizer, replica.param_map)
            # the training state: parameters the optimizer updates (a frozen one would be a neutral
            # direction that never shrinks)
            real_params = [p for g in ctx.optimizer.param_groups for p in g["params"] if p.requires_grad]
            shadow_params: list[torch.Tensor] = [replica.param_map[id(p)] for p in real_params]
            theta = global_norm(real_params)
            theta_host = float(theta)  # one sync per window
            if not (math.isfinite(theta_host) and theta_host > 0):
                self._cached = replica if self.offload else None
                self.fail(
                    "shadow spawn",
                    StabwatchError(
                        f"‖θ‖ = {theta_host} at step {step}; a relative perturbation needs a "
                        "finite, non-zero parameter norm"
                    ),
                )
                return
            carried, self._direction = self._direction, None  # the window's difference holds it from here
            if not (carried is not None and self._start_from(carried, opt, real_params, shadow_params, theta_host)):
                assert self._generator is not None
                delta = random_direction(real_params, self._generator, self.eps * theta_host)
                for sp, dp in zip(shadow_params, delta):
                    sp.add_(dp)
            d0 = difference_norms(shadow_params, real_params).square().sum().sqrt()
        dev = d0.device
        layers, owner_idx = self._owners(real_params)
        window = _Window(
            start=step,
            replica=replica,
            optimizer=opt,
            real_params=real_params,
            shadow_params=shadow_params,
            layers=layers,
            owner_idx=torch.tensor(owner_idx, device=dev),
            log_sum=torch.zeros((), dtype=torch.float64, device=dev),
            d_start=d0,
            d_prev=d0,
            started=self._auto or self.transient == 0,
            growth=torch.zeros(self.window, dtype=torch.float64, device=dev) if self._auto else None,
        )
        self._window = window
        self._windows_opened += 1

    def _start_from(
        self,
        carried: _Direction,
        opt: torch.optim.Optimizer,
        real_params: list[torch.Tensor],
        shadow_params: list[torch.Tensor],
        theta: float,
    ) -> bool:
        """Perturb the fresh replica along the carried direction, ``‖δθ‖ = eps·‖θ‖``; ``False`` if it does
        not fit the parameters any more (the caller draws a random direction instead)."""
        if len(carried.params) != len(shadow_params) or any(
            c.shape != p.shape for c, p in zip(carried.params, shadow_params)
        ):
            return False
        scale = self.eps * theta
        for sp, c in zip(shadow_params, carried.params):
            sp.add_(c.to(device=sp.device, dtype=sp.dtype), alpha=scale)
        assert self.ctx is not None and self.ctx.optimizer is not None
        sh_state, _, nonneg = paired_state(self.ctx.optimizer, opt, real_params, shadow_params)
        if len(sh_state) == len(carried.state) and all(c.shape == t.shape for c, t in zip(carried.state, sh_state)):
            for t, c in zip(sh_state, carried.state):
                t.add_(c.to(device=t.device, dtype=t.dtype), alpha=scale)
            clamp_min_(nonneg, 0.0)
        return True

    def _keep_direction(self, w: _Window) -> tuple[_Direction, torch.Tensor]:
        """The difference the window ends with, scaled to ‖δθ‖ = 1 (the next window's start), and a
        float64 0-d flag on the device: 1 if the scale was finite (a collapsed difference is not kept)."""
        with torch.no_grad():
            inv = 1.0 / difference_norms(w.shadow_params, w.real_params).square().sum().sqrt()
            sh_state, re_state, _ = self._state_pairs(w)
            params = scaled_difference(w.shadow_params, w.real_params, inv)
            state = scaled_difference(sh_state, re_state, inv)
            if self.offload:
                params = [t.to("cpu") for t in params]
                state = [t.to("cpu") for t in state]
        return _Direction(params, state), torch.isfinite(inv).to(torch.float64)

    def _close(self, keep: bool = True) -> None:
        w, self._window = self._window, None
        if w is None:
            return
        w.optimizer.state.clear()
        if keep and self.offload:
            w.replica.offload("cpu")
            self._cached = w.replica

    def _drop(self, why: str) -> None:
        """Close the window after a failure; the next scheduled step spawns a new one."""
        self._close()
        self.fail("shadow", StabwatchError(why))

    # --------------------------------------------------------------------------------- shadow step
    def _advance(self, w: _Window, batch: Any) -> None:
        """One training step of the replica: the real step's batch, hyperparameters, modes, RNG and scale."""
        ctx = self.ctx
        assert ctx is not None and ctx.optimizer is not None
        follow_hyperparameters(w.optimizer, ctx.optimizer)
        w.replica.follow_modes()
        if self._rng_state is None and "rng" not in self._warned:
            self._warned.add("rng")
            log.warning(
                "stabwatch: Shadow saw no forward pass of the model's root module this step; random "
                "layers (dropout) of the shadow draw different numbers than the real model"
            )
        replay = self._rng_state.replayed() if self._rng_state is not None else isolated_rng(self._cuda_devices)
        with replay, torch.enable_grad():
            if self.step_fn is not None:
                self.step_fn(w.replica.model, w.optimizer, batch)
                w.optimizer.zero_grad(set_to_none=True)  # hold one copy of model and state, not grads
                return
            assert self.loss_fn is not None
            w.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(w.replica.model, batch)
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise StabwatchError(
                    "Shadow: loss_fn(model, batch) must return a differentiable loss tensor of the model "
                    f"it is given; got {type(loss).__name__}"
                )
            amp = ScaledStep(self._scale, loss.device)
            amp.backward(loss)
            if all(p.grad is None for p in w.shadow_params):
                raise StabwatchError(
                    "Shadow: loss_fn produced no gradient for the replica; it must compute the loss with "
                    "its `model` argument, not the real model"
                )
            if not amp.step(w.optimizer):
                raise StabwatchError(
                    "Shadow: the replica's scaled gradients overflowed while the real step's did not; the "
                    "shadow no longer follows the same map (eps or window too large)"
                )
            w.optimizer.zero_grad(set_to_none=True)

    def _state_pairs(self, w: _Window) -> StatePairs:
        """Floating optimizer-state tensors shaped like their parameter: (shadow, real, non-negative)."""
        ctx = self.ctx
        assert ctx is not None and ctx.optimizer is not None
        return paired_state(ctx.optimizer, w.optimizer, w.real_params, w.shadow_params)

    def _owners(self, params: list[torch.Tensor]) -> tuple[list[str], list[int]]:
        """Module paths owning ``params`` (in first-seen order) and each parameter's index into them."""
        assert self.ctx is not None
        layers: list[str] = []
        index: dict[str, int] = {}
        owner_idx: list[int] = []
        for p in params:
            owner = self.ctx.param_owner.get(id(p), "(root)")
            if owner not in index:
                index[owner] = len(layers)
                layers.append(owner)
            owner_idx.append(index[owner])
        return layers, owner_idx

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        w = self._window
        if w is None:
            return
        if self._real_steps == 0:
            return  # the real optimizer did not step (e.g. AMP skipped it): the map is the identity
        assert self.ctx is not None and self.ctx.optimizer is not None
        if fused_step_skipped(self.ctx.optimizer, self.scaler, self._scale):
            return  # a fused optimizer was called but did nothing (overflow): the identity too
        if self._real_steps > 1:
            self._drop(
                f"the optimizer stepped {self._real_steps} times in step {step}; the shadow replays "
                "one optimizer step per Monitor.step"
            )
            return
        if batch is None:
            self._drop(
                f"Monitor.step(batch=...) got no batch at step {step} while a shadow window is open; the "
                "shadow trains on the same batch as the real model — pass the batch to mon.step"
            )
            return
        try:
            self._advance(w, batch)
        except Exception:
            self._close()
            raise
        with torch.no_grad():
            w.n += 1
            w.stop = step
            per_tensor = difference_norms(w.shadow_params, w.real_params)
            d = per_tensor.square().sum().sqrt()
            theta = global_norm(w.real_params)
            readout.add("shadow_divergence", d / theta)
            if self.per_layer:
                sq = torch.zeros(len(w.layers), dtype=torch.float64, device=per_tensor.device)
                sq.index_add_(0, w.owner_idx, per_tensor.square())
                readout.add_layers("shadow_divergence", w.layers, sq.sqrt() / theta)
            growth = torch.log(d) - torch.log(w.d_start)
            since = w.n - w.last_mark
            if self._auto:
                self._auto_estimate(w, torch.log(d) - torch.log(w.d_prev), readout)
            elif w.started:
                readout.add("lyapunov", (w.log_sum + growth) / (w.n - w.n_start))
            renorm_now = self.renorm is not None and since >= self.renorm
            transient_end = not w.started and w.n >= int(self.transient)
            if renorm_now:
                readout.add("lyapunov_local", growth / since)
                if w.started and not self._auto:
                    w.log_sum = w.log_sum + growth
                sh_state, re_state, nonneg = self._state_pairs(w)
                rescale_difference_(w.shadow_params + sh_state, w.real_params + re_state, self.eps * theta / d)
                clamp_min_(nonneg, 0.0)
                w.d_start = difference_norms(w.shadow_params, w.real_params).square().sum().sqrt()
                w.last_mark = w.n
            w.d_prev = w.d_start if renorm_now else d
            if transient_end:
                w.started = True
                w.n_start = w.n
                w.log_sum = torch.zeros_like(w.log_sum)
                if not renorm_now:
                    w.d_start = d
                    w.last_mark = w.n
            if not self.continuous and w.n >= self.window:
                kept = self._keep_direction(w) if self.carry else None
                # one host sync per window: the transient's size and whether the kept direction is finite
                cut, finite = torch.stack(
                    [
                        (w.cut if w.cut is not None else torch.tensor(w.n_start, device=d.device)).to(torch.float64),
                        torch.ones((), dtype=torch.float64, device=d.device) if kept is None else kept[1],
                    ]
                ).tolist()
                if kept is not None and finite:
                    self._direction = kept[0]
                self._closed_now = (w.start, step, w.n - int(cut))
                self._close()

    def _auto_estimate(self, w: _Window, step_growth: torch.Tensor, readout: Readout) -> None:
        """``transient="auto"``: the mean log growth per step after a transient sized by `truncated_mean`.

        Within a window the per-step log growths are kept and the transient re-sized at every step (MSER:
        the cut that minimises the standard error of the mean of what is left, at most half the steps).
        In continuous mode the cut is fixed once, after ``window`` steps; from then on every step's growth
        is summed.
        """
        if w.growth is None:
            w.log_sum = w.log_sum + step_growth
            readout.add("lyapunov", w.log_sum / (w.n - w.n_start))
            return
        w.growth[w.n - 1] = step_growth
        value, w.cut = truncated_mean(w.growth[: w.n])
        readout.add("lyapunov", value)
        if self.continuous and w.n >= self.window:
            w.n_start = int(w.cut)  # one sync per run
            w.log_sum = w.growth[w.n_start :].sum()
            w.growth = w.cut = None

    def finish(self, step: int, readout: Readout, record: Any) -> None:
        div = getattr(record, "shadow_divergence", None)
        if div is not None and self._window is not None:
            if not math.isfinite(div):
                self._drop(f"the shadow's divergence is {div} at step {step}; the window is dropped")
            elif div == 0.0:
                self._drop(
                    f"the shadow collapsed onto the real model at step {step} (divergence 0): eps="
                    f"{self.eps:g} is lost in rounding; raise eps"
                )
            elif div >= self.saturation and "saturation" not in self._warned:
                self._warned.add("saturation")
                log.warning(
                    "stabwatch: Shadow divergence %.3g ≥ %.3g of ‖θ‖ at step %d: the difference is no "
                    "longer small and the exponent is underestimated; lower eps (%.3g) or renorm (%s)%s",
                    div,
                    self.saturation,
                    step,
                    self.eps,
                    self.renorm,
                    "" if self.renorm is not None else " — renorm=None lets it grow over the whole window",
                )
        if self._closed_now is not None:
            start, stop, steps = self._closed_now
            self._closed_now = None
            value = getattr(record, "lyapunov", None)
            if value is not None:
                self.estimates.append(ShadowEstimate(start, stop, float(value), steps))

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: finished estimates, the perturbation
        generator, the spawn bookkeeping and, while a window is open, the window itself.

        An open window is saved whole: the replica's parameters and buffers (in `Replica.tensors`
        order), its optimizer's ``state_dict()`` (momentum, moments, step counts), and the Benettin
        bookkeeping (steps taken, log-growth sum, last renormalisation). Loading it rebuilds the replica
        from the model and overwrites its tensors, so the resumed shadow continues the same window with
        bit-identical values on the same device and dtype. While a window is open the state therefore
        holds one more copy of the model and of the optimizer state; like ``Module.state_dict()`` the
        tensors are references (``torch.save`` them, or ``copy.deepcopy`` the dict to keep a snapshot).
        Between windows ``"direction"`` holds the carried unit difference (``{"params": [...], "state":
        [...]}``, or ``None``), so the next window starts where the uninterrupted run's would.
        Every value is a tensor or a plain Python value (``torch.load(weights_only=True)`` loads it).
        """
        if self._restore is not None:  # loaded before the monitor started and not applied yet
            return self._restore
        state: dict[str, Any] = {
            "estimates": [tuple(e) for e in self.estimates],
            "windows_opened": self._windows_opened,
            "spawned": self._spawned,
            "window": self._window_state(),
            "direction": None
            if self._direction is None
            else {"params": list(self._direction.params), "state": list(self._direction.state)},
        }
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        return state

    def _window_state(self) -> dict[str, Any] | None:
        w = self._window
        if w is None:
            return None
        return {
            "start": w.start,
            "n": w.n,
            "n_start": w.n_start,
            "last_mark": w.last_mark,
            "stop": w.stop,
            "started": w.started,
            "log_sum": w.log_sum.detach(),
            "d_start": w.d_start.detach(),
            "d_prev": w.d_prev.detach(),
            "growth": None if w.growth is None else w.growth.detach(),
            "cut": None if w.cut is None else w.cut.detach(),
            "tensors": [t.detach() for _, t in w.replica.tensors],
            "optimizer": w.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, before or after the monitor starts (before, it is applied
        when the monitor attaches the shadow). A saved open window continues where it was; a state saved
        by an earlier version (no ``"window"``) starts the next window at the next scheduled step.

        Raises:
            ConfigError: the saved window does not fit this model (another number or shape of parameters
                and buffers) or this optimizer.
        """
        if not isinstance(state, dict):
            raise ConfigError(
                f"Shadow.load_state_dict: expected a dict from Shadow.state_dict(), got {type(state).__name__}"
            )
        if self.ctx is None:
            self._restore = state
            return
        self._restore = None
        self._close(keep=False)
        self.estimates = [ShadowEstimate(*e) for e in state.get("estimates", [])]
        self._windows_opened = int(state.get("windows_opened", 0))
        if self._generator is not None and state.get("generator") is not None:
            self._generator.set_state(state["generator"])
        self._spawned = bool(state.get("spawned", False))
        carried = state.get("direction")
        self._direction = (
            None
            if carried is None
            else _Direction([t.clone() for t in carried["params"]], [t.clone() for t in carried["state"]])
        )
        if state.get("window") is not None:
            self._restore_window(state["window"])

    def _restore_window(self, saved: dict[str, Any]) -> None:
        """Rebuild the replica of a saved open window and put the saved tensors and optimizer state in it."""
        ctx = self.ctx
        assert ctx is not None and ctx.optimizer is not None
        tensors = list(saved["tensors"])
        with torch.no_grad():
            replica = self._replica(ctx.model)
            mine = [t for _, t in replica.tensors]
            wrong = [
                i
                for i, (a, b) in enumerate(zip(mine, tensors))
                if not isinstance(b, torch.Tensor) or a.shape != b.shape
            ]
            if len(mine) != len(tensors) or wrong:
                where = (
                    f"{len(tensors)} saved tensors for {len(mine)} parameters and buffers"
                    if len(mine) != len(tensors)
                    else f"tensor {wrong[0]}: saved shape {tuple(getattr(tensors[wrong[0]], 'shape', ()))}, "
                    f"model {tuple(mine[wrong[0]].shape)}"
                )
                raise ConfigError(
                    f"Shadow.load_state_dict: the saved open window does not fit {type(ctx.model).__name__} "
                    f"({where}); resume with the model the checkpoint was saved from"
                )
            for sh, t in zip(mine, tensors):
                sh.copy_(t)  # in place: the replica's pairs and the optimizer's parameters stay valid
            opt = clone_optimizer(ctx.optimizer, replica.param_map)
            opt_state = saved["optimizer"]
            try:  # torch keeps tensors of the loaded state as they are: clone so nothing is shared with `saved`
                opt.load_state_dict(
                    {
                        "state": {
                            k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in st.items()}
                            for k, st in opt_state["state"].items()
                        },
                        "param_groups": opt_state["param_groups"],
                    }
                )
            except (KeyError, ValueError, TypeError) as exc:
                raise ConfigError(
                    f"Shadow.load_state_dict: the saved window's optimizer state does not fit "
                    f"{type(ctx.optimizer).__name__} ({type(exc).__name__}: {exc})"
                ) from None
        real_params = [p for g in ctx.optimizer.param_groups for p in g["params"] if p.requires_grad]
        dev = real_params[0].device
        layers, owner_idx = self._owners(real_params)
        growth, cut = saved.get("growth"), saved.get("cut")
        sizing = self._auto and not (self.continuous and int(saved["n"]) >= self.window)
        if sizing != (growth is not None):
            how = "transient='auto'" if growth is not None else "a fixed transient"
            raise ConfigError(
                f"Shadow.load_state_dict: the saved open window was measured with {how} and this shadow has "
                f"transient={self.transient!r}; resume with the settings the checkpoint was saved with"
            )
        d_start = saved["d_start"].to(dev, torch.float64).clone()
        self._window = _Window(
            start=int(saved["start"]),
            replica=replica,
            optimizer=opt,
            real_params=real_params,
            shadow_params=[replica.param_map[id(p)] for p in real_params],
            layers=layers,
            owner_idx=torch.tensor(owner_idx, device=dev),
            log_sum=saved["log_sum"].to(dev, torch.float64).clone(),
            d_start=d_start,
            d_prev=saved["d_prev"].to(dev, torch.float64).clone() if "d_prev" in saved else d_start,
            started=bool(saved["started"]),
            n=int(saved["n"]),
            n_start=int(saved["n_start"]),
            last_mark=int(saved["last_mark"]),
            stop=int(saved["stop"]),
            growth=None if growth is None else growth.to(dev, torch.float64).clone(),
            cut=None if cut is None else cut.to(dev).clone(),
        )

    def lyapunov_vector(self) -> dict[str, torch.Tensor] | None:
        """The shadow's parameter difference ``δθ / ‖δθ‖`` (unit global norm), by parameter name.

        After the transient it approximates the most expanding direction of the training map (the top
        Lyapunov vector): large entries show which parameters carry the instability. ``None`` while no
        window is open. Returns detached copies.
        """
        w, ctx = self._window, self.ctx
        if w is None or ctx is None:
            return None
        names = {id(p): name for name, p in ctx.model.named_parameters()}
        with torch.no_grad():
            diffs = [s - r for s, r in zip(w.shadow_params, w.real_params)]
            norm = global_norm(diffs)
            return {
                names.get(id(rp), f"param{i}"): (d / norm.to(d.dtype)).clone()
                for i, (rp, d) in enumerate(zip(w.real_params, diffs))
            }

    @property
    def open(self) -> bool:
        """Whether a shadow is in flight."""
        return self._window is not None

    def __repr__(self) -> str:
        mode = "continuous" if self.continuous else f"window={self.window}"
        return (
            f"Shadow({mode}, eps={self.eps:g}, renorm={self.renorm}, transient={self.transient!r}, carry={self.carry})"
        )
