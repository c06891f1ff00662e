"""DDP on the CPU (gloo, two processes): global values, rank-0 emission, rank 0's stop on every rank.

One spawn runs every DDP scenario (`workers.ddp_scenario`); the checks below read what each rank returned
and compare it with one process training on the combined batch (`workers.reference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stabwatch.sinks import read_jsonl
from tests.distributed import workers
from tests.distributed.workers import close

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("ddp")
    return workers.launch("ddp_scenario", out, timeout=90), out


@pytest.fixture(scope="module")
def ref() -> list[dict[str, Any]]:
    return workers.reference()


def test_gradient_norms_are_those_of_the_combined_batch(ddp, ref) -> None:
    results, _ = ddp
    for rank, res in enumerate(results):
        recs = res["records"]
        assert [r["step"] for r in recs] == list(range(workers.STEPS))
        for rec, want in zip(recs, ref, strict=True):
            assert close(rec["grad_norm"], want["grad_norm"], 1e-6), (rank, rec["grad_norm"], want["grad_norm"])
            for layer in ("0", "2", "4"):
                got = rec["layers"][layer]["grad_norm"]
                assert close(got, want["layers"][layer]["grad_norm"], 1e-6), (rank, layer)
                assert close(rec["layers"][layer]["grad_max_sv"], want["layers"][layer]["grad_max_sv"], 1e-6)
            assert close(rec["update_ratio"], want["update_ratio"], 1e-6)
            assert close(rec["weight_norm"], want["weight_norm"], 1e-6)
            assert close(rec["spectral_norm"], want["spectral_norm"], 1e-3)


def test_loss_and_activations_are_reduced_across_ranks(ddp, ref) -> None:
    results, _ = ddp
    for res in results:
        for rec, want in zip(res["records"], ref, strict=True):
            assert close(rec["loss"], want["loss"], 1e-9)
            for layer in ("1", "3"):  # ReLU, Tanh: the combined batch (the statistics are float32)
                got, exp = rec["layers"][layer], want["layers"][layer]
                assert close(got["activation_mean"], exp["activation_mean"], 1e-6), (layer, got, exp)
                assert close(got["activation_std"], exp["activation_std"], 1e-6), (layer, got, exp)
            assert close(rec["layers"]["3"]["saturated_frac"], want["layers"]["3"]["saturated_frac"], 1e-6)
    # every rank holds the same (global) record
    assert results[0]["records"] == results[1]["records"]


def test_spiking_statistics_are_those_of_the_combined_batch(ddp) -> None:
    results, _ = ddp
    ref = workers.spiking_reference()
    assert 0 < ref[0]["firing_rate_mean"] < 1 and ref[0]["firing_rate_std"] > 0
    for res in results:
        for got, want in zip(res["spiking"], ref, strict=True):
            for field in workers.SPIKING_FIELDS:  # one spiking layer: the pooled value is the layer's
                assert close(got[field], want[field], 1e-6), (field, got[field], want[field])
                assert close(got[f"1/{field}"], want[field], 1e-6), field


def test_only_rank_0_writes_to_its_sinks(ddp) -> None:
    results, out = ddp
    assert [res["writes"] for res in results] == [True, False]
    assert [r.step for r in read_jsonl(out / "rank0.jsonl")] == list(range(workers.STEPS))
    assert not (out / "rank1.jsonl").exists()  # the sink on rank 1 did not even create its file
    # all_ranks=True: both write
    for rank in range(workers.WORLD):
        assert len(list(read_jsonl(out / f"all{rank}.jsonl"))) == workers.STEPS


def test_an_alert_on_rank_0_stops_every_rank_at_the_same_step(ddp) -> None:
    results, _ = ddp
    steps = [res["raise_on"][0] for res in results]
    assert steps == [1, 1], results[0]["raise_on"]
    # only rank 0's callback raises; rank 1 stops at the same record with rank 0's message
    (s0, m0), (s1, m1) = (res["callback"] for res in results)
    assert s0 is not None and s0 == s1, (s0, s1)
    assert "callback on rank 0" in m0
    assert m1.startswith("rank 0 stopped training") and "callback on rank 0" in m1


def test_custom_entries_reduce_per_tag_and_a_layout_mismatch_keeps_local_values(ddp) -> None:
    results, _ = ddp
    for res in results:  # ranks contribute 1 and 2
        for extra in res["probe_mismatch=False"]:
            assert {k: v for k, v in extra.items() if k.startswith("probe/")} == {
                "probe/mean": 1.5,
                "probe/sum": 3.0,
                "probe/max": 2.0,
                "probe/min": 1.0,
            }
    # rank 1 adds one entry more: nothing is gathered (no abort, no hang), each rank keeps its own values
    for rank, res in enumerate(results):
        for extra in res["probe_mismatch=True"]:
            assert extra["probe/max"] == rank + 1 and extra["grad_norm"] > 0
            assert ("probe/only_rank1" in extra) == (rank == 1)


def test_the_shadow_is_refused_with_more_than_one_process(ddp) -> None:
    results, _ = ddp
    for res in results:
        assert "not supported with torch.distributed" in res["shadow"]
