"""The record's top-level ``grad_rank`` (key ``grad_sv/rank``), as the docs describe it: the smallest
numerical rank over the layers with an exact spectrum, checked against ``torch.linalg.svdvals`` of the
gradients the optimizer used; empty when no layer is exact."""

from __future__ import annotations

import torch
from torch import nn

import stabwatch as sw
from stabwatch.collectors import GradSVCollector

OFF = {"update": None, "weight": None, "activation": None, "spiking": None}


def _rank(grad: torch.Tensor) -> int:
    s = torch.linalg.svdvals(grad.double())
    return int((s > s[0] * max(grad.shape) * torch.finfo(torch.float32).eps).sum())


def _run(collector: GradSVCollector, batch: int) -> tuple[sw.StabilityMetrics, dict[str, int]]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ranks: dict[str, int] = {}
    opt.register_step_pre_hook(
        lambda o, a, k: ranks.update(
            {n[: -len(".weight")]: _rank(p.grad) for n, p in model.named_parameters() if p.ndim == 2}
        )
    )
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(batch, 12, generator=g), torch.randn(batch, 6, generator=g)
    with sw.Monitor(model, opt, preset="cheap", every=OFF, collectors=[collector], alerts=False) as mon:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        record = mon.step(loss=loss)
    assert record is not None
    return record, ranks


def test_global_rank_is_the_smallest_layer_rank():
    record, ranks = _run(GradSVCollector(every=1), batch=4)  # 4 samples: rank <= 4 in both layers
    assert ranks == {"0": 4, "2": 4}
    assert record.layers["0"]["grad_rank"] == 4 and record.layers["2"]["grad_rank"] == 4
    assert record.grad_rank == min(ranks.values())
    assert record.to_dict()["grad_sv/rank"] == min(ranks.values())


def test_global_rank_follows_the_most_rank_deficient_layer():
    record, ranks = _run(GradSVCollector(every=1), batch=8)  # rank 8 in [10, 12], 6 in [6, 10]
    assert ranks == {"0": 8, "2": 6}
    assert record.grad_rank == 6 == record.layers["2"]["grad_rank"]


def test_global_rank_is_empty_without_exact_layers():
    record, _ = _run(GradSVCollector(every=1, exact_max_dim=2), batch=4)  # every gradient goes to Krylov
    assert record.grad_max_sv is not None
    assert record.grad_rank is None and record.grad_min_sv is None and record.grad_condition is None
    assert "grad_sv/rank" not in record.to_dict()
