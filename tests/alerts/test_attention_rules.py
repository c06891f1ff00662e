"""The default attention rules and the attention cause of the diagnosis on real training: the tiny decoder of
tests/collectors/test_attention.py (no qk-layernorm, AdamW) grows its attention logits at lr 1e-1 and stays
healthy at lr 3e-2, monitored with the `default` preset (the attention family every 5 steps)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.alerts.defaults import ATTENTION_ENTROPY_FLOOR, ATTENTION_LOGIT_CEILING, default_rules
from stabwatch.diagnosis import analyse
from stabwatch.metrics import AlertReason, StabilityMetrics
from tests.collectors.test_attention import Attn, Decoder, lm_steps

_ATTENTION_RULES = {"attention_logit_growth", "attention_entropy_collapse"}


class _QKNormAttn(Attn):
    """The decoder's attention with qk-layernorm: a LayerNorm on each head's queries and keys."""

    def __init__(self) -> None:
        super().__init__()
        self.q_norm, self.k_norm = nn.LayerNorm(4), nn.LayerNorm(4)

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().qk(x)
        return self.q_norm(q), self.k_norm(k), v


@functools.cache
def _train(lr: float, seed: int = 0, qk_norm: bool = False, steps: int = 50) -> tuple[list[StabilityMetrics], str]:
    """Next-token prediction over a fixed random text, AdamW (β = 0.9, 0.95; weight decay 0.1), the default
    preset with its default rules; the records and the optimizer's name."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 13, (200,), generator=g)
    torch.manual_seed(seed)
    model = Decoder()
    if qk_norm:
        model.blocks = nn.ModuleList([_QKNormAttn(), _QKNormAttn()])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    with sw.Monitor(model, opt) as mon:
        records = lm_steps(model, opt, mon, text, g, steps)
    return records, type(opt).__name__


def _measured(records: list[StabilityMetrics], key: str) -> list[tuple[int, float]]:
    return [(r.step, r.extra[key]) for r in records if key in r.extra]


@pytest.mark.parametrize("seed", [0, 1])
def test_logit_growth_warned_within_5_steps_of_onset_and_named_first_by_the_diagnosis(seed: int) -> None:
    records, optimizer = _train(1e-1, seed)
    logits = _measured(records, "attention/max_logit")
    onset = next(s for s, v in logits if v > ATTENTION_LOGIT_CEILING)  # the first measured logit > 100
    alerts = [a for r in records for a in r.alerts if a.reason is not AlertReason.RECOVERED]
    assert alerts, "no alert on a run whose attention logits blow up"
    first = min(alerts, key=lambda a: a.step)
    assert first.rule == "attention_logit_growth" and onset <= first.step <= onset + 5, (onset, str(first))
    assert first.value > ATTENTION_LOGIT_CEILING and first.severity is sw.Severity.WARNING
    # the entropy collapses after the logits: its rule fires too, on two measurements below the floor
    entropy = _measured(records, "attention/entropy_min")
    collapse = [a for a in alerts if a.rule == "attention_entropy_collapse"]
    assert collapse and collapse[0].step > first.step
    below = [s for s, v in entropy if v < ATTENTION_ENTROPY_FLOOR]
    assert collapse[0].step == below[1] and below[1] - below[0] == 5  # two measurements in a row, 5 steps apart

    d = analyse(records, optimizer=optimizer)
    top = d.causes[0]
    assert top.key == "attention_logits", [c.key for c in d.causes]
    assert "attention logit growth" in top.title
    text = " ".join(top.actions)
    assert "qk-layernorm" in text and "z-loss" in text and "warm-up" in text
    assert "does little" in text and "AdamW" in text  # clipping under Adam described as it is
    assert "clip_grad_norm_(" not in text


@pytest.mark.parametrize(
    ("lr", "seed", "qk_norm"), [(3e-2, 0, False), (3e-2, 1, False), (1e-1, 0, True), (1e-1, 1, True)]
)
def test_nothing_fires_at_a_healthy_rate_nor_with_qk_layernorm_at_the_high_one(
    lr: float, seed: int, qk_norm: bool
) -> None:
    records, optimizer = _train(lr, seed, qk_norm)
    assert max(v for _, v in _measured(records, "attention/max_logit")) < ATTENTION_LOGIT_CEILING / 2
    assert min(v for _, v in _measured(records, "attention/entropy_min")) > 5 * ATTENTION_ENTROPY_FLOOR
    assert [str(a) for r in records for a in r.alerts] == []
    assert analyse(records, optimizer=optimizer).causes == []


def test_attention_rules_are_global_and_quiet_without_the_attention_keys() -> None:
    rules = {r.name: r for r in default_rules(per_layer=False)}
    assert set(rules) >= _ATTENTION_RULES
    engine = sw.alerts.AlertEngine([rules[n] for n in sorted(_ATTENTION_RULES)], log_alerts=False)
    plain = [StabilityMetrics(step=s, loss=1.0, grad_norm=1.0) for s in range(30)]
    assert engine.run(plain) == []


def test_logit_rule_clears_at_half_its_level_and_entropy_rule_needs_two_values() -> None:
    rules = {r.name: r for r in default_rules(per_layer=False)}
    logit = rules["attention_logit_growth"]
    got = [
        (s, a.reason.value)
        for s, v in enumerate([20.0, 150.0, 80.0, 60.0, 45.0, 30.0])
        if (a := logit.update(s, v)) is not None
    ]
    assert got == [(1, "threshold"), (4, "recovered")]  # 80 and 60 are still above the clear level 50
    entropy = rules["attention_entropy_collapse"]
    hits = [s for s, v in enumerate([1.0, 0.01, 0.3, 0.02, 0.01]) if entropy.update(s, v) is not None]
    assert hits == [4]  # one low value between healthy ones is not a collapse
