"""Monitor a Hugging Face ``Trainer`` run with stabwatch: a tiny GPT-2 built from a config (nothing is
downloaded) learns a generated token sequence; stabwatch records one line per optimizer step and prints
its diagnosis at the end.

Run: ``python examples/hf_trainer_example.py --steps 50`` (needs ``pip install "stabwatch[huggingface]"``;
writes ``runs/hf_trainer.jsonl`` and the Trainer's files under ``runs/hf_trainer``).
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import stabwatch as sw
from stabwatch.integrations.transformers import StabwatchCallback

VOCAB, LENGTH = 64, 32


def token_dataset(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences of a noisy arithmetic pattern (next token = previous + stride, sometimes a random one):
    learnable, so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        ids = (start + stride * torch.arange(LENGTH)) % VOCAB
        noise = torch.rand(LENGTH, generator=g) < 0.1
        ids = torch.where(noise, torch.randint(0, VOCAB, (LENGTH,), generator=g), ids)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    parser.add_argument("--out", default="runs", help="output folder (default runs/)")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=LENGTH, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=f"{opts.out}/hf_trainer",
        max_steps=opts.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # one stabwatch record per optimizer step, not per micro-batch
        learning_rate=3e-3,
        max_grad_norm=1.0,  # stabwatch's grad/norm is the clipped norm the optimizer uses
        use_cpu=True,
        report_to=[],
        logging_steps=max(1, opts.steps // 5),
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    callback = StabwatchCallback(
        sinks=[sw.sinks.JsonlSink(f"{opts.out}/hf_trainer.jsonl")],
        preset="default",
        every={"weight": 10, "grad_sv": 10},
        raise_on="critical",  # a critical alert stops the Trainer (control.should_training_stop)
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(256), callbacks=[callback])
    with callback:  # removes the hooks even if train() raises
        trainer.train()

    last = callback.records[-1]
    print(f"{len(callback.records)} records; last (global step {last.step}): {last}")
    print(callback.diagnose())


if __name__ == "__main__":
    main()
