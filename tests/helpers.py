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


def offline_tracker_env(monkeypatch, tmp_path) -> None:
    """Isolate trackers in ``tmp_path``: wandb offline with private cache/config/data folders, no MLflow
    run or experiment inherited from the environment, spill files in ``tmp_path/spill``."""
    monkeypatch.setenv("STABWATCH_SPILL_DIR", str(tmp_path / "spill"))
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONSOLE": "off",
        "WANDB__DISABLE_STATS": "true",
        "WANDB__DISABLE_META": "true",
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
