"""Helpers for the `stabwatch.analysis` tests: tiny models, data and an exact least-squares case."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stabwatch.analysis import TrainStep


def mlp(seed: int = 0, d_in: int = 6, hidden: int = 8, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def regression_loader(n: int = 64, d_in: int = 6, d_out: int = 3, batch: int = 16, shuffle: bool = False):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, d_out, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle)


def mse_step(lr: float = 0.05, **kw) -> TrainStep:
    return TrainStep(lambda m, b: F.mse_loss(m(b[0]), b[1]), functools.partial(torch.optim.SGD, lr=lr), **kw)


def make_train_fn(lr: float = 0.05, optimizer=torch.optim.SGD):
    """A deep-lyapunov style train_fn (creates its optimizer inside)."""

    def train_fn(model, loader, n_epochs, **kwargs):
        opt = optimizer(model.parameters(), lr=lr)
        losses = []
        for _ in range(n_epochs):
            total = 0.0
            for x, y in loader:
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                total += loss.item()
            losses.append(total / len(loader))
        return {"loss": losses}

    return train_fn


@dataclass
class LeastSquares:
    """Linear model w in R^d, loss mean((Xw - y)^2) with Hessian exactly diag(h).

    Full-batch gradient descent with step eta maps a difference of two replicas by
    delta <- (I - eta diag(h)) delta, exactly: after m steps per epoch, delta(t) = M^(m t) delta(0).
    """

    h: np.ndarray
    eta: float
    steps_per_epoch: int

    def __post_init__(self) -> None:
        d = self.h.shape[0]
        n = 4 * d
        q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((n, d)))
        # mse_loss = (1/n)|Xw - y|^2 has Hessian (2/n) X^T X = diag(h) for X = sqrt(n/2) Q diag(sqrt h).
        self.x = torch.tensor(np.sqrt(n / 2.0) * q * np.sqrt(self.h)[None, :], dtype=torch.float32)
        self.y = torch.tensor(np.random.default_rng(6).standard_normal((n, 1)), dtype=torch.float32)
        self.batches = [(self.x, self.y)] * self.steps_per_epoch

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        m = nn.Linear(self.h.shape[0], 1, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(-0.8, 0.9, self.h.shape[0]))
        return m

    def step(self, **kw) -> TrainStep:
        return TrainStep(lambda m, b: F.mse_loss(m(b[0]), b[1]), functools.partial(torch.optim.SGD, lr=self.eta), **kw)

    @property
    def rho(self) -> float:
        """max |1 - eta h_i|: the per-step growth factor of the dominant mode."""
        return float(np.max(np.abs(1.0 - self.eta * self.h)))

    def predicted_differences(self, w0: np.ndarray, n_epochs: int) -> np.ndarray:
        """``[T, N, d]`` replica offsets from replica 0, propagated analytically."""
        factor = (1.0 - self.eta * self.h) ** self.steps_per_epoch
        delta0 = w0 - w0[:1]
        return np.stack([delta0 * factor[None, :] ** t for t in range(n_epochs + 1)])
