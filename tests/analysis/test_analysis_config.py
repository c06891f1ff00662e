"""`AnalyzerConfig` validation: every bad setting is the package-wide `ConfigError` naming the field, and
still the built-in type deep-lyapunov raised (`ValueError`; `TypeError` for an unknown keyword)."""

from __future__ import annotations

import inspect

import pytest
import torch

from stabwatch.analysis import AnalyzerConfig, StabilityAnalyzer
from stabwatch.errors import ConfigError, StabwatchError


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"perturbation_scale": 0.0}, "perturbation_scale"),
        ({"perturbation_scale": float("nan")}, "perturbation_scale"),
        ({"perturbation_scale": "0.01"}, "perturbation_scale"),
        ({"n_trajectories": 1}, "n_trajectories"),
        ({"n_trajectories": 2.0}, "n_trajectories"),
        ({"n_pca_components": 0}, "n_pca_components"),
        ({"record_interval": True}, "record_interval"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"max_exact_bytes": -1}, "max_exact_bytes"),
        ({"seed": "42"}, "seed"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"verbose": 1}, "verbose"),
        ({"renormalize": "no"}, "renormalize"),
    ],
)
def test_each_bad_setting_is_a_config_error_naming_the_field(settings, field):
    with pytest.raises(ConfigError) as info:
        AnalyzerConfig(**settings)
    assert isinstance(info.value, ValueError) and isinstance(info.value, StabwatchError)
    assert str(info.value).startswith(field), str(info.value)
    # the same through the analyzer's keyword settings
    with pytest.raises(ConfigError, match=field):
        StabilityAnalyzer(torch.nn.Linear(2, 2), **settings)


def test_unknown_settings_name_the_keyword_and_list_the_settings():
    with pytest.raises(ConfigError) as info:
        AnalyzerConfig(n_trajectory=3)
    assert isinstance(info.value, TypeError)  # what the dataclass (and deep-lyapunov) raised
    message = str(info.value)
    assert "n_trajectory" in message and "n_trajectories" in message and "perturbation_scale" in message
    with pytest.raises(ConfigError, match="positional"):
        AnalyzerConfig(*range(13))


def test_valid_settings_still_work_by_keyword_and_position():
    assert AnalyzerConfig(0.02, 3).to_dict()["n_trajectories"] == 3
    assert AnalyzerConfig(device="cuda:1", max_exact_bytes=0).device == "cuda:1"
    params = list(inspect.signature(AnalyzerConfig).parameters)
    assert params[:2] == ["perturbation_scale", "n_trajectories"]  # help() and IDEs still see the fields


def test_the_analysis_errors_are_the_package_errors(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        StabilityAnalyzer("not a model")
    with pytest.raises(ConfigError, match="config"):
        StabilityAnalyzer(torch.nn.Linear(2, 2), config={"n_trajectories": 3})
