"""Memory stays flat over many monitored steps: no tensor kept past its step, no growth of the process.

`tracemalloc` cannot see tensor storage (a 40 MB tensor shows as a ~500-byte Python object), so this
measures the bytes of every live tensor storage (`probes.live_tensor_bytes`) and the process RSS.
With the ``full`` preset a step of this model costs a few ms, so 10k steps would take minutes on a
2-core runner; the run is shorter and sized so a leak still shows clearly:

* tensor bytes: flat to the byte after warm-up (tolerance 4 KB); one leaked first-layer gradient
  (48 KB) per 100 steps adds ~380 KB over the measured 800 steps;
* RSS: flat within 8 MB; one leaked first-layer gradient per step adds ~39 MB.

Samples are taken at steps where no shadow window is open (its replica is alive only inside one).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stabwatch as sw
from tests.invariants.probes import live_tensor_bytes, rss_bytes

WARMUP = 250  # records deque full, caches and the optimizer state settled, two shadow windows done
CHUNK = 100  # == the shadow's period: every sample is at the same phase, 50 steps after a window opened
SAMPLES = 8
TENSOR_TOLERANCE = 4096  # bytes
RSS_TOLERANCE = 8 * 2**20


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.slow
def test_tensor_bytes_and_rss_stay_flat_with_the_full_preset_and_a_shadow():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(96, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    grad_bytes = model[0].weight.numel() * model[0].weight.element_size()
    assert CHUNK * SAMPLES // 100 * grad_bytes > 64 * TENSOR_TOLERANCE  # one gradient per 100 steps shows
    assert CHUNK * SAMPLES * grad_bytes > 4 * RSS_TOLERANCE  # one gradient per step shows in the RSS
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(256, 96, generator=g), torch.randint(0, 4, (256,), generator=g)

    def run(mon, n):
        for _ in range(n):
            idx = torch.randint(0, 256, (16,), generator=g)
            batch = (xs[idx], ys[idx])
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            opt.step()
            mon.step(loss=loss, batch=batch)

    shadow = sw.Shadow(loss_fn=_loss, every=CHUNK, window=10)
    with sw.Monitor(model, opt, preset="full", max_records=50, shadow=shadow) as mon:
        run(mon, WARMUP)
        assert not shadow.open
        base_bytes, base_storages = live_tensor_bytes()
        base_rss = rss_bytes()
        grown = []
        for _ in range(SAMPLES):
            run(mon, CHUNK)
            assert not shadow.open
            now_bytes, now_storages = live_tensor_bytes()
            grown.append(
                (mon.current_step, now_bytes - base_bytes, now_storages - base_storages, rss_bytes() - base_rss)
            )
    assert mon.current_step == WARMUP + CHUNK * SAMPLES and len(mon.records) == 50
    assert len(shadow.estimates) == len(range(0, mon.current_step, CHUNK))  # a replica built and freed per window
    report = "\n".join(f"step {s}: tensors {b:+} B in {n:+} storages, RSS {r / 2**20:+.2f} MB" for s, b, n, r in grown)
    assert len(grown) == SAMPLES
    assert max(b for _, b, _, _ in grown) <= TENSOR_TOLERANCE, f"live tensor bytes grew:\n{report}"
    assert max(n for _, _, n, _ in grown) <= 2, f"live tensor storages grew:\n{report}"
    assert max(r for _, _, _, r in grown) <= RSS_TOLERANCE, f"RSS grew:\n{report}"
