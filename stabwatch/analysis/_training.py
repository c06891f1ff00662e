"""Training the ``N`` replicas: vectorised, sequential, or through the user's own ``train_fn``.

Three drivers, all epoch-major (every replica finishes epoch ``e`` before any starts ``e + 1``, so the
recorder sees all replicas at the same time) and all feeding every replica the same batches and the
same random noise unless asked otherwise:

* `train_vectorized`: a `TrainStep` (loss as a pure function of ``(model, batch)``) run on all
  replicas at once with ``torch.func.stack_module_state`` + ``functional_call`` + ``vmap``: one data
  pass per epoch, one forward/backward/optimizer step per batch for the whole ensemble.
* `train_sequential`: the same `TrainStep`, one replica after the other per batch (models ``vmap``
  cannot batch, optimizers that are not element-wise).
* `train_with_fn`: the user's deep-lyapunov style ``train_fn``, called exactly as deep-lyapunov calls
  it: ``train_fn(model, loader, 1, **kwargs)`` once per replica per epoch, with the user's own loader
  and keyword arguments. Nothing of the user's code is replaced, so training is what it would be
  under deep-lyapunov (same replicas, same calls); only the RNG seeding per call differs (every
  replica gets the same data order and noise).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from stabwatch.analysis._log import analysis_logger
from stabwatch.analysis._replicas import (
    LoaderGenerators,
    derive_seed,
    seed_everything,
    tracked_parameters,
)
from stabwatch.analysis._views import ModelsView, StackedView
from stabwatch.errors import ConfigError, StabwatchError

__all__ = ["TrainStep"]

logger = analysis_logger()

#: Optimizers whose update of an element depends only on that element's own history (and on
#: scalars such as the step count), so one optimizer over ``[N, ...]`` tensors equals ``N``
#: independent optimizers.
_ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.ASGD,
    torch.optim.Rprop,
)

History = dict[str, list[float]]


class EpochCallback(Protocol):
    """Called after every epoch with the replicas and the number of epochs done."""

    def __call__(self, view: ModelsView | StackedView, epoch: int) -> None: ...


class Progress(Protocol):
    """The subset of ``tqdm`` the drivers use."""

    def update(self, n: float = 1) -> Any: ...


@dataclass(frozen=True)
class TrainStep:
    """A training step that is a plain function of ``(model, batch)``: the fast path.

    Passing a `TrainStep` instead of a ``train_fn`` to `StabilityAnalyzer.analyze` lets the analyzer
    own the loop: all replicas train in one vectorised pass per batch (``vmap`` over stacked
    weights), with one data pass per epoch instead of ``N``.

    Attributes:
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` (mean over the batch). It must not
            call ``.item()`` or branch on tensor values, or the vectorised path falls back to the
            sequential one (logged at INFO).
        optimizer: builds the optimizer from a list of tensors, e.g.
            ``functools.partial(torch.optim.Adam, lr=1e-3)``. Vectorised training needs an
            element-wise optimizer (SGD, Adam, AdamW, RMSprop, Adagrad, ...); any other runs
            sequentially, one optimizer per replica.
        vectorize: ``None`` (auto), ``True`` (always; an error if the model cannot be batched) or
            ``False`` (always sequential).

    Example:
        >>> import torch.nn.functional as F
        >>> step = TrainStep(lambda m, b: F.mse_loss(m(b[0]), b[1]))
    """

    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] = field(
        default=functools.partial(torch.optim.SGD, lr=0.01)
    )
    vectorize: bool | None = None


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so ``functional_call`` can swap the weights."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_fn(self.model, batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _stack_batches(batches: tuple[Any, ...]) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(batches))
    if isinstance(first, dict):
        return {k: _stack_batches(tuple(b[k] for b in batches)) for k in first}
    if isinstance(first, (list, tuple)):
        parts = [_stack_batches(tuple(b[i] for b in batches)) for i in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    return first


def _loader_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _replica_iterators(loader: Any, n: int, seed: int, epoch: int) -> list[Iterator[Any]]:
    """One iterator per replica, each shuffled from its own seed (``same_data_order=False``)."""
    iterators = []
    for i in range(n):
        seed_everything(derive_seed(seed, epoch, i))
        iterators.append(iter(loader))
    seed_everything(derive_seed(seed, epoch, n))
    return iterators


def _check_loss(loss: Any, expected: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != expected:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise StabwatchError(f"TrainStep.loss_fn must return a scalar tensor (mean loss of the batch), got {shape}")
    return loss


def _make_optimizer(step: TrainStep, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    optimizer = step.optimizer(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "TrainStep.optimizer must build a torch.optim.Optimizer from a list of tensors, e.g. "
            f"functools.partial(torch.optim.SGD, lr=0.1); got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ConfigError("LBFGS needs a closure: pass a train_fn instead of a TrainStep")
    return optimizer


def _finish_histories(sums: list[list[float]]) -> list[History]:
    return [{"loss": list(s)} for s in sums]


def train_vectorized(
    step: TrainStep,
    replicas: list[nn.Module],
    loader: Iterable[Any],
    n_epochs: int,
    *,
    device: torch.device,
    same_order: bool,
    seed: int,
    on_epoch_end: EpochCallback,
    progress: Progress,
) -> list[History] | None:
    """Train all replicas at once; None when the model or optimizer cannot be vectorised.

    The replicas' parameters and buffers are re-pointed at rows of the stacked tensors, so the
    replicas always show the current state and no copy is written back.
    """
    n = len(replicas)
    tracked = [name for name, _ in tracked_parameters(replicas[0])]
    try:
        params, buffers = torch.func.stack_module_state(replicas)
    except RuntimeError as exc:
        logger.info("vectorised training not possible (%s): training replicas one by one", exc)
        return None
    trainable = {name: params[name] for name in tracked}
    optimizer = _make_optimizer(step, list(trainable.values()))
    if step.vectorize is None and not isinstance(optimizer, _ELEMENTWISE_OPTIMIZERS):
        logger.info(
            "%s is not known to be element-wise: training replicas one by one "
            "(TrainStep(vectorize=True) to force the vectorised path)",
            type(optimizer).__name__,
        )
        return None
    wrapper = _LossModule(replicas[0], step.loss_fn)
    p_in = {f"model.{k}": v for k, v in params.items()}
    b_in = {f"model.{k}": v for k, v in buffers.items()}

    def single(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return torch.func.functional_call(wrapper, (p, b), (batch,))

    batched = torch.func.vmap(
        single,
        in_dims=(0, 0, None if same_order else 0),
        randomness="same" if same_order else "different",
    )

    # Probe one forward/backward before training, so that a model vmap cannot handle falls back to
    # the sequential path with nothing changed (buffers and the loader's generators are restored).
    # The probe also shows the memory layout in which each stacked gradient arrives (see `_adopt_layouts`).
    saved_buffers = {k: v.clone() for k, v in buffers.items()}
    generators = LoaderGenerators(loader)
    generators.snapshot()
    layouts: dict[str, torch.Tensor] = {}
    hooks = [t.register_hook(functools.partial(_note_layout, layouts, name)) for name, t in trainable.items()]
    try:
        seed_everything(derive_seed(seed, 0))
        if same_order:
            probe = to_device(next(iter(loader)), device)
        else:
            firsts = tuple(next(it) for it in _replica_iterators(loader, n, seed, 0))
            probe = to_device(_stack_batches(firsts), device)
        _check_loss(batched(p_in, b_in, probe), (n,)).sum().backward()
    except StabwatchError:
        raise
    except StopIteration:
        raise StabwatchError("train_loader is empty") from None
    except Exception as exc:  # any failure of vmap means: train sequentially
        if step.vectorize:
            raise StabwatchError(f"TrainStep(vectorize=True) but vmap failed on this model: {exc}") from exc
        logger.info("vectorised training not possible (%s: %s): training replicas one by one", type(exc).__name__, exc)
        return None
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for k, v in buffers.items():
                v.copy_(saved_buffers[k])
        optimizer.zero_grad(set_to_none=True)
        generators.restore()

    _adopt_layouts(trainable, layouts)
    # Re-point the replicas at rows of the stacked tensors: one copy of the weights, always current.
    with torch.no_grad():
        for i, replica in enumerate(replicas):
            for name, p in replica.named_parameters():
                p.data = params[name][i]
            for name, b in replica.named_buffers():
                b.data = buffers[name][i]
    view = StackedView(trainable, buffers, optimizer)
    n_batches = _loader_len(loader)
    histories: list[list[float]] = [[] for _ in range(n)]
    for epoch in range(n_epochs):
        seed_everything(derive_seed(seed, epoch))
        source: Iterable[Any] = (
            loader if same_order else map(_stack_batches, zip(*_replica_iterators(loader, n, seed, epoch)))
        )
        total = torch.zeros(n, dtype=torch.float64)
        count = 0
        for batch in source:
            optimizer.zero_grad(set_to_none=True)
            losses = _check_loss(batched(p_in, b_in, to_device(batch, device)), (n,))
            losses.sum().backward()
            optimizer.step()
            total += losses.detach().to("cpu", torch.float64)
            count += 1
            if n_batches:
                progress.update(n / n_batches)
        if not n_batches:
            progress.update(n)
        for i in range(n):
            histories[i].append(float(total[i]) / max(count, 1))
        on_epoch_end(view, epoch + 1)
    return _finish_histories(histories)


def _note_layout(layouts: dict[str, torch.Tensor], name: str, grad: torch.Tensor) -> None:
    """Gradient hook of the probe: keep an empty tensor with the layout (strides) ``grad`` came in."""
    layouts[name] = torch.empty_like(grad, memory_format=torch.preserve_format)


def _adopt_layouts(trainable: dict[str, torch.Tensor], layouts: dict[str, torch.Tensor]) -> None:
    """Store each stacked parameter in the memory layout its gradient arrives in.

    ``vmap``'s backward of a batched ``linear`` returns the weight gradient ``[N, out, in]`` as the
    transpose of a contiguous ``[N, in, out]`` product. A parameter with another layout makes
    autograd copy every gradient into the parameter's layout, a strided transpose that cost as much
    as the matrix product itself (a 784-128-10 MLP on one CPU thread: a third of the training time).
    Re-laying the parameter out once, before training, removes that copy and makes the forward
    product read a contiguous operand. Values are unchanged; only strides differ (the replicas,
    views of these tensors, get contiguous storage back in `release_stacked`).
    """
    with torch.no_grad():
        for name, t in trainable.items():
            new = layouts.get(name)
            if new is None or new.shape != t.shape or new.dtype != t.dtype or new.stride() == t.stride():
                continue
            new.copy_(t)
            t.data = new  # same tensor object: the optimizer and the vmap inputs keep pointing at it


def release_stacked(replicas: list[nn.Module]) -> None:
    """Give every replica its own contiguous storage again after vectorised training.

    During `train_vectorized` the replicas' tensors are rows of the stacked tensors, possibly in the
    gradient's layout (`_adopt_layouts`); afterwards users expect ordinary contiguous parameters.
    Values are unchanged. A no-op for replicas that already own contiguous tensors.
    """
    with torch.no_grad():
        for replica in replicas:
            for t in [*replica.parameters(), *replica.buffers()]:
                if not t.is_contiguous():
                    t.data = t.data.contiguous()


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def train_sequential(
    step: TrainStep,
    replicas: list[nn.Module],
    loader: Iterable[Any],
    n_epochs: int,
    *,
    device: torch.device,
    same_order: bool,
    seed: int,
    on_epoch_end: EpochCallback,
    progress: Progress,
) -> list[History]:
    """Train replica after replica on every batch, each with its own optimizer.

    With ``same_order`` every replica's step starts from the same RNG state, so dropout masks (and
    any other noise) are identical across replicas, as in the vectorised path.
    """
    n = len(replicas)
    optimizers = [_make_optimizer(step, [p for _, p in tracked_parameters(m)]) for m in replicas]
    view = ModelsView(replicas, optimizers)
    n_batches = _loader_len(loader)
    histories: list[list[float]] = [[] for _ in range(n)]

    def one_step(i: int, batch: Any) -> float:
        optimizers[i].zero_grad(set_to_none=True)
        loss = _check_loss(step.loss_fn(replicas[i], batch), ())
        loss.backward()
        optimizers[i].step()
        return float(loss.detach())

    for epoch in range(n_epochs):
        seed_everything(derive_seed(seed, epoch))
        total = np.zeros(n)
        count = 0
        if same_order:
            for batch in loader:
                batch = to_device(batch, device)
                start = _rng_state(device)
                for i in range(n):
                    _set_rng_state(start, device)
                    total[i] += one_step(i, batch)
                count += 1
                if n_batches:
                    progress.update(n / n_batches)
        else:
            iterators = _replica_iterators(loader, n, seed, epoch)
            states = []
            for i in range(n):
                seed_everything(derive_seed(seed, epoch, i, 1))
                states.append(_rng_state(device))
            for batches in zip(*iterators):
                for i in range(n):
                    _set_rng_state(states[i], device)
                    total[i] += one_step(i, to_device(batches[i], device))
                    states[i] = _rng_state(device)
                count += 1
                if n_batches:
                    progress.update(n / n_batches)
        if count == 0:
            raise StabwatchError("train_loader is empty")
        if not n_batches:
            progress.update(n)
        for i in range(n):
            histories[i].append(float(total[i]) / count)
        on_epoch_end(view, epoch + 1)
    return _finish_histories(histories)


# --------------------------------------------------------------------------------------------------
# User train_fn, deep-lyapunov's contract: train_fn(model, loader, 1, **kwargs) once per epoch.
# --------------------------------------------------------------------------------------------------


def _merge_results(results: list[Any]) -> History:
    merged: History = {}
    for result in results:
        if not isinstance(result, dict):
            continue
        for key, value in result.items():
            if isinstance(value, (list, tuple)):
                values = [float(v) for v in value if isinstance(v, (int, float))]
            elif isinstance(value, (int, float)):
                values = [float(value)]
            else:
                continue
            merged.setdefault(str(key), []).extend(values)
    return merged


def _loader_generators(loader: Any, train_kwargs: dict[str, Any]) -> list[LoaderGenerators]:
    """Generators of ``loader`` and of every loader-like keyword argument (rewound per replica)."""
    found = [LoaderGenerators(loader)]
    found += [LoaderGenerators(v) for v in train_kwargs.values() if v is not loader and hasattr(v, "sampler")]
    return found


def train_with_fn(
    train_fn: Callable[..., Any],
    replicas: list[nn.Module],
    loader: Any,
    n_epochs: int,
    train_kwargs: dict[str, Any],
    *,
    same_order: bool,
    seed: int,
    on_epoch_end: EpochCallback,
    progress: Progress,
) -> tuple[list[History], list[str], int]:
    """Call ``train_fn(model, loader, 1, **train_kwargs)`` once per replica per epoch, as deep-lyapunov does.

    ``loader`` and ``train_kwargs`` are passed through unchanged (the user's own objects). The calls
    are epoch-major: epoch ``e`` of every replica, then ``on_epoch_end(view, e + 1)`` records a
    checkpoint. Before each call the global RNGs are seeded from ``(seed, e)`` (``same_order``) and
    the loaders' own generators are rewound to where they were for replica 0, so every replica sees
    the same shuffling and the same dropout masks; otherwise from ``(seed, e, replica)``.

    Returns:
        ``(histories, notes, epochs)``: per-replica merged results of ``train_fn`` (one entry per
        epoch, as deep-lyapunov keeps the last value of each call), warnings (none today), and the
        number of epochs trained.
    """
    generators = _loader_generators(loader, train_kwargs)
    view = ModelsView(replicas)
    results: list[list[Any]] = [[] for _ in replicas]
    for epoch in range(n_epochs):
        for i, model in enumerate(replicas):
            if same_order:
                seed_everything(derive_seed(seed, epoch))
                for g in generators:
                    if i == 0:
                        g.snapshot()
                    else:
                        g.restore()
            else:
                seed_everything(derive_seed(seed, epoch, i))
            results[i].append(_last_of_each(train_fn(model, loader, 1, **train_kwargs)))
            progress.update(1)
        on_epoch_end(view, epoch + 1)
    logger.debug("train_fn driver: %d epochs x %d replicas", n_epochs, len(replicas))
    return [_merge_results(r) for r in results], [], n_epochs


def _last_of_each(result: Any) -> Any:
    """deep-lyapunov keeps the last element of each list a one-epoch call returns."""
    if not isinstance(result, dict):
        return result
    return {k: (v[-1] if isinstance(v, (list, tuple)) and v else v) for k, v in result.items()}
