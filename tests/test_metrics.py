"""StabilityMetrics: keys, flattening, JSON round trip with non-finite values."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

import stabwatch as sw
from stabwatch.metrics import FIELD_KEYS, metric_key


def test_every_field_key_is_family_metric_and_tracker_safe():
    import re

    ok = re.compile(r"^[A-Za-z0-9_\-. :/]+$")
    for field, key in FIELD_KEYS.items():
        assert field in sw.StabilityMetrics.model_fields
        assert key.count("/") == 1 and ok.match(key)
    assert len(set(FIELD_KEYS.values())) == len(FIELD_KEYS)


def test_metric_key_sanitises_and_bounds_length():
    assert metric_key("grad/norm", "encoder.layers.0") == "grad/norm/encoder.layers.0"
    assert metric_key("grad/norm", "a//b") == "grad/norm/a/b"
    assert metric_key("grad/norm", "héllo<1>") == "grad/norm/h_llo_1_"
    long = metric_key("grad/norm", "x" * 400)
    assert len(long) == 250 and long != metric_key("grad/norm", "x" * 399)


def test_to_dict_flattens_globals_layers_and_extra():
    r = sw.StabilityMetrics(
        step=5,
        loss=1.5,
        grad_norm=2.0,
        nonfinite=False,
        layers={"fc1": {"grad_norm": 1.0, "spectral_norm": 3.0}},
        extra={"grad/sv_top2/fc1": 0.5},
    )
    assert r.to_dict() == {
        "loss/value": 1.5,
        "grad/norm": 2.0,
        "nonfinite/any": 0.0,
        "grad/norm/fc1": 1.0,
        "weight/spectral_norm/fc1": 3.0,
        "grad/sv_top2/fc1": 0.5,
    }
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
    with pytest.raises(ValidationError, match="grad_nrom"):
        sw.StabilityMetrics(step=0, grad_nrom=1.0)
    with pytest.raises(ValidationError, match="step"):
        sw.StabilityMetrics(step=-1)
