"""VCAS controller: the control law on real digits batches, FLOP report, exact resume, CLI and trainer."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fixtures import (
    cross_entropy_loss,
    digits_batches,
    digits_subset,
    norm_linear_stack,
    tiny_vit,
    token_batches,
    weighted_sum_loss,
)
from greenprop import data as gp_data
from greenprop.controller import RunContext
from greenprop.errors import GreenpropError
from greenprop.metering.flops import count_flops_per_sample
from greenprop.methods import build_method, parse_method
from greenprop.surgery import SurgeryWarning
from greenprop.train.checkpoint import load_checkpoint, save_checkpoint
from greenprop.train.config import TrainConfig
from greenprop.train.trainer import METRICS, Trainer
from greenprop.vcas import VCAS, VCASConfig, apply_vcas
from greenprop.vcas.control import block_ratio
from greenprop.vcas.method import CONFIG
from greenprop.vcas.surgery import vcas_handle

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor]
) -> dict[str, Tensor]:
    cross_entropy_loss(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grads


def _block_norms(model: nn.Module, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
    """Per-sample gradient norms at each block's output, by plain autograd."""
    outputs: list[Tensor] = []
    hooks = [
        block.register_forward_hook(lambda m, a, out: outputs.append(out) or out.retain_grad())
        for block in model.blocks
    ]
    cross_entropy_loss(model, batch).backward()
    for hook in hooks:
        hook.remove()
    model.zero_grad(set_to_none=True)
    return [out.grad.reshape(len(out), -1).norm(dim=1) for out in outputs]


# ---------------------------------------------------------------------------------------------
# the control law on real batches


@pytest.mark.parametrize("initial_s", [1.0, 0.5])
def test_first_update_has_zero_sampling_variance_and_exact_arithmetic(digits, initial_s: float) -> None:
    model, reference = tiny_vit(), tiny_vit(seed=7)
    reference.load_state_dict(model.state_dict())
    config = VCASConfig(update_every=1, mc_repeats=2, initial_s=initial_s, seed=0)
    vcas = VCAS(apply_vcas(model, config))
    start = vcas.ratios()
    assert start["s"] == initial_s
    assert list(start["activation"]) == ["blocks.0", "blocks.1"]
    assert set(start["activation"].values()) == {1.0}  # training starts exact whatever s is
    assert len(start["weight"]) == 8 and set(start["weight"].values()) == {1.0}

    batches = digits_batches(digits, 2)
    record = vcas.update(iter(batches), cross_entropy_loss)
    # At ratio 1 the "sampled" gradients are the exact ones: no extra variance at all.
    assert record["activation_variance_ratio"] == 0.0
    assert record["weight_variance_ratio_mean"] == 0.0
    assert record["sgd_variance"] > 0
    assert vcas.s == record["s"] == initial_s - config.s_step
    assert all(r == config.weight_ratio_multiplier for r in vcas.ratios()["weight"].values())
    # Each block's ratio: the fraction of samples holding s of its gradient-norm mass, averaged
    # over the M batches (first update: no smoothing yet), from norms computed independently.
    norms = [_block_norms(reference, batch) for batch in batches]
    for i, (name, ratio) in enumerate(vcas.ratios()["activation"].items()):
        expected = statistics.fmean(block_ratio(n[i], vcas.s) for n in norms)
        assert ratio == pytest.approx(max(config.min_ratio, expected), abs=1e-12), name
        if initial_s < 1:
            assert ratio < 0.9  # half the norm mass lies in far fewer than all samples
    assert vcas.updates == 1 and vcas.history == [record]
    overhead = vcas.flop_account.overhead_samples
    # nothing samples: the activation pass is the exact pass, left out (estimation.two_backwards)
    assert overhead == {"forward": 64, "exact_backward": 64, "sampled_backward": 0}
    # The estimation left the model's gradients alone.
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("tau", "expected_s"),
    [
        (1e6, [0.49, 0.48, 0.47]),  # variance always tolerated: s keeps falling
        (1e-9, [0.49, 0.50, 0.51]),  # any variance too much: s falls once (exact start), then rises
    ],
)
def test_ratios_follow_the_measured_variance(digits, tau: float, expected_s: list[float]) -> None:
    config = VCASConfig(update_every=1, tau_act=tau, tau_w=tau, initial_s=0.5, seed=1)
    vcas = VCAS(apply_vcas(tiny_vit(), config))
    batches = iter(digits_batches(digits, 6, size=24))
    records, weights = [], {}
    for _ in range(3):
        records.append(vcas.update(batches, cross_entropy_loss))
        for name, ratio in vcas.ratios()["weight"].items():
            weights.setdefault(name, []).append(ratio)
    assert [r["s"] for r in records] == pytest.approx(expected_s, abs=1e-12)
    assert records[0]["activation_variance_ratio"] == 0.0
    # From the second update on the samplers are active and add measurable variance.
    assert all(r["activation_variance_ratio"] > 0 for r in records[1:])
    assert all(r["activation_ratio_mean"] < 1.0 for r in records)
    if tau > 1:
        assert [r["weight_ratio_mean"] for r in records] == pytest.approx([0.95, 0.95**2, 0.95**3], abs=1e-12)
        assert list(vcas.ratios()["weight"].values()) == pytest.approx([0.95**3] * 8, abs=1e-12)
        return
    assert records[1]["weight_variance_ratio_mean"] > 0
    # Only the cls token reaches the head, so in the last block the per-token layers (proj, fc1,
    # fc2) get a non-zero output gradient on one token per sample: token sampling at 0.95 keeps
    # all of those, adds no variance, and their ratio keeps falling. Every other layer's ratio
    # goes back up to 1 after sampling (0.95 / 0.95), then down again once exact.
    per_token = {"blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"}
    for name, history in weights.items():
        expected = [0.95, 0.95**2, 0.95**3] if name in per_token else [0.95, 1.0, 0.95]
        assert history == pytest.approx(expected, abs=1e-12), name


def test_step_updates_exactly_every_update_every_steps(digits) -> None:
    vcas = VCAS(apply_vcas(tiny_vit(), VCASConfig(update_every=3, mc_repeats=2)))
    pool = digits_batches(digits, 2, size=16)
    drawn = 0

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        nonlocal drawn
        for batch in itertools.cycle(pool):
            drawn += 1
            yield batch

    source = batches()
    records = [vcas.step(source, cross_entropy_loss) for _ in range(7)]
    assert [i for i, r in enumerate(records) if r is not None] == [0, 3, 6]
    assert [r["step"] for r in records if r is not None] == [0, 3, 6]
    assert vcas.steps == 7 and vcas.updates == 3 and len(vcas.history) == 3
    assert drawn == 3 * 2  # mc_repeats batches per update, none otherwise


def test_flops_report_counts_the_saving_and_the_overhead(digits) -> None:
    model, reference = tiny_vit(), tiny_vit(seed=3)
    reference.load_state_dict(model.state_dict())
    vcas = VCAS(apply_vcas(model, VCASConfig(update_every=2, tau_act=1e6, tau_w=1e6)))
    empty = vcas.flops_report()
    assert empty["backward_ratio"] is None and empty["total_ratio_with_overhead"] is None
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    estimation = iter(digits_batches(digits, 4, seed=1))
    for batch in digits_batches(digits, 4, seed=2):
        vcas.step(estimation, cross_entropy_loss)
        _train_step(model, opt, batch)
    report = vcas.flops_report()
    assert report["steps"] == 4 and report["updates"] == 2
    assert report["train_samples"] == 4 * 32
    # No block samples yet at either update (the first at ratio 1, the second near s = 1): the
    # activation pass equals the exact pass and is left out (estimation.two_backwards).
    assert report["overhead_samples"] == {"forward": 128, "exact_backward": 128, "sampled_backward": 0}
    # The dense per-sample count is the plain model's.
    x, y = digits_batches(digits, 1)[0]
    dense = count_flops_per_sample(reference, x, y, F.cross_entropy)
    assert (report["dense_forward_per_sample"], report["dense_backward_per_sample"]) == (
        dense.forward,
        dense.backward,
    )
    saved = report["sampled_backward_saved"]
    assert saved > 0
    n = report["train_samples"]
    assert report["backward_ratio"] == pytest.approx(1 - saved / (n * dense.backward), rel=1e-12)
    assert report["backward_ratio"] < 1 and report["total_ratio"] < 1
    assert report["total_ratio_with_overhead"] > report["total_ratio"]
    # exact passes only: their dense count, nothing saved
    assert report["overhead_flops"] == pytest.approx(128 * dense.forward + 128 * dense.backward, rel=1e-12)
    assert report["total_ratio_with_overhead"] == pytest.approx(
        report["total_ratio"] + report["overhead_flops"] / (n * dense.total), rel=1e-12
    )


# ---------------------------------------------------------------------------------------------
# state: bit-exact resume, mismatches


def _draw_from(digits):
    def draw(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return digits.train[torch.randperm(len(digits.train), generator=generator)[:32]]

    return draw


def test_state_dict_round_trip_resumes_bit_exactly(digits, tmp_path) -> None:
    config = VCASConfig(update_every=2, tau_act=0.5, tau_w=0.5, seed=4)
    train = digits_batches(digits, 6, seed=5)

    model_a = tiny_vit(seed=1)
    a = VCAS(apply_vcas(model_a, config))
    a.on_train_start(RunContext(model_a, 1, 6, draw_batch=_draw_from(digits), loss_fn=cross_entropy_loss))
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        a.on_step_start(0, step)
        _train_step(model_a, opt_a, train[step])
        a.flop_account.adjustment(0, step)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(
        {"epoch": 0, "model": model_a.state_dict(), "optimizer": opt_a.state_dict(), "vcas": a.state_dict()},
        path,
    )

    model_b = tiny_vit(seed=2)  # other weights, fresh controller: everything comes from the file
    b = VCAS(apply_vcas(model_b, config))
    b.on_train_start(RunContext(model_b, 1, 6, draw_batch=_draw_from(digits), loss_fn=cross_entropy_loss))
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9)
    state = load_checkpoint(path)
    model_b.load_state_dict(state["model"])
    opt_b.load_state_dict(state["optimizer"])
    b.load_state_dict(state["vcas"])
    assert b.ratios() == a.ratios() and b.steps == 3 and b.updates == 2
    assert b.history == a.history

    for step in range(3, 6):
        a.on_step_start(0, step)
        b.on_step_start(0, step)
        assert b.ratios() == a.ratios()
        grads_a, grads_b = _train_step(model_a, opt_a, train[step]), _train_step(model_b, opt_b, train[step])
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), (step, name)
        assert a.flop_account.adjustment(0, step) == b.flop_account.adjustment(0, step)
    assert a.updates == b.updates == 3
    assert a.ratios()["s"] < 1.0  # sampling was active during the compared steps
    assert a.flops_report() == b.flops_report()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_loading_a_mismatched_state_is_refused() -> None:
    state = VCAS(apply_vcas(tiny_vit(), VCASConfig(seed=0))).state_dict()
    deeper = VCAS(apply_vcas(tiny_vit(depth=3), VCASConfig(seed=0)))
    with pytest.raises(GreenpropError, match="blocks"):
        deeper.load_state_dict(state)
    other_config = VCAS(apply_vcas(tiny_vit(), VCASConfig(seed=1)))
    with pytest.raises(GreenpropError, match="another config"):
        other_config.load_state_dict(state)
    with pytest.raises(GreenpropError, match=r"format 2 .*cannot be resumed"):
        other_config.load_state_dict({**state, "format": 2})


def test_misuse_is_a_clear_error(digits) -> None:
    model = tiny_vit()
    vcas = VCAS(apply_vcas(model, VCASConfig(mc_repeats=3)))
    with pytest.raises(GreenpropError, match=r"needs 3 batches per update.*ran out"):
        vcas.update(iter(digits_batches(digits, 2, size=8)), cross_entropy_loss)
    with pytest.raises(GreenpropError, match="RunContext with draw_batch"):
        vcas.on_step_start(0, 0)
    with pytest.raises(GreenpropError, match="scalar loss"):
        vcas.update(iter(digits_batches(digits, 3, size=8)), lambda m, b: cross_entropy_loss(m, b).detach())
    model.eval()
    with pytest.raises(GreenpropError, match=r"no gradient at block\(s\) blocks\.0, blocks\.1.*model\.train"):
        vcas.update(iter(digits_batches(digits, 3, size=8)), cross_entropy_loss)
    model.train()
    assert vcas.runtime.mode.value == "full" and not vcas.runtime.record_norms  # restored
    with pytest.raises(GreenpropError, match="another config"):
        VCAS(model, VCASConfig(mc_repeats=2))
    assert VCAS(model).config == vcas.config  # None reuses the applied config


# ---------------------------------------------------------------------------------------------
# the CLI method


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("vcas:tau_act=-1", "tau_act"),
        ("vcas:update_every=0", "update_every"),
        ("vcas:nonsense=1", "nonsense"),
        ("vcas:mc_repeats=abc", "mc_repeats"),
        ("vcas:s_step=1.5", "s_step"),
    ],
)
def test_bad_method_options_name_the_option(spec: str, name: str) -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match=name) as info:
        build_method(parse_method(spec), model, epochs=1, steps_per_epoch=1, seed=0)
    assert isinstance(info.value, GreenpropError)
    assert vcas_handle(model) is None  # nothing applied


def test_method_builds_the_controller_with_the_options() -> None:
    model = tiny_vit()
    controllers = build_method(
        parse_method("vcas:update_every=5,tau_act=0.1"), model, epochs=1, steps_per_epoch=1, seed=7
    )
    assert len(controllers) == 1 and isinstance(controllers[0], VCAS)
    config = controllers[0].config
    assert (config.update_every, config.tau_act, config.seed) == (5, 0.1, 7)
    assert vcas_handle(model) is controllers[0].handle
    assert set(CONFIG.option_help()) == {f for f in VCASConfig.__dataclass_fields__}
    with pytest.warns(SurgeryWarning, match="already applied"):
        apply_vcas(model)


# ---------------------------------------------------------------------------------------------
# the reference trainer


@pytest.fixture(scope="module")
def small_digits() -> gp_data.DatasetPair:
    return digits_subset(96, 64)


def _config(method: str) -> TrainConfig:
    # 3 steps of 32 per epoch; the default-depth (6) ViT at width 32.
    return TrainConfig(
        model="vit",
        dataset="digits",
        epochs=2,
        batch_size=32,
        lr=0.05,
        width=32,
        subset=96,
        test_subset=64,
        flops_samples=8,
        progress=False,
        method=method,
    )


def _flops(metrics: dict[str, Any], phase: str) -> float:
    return metrics["summary"]["flops"][phase]["value"]


def test_vcas_trains_through_the_trainer_and_counts_its_flops(tmp_path, small_digits) -> None:
    base = Trainer(_config("baseline"), data=small_digits).fit()
    config = _config("vcas:update_every=2")
    whole = Trainer(config, tmp_path / "whole", data=small_digits)
    metrics = whole.fit()

    vcas = whole.controllers[0]
    assert isinstance(vcas, VCAS) and vcas.config.update_every == 2 and vcas.config.seed == config.seed
    records = metrics["epochs"]
    assert len(records) == 2
    # steps 0, 1, 2 | 3, 4, 5: updates at 0, 2 | 4
    assert [r["vcas"]["updates"] for r in records] == [2, 3]
    assert [len(r["vcas"]["history"]) for r in records] == [2, 1]
    assert records[1]["vcas"]["s"] == vcas.s < 1.0
    for r in records:
        assert len(r["step_losses"]) == whole.steps_per_epoch == 3
        assert all(math.isfinite(v) for v in r["step_losses"])
        assert statistics.fmean(r["step_losses"]) == pytest.approx(r["train_loss"], rel=1e-12)
        assert set(r["vcas"]["realised_activation_ratio"]) == {f"blocks.{i}" for i in range(6)}
    assert json.loads((tmp_path / "whole" / METRICS).read_text())["epochs"][1]["vcas"] == records[1]["vcas"]

    # FLOPs: the dense count, minus what the sampled Linear backwards saved, plus the estimation.
    report = vcas.flops_report()
    assert report["backward_ratio"] < 1 and records[1]["vcas"]["backward_ratio"] == report["backward_ratio"]
    overhead_forward = report["overhead_samples"]["forward"] * report["dense_forward_per_sample"]
    overhead_backward = report["overhead_flops"] - overhead_forward
    assert _flops(metrics, "forward") == pytest.approx(_flops(base, "forward") + overhead_forward, rel=1e-9)
    training_backward = _flops(metrics, "backward") - overhead_backward
    assert training_backward == pytest.approx(
        _flops(base, "backward") - report["sampled_backward_saved"], rel=1e-9
    )
    assert training_backward < _flops(base, "backward")
    # The estimation is counted too: at F = 2 (2 batches x 3 backwards every other step) it
    # outweighs the small early saving, so the run's total backward exceeds the baseline's.
    assert _flops(metrics, "backward") > _flops(base, "backward")


# ---------------------------------------------------------------------------------------------
# frozen weights


def test_frozen_blocks_are_left_out_of_the_estimation():
    model = norm_linear_stack()
    for p in model[0].parameters():  # fine-tuning: the lowest block frozen
        p.requires_grad_(False)
    vcas = VCAS(apply_vcas(model, VCASConfig(update_every=1, s_step=0.1)))
    record = vcas.step(token_batches(), weighted_sum_loss)
    assert record is not None and record["s"] == pytest.approx(0.9)
    ratios = vcas.ratios()
    assert ratios["weight"]["0.fc"] == 1.0  # frozen: no gradient, no token ratio to adapt
    assert ratios["weight"]["1.fc"] == pytest.approx(0.95) == ratios["weight"]["2.fc"]
    # Block 0 sees no backward once its weights are frozen; blocks 1 and 2 were updated.
    assert ratios["activation"]["0"] == 1.0
    x, w = next(token_batches())
    weighted_sum_loss(model, (x, w)).backward()
    assert model[0].fc.weight.grad is None and model[2].fc.weight.grad is not None


def test_everything_frozen_is_a_clear_error():
    model = norm_linear_stack()
    for p in model.parameters():
        p.requires_grad_(False)
    model[0].norm.weight.requires_grad_(True)  # a loss that still requires grad
    vcas = VCAS(apply_vcas(model, VCASConfig(update_every=1)))
    with pytest.raises(GreenpropError, match=r"no converted layer .* trainable weight"):
        vcas.step(token_batches(), weighted_sum_loss)
