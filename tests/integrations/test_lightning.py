"""The Lightning front-end against a real ``lightning.pytorch.Trainer`` on the CPU: one record per optimizer
step, the gradients the optimizer uses (accumulated, unscaled, clipped) against references computed by
hand, manual optimization, stopping, hooks removed, training unchanged, checkpoint resume, trainer
loggers and the example."""

from __future__ import annotations

import copy
import csv
import logging
import math
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

import stabwatch as sw  # noqa: E402
from stabwatch.errors import ConfigError, StabwatchError  # noqa: E402
from stabwatch.integrations.lightning import StabwatchCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N, BATCH, LR = 32, 4, 0.1

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Lightning's num_workers / small-log-interval hints
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)  # "GPU available: False", tips
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logger.setLevel(level)


def _data(seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(N, 6, generator=g), torch.randn(N, 1, generator=g))


def _loader(seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_data(seed), batch_size=BATCH, shuffle=False)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(_loader())


class Reg(L.LightningModule):
    """A tiny regression MLP; ``nan_at`` makes the loss NaN from that batch on (a scripted blow-up)."""

    def __init__(self, seed: int = 0, dropout: float = 0.0, nan_at: int | None = None, fail_at: int | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.nan_at, self.fail_at = nan_at, fail_at
        self.seen_grad_norms: list[float] = []  # in on_before_optimizer_step: accumulated, unscaled, unclipped
        self.hooks_during_fit: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.nan_at is not None and self.global_step >= self.nan_at:
            loss = loss * float("nan")
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("scripted failure")
        if batch_idx == 1:
            self.hooks_during_fit = (_hook_count(self), _opt_hook_count(self.trainer.optimizers[0]))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.seen_grad_norms.append(_grad_norm(self))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


class ManualReg(Reg):
    """Manual optimization: a step every ``every`` batches, clipping to ``clip`` by hand."""

    def __init__(self, every: int = 1, clip: float | None = None, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False
        self.every, self.clip = every, clip
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(float(loss))
        self.manual_backward(loss / self.every)
        if (batch_idx + 1) % self.every == 0:
            if self.clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
            opt.step()  # on_before_optimizer_step (inherited) records the clipped gradient's norm
            opt.zero_grad()
        return loss


def _grad_norm(model: nn.Module) -> float:
    grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads)))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _opt_hook_count(opt) -> int:
    return len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def _trainer(callbacks=(), **kw) -> L.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    opts.update(kw)
    return L.Trainer(callbacks=list(callbacks), **opts)


# ---------------------------------------------------------------------------------------------- steps
def test_one_record_per_optimizer_step_with_accumulation_matches_a_hand_computed_reference():
    model = Reg()
    reference_model = copy.deepcopy(model)
    cb = StabwatchCallback(preset="cheap")
    _trainer([cb], max_steps=3, accumulate_grad_batches=2).fit(model, _loader())
    recs = list(cb.records)
    assert [r.step for r in recs] == [0, 1, 2]  # 6 micro-batches, 3 optimizer steps, 3 records

    # the reference: the same SGD by hand, gradients accumulated over 2 micro-batches of loss/2
    opt = torch.optim.SGD(reference_model.parameters(), lr=LR, momentum=0.9)
    batches = _batches()
    want_norms, want_losses = [], []
    for k in range(3):
        opt.zero_grad()
        losses = []
        for x, y in batches[2 * k : 2 * k + 2]:
            loss = nn.functional.mse_loss(reference_model(x), y)
            (loss / 2).backward()
            losses.append(float(loss))
        want_norms.append(_grad_norm(reference_model))
        want_losses.append(sum(losses) / 2)
        opt.step()
    assert [r.grad_norm for r in recs] == pytest.approx(want_norms, rel=1e-5)
    assert [r.loss for r in recs] == pytest.approx(want_losses, rel=1e-5)
    # the single micro-batch's gradient is a different number: the test tells the two apart
    assert abs(recs[0].grad_norm - want_norms[0] * 2) > 0.1 * want_norms[0]
    for name, p in model.named_parameters():
        assert torch.allclose(p, dict(reference_model.named_parameters())[name], atol=1e-6), name


def test_clipped_gradient_is_measured():
    clip = 0.01
    model = Reg()
    cb = StabwatchCallback(preset="cheap")
    _trainer([cb], max_steps=3, gradient_clip_val=clip).fit(model, _loader())
    assert min(model.seen_grad_norms) > 10 * clip  # clipping is active on every step
    assert [r.grad_norm for r in cb.records] == pytest.approx([clip] * 3, rel=1e-4)


@pytest.mark.parametrize("every", [1, 2])
def test_manual_optimization(every):
    model = ManualReg(every=every, clip=0.05)
    cb = StabwatchCallback(preset="cheap")
    _trainer([cb], max_steps=3).fit(model, _loader())  # max_steps counts optimizer steps
    recs = list(cb.records)
    assert [r.step for r in recs] == [0, 1, 2]
    assert [r.grad_norm for r in recs] == pytest.approx(model.seen_grad_norms, rel=1e-5)
    assert [r.grad_norm for r in recs] == pytest.approx([0.05] * 3, rel=1e-4)
    want = [sum(model.losses[every * k : every * k + every]) / every for k in range(3)]
    assert [r.loss for r in recs] == pytest.approx(want, rel=1e-5)


def test_fp16_amp_gradients_are_unscaled():
    """Real fp16 autocast + GradScaler on the CPU (Lightning maps precision="16-mixed" on the CPU to bf16,
    so the plugin is passed explicitly): the record has the unscaled norm, not 1024 times it."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model = Reg()
    cb = StabwatchCallback(preset="cheap")
    _trainer([cb], max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(model, _loader())
    assert scaler.get_scale() == 1024.0  # no step was skipped
    assert [r.grad_norm for r in cb.records] == pytest.approx(model.seen_grad_norms, rel=1e-6)
    assert all(0 < r.grad_norm < 100 for r in cb.records)


def test_bf16_mixed_runs_on_cpu():
    model = Reg()
    cb = StabwatchCallback(preset="cheap")
    _trainer([cb], max_steps=3, precision="bf16-mixed").fit(model, _loader())
    assert [r.grad_norm for r in cb.records] == pytest.approx(model.seen_grad_norms, rel=1e-6)
    assert all(math.isfinite(r.loss) for r in cb.records)


# ---------------------------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("how", ["raise_on", "on_alert"])
def test_alert_stops_training_without_an_exception(how, caplog):
    def stop_on_nan(alert: sw.Alert) -> None:
        if alert.reason is sw.AlertReason.NON_FINITE:
            raise sw.InstabilityError(f"stop: {alert.message}", alerts=[alert], step=alert.step)

    kw = {"raise_on": "critical"} if how == "raise_on" else {"on_alert": stop_on_nan}
    cb = StabwatchCallback(preset="cheap", **kw)
    trainer = _trainer([cb], max_steps=8)
    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        trainer.fit(Reg(nan_at=3), _loader())
    assert trainer.should_stop
    assert trainer.global_step == 4  # stopped after the first NaN step, not at max_steps=8
    assert [r.step for r in cb.records] == [0, 1, 2, 3]
    assert cb.stop_reason is not None and "non" in cb.stop_reason.lower()
    stops = [r.getMessage() for r in caplog.records if "stopping training" in r.getMessage()]
    assert len(stops) == 1 and cb.stop_reason in stops[0]


def test_no_stop_without_raise_on():
    cb = StabwatchCallback(preset="cheap")
    trainer = _trainer([cb], max_steps=6)
    trainer.fit(Reg(nan_at=3), _loader())
    assert trainer.global_step == 6 and cb.stop_reason is None
    assert any(a.reason is sw.AlertReason.NON_FINITE for a in cb.alerts)


# ---------------------------------------------------------------------------------------------- lifecycle
def test_hooks_removed_after_fit_and_after_a_failing_fit():
    for fail_at in (None, 2):
        model = Reg(fail_at=fail_at)
        before = _hook_count(model)
        cb = StabwatchCallback(preset="full")
        trainer = _trainer([cb], max_steps=4)
        if fail_at is None:
            trainer.fit(model, _loader())
        else:
            with pytest.raises(RuntimeError, match="scripted failure"):
                trainer.fit(model, _loader())
        assert model.hooks_during_fit is not None
        assert model.hooks_during_fit[0] > before and model.hooks_during_fit[1] == 2  # attached during fit
        assert _hook_count(model) == before == 0
        assert _opt_hook_count(trainer.optimizers[0]) == 0
        with pytest.raises(StabwatchError, match="outside the monitor"):  # closed
            cb.monitor.step()


class ValReg(Reg):
    """With a validation set on a very different scale: its activations must not reach the records."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(100 * x), y)


def test_validation_passes_do_not_reach_the_records():
    def run(validate: bool):
        model = ValReg() if validate else Reg()
        cb = StabwatchCallback(preset="cheap", every={"activation": 1})
        kw = {"val_check_interval": 2, "num_sanity_val_steps": 1, "limit_val_batches": 2} if validate else {}
        _trainer([cb], max_steps=4, **kw).fit(model, _loader(), *([_loader(1)] if validate else []))
        assert _hook_count(model) == 0
        return [r.activation_std for r in cb.records]

    plain, validated = run(False), run(True)
    assert len(plain) == 4 and all(v is not None for v in plain)
    assert validated == plain


def test_training_unchanged_bit_for_bit():
    def run(callbacks):
        L.seed_everything(7, verbose=False)
        model = Reg(dropout=0.2)
        _trainer(callbacks, max_steps=6, accumulate_grad_batches=2, gradient_clip_val=0.5).fit(model, _loader())
        return model, torch.get_rng_state()

    (plain, rng0), (watched, rng1) = run([]), run([StabwatchCallback(preset="full")])
    sd0, sd1 = plain.state_dict(), watched.state_dict()
    assert list(sd0) == list(sd1) and len(sd0) == 4
    for name in sd0:
        assert torch.equal(sd0[name], sd1[name]), name
    assert torch.equal(rng0, rng1)  # the global RNG stream (dropout masks) was not touched


def test_checkpoint_resume_continues_the_step_count(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=6)
    first = StabwatchCallback(preset="cheap")
    _trainer([first, ckpt], max_steps=6, enable_checkpointing=True).fit(Reg(), _loader())
    assert [r.step for r in first.records] == list(range(6))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["callbacks"][first.state_key]["monitor"]["step"] == 6

    second = StabwatchCallback(preset="cheap")
    trainer = _trainer([second], max_steps=9, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(Reg(), _loader(), ckpt_path=tmp_path / "last.ckpt")
    assert [r.step for r in second.records] == [6, 7, 8]


def test_unusable_checkpoint_state_starts_fresh(caplog):
    cb = StabwatchCallback(preset="cheap")
    cb.load_state_dict({"monitor": {"generator": torch.get_rng_state(), "step": 5, "alerts": {"rules": 3}}})
    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        _trainer([cb], max_steps=2).fit(Reg(), _loader())
    assert [r.step for r in cb.records] == [0, 1]
    assert any("could not be applied" in r.getMessage() for r in caplog.records)


def test_log_to_trainer_writes_to_the_csv_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run", version=0)
    cb = StabwatchCallback(preset="cheap", log_to_trainer=True)
    _trainer([cb], max_steps=4, logger=logger, log_every_n_steps=1).fit(Reg(), _loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("grad/norm")]
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]
    assert [float(row["grad/norm"]) for row in rows] == pytest.approx([r.grad_norm for r in cb.records], rel=1e-6)
    assert [float(row["loss/value"]) for row in rows] == pytest.approx([r.loss for r in cb.records], rel=1e-6)


def test_shadow_gets_the_batch():
    def loss_fn(model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    cb = StabwatchCallback(preset="cheap", shadow=sw.Shadow(loss_fn, every=4, window=4, transient=0))
    _trainer([cb], max_steps=4).fit(Reg(), _loader())
    assert any(r.lyapunov is not None or r.shadow_divergence is not None for r in cb.records)

    refused = StabwatchCallback(shadow=sw.Shadow(loss_fn, every=4, window=4))
    with pytest.raises(ConfigError, match="accumulate_grad_batches"):
        _trainer([refused], max_steps=2, accumulate_grad_batches=2).fit(Reg(), _loader())


def test_bad_options_fail_at_construction():
    with pytest.raises(ConfigError, match="preset"):
        StabwatchCallback(preset="fast")
    with pytest.raises(ConfigError, match="raise_on"):
        StabwatchCallback(raise_on="sometimes")
    with pytest.raises(ConfigError, match="optimizer_index"):
        StabwatchCallback(optimizer_index=-1)
    with pytest.raises(ConfigError, match="sinks"):
        StabwatchCallback(sinks="run.jsonl")
    cb = StabwatchCallback(optimizer_index=1)
    with pytest.raises(ConfigError, match="optimizer_index=1"):
        _trainer([cb], max_steps=1).fit(Reg(), _loader())
    with pytest.raises(StabwatchError, match="no fit"):
        StabwatchCallback().monitor  # noqa: B018


def test_one_callback_one_fit_and_the_tuner_does_not_count():
    from lightning.pytorch.tuner import Tuner

    cb = StabwatchCallback(preset="cheap")
    trainer = _trainer([cb], max_steps=3)
    model = Reg()
    Tuner(trainer).lr_find(model, _loader(), num_training=5, update_attr=False)
    assert not cb.records  # the learning-rate search ran before the callback attached
    trainer.fit(model, _loader())
    assert [r.step for r in cb.records] == [0, 1, 2]
    with pytest.raises(StabwatchError, match="new StabwatchCallback"):
        _trainer([cb], max_steps=3).fit(Reg(), _loader())


def test_example_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning_example.py", "--steps", "5"])
    runpy.run_path(str(ROOT / "examples" / "lightning_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "5 records" in out
