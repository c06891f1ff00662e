"""LayerKeyPolicy: selection and quantiles against numpy."""

from __future__ import annotations

import numpy as np
import pytest

import stabwatch as sw
from stabwatch.sinks import LayerKeyPolicy


def _record(n_layers: int, seed: int = 0) -> sw.StabilityMetrics:
    rng = np.random.default_rng(seed)
    values = rng.lognormal(size=n_layers)
    layers = {f"blocks.{i}": {"grad_norm": float(v), "update_ratio": float(v) / 1e3} for i, v in enumerate(values)}
    layers["blocks.3"]["grad_norm"] = float("nan")
    return sw.StabilityMetrics(step=1, grad_norm=1.0, layers=layers)


def test_all_keeps_every_key_made_by_to_dict():
    rec = _record(100)
    assert LayerKeyPolicy("all").select(rec) == rec.to_dict()


def test_quantiles_match_numpy_and_nonfinite_layers_are_kept():
    rec = _record(100)
    qs = (0.0, 0.25, 0.5, 0.9, 1.0)
    out = LayerKeyPolicy("quantiles", quantiles=qs).select(rec)
    finite = np.array([v["grad_norm"] for v in rec.layers.values() if np.isfinite(v["grad_norm"])])
    names = {0.0: "layers:min", 0.25: "layers:p25", 0.5: "layers:p50", 0.9: "layers:p90", 1.0: "layers:max"}
    for q in qs:
        assert out[f"grad_layers/norm/{names[q]}"] == pytest.approx(float(np.quantile(finite, q)), rel=1e-12)
    assert np.isnan(out["grad_layers/norm/blocks.3"])  # a non-finite layer is a finding: always sent
    assert not any(k.startswith("grad_layers/norm/blocks.") and k != "grad_layers/norm/blocks.3" for k in out)


def test_top_k_keeps_the_largest_layers():
    rec = _record(30, seed=1)
    out = LayerKeyPolicy("top_k", k=4).select(rec)
    ups = sorted(((v["update_ratio"], n) for n, v in rec.layers.items()), reverse=True)[:4]
    assert {k for k in out if k.startswith("update_layers/ratio/")} == {f"update_layers/ratio/{n}" for _, n in ups}


def test_auto_depends_on_the_layer_count_only():
    small, big = _record(10), _record(200)
    assert LayerKeyPolicy().select(small) == small.to_dict()
    out = LayerKeyPolicy(max_layers=64, k=5).select(big)
    layer_keys = [k for k in out if k.startswith("grad_layers/norm/")]
    assert len(layer_keys) == 4 + 5 + 1  # quantiles + top-k + the NaN layer
    assert len(out) < 40


@pytest.mark.parametrize("kwargs", [{"mode": "some"}, {"k": 0}, {"quantiles": (1.5,)}, {"max_layers": -1}])
def test_bad_policy_names_the_field(kwargs):
    field = next(iter(kwargs))
    with pytest.raises(sw.StabwatchError, match=field):
        LayerKeyPolicy(**kwargs)
