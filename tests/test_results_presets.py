"""The results page's presets parse, and every method in them applies to its model (no training)."""

from __future__ import annotations

import pytest
import torch

from greenprop.data import DatasetInfo
from greenprop.errors import GreenpropError
from greenprop.experiments.presets import get_preset
from greenprop.methods import build_method, parse_method
from greenprop.surgery import converted_layers
from greenprop.train.config import TrainConfig
from greenprop.train.setup import create_model

RESULTS = ("results-cnn", "results-vit", "results-resnet")
FASHION = DatasetInfo(
    name="fashion-mnist", num_classes=10, in_channels=1, image_size=28, mean=0.286, std=0.353
)


def _model(config: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(config, FASHION)


def _apply(config: TrainConfig, spec: str) -> tuple[list[str], list[str]]:
    """Controller names and converted layers after applying ``spec`` to a fresh model."""
    model = _model(config)
    controllers = build_method(parse_method(spec), model, epochs=config.epochs, steps_per_epoch=4, seed=0)
    return [c.name for c in controllers], converted_layers(model)


@pytest.mark.parametrize("name", RESULTS)
def test_results_preset_methods_all_apply(name):
    preset = get_preset(name)
    config = TrainConfig(**preset.config)
    assert preset.methods[0] == "baseline" and preset.seeds == (0, 1, 2)
    for method in preset.methods[1:]:
        spec = parse_method(method)
        parts = spec.parts or (spec,)
        names, converted = _apply(config, method)
        assert names == [part.name for part in parts], method
        for part in parts:
            if part.name in ("ssprop", "vcas"):  # a layer method must convert layers on its own
                assert _apply(config, part.label)[1], f"{part.label} converts nothing on {name}"
        if any(part.name != "gradsamp" for part in parts):
            assert converted, method


@pytest.mark.parametrize("name", RESULTS)
def test_results_presets_hold_every_method_that_applies(name):
    """GradSamp, ssProp, VCAS (where it applies) and one combination on each model."""
    preset = get_preset(name)
    config = TrainConfig(**preset.config)
    methods = [parse_method(m) for m in preset.methods]
    singles = {m.name for m in methods if not m.parts}
    assert {"baseline", "gradsamp", "ssprop"} <= singles
    assert sum(1 for m in methods if m.parts) == 1
    if "vcas" not in singles:  # left out only where it refuses the model
        with pytest.raises(GreenpropError):
            _apply(config, "vcas")
