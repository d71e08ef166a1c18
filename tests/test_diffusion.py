"""The DDPM U-Net, its noise schedule and sampler, the FD score, the methods on the U-Net, the CLI."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from fixtures import digits_run, digits_subset
from greenprop import apply_ssprop
from greenprop.cli import main
from greenprop.diffusion.frechet import frechet_distance
from greenprop.diffusion.schedule import NoiseSchedule, ancestral_sample
from greenprop.diffusion.task import DiffusionTask
from greenprop.errors import GreenpropError
from greenprop.experiments.compare import RunResult
from greenprop.experiments.frontier import ONE_SEED
from greenprop.experiments.report import aggregate, format_table, task_metrics
from greenprop.methods import build_method, parse_method
from greenprop.models import DIFFUSION_MODELS, MODELS, DDPMUNet, ResBlock, create, task_of
from greenprop.ssprop.config import SSPropConfig
from greenprop.ssprop.layers import SparseConv2d
from greenprop.train.trainer import Trainer
from greenprop.vcas import apply_vcas, vcas_handle
from greenprop.vcas.config import VCASConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed: int = 0) -> DDPMUNet:
    torch.manual_seed(seed)
    return create("ddpm-unet", width=4)


def noisy_batch(n: int = 3, side: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, side, side, generator=gen)
    t = torch.randint(0, 200, (n,), generator=gen)
    return x, t, torch.randn(n, 1, side, side, generator=gen)


def grads_of(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor
) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x, t), target).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------ model


@pytest.mark.parametrize("side", [8, 32])
def test_unet_forward_backward_shapes(side):
    model = tiny_unet()
    x, t, noise = noisy_batch(3, side)
    out = model(x, t)
    assert out.shape == x.shape
    grads = grads_of(model, x, t, noise)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name  # every layer, the time MLP included, is on the path


def test_unet_is_a_diffusion_model_with_a_dense_output_head():
    assert DIFFUSION_MODELS == ("ddpm-unet",) and "ddpm-unet" not in MODELS
    assert task_of("ddpm-unet") == "diffusion" and task_of("ddpm_unet:") == "diffusion"
    assert task_of("cnn") == "classification"
    model = create("ddpm-unet")  # ssProp's size: 16 base channels
    assert model.stem.out_channels == 16 and isinstance(model.head, nn.Conv2d)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(1, 1, 30, 30), torch.zeros(1, dtype=torch.int64))


def test_time_embedding_changes_the_output():
    model = tiny_unet()
    x, _, _ = noisy_batch(2)
    assert not torch.allclose(model(x, torch.tensor([0, 0])), model(x, torch.tensor([150, 150])))


# ------------------------------------------------------------------------------ schedule


def test_schedule_matches_the_ddpm_formulas():
    schedule = NoiseSchedule(steps=10, beta_start=1e-3, beta_end=0.2)
    betas = [1e-3 + (0.2 - 1e-3) * i / 9 for i in range(10)]
    assert np.allclose(schedule.betas.numpy(), betas)
    alpha_bars = [math.prod(1 - b for b in betas[: t + 1]) for t in range(10)]
    assert np.allclose(schedule.alpha_bars.numpy(), alpha_bars, rtol=1e-12)
    posterior = [0.0] + [
        betas[t] * (1 - alpha_bars[t - 1]) / (1 - alpha_bars[t]) for t in range(1, 10)
    ]  # beta~_t of Ho et al. (eq. 7)
    assert np.allclose(schedule.posterior_variances.numpy(), posterior, rtol=1e-12)
    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    t = torch.tensor([0, 3, 7, 9])
    expected = torch.stack(
        [
            alpha_bars[int(s)] ** 0.5 * x0[i] + (1 - alpha_bars[int(s)]) ** 0.5 * noise[i]
            for i, s in enumerate(t)
        ]
    )
    assert torch.allclose(schedule.add_noise(x0, t, noise), expected, atol=1e-6)
    assert NoiseSchedule().steps == 200  # ssProp's T
    with pytest.raises(GreenpropError, match="diffusion_steps=0"):
        NoiseSchedule(steps=0)


def test_sampler_with_the_true_noise_recovers_the_data_point():
    """For data that is one point c, the exact noise predictor is (x_t - sqrt(ab_t) c) / sqrt(1 - ab_t);
    the ancestral sampler must then end exactly at c."""
    schedule = NoiseSchedule(steps=30)
    c = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    alpha_bars = schedule.alpha_bars.float()

    def oracle(x, t):
        ab = alpha_bars[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * c) / (1 - ab).sqrt()

    out = ancestral_sample(oracle, schedule, (5, 1, 4, 4), torch.Generator().manual_seed(0))
    assert torch.allclose(out, c.expand(5, -1, -1, -1), atol=1e-4)


def test_sampler_is_deterministic_from_its_seed():
    model = tiny_unet().eval()
    schedule = NoiseSchedule(steps=5)

    def draw(seed):
        return ancestral_sample(model, schedule, (2, 1, 8, 8), torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.allclose(draw(3), draw(4))


# ------------------------------------------------------------------------------ FD


def test_frechet_distance_zero_for_identical_sets_and_positive_when_shifted():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, 0.0, -2.0, 0.5, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # b = 2a + 1: cov_b = 4 cov_a, so (cov_a cov_b)^(1/2) = 2 cov_a and FD = |mu diff|^2 + tr(cov_a)
    b = 2 * a + 1
    mu_diff = a.mean(0) - b.mean(0)
    assert frechet_distance(a, b) == pytest.approx(
        mu_diff @ mu_diff + np.trace(np.cov(a, rowvar=False)), rel=1e-8
    )


def test_frechet_distance_agrees_with_the_direct_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(40, 3)) @ rng.normal(size=(3, 3)) + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # symmetric form: Tr (s_a^(1/2) s_b s_a^(1/2))^(1/2), computed by eigendecomposition
    w, v = np.linalg.eigh(s_a)
    half = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(half @ s_b @ half)
    expected = (
        np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.sum(np.sqrt(inner))
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_handles_fewer_rows_than_features_and_bad_input():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 10)), rng.normal(size=(5, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        assert math.isfinite(frechet_distance(a, b)) and frechet_distance(a, b) > 0
    with pytest.raises(GreenpropError, match="same D"):
        frechet_distance(a, b[:, :3])
    with pytest.raises(GreenpropError, match="finite"):
        frechet_distance(a * np.nan, b)


# ------------------------------------------------------------------------------ methods


def test_ssprop_converts_the_unet_convs_but_not_the_output_and_is_exact_at_keep_1():
    dense = tiny_unet()
    model = copy.deepcopy(dense)
    keys = list(model.state_dict())
    apply_ssprop(model, SSPropConfig(keep=1.0))  # default layers: Conv2d only
    converted = {n for n, m in model.named_modules() if isinstance(m, SparseConv2d)}
    convs = {n for n, m in dense.named_modules() if isinstance(m, nn.Conv2d)}
    assert converted == convs - {"head"}
    assert {"down_blocks.0.conv1", "up_blocks.2.conv2", "downsamples.0", "upsamples.1", "stem"} <= converted
    assert list(model.state_dict()) == keys
    x, t, noise = noisy_batch(4)
    expected, got = grads_of(dense, x, t, noise), grads_of(model, x, t, noise)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-5), name


def test_vcas_samples_after_the_residual_blocks_exact_at_ratio_1():
    dense = tiny_unet()
    model = copy.deepcopy(dense)
    keys = list(model.state_dict())
    build_method(parse_method("vcas:check_rows=true"), model, epochs=2, steps_per_epoch=2, seed=0)
    handle = vcas_handle(model)
    blocks = [s.name for s in handle.samplers]
    assert blocks == [n for n, m in model.named_modules() if isinstance(m, ResBlock)]
    assert blocks[-1] == "up_blocks.2" and len(blocks) == 8  # forward order: the last block is last
    assert "down_blocks.0.conv1" in handle.convs and "down_blocks.0.time" in handle.linears
    assert list(model.state_dict()) == keys
    x, t, noise = noisy_batch(6)
    expected, got = grads_of(dense, x, t, noise), grads_of(model, x, t, noise)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-5), name


def test_vcas_row_assumption_holds_in_the_unet_despite_skip_connections():
    """Skips leave each block through its (sampled) output, so no dropped row reaches a block's layers."""
    model = tiny_unet()
    apply_vcas(model, VCASConfig(check_rows=True), block_types=DDPMUNet.vcas_block_types)
    for sampler in vcas_handle(model).samplers:
        sampler.ratio = 0.5
    x, t, noise = noisy_batch(8)
    grads = grads_of(model, x, t, noise)  # check_rows raises if a skipped row carried gradient
    assert all(torch.isfinite(g).all() for g in grads.values())
    kept = vcas_handle(model).runtime.tally.rows
    assert kept and all(k < seen for k, seen in kept.values())


def test_vcas_refuses_a_unet_block_with_batchnorm():
    model = tiny_unet()
    model.mid_blocks[0].norm1 = nn.BatchNorm2d(8)
    with pytest.raises(GreenpropError, match="BatchNorm"):
        build_method(parse_method("vcas"), model, epochs=2, steps_per_epoch=2, seed=0)


def diffusion_run(**fields):
    """A tiny ddpm-unet run on digits (padded to 32x32), unscored unless ``fields`` say so."""
    settings = {"width": 4, "subset": 32, "test_subset": 16, "batch_size": 16, "optimizer": "adamw"}
    settings.update(lr=1e-3, diffusion_steps=10, score_every=0)
    return digits_run(model="ddpm-unet", **{**settings, **fields})


def test_gradsamp_replaces_a_unet_epoch_and_keeps_the_keys():
    data = digits_subset(32, 16)
    trainer = Trainer(diffusion_run(epochs=3, method="gradsamp:strategy=pe:1"), data=data)
    keys = list(trainer.model.state_dict())
    metrics = trainer.fit()
    assert [r["replaced_by"] for r in metrics["epochs"]] == [None, "gradsamp", None]
    assert all(math.isfinite(r["loss"]) for r in metrics["epochs"])
    assert list(trainer.model.state_dict()) == keys
    assert metrics["summary"]["flops"]["backward"]["value"] > 0


def test_the_diffusion_trainer_is_exact_and_reproducible_and_ssprop_keep_1_matches_it():
    data = digits_subset(32, 16)
    first = Trainer(diffusion_run(epochs=1), data=data).fit()
    again = Trainer(diffusion_run(epochs=1), data=data).fit()
    dense_keep = Trainer(diffusion_run(epochs=1, method="ssprop:keep=1.0"), data=data).fit()
    assert first["epochs"][0]["step_losses"] == again["epochs"][0]["step_losses"]
    assert np.allclose(dense_keep["epochs"][0]["step_losses"], first["epochs"][0]["step_losses"], rtol=1e-5)
    assert first["task"]["name"] == "diffusion" and "acc1" not in first["epochs"][0]
    assert first["summary"]["fd"] is None and first["summary"]["test_loss"] == first["epochs"][0]["loss"]


def test_diffusion_options_are_checked():
    data = digits_subset(32, 16)
    with pytest.raises(GreenpropError, match="only apply to a diffusion model"):
        Trainer(digits_run(model="cnn", score_every=1), data=data)
    with pytest.raises(GreenpropError, match="score_samples=1"):
        Trainer(diffusion_run(score_samples=1), data=data)
    with pytest.raises(GreenpropError, match="score_every=-1"):
        diffusion_run(score_every=-1)


def test_diffusion_task_maps_images_to_model_space_and_back():
    data = digits_subset(32, 16)
    task = DiffusionTask(diffusion_run(), data)
    x = data.train.inputs[:4]
    model_space = task.to_model_space(x)
    assert model_space.shape == (4, 1, 32, 32)
    assert model_space.min() >= -1 - 1e-6 and model_space.max() <= 1 + 1e-6
    assert torch.all(model_space[..., :12, :] == -1)  # the padding is background
    assert torch.allclose(task.to_data_space(model_space), x, atol=1e-5)


# ------------------------------------------------------------------------------ CLI and report


def test_train_cli_writes_loss_fd_and_a_sample_grid(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "ddpm-unet", "--dataset", "fashion-mnist", "--subset", "200"]
    argv += [
        "--test-subset",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--width",
        "4",
        "--optimizer",
        "adamw",
    ]
    argv += [
        "--lr",
        "0.001",
        "--diffusion-steps",
        "8",
        "--score-samples",
        "16",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    record = metrics["epochs"][0]
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["loss"])
    assert record["fd"] > 0 and metrics["summary"]["fd"] == record["fd"]
    png = out / record["sample_grid"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cache = tmp_path / "fd-classifier-fashion-mnist-200"
    assert json.loads((cache / "metrics.json").read_text())["complete"]
    assert "FD (greenprop CNN features)" in capsys.readouterr().out
    argv_bad = ["train", "--model", "cnn", "--score-every", "2", "--out", str(tmp_path / "bad")]
    assert main(argv_bad) == 2
    assert "only apply to a diffusion model" in capsys.readouterr().err


def _result(method: str, fd: float | None, loss: float, backward: float, diverged: bool = False) -> RunResult:
    quantity = {"kind": "counted", "source": "test"}
    summary = {
        "epochs_run": 2,
        "epochs_replaced": 0,
        "fd": fd,
        "test_loss": loss,
        "flops": {"forward": {"value": 1e12, **quantity}, "backward": {"value": backward, **quantity}},
        "time": {"train": {"value": 10.0, **quantity}},
        "energy": {"value": None, "kind": "unavailable", "source": "none"},
    }
    task = {
        "name": "diffusion",
        "metrics": [
            {"key": "fd", "label": "FD (greenprop CNN features)", "higher_is_better": False},
            {"key": "test_loss", "label": "Test loss (noise MSE)", "higher_is_better": False},
        ],
    }
    metrics = {"summary": summary, "task": task, "diverged": {"epoch": 1} if diverged else None}
    return RunResult(method, 0, None, metrics)


def test_report_shows_the_diffusion_metrics_lower_is_better():
    results = [_result("baseline", 30.0, 0.1, 2e12), _result("ssprop:keep=0.6", 25.0, 0.12, 1.2e12)]
    metrics = task_metrics(results)
    rows = {r["method"]: r for r in aggregate(results)}
    assert rows["ssprop:keep=0.6"]["fd_mean"] == 25.0 and "acc1_mean" not in rows["baseline"]
    assert rows["ssprop:keep=0.6"]["backward_saved_pct"] == pytest.approx(40.0)
    table = format_table(list(rows.values()), markdown=True, metrics=metrics)
    assert "FD (greenprop CNN features) ↓" in table and "Acc@1" not in table
    assert "| 25.00 |" in table
    unscored = [_result("baseline", None, 0.1, 2e12), _result("vcas", 1.0, 0.1, 1e12, diverged=True)]
    rows = aggregate(unscored)
    text = format_table(rows, metrics=metrics)
    assert "n/a" in text and "diverged" in text  # no FD is not a divergence
    assert rows[0]["flops_saved_pct"] == pytest.approx(0.0)


def test_compare_of_diffusion_runs_shares_one_fd_classifier_and_reports_fd(tmp_path):
    from greenprop.experiments.compare import run_compare
    from greenprop.experiments.report import write_report

    base = diffusion_run(epochs=2, score_every=None, score_samples=8, diffusion_steps=5)
    results = run_compare(base, ["baseline", "ssprop:keep=0.5"], [0], tmp_path, frontier=(0.5,))
    assert [r.method for r in results] == ["baseline", "ssprop:keep=0.5", "dense@1ep"]
    caches = sorted(p.name for p in tmp_path.glob("fd-classifier-*"))
    assert caches == ["fd-classifier-digits-32"]
    assert all(r.metrics["config"]["fd_cache"] == str(tmp_path) for r in results)
    assert all(r.metrics["summary"]["fd"] > 0 for r in results)
    paths = write_report(results, tmp_path, title="ddpm")
    report = paths["markdown"].read_text()
    assert "FD (greenprop CNN features) ↓" in report and "Acc@1" not in report
    assert paths["curves_plot"].exists() and paths["saving_plot"].name == "fd_vs_saving.png"
    assert paths["saving_plot"].exists() and "![fd vs saving](fd_vs_saving.png)" in report
    # The dense frontier on both metrics, lower is better: ssProp's cost lies between dense@1ep
    # and the baseline, where dense's value is read linearly in the FLOPs.
    (row,) = json.loads(paths["json"].read_text())["frontier"]
    assert row["metrics"] == ["fd", "test_loss"] and row["position_flops"] == "inside"
    summary = {r.method: r.metrics["summary"] for r in results}
    flops = {m: s["flops"]["forward"]["value"] + s["flops"]["backward"]["value"] for m, s in summary.items()}
    share = (flops["ssprop:keep=0.5"] - flops["dense@1ep"]) / (flops["baseline"] - flops["dense@1ep"])
    for key in ("fd", "test_loss"):
        dense = summary["dense@1ep"][key] + share * (summary["baseline"][key] - summary["dense@1ep"][key])
        assert row[f"dense_{key}_at_flops"] == pytest.approx(dense)
        delta = summary["ssprop:keep=0.5"][key] - dense
        side = "above" if delta < 0 else "below"
        assert row[f"verdict_{key}_flops"] == f"{side} the frontier{ONE_SEED}"
    assert "### FD (greenprop CNN features) ↓ (lower is better)" in report
    assert "### Test loss (noise MSE) ↓ (lower is better)" in report
    for name in ("frontier_flops.png", "frontier_test_loss_flops.png", "frontier_test_loss_time.png"):
        assert (tmp_path / name).stat().st_size > 0
