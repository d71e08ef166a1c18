"""VCAS's measured block policy: each block's own sampling limit, from a timing of the block."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fixtures import cross_entropy_loss, digits_batches, stack, tiny_vit
from greenprop.errors import GreenpropError
from greenprop.vcas import VCAS, VCASConfig, apply_vcas
from greenprop.vcas.block_policy import block_limits, measured_block_limits, recorded_inputs, time_block
from greenprop.vcas.policy import WeightGradTiming
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import fixed_ratios, step_grads

pytestmark = pytest.mark.usefixtures("one_thread")

RATIOS = (0.5, 0.7, 0.9)


def _timing(exact: float, *sampled: float) -> WeightGradTiming:
    return WeightGradTiming(exact, sampled, RATIOS)


def test_the_limit_is_where_the_fitted_sampled_time_meets_the_exact_one() -> None:
    timings = {
        "pays to 0.8": _timing(0.9, 0.6, 0.8, 1.0),  # 0.1 + r: meets 0.9 at 0.8
        "never pays": _timing(1.0, 1.5, 1.7, 1.9),
        "always pays": _timing(2.0, 1.0, 1.2, 1.4),  # meets 2.0 at 1.5: clipped to 1
    }
    keys = {"a": "pays to 0.8", "b": "never pays", "c": "always pays", "d": "pays to 0.8"}
    limits = block_limits(keys, timings)
    assert limits == {"a": pytest.approx(0.8), "b": 0.0, "c": 1.0, "d": pytest.approx(0.8)}
    assert block_limits(dict(keys), dict(timings)) == limits  # the same timings, the same limits
    with pytest.raises(GreenpropError, match="no timing for the block"):
        block_limits({"a": "unknown"}, timings)


@pytest.mark.parametrize("compact", [True, False])
def test_each_block_samples_only_below_its_own_limit(compact: bool) -> None:
    """Block 0 (limit 0.9) samples at 0.6; block 1 (limit 0.5) runs exact at 0.6, though the
    runtime's limit (1) would let it sample: its gradients are dense autograd's."""
    reference = stack(depth=2)
    model = fixed_ratios(copy.deepcopy(reference), 0.6, 1.0, compact=compact)
    handle = vcas_handle(model)
    first, last = handle.samplers
    first.sample_max_ratio, last.sample_max_ratio = 0.9, 0.5
    assert (first.drawn_ratio, last.drawn_ratio) == (0.6, 1.0)
    got, want = step_grads(model, 3), step_grads(reference, 3)
    for g, w in zip(got, want, strict=True):  # the last block is backpropagated first: exact
        for name in ("1.fc1.weight", "1.fc2.weight", "1.norm.weight"):
            torch.testing.assert_close(g[name], w[name], rtol=1e-12, atol=1e-12)
    assert any(not torch.equal(g["0.fc1.weight"], w["0.fc1.weight"]) for g, w in zip(got, want, strict=True))
    rows = handle.runtime.tally.rows
    assert rows[last.index][0] == rows[last.index][1]  # every row kept
    assert rows[first.index][0] < rows[first.index][1]


def _batches(digits, size: int = 32):
    yield from digits_batches(digits, 8, size=size)


def test_block_policy_is_off_by_default(digits) -> None:
    assert VCASConfig().block_policy == "fixed"
    vcas = VCAS(apply_vcas(tiny_vit(), VCASConfig(update_every=1)))
    vcas.update(_batches(digits), cross_entropy_loss)
    assert vcas.block_limits is None and vcas.block_timing_s is None
    assert all(s.sample_max_ratio is None for s in vcas.handle.samplers)
    assert all(s.drawn_ratio == 1.0 for s in vcas.handle.samplers)


def test_block_policy_option_is_checked() -> None:
    with pytest.raises(GreenpropError, match="block_policy"):
        VCASConfig.from_dict({"block_policy": "sometimes"})


def test_the_timing_leaves_the_model_and_the_generators_as_they_were(digits) -> None:
    model = apply_vcas(tiny_vit(), VCASConfig(seed=1)).train()
    handle = vcas_handle(model)
    for sampler in handle.samplers:
        sampler.ratio = 0.75
    runtime = handle.runtime
    batch = digits_batches(digits, 1, size=32)[0]
    before = (
        torch.get_rng_state(),
        runtime.activation_generator.get_state(),
        runtime.weight_generator.get_state(),
    )
    limits = measured_block_limits(
        model, runtime, handle.samplers, lambda: cross_entropy_loss(model, batch), repeats=1, warmup=1
    )
    assert set(limits) == {s.name for s in handle.samplers}
    assert all(0.0 <= limit <= 1.0 for limit in limits.values())
    after = (
        torch.get_rng_state(),
        runtime.activation_generator.get_state(),
        runtime.weight_generator.get_state(),
    )
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert [(s.ratio, s.sample_max_ratio) for s in handle.samplers] == [(0.75, None)] * 2
    assert runtime.tally.rows == {} and runtime.tally.dense == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_measured_limits_from_the_cache_set_each_block_and_survive_a_resume(digits, tmp_path) -> None:
    """The first run times the (identical) ViT blocks once and caches it; timings injected into
    the file decide the limit of a second run, which a resumed controller keeps without timing."""
    path = tmp_path / "timings.json"
    config = VCASConfig(update_every=1, block_policy="measured", timing_cache=str(path))
    vcas = VCAS(apply_vcas(tiny_vit(), config))
    vcas.update(_batches(digits), cross_entropy_loss)
    assert vcas.block_timing_s is not None and vcas.block_timing_s > 0
    data = json.loads(path.read_text())
    keys = [k for k in data["timings"] if k.startswith("block/")]
    assert len(keys) == 1  # both blocks have the same type and shapes: one timing
    assert set(vcas.block_limits) == {s.name for s in vcas.handle.samplers}
    data["timings"][keys[0]] = {"dense_s": 0.9, "sampled_s": [0.6, 0.8, 1.0], "ratios": list(RATIOS)}
    path.write_text(json.dumps(data))
    again = VCAS(apply_vcas(tiny_vit(), config))
    again.update(_batches(digits), cross_entropy_loss)
    assert again.block_limits == {s.name: pytest.approx(0.8) for s in again.handle.samplers}
    assert [s.sample_max_ratio for s in again.handle.samplers] == [pytest.approx(0.8)] * 2
    resumed = VCAS(apply_vcas(tiny_vit(), config))
    resumed.load_state_dict(again.state_dict())
    assert resumed.block_limits == again.block_limits
    assert [s.sample_max_ratio for s in resumed.handle.samplers] == [
        s.sample_max_ratio for s in again.handle.samplers
    ]


def test_a_block_is_timed_exact_and_sampled_through_its_training_path(digits) -> None:
    model = apply_vcas(tiny_vit(), VCASConfig()).train()
    handle = vcas_handle(model)
    sampler = handle.samplers[1]
    block = model.get_submodule(sampler.name)
    batch = digits_batches(digits, 1, size=32)[0]
    with recorded_inputs({sampler.name: block}) as calls, torch.no_grad():
        cross_entropy_loss(model, batch)
    handle.runtime.take_tally()
    timing = time_block(block, sampler, calls[sampler.name], repeats=2, warmup=0)
    assert timing.ratios == RATIOS and timing.dense_s > 0 and all(t > 0 for t in timing.sampled_s)
    kept, seen = handle.runtime.tally.rows[sampler.index]
    assert seen == 2 * 4 * 32  # 2 repeats of exact and three sampled ratios, 32 samples each
    assert 2 * 32 < kept < seen  # exact kept every row, the sampled runs fewer
    assert (sampler.ratio, sampler.sample_max_ratio) == (1.0, None)  # set back
