"""Plumbing of the shadow replica: copy the training state and replay the real step on the copy.

`stabwatch.collectors.shadow.Shadow` owns the policy (when windows open, the perturbation, Benettin
renormalisation, the log-growth sums); this module owns the mechanism, each piece testable alone:

* `Replica` — a deep copy of the model made without the monitor's hooks (the user's hooks, e.g. spectral
  norm, are part of the model and are kept), every module, parameter and buffer paired with its original,
  and a kept replica refreshed from the real tensors instead of copied again;
* `clone_optimizer` / `follow_hyperparameters` — a second optimizer of the same class over the replica
  with a copy of the state (momentum, Adam moments, step counts), following the real optimizer's
  hyperparameters (learning-rate schedules) step by step; `paired_state` pairs their state tensors;
* `loss_scale` / `ScaledStep` — the AMP loss scale the real step used, read through ``GradScaler``'s
  public API, and the same scale → backward → unscale → step on the replica, done by a ``GradScaler`` so
  the arithmetic is the real step's;
* `RngState` — the global RNG state at the start of the real forward pass, replayed for the replica's
  forward (same dropout masks) without moving the real stream.

Only public torch API: modules are walked with ``named_parameters``/``named_buffers(recurse=False)``,
optimizers rebuilt from ``param_groups``/``defaults``/``state_dict``, the loss scale read with
``GradScaler.get_scale()``/``is_enabled()``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from stabwatch.errors import StabwatchError

__all__ = [
    "NONNEGATIVE_STATE",
    "Replica",
    "RngState",
    "ScaledStep",
    "StatePairs",
    "clone_optimizer",
    "follow_hyperparameters",
    "fused_step_skipped",
    "is_grad_scaler",
    "isolated_rng",
    "loss_scale",
    "paired_state",
]

#: Optimizer-state entries that are non-negative by construction (second moments, accumulators). After a
#: rescale with factor > 1 a replica's copy could dip below zero; the caller clamps them at 0.
NONNEGATIVE_STATE = frozenset(
    {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf", "max_exp_avg_sqs"}
)


# ------------------------------------------------------------------------------------------ the model
@dataclass
class Replica:
    """A copy of a model with every module and tensor paired with the original.

    Attributes:
        model: the copy.
        modules: ``(real, replica)`` module pairs, in ``model.modules()`` order (to follow train/eval).
        tensors: ``(real, replica)`` for every parameter and buffer (shared ones once), to refresh a kept
            replica.
        param_map: ``id(real parameter) -> replica parameter``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> rep = Replica.build(net)
        >>> rep.param_map[id(net[0].weight)] is rep.model[0].weight, len(rep.tensors)
        (True, 7)
    """

    model: nn.Module
    modules: list[tuple[nn.Module, nn.Module]]
    tensors: list[tuple[torch.Tensor, torch.Tensor]]
    param_map: dict[int, nn.Parameter]

    @classmethod
    def build(
        cls, model: nn.Module, *, without: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    ) -> Replica:
        """Deep-copy ``model`` inside the context ``without()`` (which takes the monitor's hooks off).

        Tied parameters stay tied in the copy (``copy.deepcopy`` keeps sharing). Gradients are not copied.
        Tensor attributes that are not graph leaves (the weight old-style ``spectral_norm`` computes in
        forward) are copied detached.

        Raises:
            StabwatchError: the copy does not have the model's structure.
        """
        # a tensor attribute computed in forward (old-style ``spectral_norm``/``weight_norm`` keep the
        # weight so) is not a graph leaf and deepcopy refuses it: the copy gets a detached clone, which
        # the module's pre-hook recomputes at the replica's first forward anyway
        # snntorch keeps its hidden state (``mem``, ``syn``) in buffers that hold graph tensors after a
        # forward pass: the same applies to buffers
        memo: dict[int, Any] = {
            id(value): value.detach().clone()
            for m in model.modules()
            for value in (*vars(m).values(), *m.buffers(recurse=False))
            if isinstance(value, torch.Tensor) and not value.is_leaf
        }
        with without():
            shadow = copy.deepcopy(model, memo)
        real_mods, shadow_mods = list(model.modules()), list(shadow.modules())
        if len(real_mods) != len(shadow_mods):
            raise StabwatchError(
                f"Shadow: copying {type(model).__name__} gave {len(shadow_mods)} modules instead of "
                f"{len(real_mods)}; the model cannot be replicated with copy.deepcopy"
            )
        param_map: dict[int, nn.Parameter] = {}
        tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()
        for path, (mr, ms) in zip((n for n, _ in model.named_modules()), zip(real_mods, shadow_mods)):
            if type(mr) is not type(ms):
                raise StabwatchError(
                    f"Shadow: the copy of module {path or '(root)'} is a {type(ms).__name__}, not a "
                    f"{type(mr).__name__}; the model cannot be replicated with copy.deepcopy"
                )
            shadow_params = dict(ms.named_parameters(recurse=False, remove_duplicate=False))
            for name, p in mr.named_parameters(recurse=False, remove_duplicate=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    param_map[id(p)] = shadow_params[name]
                    tensors.append((p, shadow_params[name]))
            shadow_buffers = dict(ms.named_buffers(recurse=False, remove_duplicate=False))
            for name, b in mr.named_buffers(recurse=False, remove_duplicate=False):
                sb = shadow_buffers.get(name)
                if sb is not None and id(b) not in seen:
                    seen.add(id(b))
                    tensors.append((b, sb))
        for p in shadow.parameters():
            p.grad = None
        return cls(shadow, list(zip(real_mods, shadow_mods)), tensors, param_map)

    def refresh(self) -> None:
        """Copy the real parameters and buffers into the replica (in place: the pairs stay valid)."""
        with torch.no_grad():
            for real, sh in self.tensors:
                if sh.device == real.device and sh.dtype == real.dtype and sh.shape == real.shape:
                    sh.copy_(real)
                else:
                    sh.data = real.detach().clone()

    def offload(self, device: torch.device | str = "cpu") -> None:
        """Move the replica's tensors to ``device`` (in place) and drop its gradients."""
        target = torch.device(device)
        with torch.no_grad():
            for _, sh in self.tensors:
                if sh.device != target:
                    sh.data = sh.data.to(target)
            for p in self.model.parameters():
                p.grad = None

    def follow_modes(self) -> None:
        """Set every replica module's train/eval flag to its original's."""
        for real, sh in self.modules:
            sh.training = real.training


# -------------------------------------------------------------------------------------- the optimizer
def clone_optimizer(real: torch.optim.Optimizer, param_map: dict[int, nn.Parameter]) -> torch.optim.Optimizer:
    """A second optimizer of ``real``'s class over the replica's parameters, with a copy of its state.

    Same ``param_groups`` (hyperparameters), cloned state tensors (momentum buffers, Adam moments, step
    counts), no hooks. ``param_map`` maps ``id(real parameter)`` to the replica's parameter.

    Raises:
        StabwatchError: the class cannot be built as ``cls(param_groups, **defaults)``, or a parameter of
            ``real`` has no counterpart in ``param_map``.
    """
    groups = []
    for g in real.param_groups:
        group = {k: v for k, v in g.items() if k != "params"}
        missing = [i for i, p in enumerate(g["params"]) if id(p) not in param_map]
        if missing:
            raise StabwatchError(
                f"Shadow: {len(missing)} parameter(s) of {type(real).__name__} (group indices {missing[:5]}) "
                "are not in the model; the replica cannot follow them"
            )
        group["params"] = [param_map[id(p)] for p in g["params"]]
        groups.append(group)
    # the constructor's keyword arguments (some defaults, e.g. AdamW's decoupled_weight_decay, are not);
    # every hyperparameter also rides in the groups and in the loaded state dict
    accepted = inspect.signature(type(real).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        kwargs = dict(real.defaults)
    else:
        kwargs = {k: v for k, v in real.defaults.items() if k in accepted}
    try:
        opt = type(real)(groups, **kwargs)
    except (TypeError, ValueError) as exc:
        raise StabwatchError(
            f"Shadow: could not build a second {type(real).__name__} for the replica "
            f"({type(real).__name__}(param_groups, **defaults) raised: {exc})"
        ) from exc
    state = real.state_dict()
    cloned = {
        idx: {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
        for idx, s in state["state"].items()
    }
    opt.load_state_dict({"state": cloned, "param_groups": state["param_groups"]})
    return opt


def follow_hyperparameters(shadow: torch.optim.Optimizer, real: torch.optim.Optimizer) -> None:
    """Copy every hyperparameter of ``real``'s groups into ``shadow``'s (a schedule changed the lr)."""
    for g_shadow, g_real in zip(shadow.param_groups, real.param_groups, strict=True):
        for k, v in g_real.items():
            if k != "params":
                g_shadow[k] = v


class StatePairs(NamedTuple):
    """Floating optimizer-state tensors shaped like their parameter, paired between two optimizers."""

    shadow: list[torch.Tensor]
    real: list[torch.Tensor]
    #: the shadow's entries that are non-negative by construction (`NONNEGATIVE_STATE`)
    nonnegative: list[torch.Tensor]


def paired_state(
    real: torch.optim.Optimizer,
    shadow: torch.optim.Optimizer,
    real_params: Sequence[torch.Tensor],
    shadow_params: Sequence[torch.Tensor],
) -> StatePairs:
    """The per-parameter state of ``shadow`` and ``real`` that is part of the training state.

    Floating tensors with the parameter's shape (momentum buffers, moments); scalars such as step counts
    are left out (they are equal in both).
    """
    pairs = StatePairs([], [], [])
    for rp, sp in zip(real_params, shadow_params, strict=True):
        rs = real.state.get(rp)
        ss = shadow.state.get(sp)
        if not rs or not ss:
            continue
        for key, rv in rs.items():
            sv = ss.get(key)
            if (
                isinstance(rv, torch.Tensor)
                and isinstance(sv, torch.Tensor)
                and rv.is_floating_point()
                and rv.shape == rp.shape
                and sv.shape == rv.shape
            ):
                pairs.shadow.append(sv)
                pairs.real.append(rv)
                if key in NONNEGATIVE_STATE:
                    pairs.nonnegative.append(sv)
    return pairs


# ---------------------------------------------------------------------------------- AMP loss scaling
def is_grad_scaler(obj: Any) -> bool:
    """Whether ``obj`` offers the public ``GradScaler`` methods the replay reads."""
    return all(callable(getattr(obj, name, None)) for name in ("get_scale", "is_enabled"))


def loss_scale(scaler: Any) -> float | None:
    """The scale ``scaler`` multiplies the loss by now (``None`` when it is disabled). Syncs once.

    Read it between ``scaler.scale(loss).backward()`` and ``scaler.update()`` (e.g. in the optimizer's
    pre-step hook) to get the scale the current step used.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


def fused_step_skipped(optimizer: torch.optim.Optimizer, scaler: Any, used: float | None) -> bool:
    """Whether ``scaler`` skipped a fused optimizer's step, seen after ``scaler.update()``.

    ``GradScaler.step`` calls a fused optimizer's ``step()`` even when the gradients overflowed (the kernel
    then changes nothing), so the step hooks fire for a step that did not happen. ``update()`` backs the
    scale off exactly when a step was skipped: a scale below ``used`` (the scale of the step's backward)
    means this one was. Other optimizers are not stepped at all on overflow (their hooks tell).
    """
    if used is None or not optimizer.defaults.get("fused"):
        return False
    now = loss_scale(scaler)
    return now is not None and now < used


class ScaledStep:
    """One ``backward`` → ``step`` of the replica, scaled and unscaled exactly as the real step was.

    With ``scale=None`` a plain ``loss.backward()`` and ``optimizer.step()``. Otherwise a fresh
    ``torch.amp.GradScaler`` holding ``scale`` does ``scaler.scale(loss).backward()``, ``scaler.step`` (the
    same inverse scale, the same unscale kernels, fused optimizers handled as for the real one) and
    ``scaler.update()``; the user's scaler is never touched.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.SGD([w], lr=0.5)
        >>> amp = ScaledStep(2.0**10, w.device)
        >>> amp.backward((w * 3).sum()); w.grad.tolist()  # the gradient of the scaled loss
        [3072.0, 3072.0]
        >>> amp.step(opt), w.tolist()
        (True, [-0.5, -0.5])
    """

    def __init__(self, scale: float | None, device: torch.device) -> None:
        self.scale = scale
        self._scaler = None if scale is None else torch.amp.GradScaler(device.type, init_scale=scale)

    def backward(self, loss: torch.Tensor) -> None:
        """``backward`` of the loss times the scale."""
        (loss if self._scaler is None else self._scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale and step; ``False`` when the scaled gradients overflowed and the step was skipped."""
        if self._scaler is None or self.scale is None:
            optimizer.step()
            return True
        self._scaler.step(optimizer)
        self._scaler.update()  # backs the scale off exactly when the step was skipped
        return self._scaler.get_scale() >= self.scale


# ---------------------------------------------------------------------------------------- random state
@dataclass(frozen=True)
class RngState:
    """The global CPU (and CUDA) RNG state at one moment, to replay random layers (dropout masks).

    Example:
        >>> state = RngState.capture(())
        >>> first = torch.rand(2)
        >>> with state.replayed(): torch.equal(torch.rand(2), first)
        True
        >>> torch.equal(torch.rand(2), first)  # the global stream went on as if nothing was replayed
        False
    """

    cpu: torch.Tensor
    cuda: tuple[tuple[int, torch.Tensor], ...] = ()

    @classmethod
    def capture(cls, cuda_devices: Sequence[int]) -> RngState:
        return cls(torch.get_rng_state(), tuple((d, torch.cuda.get_rng_state(d)) for d in cuda_devices))

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the block from this state; the global RNG is restored to what it was before afterwards."""
        with isolated_rng([d for d, _ in self.cuda]):
            torch.set_rng_state(self.cpu)
            for d, s in self.cuda:
                torch.cuda.set_rng_state(s, d)
            yield


@contextlib.contextmanager
def isolated_rng(cuda_devices: Sequence[int]) -> Iterator[None]:
    """Run the block and put the global CPU and CUDA RNG states back afterwards."""
    with torch.random.fork_rng(devices=[torch.device("cuda", d) for d in cuda_devices], enabled=True):
        yield
