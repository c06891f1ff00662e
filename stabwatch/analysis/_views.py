"""Two ways the replicas are held while they train, behind one `ReplicaView` interface.

* `ModelsView`: ``N`` separate modules (user ``train_fn``, manual mode, sequential fallback).
* `StackedView`: one ``[N, ...]`` tensor per parameter (the vectorised ``vmap`` path).

Both can apply a Benettin renormalisation ``s_i <- s_0 + alpha_i (s_i - s_0)`` to every part of the
training state they can reach: parameters, floating-point buffers and, when the optimizers are ours,
the optimizer state (momentum, Adam moments).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from stabwatch.analysis._replicas import tracked_parameters

__all__: list[str] = []


def _pull_towards(ref: torch.Tensor, target: torch.Tensor, alpha: float) -> None:
    """``target <- ref + alpha (target - ref)`` in at least float32, rounded once."""
    work = torch.promote_types(target.dtype, torch.float32)
    r = ref.to(work)
    target.copy_((r + alpha * (target.to(work) - r)).to(target.dtype))


def _state_tensors(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> dict[str, torch.Tensor]:
    if optimizer is None:
        return {}
    state = optimizer.state.get(param, {})
    return {
        key: value
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == param.shape
    }


class ModelsView:
    """``N`` separate replica modules.

    Args:
        models: the replicas (replica 0 is the reference).
        optimizers: one optimizer per replica when the analyzer owns them (their state is
            renormalised too), else None.
    """

    def __init__(self, models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer] | None = None) -> None:
        self.models = list(models)
        self.optimizers = list(optimizers) if optimizers is not None else None
        self._params = [[p for _, p in tracked_parameters(m)] for m in self.models]
        self._buffers = [[b for b in m.buffers() if b.is_floating_point()] for m in self.models]

    @property
    def n_replicas(self) -> int:
        """``N``."""
        return len(self.models)

    def columns(self, j: int, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``j`` of every replica, ``[N, stop - start]``."""
        return torch.stack([params[j].detach().reshape(-1)[start:stop] for params in self._params])

    def grad_norms(self) -> NDArray[np.float64]:
        """Global gradient norm of each replica (NaN when no parameter has a gradient)."""
        out = np.full(self.n_replicas, np.nan)
        for i, params in enumerate(self._params):
            squares = [p.grad.detach().to("cpu").double().square().sum() for p in params if p.grad is not None]
            if squares:
                out[i] = float(torch.stack(squares).sum().sqrt())
        return out

    def renormalize(self, alphas: NDArray[np.float64]) -> None:
        """Pull every replica ``i >= 1`` towards replica 0 by ``alphas[i]``."""
        with torch.no_grad():
            for i in range(1, self.n_replicas):
                alpha = float(alphas[i])
                opt_i = self.optimizers[i] if self.optimizers else None
                opt_0 = self.optimizers[0] if self.optimizers else None
                for p0, pi in zip(self._params[0], self._params[i]):
                    _pull_towards(p0, pi, alpha)
                    ref_state = _state_tensors(opt_0, p0)
                    for key, value in _state_tensors(opt_i, pi).items():
                        if key in ref_state:
                            _pull_towards(ref_state[key], value, alpha)
                for b0, bi in zip(self._buffers[0], self._buffers[i]):
                    _pull_towards(b0, bi, alpha)


class StackedView:
    """Replicas stacked along a leading dimension of size ``N``.

    Args:
        tensors: trainable parameters by name, each ``[N, ...]``, in tracking order.
        buffers: buffers by name, each ``[N, ...]``.
        optimizer: the optimizer built over ``tensors`` (its state is ``[N, ...]`` too).
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        self._tensors = list(tensors.values())
        self._buffers = [b for b in buffers.values() if b.is_floating_point()]
        self.optimizer = optimizer
        self._n = self._tensors[0].shape[0] if self._tensors else 0

    @property
    def n_replicas(self) -> int:
        """``N``."""
        return self._n

    def columns(self, j: int, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``j`` of every replica, ``[N, stop - start]``.

        Elements are in each replica's row-major order whatever the stacked tensor's memory layout;
        a non-contiguous tensor is copied only in the slices of its second dimension that hold them.
        """
        t = self._tensors[j].detach()
        if t.dim() <= 2 or t.is_contiguous():
            return t.reshape(self._n, -1)[:, start:stop]
        inner = max(1, t[0, 0].numel())  # elements per index of the first per-replica dimension
        first, last = start // inner, -(-stop // inner)
        block = t[:, first:last].reshape(self._n, -1)
        return block[:, start - first * inner : stop - first * inner]

    def grad_norms(self) -> NDArray[np.float64]:
        """Global gradient norm of each replica (NaN when no gradient exists)."""
        total = torch.zeros(self._n, dtype=torch.float64)
        seen = False
        for t in self._tensors:
            if t.grad is not None:
                seen = True
                total += t.grad.detach().reshape(self._n, -1).to("cpu").double().square().sum(dim=1)
        if not seen:
            return np.full(self._n, np.nan)
        return np.sqrt(total.numpy())

    def renormalize(self, alphas: NDArray[np.float64]) -> None:
        """Pull every replica row ``i >= 1`` towards row 0 by ``alphas[i]``."""
        with torch.no_grad():
            for t in self._tensors:
                self._pull_rows(t, alphas)
                for value in _state_tensors(self.optimizer, t).values():
                    self._pull_rows(value, alphas)
            for b in self._buffers:
                self._pull_rows(b, alphas)

    @staticmethod
    def _pull_rows(t: torch.Tensor, alphas: NDArray[np.float64]) -> None:
        work = torch.promote_types(t.dtype, torch.float32)
        shape = (-1,) + (1,) * (t.dim() - 1)
        a = torch.as_tensor(alphas, dtype=work, device=t.device).reshape(shape)
        x = t.to(work)
        ref = x[:1]
        t.copy_((ref + a * (x - ref)).to(t.dtype))
