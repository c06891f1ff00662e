"""`StabwatchCallback` inside a real Hugging Face ``Trainer`` (tiny GPT-2 from a config, CPU, nothing
downloaded). References: the Trainer's own logs (``state.log_history``: its loss, and its ``grad_norm``,
which is the norm *before* clipping) and a plain ``TrainerCallback`` that computes the global gradient
norm with ``torch.linalg.vector_norm`` at ``on_pre_optimizer_step`` (after clipping, before the step)."""

from __future__ import annotations

import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import stabwatch as sw
from stabwatch.alerts import ThresholdRule
from stabwatch.integrations.transformers import STATE_FILE, StabwatchCallback

ROOT = Path(__file__).resolve().parents[2]
MAX_GRAD_NORM_OFF = 0.0


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def tokens(n: int = 64, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 50, (16,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def training_args(out: Path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


class GradReference(TrainerCallback):
    """Independent reference: the global gradient norm the optimizer is about to use, one per step."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad.reshape(-1).double() for p in self.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))


def run(tmp_path: Path, *callbacks, model=None, data=None, **overrides) -> Trainer:
    trainer = Trainer(
        model=model if model is not None else gpt2(),
        args=training_args(tmp_path, **overrides),
        train_dataset=data if data is not None else tokens(),
        callbacks=list(callbacks),
    )
    trainer.train()
    return trainer


def logged(trainer: Trainer, key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    ) + sum(len(p._backward_hooks or {}) for p in model.parameters() if hasattr(p, "_backward_hooks"))


def optimizer_hook_count(trainer: Trainer) -> int:
    inner = trainer.optimizer.optimizer
    return len(inner._optimizer_step_pre_hooks) + len(inner._optimizer_step_post_hooks)


# ------------------------------------------------------------------------------------------------
def test_one_record_per_optimizer_step_under_accumulation(tmp_path, one_thread) -> None:
    ref = GradReference()
    cb = StabwatchCallback(preset="cheap")
    trainer = run(tmp_path, ref, cb, gradient_accumulation_steps=2, max_grad_norm=MAX_GRAD_NORM_OFF)

    records = list(cb.records)
    assert len(records) == 4  # max_steps, not 8 micro-batches
    # record step == the Trainer's global step of that update (what its logs use)
    assert [r.step for r in records] == sorted(logged(trainer, "loss")) == [1, 2, 3, 4]
    # no clipping: the gradients used are the Trainer's logged (pre-clip) norm and the reference's
    hf_norm = logged(trainer, "grad_norm")
    for r, ref_norm in zip(records, ref.norms, strict=True):
        assert r.grad_norm == pytest.approx(ref_norm, rel=1e-5)
        assert r.grad_norm == pytest.approx(hf_norm[r.step], rel=1e-5)
    # the loss of the step: the Trainer's logged loss (sum of the num_items-normalised micro-batch losses)
    hf_loss = logged(trainer, "loss")
    for r in records:
        assert r.loss == pytest.approx(hf_loss[r.step], rel=1e-6)


def test_recorded_gradients_are_the_clipped_ones(tmp_path, one_thread) -> None:
    ref = GradReference()
    cb = StabwatchCallback(preset="cheap")
    trainer = run(tmp_path, ref, cb, gradient_accumulation_steps=2, max_grad_norm=0.01)

    hf_preclip = logged(trainer, "grad_norm")
    assert all(v > 0.1 for v in hf_preclip.values())  # clipping really happened
    assert len(cb.records) == 4
    for r, ref_norm in zip(cb.records, ref.norms, strict=True):
        assert r.grad_norm == pytest.approx(0.01, rel=1e-5)
        assert r.grad_norm == pytest.approx(ref_norm, rel=1e-5)


class MeanLossModel(torch.nn.Module):
    """A model whose forward takes no ``**kwargs``: the Trainer passes no ``num_items_in_batch``, its loss is
    a per-micro-batch mean and the step's loss is the mean over micro-batches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.emb(input_ids))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1))
        return {"loss": loss, "logits": logits}


def test_loss_of_a_model_without_loss_kwargs_is_the_micro_batch_mean(tmp_path, one_thread) -> None:
    cb = StabwatchCallback(preset="cheap")
    trainer = run(tmp_path, cb, model=MeanLossModel(), gradient_accumulation_steps=2)
    assert not trainer.model_accepts_loss_kwargs
    hf_loss = logged(trainer, "loss")
    assert len(cb.records) == 4
    for r in cb.records:
        assert r.loss == pytest.approx(hf_loss[r.step], rel=1e-6)
        assert 3.0 < r.loss < 5.0  # ~ln(50): a mean, not the sum of two micro-batch means


def test_bf16_on_cpu(tmp_path, one_thread) -> None:
    seen: set[torch.dtype] = set()

    class DtypeProbe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            block = model.transformer.h[0].mlp.c_fc
            block.register_forward_hook(lambda m, a, out: seen.add(out.dtype))

    ref = GradReference()
    cb = StabwatchCallback(preset="cheap")
    trainer = run(tmp_path, DtypeProbe(), ref, cb, bf16=True, gradient_accumulation_steps=2, max_grad_norm=0.05)
    assert torch.bfloat16 in seen  # autocast really ran in bf16
    hf_loss = logged(trainer, "loss")
    assert len(cb.records) == 4
    for r, ref_norm in zip(cb.records, ref.norms, strict=True):
        assert r.grad_norm == pytest.approx(ref_norm, rel=1e-5)
        assert r.grad_norm == pytest.approx(0.05, rel=1e-5)
        assert r.loss == pytest.approx(hf_loss[r.step], rel=1e-6)


@pytest.mark.parametrize("how", ["raise_on", "on_alert"])
def test_an_alert_stops_the_trainer(tmp_path, one_thread, caplog, how) -> None:
    rule = ThresholdRule("grad_norm", above=0.0, patience=2, severity="critical", name="test_stop")
    if how == "raise_on":
        cb = StabwatchCallback(preset="cheap", alerts=[rule], raise_on="critical")
    else:

        def stop(alert):
            raise sw.InstabilityError(f"asked to stop by the test callback ({alert.rule})")

        cb = StabwatchCallback(preset="cheap", alerts=[rule], on_alert=stop)
    model = gpt2()
    with caplog.at_level(logging.ERROR, logger="stabwatch"):
        trainer = run(tmp_path, cb, model=model, max_steps=6)  # no exception escapes
    assert trainer.state.global_step == 2 < 6
    assert [r.step for r in cb.records] == [1, 2]
    assert [a.rule for a in cb.alerts] == ["test_stop"]
    stops = [r.getMessage() for r in caplog.records if "stopping the Trainer" in r.getMessage()]
    assert len(stops) == 1
    assert "global step 2" in stops[0] and "test_stop" in stops[0]
    assert hook_count(model) == 0 and optimizer_hook_count(trainer) == 0  # on_train_end still ran


def test_hooks_removed_after_training(tmp_path, one_thread) -> None:
    model = gpt2()
    assert hook_count(model) == 0
    cb = StabwatchCallback(preset="full")
    trainer = run(tmp_path, cb, model=model, max_steps=2)
    assert len(cb.records) == 2
    assert hook_count(model) == 0
    assert optimizer_hook_count(trainer) == 0


class _Exploding(torch.utils.data.Dataset):
    """Fault injection: the data loader fails at the fourth batch, so ``Trainer.train`` raises mid-run."""

    def __init__(self) -> None:
        self.rows = tokens(64)
        self.calls = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > 12:
            raise RuntimeError("data loader failure")
        return self.rows[i]


def test_a_failing_train_run_leaves_no_hooks_with_the_context_manager(tmp_path, one_thread) -> None:
    model = gpt2()
    with StabwatchCallback(preset="cheap") as cb:
        trainer = Trainer(
            model=model,
            args=training_args(tmp_path, per_device_train_batch_size=4, max_steps=4),
            train_dataset=_Exploding(),
            callbacks=[cb],
        )
        with pytest.raises(RuntimeError, match="data loader failure"):
            trainer.train()
        assert hook_count(model) > 0  # still attached: on_train_end never ran
    assert hook_count(model) == 0
    assert 1 <= len(cb.records) < 4  # it did monitor some steps before the failure


def test_training_is_unchanged_by_the_callback(tmp_path, one_thread) -> None:
    plain = gpt2()
    run(tmp_path / "a", model=plain, gradient_accumulation_steps=2, max_grad_norm=0.5)
    watched = gpt2()
    cb = StabwatchCallback(preset="full")
    run(tmp_path / "b", cb, model=watched, gradient_accumulation_steps=2, max_grad_norm=0.5)
    assert len(cb.records) == 4
    for (name, p), q in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_resume_from_checkpoint_continues_the_monitor(tmp_path, one_thread) -> None:
    out = tmp_path / "run"
    constant = {"lr_scheduler_type": "constant", "save_steps": 2}  # the same schedule for 2 or 4 steps
    first = StabwatchCallback(preset="cheap")
    run(out, first, max_steps=2, save_strategy="steps", **constant)
    path = out / "checkpoint-2" / STATE_FILE
    assert path.is_file()
    saved = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert saved["step"] == 3  # the next record's step
    assert saved["alerts"] == first.monitor.state_dict()["alerts"]

    second = StabwatchCallback(preset="cheap")
    trainer = Trainer(
        model=gpt2(),
        args=training_args(out, max_steps=4, **constant),
        train_dataset=tokens(),
        callbacks=[second],
    )
    trainer.train(resume_from_checkpoint=True)
    assert [r.step for r in second.records] == [3, 4]
    # the alert rules saw steps 1-2 in the first run: the resumed windows hold 4 values, like a straight run
    straight = StabwatchCallback(preset="cheap")
    run(tmp_path / "straight", straight, max_steps=4, **constant)
    assert second.monitor.state_dict()["alerts"] == straight.monitor.state_dict()["alerts"]
    assert [r.grad_norm for r in second.records] == pytest.approx([r.grad_norm for r in straight.records][2:], rel=1e-6)


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(sw.errors.ConfigError, match="raise_on"):
        StabwatchCallback(raise_on="sometimes")
    with pytest.raises(sw.errors.ConfigError, match="unknown option"):
        StabwatchCallback(colectors=[])
    with pytest.raises(sw.errors.ConfigError, match="preset"):
        StabwatchCallback(preset="everything")
    with pytest.raises(sw.errors.ConfigError, match="sinks"):
        StabwatchCallback(sinks="run.jsonl")


@pytest.mark.slow  # a fresh interpreter imports torch (~3 s)
def test_missing_transformers_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n    import stabwatch.integrations.transformers\n"
        "except ImportError as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.startswith("MissingExtraError")
    assert 'pip install "stabwatch[huggingface]"' in out


def test_example_runs(tmp_path, monkeypatch, one_thread, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["hf_trainer_example.py", "--steps", "3", "--out", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "hf_trainer_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "3 records" in out and "stabwatch diagnosis" in out
    lines = (tmp_path / "hf_trainer.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert os.path.isdir(tmp_path / "hf_trainer")


def test_an_unreadable_monitor_state_costs_the_windows_not_the_run(tmp_path, one_thread, caplog) -> None:
    out = tmp_path / "run"
    constant = {"lr_scheduler_type": "constant", "save_steps": 2}
    run(out, StabwatchCallback(preset="cheap"), max_steps=2, save_strategy="steps", **constant)
    (out / "checkpoint-2" / STATE_FILE).write_bytes(b"not a torch file")  # fault injection

    cb = StabwatchCallback(preset="cheap")
    trainer = Trainer(
        model=gpt2(), args=training_args(out, max_steps=4, **constant), train_dataset=tokens(), callbacks=[cb]
    )
    with caplog.at_level(logging.WARNING, logger="stabwatch"):
        trainer.train(resume_from_checkpoint=True)
    assert any("could not read" in r.getMessage() for r in caplog.records)
    assert [r.step for r in cb.records] == [3, 4]  # numbering still follows the Trainer
