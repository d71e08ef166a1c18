"""The demo preset (README's `make demo`): every method applies to its model, VCAS adapts within it."""

from __future__ import annotations

import math

from greenprop.data import DatasetInfo
from greenprop.experiments.presets import PRESETS
from greenprop.methods import build_method, parse_method
from greenprop.train.config import TrainConfig
from greenprop.train.setup import create_model

FASHION = DatasetInfo(name="fashion-mnist", num_classes=10, in_channels=1, image_size=28, mean=0.0, std=1.0)


def test_demo_runs_every_method_and_a_combination():
    demo = PRESETS["demo"]
    names = {part.split(":")[0] for spec in demo.methods for part in spec.split(";")}
    assert names == {"baseline", "gradsamp", "ssprop", "vcas"}
    assert any(";" in spec for spec in demo.methods)
    assert "demo-vcas" not in PRESETS  # superseded by the demo itself


def test_every_demo_method_converts_layers_of_the_demo_model():
    demo = PRESETS["demo"]
    config = TrainConfig(**demo.config)
    steps = math.ceil(config.subset / config.batch_size)
    for spec in demo.methods:
        model = create_model(config, FASHION)
        controllers = build_method(
            parse_method(spec), model, epochs=config.epochs, steps_per_epoch=steps, seed=0
        )
        kinds = {type(m).__name__ for m in model.modules()}
        if "ssprop" in spec:
            assert "SparseConv2d" in kinds, spec
        if "vcas" in spec:
            assert "VCASConv2d" in kinds, spec
            vcas = next(c for c in controllers if c.name == "vcas")
            # The controller must update several times within the run to lower its ratios.
            assert config.epochs * steps // vcas.config.update_every >= 4, spec
