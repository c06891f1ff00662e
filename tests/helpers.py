"""Small models and loops shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 32), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, opt, steps, monitor=None, batch=16, seed=0):
    """Mini-batch training; returns the records the monitor emitted."""
    x, y = data(seed=seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if monitor is not None:
            rec = monitor.step(loss=loss, batch=(x[idx], y[idx]))
            if rec is not None:
                out.append(rec)
    return out
