"""The GradSamp controller: sampled updates, safety of the default, guard, resume."""

from __future__ import annotations

import io
import json
import math
import warnings

import pytest
import torch
from scipy import stats
from torch import nn

from greenprop.controller import RunContext
from greenprop.gradsamp import GradSamp, GradSampConfig, NothingSampledWarning, ggd
from greenprop.gradsamp.ggd import GGDFitWarning, GGDParams

# The 4-way head's bias is below ggd.MIN_FIT_SIZE: its documented fallback warns every time.
pytestmark = pytest.mark.filterwarnings("ignore:GGD fit of '4.bias'")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128), nn.Linear(128, 4)
    )


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


# Per-tensor shapes of the fake "real" updates below (beta, std).
_UPDATE_SHAPES = [(0.6, 2e-3), (1.0, 1e-3), (1.5, 5e-4), (2.0, 3e-3), (0.9, 1e-4), (1.2, 2e-4)]


def _fake_real_epoch(model: nn.Module, gs: GradSamp, epoch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 'real' epoch whose update is a known GGD draw per tensor; returns those updates."""
    gs.on_epoch_start(epoch)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            beta, std = _UPDATE_SHAPES[i % len(_UPDATE_SHAPES)]
            d = ggd.sample(GGDParams(1e-5, ggd.scale_for_std(std, beta), beta), p.shape, gen)
            p.add_(d)
            deltas[name] = d
    gs.on_epoch_end(epoch, {})
    return deltas


def test_sampled_update_matches_the_last_real_update_statistically_and_spares_buffers():
    model = _model()
    model(torch.randn(8, 64))  # move the BatchNorm statistics off their init
    gs = GradSamp(model, GradSampConfig(strategy="pe:1", seed=3), epochs=4)
    deltas = _fake_real_epoch(model, gs, 0)
    assert not gs.should_skip(0) and gs.should_skip(1)
    before, buffers = _params(model), _buffers(model)
    gs.on_epoch_start(1)
    with pytest.warns(GGDFitWarning, match="'4.bias'"):
        record = gs.replace_epoch(1)
    gs.on_epoch_end(1, record)
    assert record["sampled"] is True
    assert record["ggd"]["tensors"] == len(deltas) and record["ggd"]["from_epoch"] == 0
    # The 4-element head bias is too small to fit: zero update, reported as a fallback.
    assert record["ggd"]["fallback_tensors"] == ["4.bias"]
    after = _params(model)
    assert torch.equal(after["4.bias"], before["4.bias"])
    for name, delta in deltas.items():
        if name == "4.bias":
            continue
        change = after[name] - before[name]
        assert not torch.equal(change, torch.zeros_like(change)), name
        # Same distribution as the real update: two-sample KS, and matching fits.
        assert stats.ks_2samp(change.flatten().numpy(), delta.flatten().numpy()).pvalue > 1e-3, name
        f_change, f_delta = ggd.fit(change), ggd.fit(delta)
        if delta.numel() >= 10_000:  # the shape of 128-256 elements is too noisy to compare
            assert f_change.beta == pytest.approx(f_delta.beta, rel=0.12), name
        assert f_change.std == pytest.approx(f_delta.std, rel=0.06 if delta.numel() >= 10_000 else 0.3)
        assert change.abs().max() <= delta.abs().max() + 1e-6  # clamped (+ float32 rounding)
        assert gs.last_fits[name].beta == pytest.approx(f_delta.beta, rel=1e-4)
    for name, buf in _buffers(model).items():
        assert torch.equal(buf, buffers[name]), f"buffer {name} was touched"


HAZARD = GGDParams(loc=0.0, scale=2.3e-6, beta=0.27)  # the measured update: std ~2.4e-3


def _hazard_model() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Linear(400, 500, bias=False)  # 200k elements
    return model, ggd.sample(HAZARD, model.weight.shape, torch.Generator().manual_seed(0))


def _sample_after(model: nn.Module, delta: torch.Tensor, **kwargs) -> torch.Tensor:
    gs = GradSamp(model, GradSampConfig(strategy="pe:1", seed=1, **kwargs), epochs=4)
    gs.on_epoch_start(0)
    with torch.no_grad():
        model.weight.add_(delta)
    gs.on_epoch_end(0)
    before = model.weight.detach().clone()
    gs.on_epoch_start(1)
    gs.sampled_update()
    return model.weight.detach() - before


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"tolerance_mode": "relative", "tolerance": 0.5},
        {"tolerance_mode": "absolute"},
        {"tolerance_mode": "absolute", "tolerance": 1e-2},
        {"update": "ggd-signed"},
        {"fit_method": "mle"},
    ],
)
def test_a_sampled_update_never_exceeds_twice_the_real_spread(kwargs):
    model, delta = _hazard_model()
    change = _sample_after(model, delta, **kwargs)
    real_std = float(delta.std())
    tol = kwargs.get("tolerance", 1e-3)
    assert float(change.std()) <= 2 * real_std + tol
    assert float(change.abs().max()) <= float(delta.abs().max()) + 1e-6
    if kwargs.get("tolerance_mode", "relative") == "relative":
        assert float(change.std()) <= 2 * real_std  # relative: no absolute slack needed


def test_the_literal_paper_rule_reproduces_the_measured_hazard():
    model, delta = _hazard_model()
    change = _sample_after(model, delta, tolerance_mode="paper")
    # Draw std ~1 against a real update of ~2.4e-3: why it is not the default.
    assert float(change.std()) > 100 * float(delta.std())
    # Clamping alone bounds the largest step but not the spread: still >10x the real std.
    model, delta = _hazard_model()
    change = _sample_after(model, delta, tolerance_mode="paper", clamp=True)
    assert float(change.abs().max()) <= float(delta.abs().max()) + 1e-6
    assert float(change.std()) > 10 * float(delta.std())


def test_extrapolate_repeats_the_last_real_update_scaled():
    model, delta = _hazard_model()
    change = _sample_after(model, delta, update="extrapolate", update_scale=0.5)
    torch.testing.assert_close(change, 0.5 * delta, rtol=1e-4, atol=1e-8)  # float32 rounding


def test_ggd_signed_keeps_the_signs_of_the_real_update():
    model = _model()
    gs = GradSamp(model, GradSampConfig(strategy="pe:1", seed=1, update="ggd-signed"), epochs=4)
    deltas = _fake_real_epoch(model, gs, 0)
    before = _params(model)
    gs.on_epoch_start(1)
    gs.sampled_update()
    for name, p in model.named_parameters():
        if gs.last_fits[name].fallback is not None:  # the 4-element head bias
            continue
        loc = gs.last_fits[name].loc
        change = p.detach() - before[name]
        moved = (change - loc).abs() > 1e-9
        assert moved.float().mean() > 0.9
        assert torch.equal(torch.sign(change - loc)[moved], torch.sign(deltas[name] - loc)[moved])


def test_degenerate_updates_fall_back_to_zero_with_a_named_warning():
    model = _model()
    gs = GradSamp(model, GradSampConfig(strategy="pe:1", seed=0), epochs=4)
    gs.on_epoch_start(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "0.weight":
                p.add_(float("nan"))
            elif name != "0.bias":  # 0.bias: no change at all
                p.add_(torch.randn_like(p) * 1e-3)
    gs.on_epoch_end(0)
    with torch.no_grad():
        model[0].weight.zero_()  # a real epoch would have stopped here; keep the test finite
    before = _params(model)
    gs.on_epoch_start(1)
    with pytest.warns(GGDFitWarning) as caught:
        record = gs.sampled_update()
    messages = " ".join(str(w.message) for w in caught)
    assert "'0.weight'" in messages and "non-finite" in messages and "'0.bias'" in messages
    assert record["ggd"]["fallbacks"] == 3
    assert set(record["ggd"]["fallback_tensors"]) == {"0.weight", "0.bias", "4.bias"}
    after = _params(model)
    assert torch.equal(after["0.weight"], before["0.weight"])
    assert torch.equal(after["0.bias"], before["0.bias"])
    assert all(torch.isfinite(t).all() for t in after.values())
    assert not torch.equal(after["3.weight"], before["3.weight"])


def test_a_schedule_sampling_no_epoch_of_the_run_warns_that_it_is_dense():
    with pytest.warns(NothingSampledWarning, match=r"pe:1 samples no epoch of this 2-epoch run"):
        gs = GradSamp(_model(), GradSampConfig(strategy="pe:1", seed=0), epochs=2)
    assert gs.skipped_epochs() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingSampledWarning)
        assert GradSamp(_model(), GradSampConfig(strategy="pe:1", seed=0), epochs=3).skipped_epochs() == [1]


def test_first_and_last_epochs_are_real_and_skip_matches_the_strategy():
    gs = GradSamp(_model(), GradSampConfig(strategy="pe:1", seed=0), epochs=6)
    assert [e for e in range(6) if gs.should_skip(e)] == [1, 3] == gs.skipped_epochs()
    assert gs.expected_saving() == pytest.approx(2 / 6)
    info = gs.describe()
    assert info["strategy"] == "Pe=1" and info["realised_saving"] == pytest.approx(2 / 6)


def test_record_fields_are_json_safe():
    model = _model()
    gs = GradSamp(model, GradSampConfig(strategy="pe:1", record_fits=True), epochs=4)
    _fake_real_epoch(model, gs, 0)
    gs.on_epoch_start(1)
    record = gs.replace_epoch(1)
    assert set(record["ggd"]["fits"]) == {n for n, _ in model.named_parameters()}
    assert record["ggd"]["draw_std_ratio_max"] < 1.1
    json.dumps(record, allow_nan=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampled_update_on_cuda_is_reproducible():
    changes = []
    for _ in range(2):
        model = _model().cuda()
        gs = GradSamp(model, GradSampConfig(strategy="pe:1", seed=5, update="ggd-signed"), epochs=4)
        gs.on_epoch_start(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        gs.on_epoch_end(0)
        before = _params(model)
        gs.on_epoch_start(1)
        gs.sampled_update()
        changes.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
    for name, change in changes[0].items():
        assert change.is_cuda and torch.equal(change, changes[1][name]), name


def test_sampling_without_a_real_update_is_a_clear_error():
    gs = GradSamp(_model(), GradSampConfig(strategy="pe:1"), epochs=4)
    with pytest.raises(RuntimeError, match="no real update"):
        gs.sampled_update(1)


def test_memory_is_one_copy_of_the_parameters():
    model = _model()
    gs = GradSamp(model, GradSampConfig(strategy="pe:1", guard_threshold=0.1), epochs=6)
    for epoch in range(4):
        if gs.should_skip(epoch):
            gs.on_epoch_start(epoch)
            gs.replace_epoch(epoch)
            gs.on_epoch_end(epoch, {})
        else:
            _fake_real_epoch(model, gs, epoch, seed=epoch)
    assert gs._buf is not None and gs._pre is None
    held = sum(t.numel() for t in gs._buf)
    assert held == sum(p.numel() for p in model.parameters())


def test_frozen_parameters_are_left_alone():
    model = _model()
    model[0].weight.requires_grad_(False)
    gs = GradSamp(model, GradSampConfig(strategy="pe:1"), epochs=4)
    assert "0.weight" not in [n for n, _ in gs._params]


# ---------------------------------------------------------------------------- guard


def _after_one_sample(**kwargs) -> tuple[nn.Module, GradSamp, dict[str, torch.Tensor]]:
    model = _model()
    gs = GradSamp(model, GradSampConfig(strategy="pe:1", seed=2, guard_threshold=0.05, **kwargs), epochs=6)
    _fake_real_epoch(model, gs, 0)
    before = _params(model)
    gs.on_epoch_start(1)
    gs.replace_epoch(1)
    return model, gs, before


@pytest.mark.parametrize("allow_consecutive", [False, True])
def test_guard_rolls_back_exactly_when_validation_loss_rises(allow_consecutive):
    model, gs, before = _after_one_sample(allow_consecutive=allow_consecutive)
    sampled = _params(model)
    assert not gs.guard(1.0, 1.04)  # within 5%
    assert all(torch.equal(sampled[n], t) for n, t in _params(model).items())
    assert gs.guard(1.0, 1.2)
    assert all(torch.equal(before[n], t) for n, t in _params(model).items())
    assert gs.rolled_back_epochs == [1]
    assert not gs.guard(1.0, 9.0)  # nothing left to roll back
    gs.on_epoch_end(1, {})
    _fake_real_epoch(model, gs, 2, seed=5)  # training goes on normally


def test_guard_treats_nan_loss_as_a_rise():
    model, gs, before = _after_one_sample()
    assert gs.guard(1.0, math.nan)
    assert all(torch.equal(before[n], t) for n, t in _params(model).items())


def test_guard_needs_a_threshold_and_a_sampled_epoch():
    gs = GradSamp(_model(), GradSampConfig(strategy="pe:1"), epochs=4)
    with pytest.raises(ValueError, match="guard_threshold"):
        gs.guard(1.0, 2.0)
    model = _model()
    gs = GradSamp(model, GradSampConfig(strategy="pe:1", guard_threshold=0.0), epochs=4)
    _fake_real_epoch(model, gs, 0)
    assert not gs.guard(1.0, 2.0)  # the last epoch was real


# ---------------------------------------------------------------------------- resume

X = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (256,), generator=torch.Generator().manual_seed(1))


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, epoch: int) -> None:
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(epoch))
    model.train()
    for i in range(0, 256, 64):
        idx = perm[i : i + 64]
        loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _run(spec: str, epochs: range, state: dict | None = None, total: int = 9) -> tuple[nn.Module, dict]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gs = GradSamp(model, GradSampConfig(strategy=spec, seed=11), epochs=total)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gs.load_state_dict(state["gs"])
    gs.on_train_start(RunContext(model, epochs=total, steps_per_epoch=4))
    for epoch in epochs:
        gs.on_epoch_start(epoch)
        if gs.replace_epoch(epoch) is None:
            _train_epoch(model, opt, epoch)
        gs.on_epoch_end(epoch, {})
    buf = io.BytesIO()  # through torch.save, like a checkpoint
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gs": gs.state_dict()}, buf)
    buf.seek(0)
    return model, torch.load(buf, weights_only=False) | {"sampled": gs.sampled_epochs}


@pytest.mark.parametrize(("spec", "cut"), [("pe:2", 2), ("pe:2", 3), ("pr:0.5", 4), ("dr:0.6", 5)])
def test_resume_reproduces_the_same_run(spec, cut):
    full, full_state = _run(spec, range(9))
    _, half_state = _run(spec, range(cut))
    resumed, resumed_state = _run(spec, range(cut, 9), state=half_state)
    assert full_state["sampled"], "the strategy sampled nothing; pick another seed"
    assert resumed_state["sampled"] == full_state["sampled"]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_holds_the_buffer_only_when_the_next_epoch_samples():
    model = _model()
    gs = GradSamp(model, GradSampConfig(strategy="pe:2"), epochs=9)
    _fake_real_epoch(model, gs, 0)
    assert gs.state_dict()["buffer"] is None  # epoch 1 is real: the update will be replaced
    _fake_real_epoch(model, gs, 1, seed=1)
    state = gs.state_dict()
    assert state["buffer_kind"] == "delta" and len(state["buffer"]) == len(list(model.parameters()))


def test_loading_a_state_from_another_strategy_or_seed_is_refused():
    model = _model()
    state = GradSamp(model, GradSampConfig(strategy="pe:2", seed=1), epochs=9).state_dict()
    with pytest.raises(ValueError, match="strategy"):
        GradSamp(model, GradSampConfig(strategy="pe:3", seed=1), epochs=9).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        GradSamp(model, GradSampConfig(strategy="pe:2", seed=2), epochs=9).load_state_dict(state)
    with pytest.raises(ValueError, match="strategy seed"):
        other_coins = {**state, "strategy_seed": 9}
        GradSamp(model, GradSampConfig(strategy="pe:2", seed=1), epochs=9).load_state_dict(other_coins)
    with pytest.raises(ValueError, match="other parameters"):
        GradSamp(nn.Linear(3, 3), GradSampConfig(strategy="pe:2", seed=1), epochs=9).load_state_dict(
            state
        )
