"""GradSamp's draw rule as a pure function, and the controller applying exactly its draws."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from greenprop.gradsamp import GradSamp, ggd
from greenprop.gradsamp.config import GradSampConfig
from greenprop.gradsamp.sampling import DEFAULT_BETA_BOUNDS, DrawStats, sample_update
from greenprop.seeding import gradsamp_draw_seed

RULE = {
    "update": "ggd",
    "tolerance": 1e-3,
    "tolerance_mode": "relative",
    "update_scale": 1.0,
    "clamp": True,
    "beta_bounds": DEFAULT_BETA_BOUNDS,
    "fit_method": "moments",
}


def _heavy(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).pow(3) * 1e-3


def test_draw_is_a_pure_function_of_delta_and_generator():
    delta = _heavy((64, 32), 0)
    before = delta.clone()
    a, fa = sample_update(delta, **RULE, generator=torch.Generator().manual_seed(3))
    b, fb = sample_update(delta, **RULE, generator=torch.Generator().manual_seed(3))
    c, _ = sample_update(delta, **RULE, generator=torch.Generator().manual_seed(4))
    assert torch.equal(delta, before)  # the real update is not touched
    assert torch.equal(a, b) and fa == fb and not torch.equal(a, c)
    assert a.shape == delta.shape and a.dtype == torch.float32
    assert float(a.abs().max()) <= float(delta.abs().max())  # clamped to the largest real step
    assert float(a.std()) / float(delta.std()) == pytest.approx(1.0, abs=0.2)


def test_extrapolate_repeats_the_update_and_a_fallback_draws_its_loc():
    delta = _heavy((10, 10), 1)
    rule = {**RULE, "update": "extrapolate", "update_scale": 0.5}
    draw, fitted = sample_update(delta, **rule, generator=torch.Generator())
    assert fitted is None and torch.equal(draw, delta * 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ggd.GGDFitWarning)
        draw, fitted = sample_update(torch.full((4, 4), 0.25), **RULE, generator=torch.Generator())
    assert fitted is not None and fitted.fallback == "all elements equal"
    assert torch.equal(draw, torch.full((4, 4), 0.25))


def test_draw_stats_summarise_fits_fallbacks_and_spread():
    stats = DrawStats()
    delta = _heavy((50, 20), 2)
    draw, fitted = sample_update(delta, **RULE, generator=torch.Generator().manual_seed(0))
    stats.add("w", delta, draw, fitted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ggd.GGDFitWarning)
        tiny = torch.ones(3)
        stats.add("b", tiny, *sample_update(tiny, **RULE, generator=torch.Generator()))
    summary = stats.summary(record_fits=True)
    assert summary["fallbacks"] == 1 and summary["fallback_tensors"] == ["b"]
    assert summary["beta_median"] == pytest.approx(fitted.beta)
    assert summary["draw_std_ratio_max"] == pytest.approx(float(draw.std()) / float(delta.std()))
    assert set(summary["fits"]) == {"w", "b"} and "fits" not in stats.summary()


def test_the_controller_adds_exactly_the_rules_draws_in_model_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    gs = GradSamp(model, GradSampConfig(strategy="pe:1", seed=11, update="ggd-signed"), epochs=3)
    gs.on_epoch_start(0)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(_heavy(tuple(p.shape), 10 + i))
    gs.on_epoch_end(0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    deltas = [b.clone() for b in gs._buf]
    gs.on_epoch_start(1)
    gs.sampled_update(1)

    gen = torch.Generator().manual_seed(gradsamp_draw_seed(11, 1))
    fit_gen = torch.Generator().manual_seed(gradsamp_draw_seed(11, 1))
    rule = {**RULE, "update": "ggd-signed"}
    for (name, p), delta in zip(model.named_parameters(), deltas, strict=True):
        draw, _ = sample_update(delta, **rule, generator=gen, fit_generator=fit_gen, name=name)
        assert torch.equal(p, start[name] + draw), name
