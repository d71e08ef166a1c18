"""Combined methods (``a;b``): the order they are applied in, and counted FLOPs that compose."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
from torch.nn import Conv2d, Linear

from greenprop import data as gp_data
from greenprop.errors import GreenpropError
from greenprop.methods import build_method, parse_method
from greenprop.train.config import TrainConfig
from greenprop.train.setup import create_model
from greenprop.train.trainer import Trainer


def _layer_classes(model_name: str, spec: str) -> tuple[Counter[str], list[str]]:
    data = gp_data.load("digits", subset=64, test_subset=32)
    model = create_model(TrainConfig(model=model_name, dataset="digits", width=8), data.info)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controllers = build_method(parse_method(spec), model, epochs=2, steps_per_epoch=2, seed=0)
    kinds = Counter(type(m).__name__ for m in model.modules() if isinstance(m, (Conv2d, Linear)))
    return kinds, [c.name for c in controllers]


def test_vcas_then_ssprop_shares_a_resnet_between_them():
    kinds, controllers = _layer_classes("resnet18-gn", "vcas;ssprop:keep=0.5")
    assert controllers == ["vcas", "ssprop"]  # parts apply, and their hooks run, as written
    # VCAS takes the convolutions inside the residual blocks; ssProp the stem convolution.
    assert kinds["VCASConv2d"] == 19 and kinds["SparseConv2d"] == 1


def test_on_a_vit_ssprop_and_vcas_compose_in_either_order():
    one, first = _layer_classes("vit", "ssprop:keep=0.5;vcas")
    other, second = _layer_classes("vit", "vcas;ssprop:keep=0.5")
    assert one == other and first == ["ssprop", "vcas"] and second == ["vcas", "ssprop"]
    assert one["SparseConv2d"] == 1 and one["VCASLinear"] > 0  # patch embedding / blocks


def test_a_combination_the_layers_do_not_allow_is_refused():
    with pytest.raises(GreenpropError, match="vcas"):  # the BatchNorm CNN has no blocks for VCAS
        _layer_classes("cnn", "ssprop:keep=0.5;vcas")


def _flops(tmp_path, method: str, **config) -> dict[str, float]:
    base = {"dataset": "digits", "subset": 128, "test_subset": 64, "batch_size": 64, "progress": False}
    run = TrainConfig(**{**base, **config}, method=method)
    summary = Trainer(run, tmp_path / method.replace(";", "+").replace(":", "_")).fit()["summary"]
    return {phase: summary["flops"][phase]["value"] for phase in ("forward", "backward")}


def test_gradsamp_with_ssprop_saves_the_product_of_their_savings(tmp_path):
    """GradSamp skips whole epochs, ssProp thins every real step: savings multiply."""
    config = {"model": "mlp", "epochs": 4}
    base = _flops(tmp_path, "baseline", **config)
    gradsamp = _flops(tmp_path, "gradsamp:strategy=pe:2", **config)
    ssprop = _flops(tmp_path, "ssprop:keep=0.5,layers=linear", **config)
    both = _flops(tmp_path, "gradsamp:strategy=pe:2;ssprop:keep=0.5,layers=linear", **config)
    for phase in ("forward", "backward"):
        trained = gradsamp[phase] / base[phase]
        assert 0 < trained < 1 and ssprop["backward"] < base["backward"]
        assert both[phase] == pytest.approx(ssprop[phase] * trained, rel=1e-9), phase


@pytest.mark.slow  # VCAS's estimation passes: minutes on the busy 2-core machine
def test_ssprop_with_vcas_on_disjoint_layers_adds_their_savings(tmp_path):
    """One step of a ViT: ssProp on the patch convolution, VCAS on the blocks' Linears.

    With a single step both see the same weights and data. The forward adds up exactly
    (ssProp changes no forward). The backward saves at least the sum: VCAS's variance
    estimation (at the first step) runs the whole model's backward, ssProp's layer
    included, so ssProp thins those passes too: the one place where the two interact.
    """
    config = {"model": "vit", "width": 16, "epochs": 1, "subset": 64, "optimizer": "adamw", "lr": 1e-3}
    vcas = "vcas:initial_s=0.5,initial_weight_ratio=0.5,update_every=100"
    base = _flops(tmp_path, "baseline", **config)
    ssprop_only = _flops(tmp_path, "ssprop:keep=0.5", **config)
    vcas_only = _flops(tmp_path, vcas, **config)
    both = _flops(tmp_path, f"ssprop:keep=0.5;{vcas}", **config)
    assert ssprop_only["backward"] < base["backward"] and vcas_only["backward"] != base["backward"]
    expected = {p: ssprop_only[p] + vcas_only[p] - base[p] for p in ("forward", "backward")}
    assert both["forward"] == pytest.approx(expected["forward"], rel=1e-9)
    # ... by exactly ssProp's saving on each of the estimation's backward passes: one per
    # Monte-Carlo batch, mc_repeats=2 batches (at the first step no block samples yet, so
    # vcas.estimation.two_backwards leaves its activation pass, the exact pass again, out).
    passes = (expected["backward"] - both["backward"]) / (base["backward"] - ssprop_only["backward"])
    assert passes == pytest.approx(2 * 1, abs=1e-9)
