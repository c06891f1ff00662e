"""`GradSVCollector` on its own: gradient spectra against ``torch.linalg.svdvals`` in float64.

Exact path (``min(m, n) <= exact_max_dim``): top-k, the smallest non-zero singular value above the
``sigma_1 * max(m, n) * eps(float32)`` rank tolerance, the numerical rank and the condition number.
Randomized path (wider layers): the top-k only, drawn from the monitor's generator, never the global RNG.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabwatch.collectors import GradSVCollector
from tests.collectors.drive import Drive

K = GradSVCollector().top_k


def _reference(grad: torch.Tensor) -> dict[str, float]:
    g = grad.detach().reshape(grad.shape[0], -1).double()
    s = torch.linalg.svdvals(g)
    tol = float(s[0]) * max(g.shape) * torch.finfo(torch.float32).eps
    rank = int((s > tol).sum())
    return {"top": s[:K].tolist(), "min": float(s[rank - 1]), "rank": rank, "kappa": float(s[0] / s[rank - 1])}


class Net(nn.Module):
    """Two same-shape layers (one batch), a conv kernel (reshaped to [out, in*k*k]), a [1, n] head (a
    vector, not a matrix: left out)."""

    def __init__(self, wide: int = 16) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(2, 6, 3)
        self.a = nn.Linear(6 * 4 * 4, wide)
        self.b = nn.Linear(wide, wide)
        self.c = nn.Linear(wide, wide)
        self.head = nn.Linear(wide, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(torch.relu(self.conv(x)).flatten(1)))
        return self.head(torch.tanh(self.c(torch.tanh(self.b(h)))))


def _loss(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 2, 6, 6, generator=g), torch.randn(32, 1, generator=g)


def test_exact_spectra_match_svdvals():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    drive = Drive(GradSVCollector(every=1), model, opt)
    grads: dict[str, torch.Tensor] = {}
    opt.register_step_pre_hook(lambda o, a, k: grads.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    values = drive.train_step(_loss, _batch())
    layers = ["conv", "a", "b", "c"]
    refs = {layer: _reference(grads[f"{layer}.weight"]) for layer in layers}
    for field, key in (("grad_min_sv", "min"), ("grad_rank", "rank"), ("grad_condition", "kappa")):
        got = values.layers(field)
        assert sorted(got) == sorted(layers), field
        for layer in layers:
            assert got[layer] == pytest.approx(refs[layer][key], rel=1e-5), f"{field} of {layer}"
    top1 = values.layers("grad_max_sv")
    assert sorted(top1) == sorted(layers)
    for layer in layers:
        assert top1[layer] == pytest.approx(refs[layer]["top"][0], rel=1e-5), layer
        extra = values.extra(layer)  # top-1..k, keys sorted by their index
        assert len(extra) == K and [extra[k] for k in sorted(extra)] == pytest.approx(refs[layer]["top"], rel=1e-5)
    assert values.field("grad_max_sv") == pytest.approx(max(r["top"][0] for r in refs.values()), rel=1e-5)
    assert values.field("grad_min_sv") == pytest.approx(min(r["min"] for r in refs.values()), rel=1e-5)
    assert values.field("grad_condition") == pytest.approx(max(r["kappa"] for r in refs.values()), rel=1e-5)
    drive.close()


def test_wide_layers_take_the_randomized_path_with_the_monitors_generator():
    wide = GradSVCollector().exact_max_dim + 44
    model = Net(wide)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    drive = Drive(GradSVCollector(every=1), model, opt)
    grads: dict[str, torch.Tensor] = {}
    opt.register_step_pre_hook(lambda o, a, k: grads.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    for step in range(3):
        rng = torch.get_rng_state()
        generator = drive.generator.get_state()
        values = drive.train_step(_loss, _batch(step))
        assert torch.equal(torch.get_rng_state(), rng), "the randomized path drew from the global RNG"
        for layer in ("b", "c"):  # [wide, wide]: randomized, top-k only
            ref = _reference(grads[f"{layer}.weight"])
            assert values.layers("grad_max_sv")[layer] == pytest.approx(ref["top"][0], rel=1e-3)
            extra = values.extra(layer)
            assert len(extra) == K
            assert [extra[k] for k in sorted(extra)] == pytest.approx(ref["top"], rel=2e-2)
            assert layer not in values.layers("grad_condition") and layer not in values.layers("grad_rank")
        assert "a" in values.layers("grad_condition")  # [wide, 96]: still exact
        # probes are drawn once per shape (later records start from the previous basis)
        assert torch.equal(drive.generator.get_state(), generator) == (step > 0)
    drive.close()


def test_without_an_optimizer_the_spectra_are_taken_at_collect():
    model = Net()
    drive = Drive(GradSVCollector(every=1), model)
    values = drive.train_step(_loss, _batch())
    ref = _reference(model.b.weight.grad)
    assert values.layers("grad_max_sv")["b"] == pytest.approx(ref["top"][0], rel=1e-5)
    drive.close()
