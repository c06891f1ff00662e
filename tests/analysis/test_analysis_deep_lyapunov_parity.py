"""The drop-in against the real deep-lyapunov 0.1.2, on cases where deep-lyapunov is right.

With an unshuffled loader and no random layers, deep-lyapunov's replica-by-replica training and
stabwatch's epoch-major calls of the same ``train_fn`` must produce the same weights, so every quantity
defined the same way (checkpoint count, final weights, per-replica path length and speed, losses, the
full-space spread recomputed from deep-lyapunov's stored trajectories) must agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stabwatch.analysis import StabilityAnalyzer
from tests.analysis.analysis_helpers import make_train_fn, mlp, regression_loader

dl = pytest.importorskip("deep_lyapunov")


def _full_space_spread(traj: np.ndarray) -> np.ndarray:
    """RMS pairwise distance per checkpoint, ``traj`` ``[T, N, P]`` (independent of stabwatch)."""
    t, n, _ = traj.shape
    out = np.zeros(t)
    for k in range(t):
        d2 = [np.sum((traj[k, i].astype(np.float64) - traj[k, j]) ** 2) for i in range(n) for j in range(i + 1, n)]
        out[k] = math.sqrt(float(np.mean(d2)))
    return out


def _weights(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().reshape(-1).numpy() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_same_train_fn_gives_deep_lyapunov_trajectories(optimizer, one_thread):
    train_fn = make_train_fn(lr=0.02, optimizer=optimizer)
    loader = regression_loader()
    n, n_epochs = 4, 3
    theirs = dl.StabilityAnalyzer(mlp(), n_trajectories=n, verbose=False, device="cpu")
    ref = theirs.analyze(train_fn, loader, n_epochs)
    ours_an = StabilityAnalyzer(mlp(), n_trajectories=n, verbose=False, device="cpu")
    ours = ours_an.analyze(train_fn, loader, n_epochs)

    assert ours.n_checkpoints == ref.n_checkpoints == n_epochs + 1
    assert ours.n_parameters == ref.n_parameters
    for mine, their in zip(ours_an.get_models(), theirs.get_models(), strict=True):
        np.testing.assert_allclose(_weights(mine), _weights(their), rtol=0, atol=1e-6)

    traj = np.stack([t.get_trajectory() for t in theirs._trackers], axis=1)  # [T, N, P]
    np.testing.assert_allclose(ours.spread_evolution, _full_space_spread(traj), rtol=1e-4)
    for mine, their in zip(ours.trajectory_metrics, ref.trajectory_metrics, strict=True):
        assert mine.path_length == pytest.approx(their.path_length, rel=1e-4)
        assert mine.velocity_mean == pytest.approx(their.velocity_mean, rel=1e-4)
        assert mine.velocity_std == pytest.approx(their.velocity_std, rel=1e-3, abs=1e-7)
        assert mine.final_loss == pytest.approx(their.final_loss, rel=1e-5)


def test_fixed_steps_per_epoch_and_kwargs_loader_match_deep_lyapunov(one_thread):
    loader = regression_loader()

    def train_fn(model, _loader, n_epochs, data=None, steps=2):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        loss = torch.zeros(())
        for _ in range(n_epochs):
            for k, (x, y) in enumerate(data):
                if k == steps:
                    break
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                opt.step()
        return {"loss": [loss.item()]}

    kw = {"n_trajectories": 3, "verbose": False, "device": "cpu"}
    theirs = dl.StabilityAnalyzer(mlp(), **kw)
    ref = theirs.analyze(train_fn, loader, 5, data=loader, steps=3)
    an = StabilityAnalyzer(mlp(), **kw)
    ours = an.analyze(train_fn, loader, 5, data=loader, steps=3)
    assert ours.n_checkpoints == ref.n_checkpoints == 6
    traj = np.stack([t.get_trajectory() for t in theirs._trackers], axis=1)
    np.testing.assert_allclose(ours.spread_evolution, _full_space_spread(traj), rtol=1e-4)
    assert ours.lyapunov == pytest.approx(math.log(ours.convergence_ratio) / 5, rel=1e-12)


@pytest.mark.slow
def test_lightning_trainer_fit_inside_train_fn_gives_a_checkpoint_per_epoch(one_thread):
    L = pytest.importorskip("lightning")

    class Lit(L.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, _idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_fn(model, loader, n_epochs):
        trainer = L.Trainer(
            max_epochs=n_epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Lit(model), loader)
        return {"loss": [float(trainer.callback_metrics.get("train_loss", 0.0))]}

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {"n_trajectories": 2, "verbose": False, "device": "cpu"}
        theirs = dl.StabilityAnalyzer(mlp(), **kw)
        theirs.analyze(train_fn, regression_loader(), 3)
        an = StabilityAnalyzer(mlp(), **kw)
        ours = an.analyze(train_fn, regression_loader(), 3)
    assert ours.n_checkpoints == theirs._n_checkpoints == 4
    traj = np.stack([t.get_trajectory() for t in theirs._trackers], axis=1)
    np.testing.assert_allclose(ours.spread_evolution, _full_space_spread(traj), rtol=1e-4)
