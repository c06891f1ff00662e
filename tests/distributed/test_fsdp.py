"""FSDP2 (``fully_shard``) on the CPU (gloo, two processes): norms of the full gradient and parameters, never
of a local shard; spectra of the gathered weights; rank 0 alone writes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from stabwatch.sinks import read_jsonl
from tests.distributed import workers
from tests.distributed.workers import close

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("fsdp")
    return workers.launch("fsdp_scenario", out, timeout=90), out


def test_sharded_norms_are_those_of_the_full_tensors(fsdp) -> None:
    results, _ = fsdp
    ref = workers.reference()
    assert all(res["sharded"] for res in results)
    for rank, res in enumerate(results):
        for rec, want in zip(res["records"], ref, strict=True):
            assert close(rec["grad_norm"], want["grad_norm"], 1e-6), (rank, rec["grad_norm"], want["grad_norm"])
            assert close(rec["update_ratio"], want["update_ratio"], 1e-6)
            assert close(rec["weight_norm"], want["weight_norm"], 1e-6)
            assert close(rec["loss"], want["loss"], 1e-9)
            for layer in ("0", "2", "4"):
                got, exp = rec["layers"][layer], want["layers"][layer]
                assert close(got["grad_norm"], exp["grad_norm"], 1e-6), (rank, layer, got, exp)
                assert close(got["weight_norm"], exp["weight_norm"], 1e-6)
                assert close(got["update_ratio"], exp["update_ratio"], 1e-6)
                assert close(got["grad_max_sv"], exp["grad_max_sv"], 1e-6)
                assert close(got["spectral_norm"], exp["spectral_norm"], 1e-3)
            for layer in ("1", "3"):
                assert close(rec["layers"][layer]["activation_mean"], want["layers"][layer]["activation_mean"], 1e-6)
    # a local shard alone is clearly smaller: the check above would fail on the unreduced value
    last = ref[-1]["grad_norm"]
    for res in results:
        assert math.sqrt(res["local_grad_sq"]) < 0.99 * last


def test_only_rank_0_writes_under_fsdp(fsdp) -> None:
    _, out = fsdp
    assert len(list(read_jsonl(out / "rank0.jsonl"))) == workers.STEPS
    assert not (out / "rank1.jsonl").exists()
