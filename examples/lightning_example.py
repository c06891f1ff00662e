"""Monitor a PyTorch Lightning run with `StabwatchCallback` (scikit-learn's digits, a small MLP).

Run: ``python examples/lightning_example.py`` (``--steps 200``; ``--lr 5 --clip 0`` for an unstable run
that the callback stops). Writes ``runs/lightning.jsonl`` and Lightning's own CSV log under ``runs/lightning/``
(with stabwatch's metrics in it: ``log_to_trainer=True``), then prints the diagnosis.
"""

from __future__ import annotations

import argparse
import logging

import lightning.pytorch as L
import torch
from torch import nn

import stabwatch as sw
from stabwatch.demo import load_data
from stabwatch.integrations.lightning import StabwatchCallback


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument("--clip", type=float, default=5.0, help="gradient_clip_val (default 5; 0: no clipping)")
    parser.add_argument("--out", default="runs", help="output folder (default runs/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    x, y, source = load_data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    callback = StabwatchCallback(
        sinks=[sw.sinks.JsonlSink(f"{args.out}/lightning.jsonl"), sw.sinks.ConsoleSink(every=max(1, args.steps // 5))],
        every={"grad_sv": 25, "weight": 25},
        raise_on="critical",  # a critical alert (NaN/inf, exploding gradients) ends fit gracefully
        log_to_trainer=True,
    )
    trainer = L.Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=2,  # one record per optimizer step, i.e. per 2 batches
        gradient_clip_val=args.clip or None,  # grad/norm is measured after clipping: at most --clip
        callbacks=[callback],
        logger=L.loggers.CSVLogger(args.out, name="lightning"),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(DigitsClassifier(args.lr), loader)

    print(f"data: {source}; {len(callback.records)} records, last: {callback.records[-1]}")
    if callback.stop_reason:
        print(f"stopped early after {trainer.global_step} steps: {callback.stop_reason}")
    print(callback.diagnose())


if __name__ == "__main__":
    main()
