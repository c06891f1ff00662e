"""StabilityMetrics: keys (the prefix-free scheme, over a real full-preset run), flattening, JSON round trip
with non-finite values."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable

import pytest
import torch
from torch import nn

import stabwatch as sw
from stabwatch.collectors import FAMILIES
from stabwatch.errors import InputError
from stabwatch.metrics import FIELD_KEYS, metric_key, parse_key
from stabwatch.sinks import LayerKeyPolicy
from tests.helpers import train

#: what MLflow (the strictest tracker) accepts: these characters, at most 250, no empty segment
TRACKER_SAFE = re.compile(r"^[A-Za-z0-9_\-.:][A-Za-z0-9_\-. :]*(/[A-Za-z0-9_\-.:][A-Za-z0-9_\-. :]*)*$")


def assert_prefix_free(keys: Iterable[str]) -> None:
    """No key is a path prefix of another: no K with another key starting with K + "/"."""
    keys = sorted(set(keys))
    as_paths = set(keys)
    for key in keys:
        parts = key.split("/")
        for i in range(1, len(parts)):
            head = "/".join(parts[:i])
            assert head not in as_paths, f"{head!r} is a key and a path prefix of {key!r}"
        assert len(key) <= 250 and TRACKER_SAFE.match(key) and key == key.strip(), key


def test_every_field_key_is_family_metric_of_the_family_that_computes_it():
    families = set(FAMILIES) | {"loss", "monitor", "shadow"}
    for field, key in FIELD_KEYS.items():
        assert field in sw.StabilityMetrics.model_fields
        family, metric = key.split("/")
        assert family in families, f"{field}: {key} is not under a family"
        assert metric_key(key) == key and TRACKER_SAFE.match(key)
        assert metric_key(key, "fc1") == f"{family}_layers/{metric}/fc1"
        assert parse_key(metric_key(key, "enc.0")) == (key, "enc.0")
    assert len(set(FIELD_KEYS.values())) == len(FIELD_KEYS)
    assert FIELD_KEYS["grad_max_sv"] == "grad_sv/max" and FIELD_KEYS["weight_norm"] == "update/weight_norm"


def test_metric_key_sanitises_and_bounds_length():
    assert metric_key("grad/norm", "encoder.layers.0") == "grad_layers/norm/encoder.layers.0"
    assert metric_key("grad/norm", "a/b") == "grad_layers/norm/a_b"  # a module path is one segment
    assert metric_key("grad/norm", "héllo<1>") == "grad_layers/norm/h_llo_1_"
    assert metric_key("grad/norm", "..") == "grad_layers/norm/__"  # never a relative path in a file store
    assert metric_key("grad/norm", "") == "grad_layers/norm/_"
    assert metric_key("loss") == "loss/value"
    assert metric_key("a/b/c") == "a/b_c"  # a global key always has two segments
    assert metric_key("custom_layers/x") == "custom_layers_/x"  # the suffix is reserved for per-layer keys
    long = metric_key("grad/norm", "x" * 400)
    assert len(long) == 250 and long != metric_key("grad/norm", "x" * 399)


@pytest.mark.parametrize(
    "names",
    [
        [("grad/norm", None), ("grad/norm", "fc1"), ("grad/norm", "fc1/x"), ("grad/norm", "fc1.x")],
        [("a/b/c", None), ("a/b", "c"), ("a/b", None), ("a_layers/b", None), ("a", None), ("a/value", "x")],
        [("g" * 300, None), ("g" * 300, "l"), ("grad/" + "n" * 300, "x" * 300), ("grad/" + "n" * 300, None)],
        [(" a /b", " c "), ("a/b", "c"), ("./..", "."), ("x", "layers:p50"), ("x/value", None)],
    ],
)
def test_metric_key_is_prefix_free_whatever_the_names(names):
    assert_prefix_free(metric_key(name, layer) for name, layer in names)


class _Nested(nn.Module):
    """Every family in one small nested model: Linear/Tanh/ReLU two levels deep (grad, update, grad_sv,
    weight, activation), a recurrent weight (spectral radius) and, when snntorch is there, a LIF layer."""

    def __init__(self, spiking: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()))
        self.rnn = nn.RNN(16, 16, batch_first=True)
        self.lif = None
        if spiking:
            import snntorch

            self.lif = snntorch.Leaky(beta=0.9)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        h = self.rnn(h.unsqueeze(1))[0][:, 0]
        if self.lif is not None:
            mem = self.lif.init_leaky()
            rate = torch.zeros_like(h)
            for _ in range(3):
                spk, mem = self.lif(h, mem)
                rate = rate + spk / 3
            h = h + rate
        return self.head(h)


def shadow_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _full_run_keys(model: nn.Module, shadow: bool) -> set[str]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    replica = sw.Shadow(loss_fn=shadow_loss, every=2, window=2, per_layer=True) if shadow else None
    with sw.Monitor(model, opt, preset="full", shadow=replica, alerts=False) as mon:
        records = train(model, opt, 6, monitor=mon)
    keys: set[str] = set()
    for rec in records:
        keys |= set(rec.to_dict())
        for policy in (LayerKeyPolicy("quantiles"), LayerKeyPolicy("top_k", k=2), LayerKeyPolicy(max_layers=1)):
            keys |= set(policy.select(rec))
    return keys


def test_keys_of_a_full_preset_run_with_every_family_are_prefix_free():
    try:
        import snntorch  # noqa: F401

        spiking = True
    except ImportError:
        spiking = False
    keys = _full_run_keys(_Nested(spiking=spiking), shadow=True)
    assert_prefix_free(keys)
    firsts = {k.split("/")[0] for k in keys}
    want = {"loss", "grad", "nonfinite", "update", "grad_sv", "weight", "activation", "shadow", "monitor"}
    want |= {"spiking"} if spiking else set()
    assert want <= firsts, sorted(want - firsts)
    want_layers = {f"{f}_layers" for f in ("grad", "update", "grad_sv", "weight", "activation", "shadow")}
    want_layers |= {"spiking_layers"} if spiking else set()
    assert want_layers <= firsts, sorted(want_layers - firsts)
    assert "grad_layers/norm/encoder.2.0" in keys  # nested module paths stay one segment
    assert "update/weight_norm" in keys and "grad_sv/max" in keys and "weight/spectral_radius" in keys
    assert any(k.startswith("grad_sv_layers/top1/") for k in keys)  # the top-k extras are per-layer keys
    assert "grad_layers/norm/layers:p50" in keys  # the policy's summaries follow the scheme


def test_to_dict_flattens_globals_layers_and_extra():
    r = sw.StabilityMetrics(
        step=5,
        loss=1.5,
        grad_norm=2.0,
        nonfinite=False,
        weight_norm=4.0,
        layers={"fc1": {"grad_norm": 1.0, "spectral_norm": 3.0}},
        extra={"grad_sv/top2/fc1": 0.5, "analysis/spread": 0.25},
    )
    assert r.to_dict() == {
        "loss/value": 1.5,
        "grad/norm": 2.0,
        "update/weight_norm": 4.0,
        "nonfinite/any": 0.0,
        "grad_layers/norm/fc1": 1.0,
        "weight_layers/spectral_norm/fc1": 3.0,
        "grad_sv_layers/top2/fc1": 0.5,
        "analysis/spread": 0.25,
    }
    assert r.get("grad_layers/norm/fc1") == 1.0 and r.get("grad_sv/top2/fc1") == 0.5 and r.get("x/y") is None
    assert "step 5" in str(r) and "loss=1.5" in str(r)


def test_json_round_trip_keeps_non_finite_values_as_strict_json():
    alert = sw.Alert(
        rule="r",
        reason=sw.AlertReason.LOSS_SPIKE,
        severity=sw.Severity.WARNING,
        step=2,
        metric="loss",
        value=float("inf"),
        message="m",
    )
    r = sw.StabilityMetrics(
        step=2, loss=float("nan"), grad_norm=float("inf"), grad_min_sv=float("-inf"), alerts=[alert]
    )
    line = r.to_json_line()
    parsed = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))
    assert parsed["loss"] == "NaN" and parsed["grad_norm"] == "Infinity"
    back = sw.StabilityMetrics.from_json_line(line)
    assert math.isnan(back.loss) and back.grad_norm == math.inf and back.grad_min_sv == -math.inf
    assert back.alerts[0].value == math.inf and back.alerts[0].reason is sw.AlertReason.LOSS_SPIKE


def test_record_rejects_unknown_fields_and_negative_steps():
    with pytest.raises(InputError, match="grad_nrom"):
        sw.StabilityMetrics(step=0, grad_nrom=1.0)
    with pytest.raises(InputError, match="step"):
        sw.StabilityMetrics(step=-1)
