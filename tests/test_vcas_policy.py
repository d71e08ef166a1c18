"""VCAS's cheaper estimation (two backwards, sub-batches) and the measured token policy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from fixtures import cross_entropy_loss, digits_batches, tiny_vit
from greenprop.errors import GreenpropError
from greenprop.vcas import VCAS, VCASConfig, apply_vcas, policy
from greenprop.vcas.estimation import pick_entries, two_backwards
from greenprop.vcas.layers import Mode
from greenprop.vcas.policy import TimingCache, WeightGradShape, WeightGradTiming, break_even, break_evens
from greenprop.vcas.surgery import VCASHandle

pytestmark = pytest.mark.usefixtures("one_thread")


def _sampled_vit(r: float = 0.5, nu: float = 0.3, seed: int = 0) -> tuple[torch.nn.Module, VCASHandle]:
    model = apply_vcas(tiny_vit(), VCASConfig(seed=seed)).train()
    handle = model._greenprop_vcas
    for sampler in handle.samplers:
        sampler.ratio = r
    for layer in handle.linears.values():
        layer.vcas_weight_ratio = nu
    return model, handle


# ---------------------------------------------------------------------------------------------
# two backwards: the token draws on the side equal a third, fully sampled backward


def _three_backwards_full(model, handle, batch, entries) -> dict[str, Tensor]:
    """The fully sampled gradients as the estimation took them before: a third backward, the
    activation draws replayed from the second."""
    runtime = handle.runtime
    layers = handle.linears
    loss = cross_entropy_loss(model, batch)
    weights = [layer.weight for layer in layers.values()]
    runtime.mode = Mode.EXACT
    torch.autograd.grad(loss, weights, retain_graph=True)
    replay = runtime.activation_generator.get_state()
    runtime.mode = Mode.ACTIVATION
    torch.autograd.grad(loss, weights, retain_graph=True)
    runtime.activation_generator.set_state(replay)
    runtime.mode = Mode.FULL
    grads = torch.autograd.grad(loss, weights)
    runtime.mode = Mode.FULL
    return {n: g.reshape(-1)[entries[n]].double() for n, g in zip(layers, grads, strict=True)}


def test_token_draws_on_the_side_equal_a_third_fully_sampled_backward(digits) -> None:
    model, handle = _sampled_vit()
    batch = digits_batches(digits, 1, size=32)[0]
    entries = pick_entries(handle.linears, 0.2, torch.Generator().manual_seed(0))
    runtime = handle.runtime
    states = (runtime.activation_generator.get_state(), runtime.weight_generator.get_state())
    draws = two_backwards(model, handle, batch, cross_entropy_loss, handle.linears, entries)
    runtime.activation_generator.set_state(states[0])
    runtime.weight_generator.set_state(states[1])
    full = _three_backwards_full(model, handle, batch, entries)
    assert set(draws.full) == set(handle.linears)
    for name, want in full.items():
        # The same tokens drawn with the same scales; only the summation order differs.
        torch.testing.assert_close(draws.full[name], want, rtol=1e-4, atol=1e-7, msg=name)
        if name.startswith("blocks.0."):  # (the last block's gradient has only the class tokens: all kept)
            assert not torch.allclose(draws.full[name], draws.activation[name])  # tokens were sampled
    assert runtime.token_probe is None and runtime.mode is Mode.FULL


def test_at_token_ratio_one_the_side_draw_is_the_activation_gradient(digits) -> None:
    model, handle = _sampled_vit(nu=1.0)
    batch = digits_batches(digits, 1, size=32)[0]
    entries = pick_entries(handle.linears, 0.2, torch.Generator().manual_seed(0))
    before = handle.runtime.weight_generator.get_state()
    draws = two_backwards(model, handle, batch, cross_entropy_loss, handle.linears, entries)
    for name in handle.linears:
        assert torch.equal(draws.full[name], draws.activation[name])
    assert torch.equal(handle.runtime.weight_generator.get_state(), before)  # nothing drawn


def test_token_draw_is_the_sampled_weight_gradient_on_the_entries() -> None:
    from greenprop.vcas.estimation import token_draw
    from greenprop.vcas.samplers import sampled_weight_grad

    gen = torch.Generator().manual_seed(3)
    dy, x = torch.randn(40, 5, generator=gen), torch.randn(40, 7, generator=gen)
    rows, cols = torch.tensor([0, 2, 4, 4]), torch.tensor([6, 0, 3, 6])
    want, _ = sampled_weight_grad(dy, x, 0.4, torch.Generator().manual_seed(9))
    got = token_draw(dy, x, 0.4, rows * 7 + cols, torch.Generator().manual_seed(9))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want[rows, cols].double(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# estimation on a sub-batch


def _batches(digits, size: int) -> Iterator[tuple[Tensor, Tensor]]:
    yield from digits_batches(digits, 8, size=size)


@pytest.mark.parametrize(
    ("fraction", "size", "estimated"), [(1.0, 64, 64), (0.25, 64, 16), (0.25, 24, 8), (0.25, 6, 6)]
)
def test_estimation_fraction_estimates_on_the_first_samples(digits, fraction, size, estimated) -> None:
    model = apply_vcas(tiny_vit(), VCASConfig(update_every=1, estimation_fraction=fraction))
    vcas = VCAS(model)
    batches = _batches(digits, size)
    vcas.update(batches, cross_entropy_loss)
    overhead = vcas.flop_account.overhead_samples
    # the first update, at ratio 1, leaves its sampled backward out (estimation.two_backwards)
    assert overhead == {"forward": 2 * estimated, "exact_backward": 2 * estimated, "sampled_backward": 0}
    for sampler in vcas.handle.samplers:
        sampler.ratio = 0.5
    vcas.update(batches, cross_entropy_loss)
    assert vcas.flop_account.overhead_samples == {
        "forward": 4 * estimated,
        "exact_backward": 4 * estimated,
        "sampled_backward": 2 * estimated,
    }


@pytest.mark.parametrize("fraction", [0.0, 1.5, float("nan")])
def test_estimation_fraction_out_of_range_is_refused(fraction) -> None:
    with pytest.raises(GreenpropError, match="estimation_fraction"):
        VCASConfig(estimation_fraction=fraction)


# ---------------------------------------------------------------------------------------------
# the measured token policy


def _timing(dense: float, *sampled: float) -> WeightGradTiming:
    return WeightGradTiming(dense, tuple(sampled))


@pytest.mark.parametrize(
    ("timing", "expected"),
    [
        (_timing(10.0, 4.0, 7.0, 10.0), 0.8),  # line 2 + 10 nu meets 10 at 0.8
        (_timing(10.0, 3.0, 4.5, 6.0), 1.0),  # pays at every ratio (line reaches 10 beyond 1)
        (_timing(1.0, 3.0, 4.5, 6.0), 0.0),  # never pays: switched off
        (_timing(5.0, 2.0, 5.0, 8.0), 0.5),
        (_timing(5.0, 4.0, 4.0, 4.0), 1.0),  # flat: pays everywhere
        (_timing(3.0, 4.0, 4.0, 4.0), 0.0),  # flat: pays nowhere
    ],
)
def test_break_even_is_where_the_fitted_sampled_time_meets_the_dense_one(timing, expected) -> None:
    assert break_even(timing) == pytest.approx(expected, abs=1e-12)


def test_break_evens_are_a_function_of_the_timings_alone() -> None:
    narrow, wide = WeightGradShape(100, 8, 8), WeightGradShape(100, 64, 256)
    shapes = {"a.fc1": narrow, "a.fc2": wide, "b.fc1": narrow}
    timings = {narrow: _timing(1.0, 1.5, 2.0, 2.5), wide: _timing(10.0, 4.0, 7.0, 10.0)}
    first = break_evens(shapes, timings)
    assert first == {"a.fc1": 0.0, "a.fc2": pytest.approx(0.8), "b.fc1": 0.0}
    assert break_evens(dict(shapes), dict(timings)) == first
    with pytest.raises(GreenpropError, match="no timing"):
        break_evens(shapes, {narrow: timings[narrow]})


@pytest.mark.parametrize("bad", [(1.0, 2.0), (0.0, 1.0, 1.0, 1.0), (1.0, float("nan"), 1.0, 1.0)])
def test_a_malformed_timing_is_refused(bad) -> None:
    with pytest.raises(GreenpropError, match="timing"):
        _timing(*bad)


def test_timing_a_shape_gives_positive_times_at_every_probe() -> None:
    timing = policy.time_weight_grad(WeightGradShape(64, 8, 16), repeats=2, warmup=1)
    assert timing.dense_s > 0 and len(timing.sampled_s) == len(policy.PROBE_RATIOS)
    assert all(t > 0 for t in timing.sampled_s)


def test_timing_cache_measures_once_and_reads_the_file_after(tmp_path, monkeypatch) -> None:
    calls: list[WeightGradShape] = []

    def fake_time(shape: WeightGradShape, **_: object) -> WeightGradTiming:
        calls.append(shape)
        return _timing(2.0, 1.0, 2.0, 3.0)

    monkeypatch.setattr(policy, "time_weight_grad", fake_time)
    path = tmp_path / "timings.json"
    shape = WeightGradShape(10, 4, 4)
    assert TimingCache(path).get(shape) == _timing(2.0, 1.0, 2.0, 3.0)
    assert TimingCache(path).get(shape) == _timing(2.0, 1.0, 2.0, 3.0)  # from the file
    assert calls == [shape]
    assert shape.key() in json.loads(path.read_text())["timings"]


@pytest.mark.parametrize(
    "text", ["not json", '{"format": 99, "timings": {}}', '{"format": 1, "timings": {"k": {}}}']
)
def test_a_bad_timing_cache_is_one_error_naming_the_file(tmp_path, text) -> None:
    path = tmp_path / "timings.json"
    path.write_text(text)
    with pytest.raises(GreenpropError, match=r"timings\.json"):
        TimingCache(path)
    assert path.read_text() == text  # never overwritten


def _cache_for(
    model_shapes: dict[str, WeightGradShape], timings: dict[tuple[int, int], WeightGradTiming], path: Path
):
    entries = {}
    for shape in model_shapes.values():
        t = timings[(shape.d_in, shape.d_out)]
        entries[shape.key()] = {
            "dense_s": t.dense_s,
            "sampled_s": list(t.sampled_s),
            "ratios": list(t.ratios),
        }
    path.write_text(json.dumps({"format": 1, "timings": entries}))


def test_token_policy_is_off_by_default(digits) -> None:
    vcas = VCAS(apply_vcas(tiny_vit(), VCASConfig(update_every=1)))
    vcas.update(_batches(digits, 32), cross_entropy_loss)
    assert vcas.token_break_even is None
    assert all(layer.vcas_token_break_even == 1.0 for layer in vcas.handle.linears.values())


def test_measured_policy_switches_off_the_layers_where_sampling_does_not_pay(digits, tmp_path) -> None:
    """Timings injected through the cache file: the fc1 shape never pays, the others up to 0.5."""
    model = apply_vcas(tiny_vit(), VCASConfig(update_every=1, initial_weight_ratio=0.3))
    linears = model._greenprop_vcas.linears
    with policy.recorded_shapes(linears) as shapes:
        cross_entropy_loss(model.train(), digits_batches(digits, 1, size=32)[0])
    fc1 = {(s.d_in, s.d_out) for n, s in shapes.items() if n.endswith("fc1")}
    timings = {
        (s.d_in, s.d_out): _timing(1.0, 2.0, 3.0, 4.0)
        if (s.d_in, s.d_out) in fc1
        else _timing(5.0, 2.0, 5.0, 8.0)
        for s in shapes.values()
    }
    path = tmp_path / "timings.json"
    _cache_for(shapes, timings, path)
    config = VCASConfig(
        update_every=1, initial_weight_ratio=0.3, token_policy="measured", timing_cache=str(path)
    )
    vcas = VCAS(apply_vcas(tiny_vit(), config))
    vcas.update(_batches(digits, 32), cross_entropy_loss)
    expected = {n: 0.0 if n.endswith("fc1") else pytest.approx(0.5) for n in linears}
    assert vcas.token_break_even == expected
    assert {n: layer.vcas_token_break_even for n, layer in vcas.handle.linears.items()} == expected
    # Training backward: fc1 (off) gets its exact weight gradient, the others sample tokens.
    layers = vcas.handle.linears
    for layer in layers.values():
        layer.vcas_weight_ratio = 0.3
    for sampler in vcas.handle.samplers:
        sampler.ratio = 1.0
    batch = digits_batches(digits, 1, size=32, seed=5)[0]
    model = vcas.model
    sampled = torch.autograd.grad(
        cross_entropy_loss(model, batch), [layer.weight for layer in layers.values()]
    )
    vcas.handle.runtime.mode = Mode.EXACT
    exact = torch.autograd.grad(cross_entropy_loss(model, batch), [layer.weight for layer in layers.values()])
    vcas.handle.runtime.mode = Mode.FULL
    for name, got, want in zip(layers, sampled, exact, strict=True):
        assert torch.equal(got, want) == name.endswith("fc1"), name
    # The policy is part of the controller's state: a resumed run does not time again.
    resumed = VCAS(apply_vcas(tiny_vit(), config))
    resumed.load_state_dict(vcas.state_dict())
    assert resumed.token_break_even == vcas.token_break_even
    assert [layer.vcas_token_break_even for layer in resumed.handle.linears.values()] == [
        layer.vcas_token_break_even for layer in layers.values()
    ]


def test_token_policy_option_is_checked() -> None:
    with pytest.raises(GreenpropError, match="token_policy"):
        VCASConfig.from_dict({"token_policy": "sometimes"})
