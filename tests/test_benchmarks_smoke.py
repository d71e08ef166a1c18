"""The benchmark scripts run, and the ssProp zero-overhead reference is a correct floor.

The reference (``NarrowConv2d``, first-k channels, no ranking/gather/scatter) must
compute exactly what greenprop's sparse backward computes when greenprop's top-k
happens to be the first k channels; otherwise the step benchmark's "b within 3% of
c" compares two different computations.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from greenprop import kernels, models
from greenprop.errors import GreenpropError
from greenprop.methods import parse_method
from greenprop.ssprop import SparseConv2d
from greenprop.train.trainer import Trainer
from greenprop.vcas import VCASConfig
from greenprop.vcas.layers import VCASRuntime

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _import(name: str) -> ModuleType:
    """Import a benchmark script as a module (they import each other by plain name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts' --threads calls torch.set_num_threads, which is process-wide."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def step_module() -> ModuleType:
    return _import("ssprop_step")


@pytest.fixture(scope="module")
def reference_module() -> ModuleType:
    return _import("_narrow_conv")


@pytest.fixture(scope="module")
def layers_module() -> ModuleType:
    return _import("ssprop_layers")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("stride", [1, 2])
def test_reference_equals_greenprop_when_topk_is_first_k(reference_module, channels_last, stride):
    torch.manual_seed(0)
    c_in, c_out, keep = 6, 10, 0.4
    sparse = SparseConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=True, keep=keep)
    k = sparse.k_for()
    reference = reference_module.NarrowConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=True, narrow_k=k)
    reference.load_state_dict(sparse.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sparse.to(memory_format=fmt)
    reference.to(memory_format=fmt)
    x = torch.randn(3, c_in, 9, 9).contiguous(memory_format=fmt).requires_grad_(True)

    out_s, out_r = sparse(x), reference(x)
    assert torch.equal(out_s, out_r)
    dy = torch.randn_like(out_s)
    dy[:, :k] *= 100.0  # the first k channels dominate, so greenprop's top-k is exactly them
    grads_s = torch.autograd.grad(out_s, (x, sparse.weight, sparse.bias), dy)
    grads_r = torch.autograd.grad(out_r, (x, reference.weight, reference.bias), dy)

    for name, gs, gr in zip(("input", "weight", "bias"), grads_s, grads_r, strict=True):
        assert torch.equal(gs, gr), name
    assert not grads_r[1][k:].any() and not grads_r[2][k:].any()
    assert grads_r[1][:k].abs().sum() > 0


def test_reference_is_dense_at_full_k_and_without_grad(reference_module):
    conv = reference_module.NarrowConv2d(4, 8, 3, padding=1, narrow_k=8)
    plain = torch.nn.Conv2d(4, 8, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(conv(x), plain(x))
    conv.narrow_k = 3
    with torch.no_grad():
        assert conv(x).grad_fn is None


def test_apply_reference_converts_the_same_layers_in_place(reference_module):
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    first = base[0]
    reference_module.apply_reference(base, {"0": 5})
    assert base[0] is first and type(first) is reference_module.NarrowConv2d and first.narrow_k == 5
    assert type(base[2]) is torch.nn.Conv2d
    with pytest.raises(TypeError, match="expected a plain"):
        reference_module.apply_reference(base, {"1": 2})


def test_step_benchmark_runs_tiny(step_module, tmp_path, capsys):
    out = tmp_path / "step.json"
    argv = ["--batch", "2", "--rounds", "1", "--warmup", "0", "--width", "8", "--image-size", "16"]
    argv += ["--clock", "cpu"]
    result = step_module.main([*argv, "--keeps", "0.4", "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "GLIBC_TUNABLES" in printed and "| keep |" in printed and "--image-size 16" in printed
    assert "process's CPU time" in printed
    (row,) = result["results"]
    assert row["layers_converted"] == 20  # every conv of ResNet-18; the head stays dense
    assert row["k_total"] < row["channels_total"]
    assert row["flops_b_over_a"] == pytest.approx(row["flops_c_over_a"])  # same k, same counted work
    assert row["flops_b_over_a"] < 1.0
    assert all(len(t) == 1 and t[0] > 0 for t in row["per_round_s"].values())
    assert json.loads(out.read_text())["results"][0]["keep"] == 0.4
    _assert_step_memory(row["memory"], {"a", "b", "c", "d"})
    assert row["kernels_loaded"] == kernels.load()  # False only where the C++ ops cannot build
    assert "Peak memory of one untimed step" in printed


def _assert_step_memory(memory: dict, variants: set[str]) -> None:
    """Every variant has a peak-memory reading saying what it is (measured on Linux)."""
    assert set(memory) == variants
    for reading in memory.values():
        if reading["kind"] == "measured":
            assert reading["growth_mib"] >= 0 and reading["peak_mib"] > 0
        else:
            assert reading["growth_mib"] is None
        assert reading["source"]


def test_layer_benchmark_runs_tiny(layers_module, tmp_path, capsys):
    out = tmp_path / "layers.json"
    argv = ["--shapes", "small", "--batch", "2", "--repeats", "1", "--warmup", "0", "--keeps", "1", "0.4"]
    result = layers_module.main([*argv, "--round-to", "1", "16", "--threads", "1", "--json", str(out)])
    assert "| conv" in capsys.readouterr().out
    rows = result["results"]
    shapes = layers_module.resnet18_shapes(8, 8)
    assert len(rows) == len(shapes) * 2 * 2
    for row in rows:
        assert 1 <= row["k"] <= row["channels"]
        assert row["of_ideal"] == pytest.approx(row["speedup"] * row["k"] / row["channels"])
    assert any(row["reused_from_round_to"] == 1 for row in rows)  # round_to 16 caps at C for tiny layers
    assert len(json.loads(out.read_text())["results"]) == len(rows)


def test_resnet18_shapes_match_the_model():
    from greenprop import models

    layers = _import("ssprop_layers")
    model = models.create("resnet18", in_channels=3, image_size=32)
    convs = {
        (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0])
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.in_channels != 3
    }
    listed = {(s.c_in, s.c_out, s.kernel, s.stride) for s in layers.resnet18_shapes()}
    assert listed == convs


def test_gradsamp_epoch_benchmark_runs():
    result = _import("gradsamp_epoch").main(
        ["--model", "mlp", "--steps", "1", "--repeats", "1", "--batch", "8"]
    )
    assert result["sampled_epoch_s"] > 0 and result["real_epoch_s"] > 0
    assert result["ratio"] == pytest.approx(result["sampled_epoch_s"] / result["real_epoch_s"])


def test_vcas_linear_benchmark_runs_tiny(tmp_path, capsys):
    out = tmp_path / "vcas.json"
    argv = ["--shapes", "minilm", "--seq-len", "4", "--rs", "1", "0.5", "--nus", "1", "0.5"]
    result = _import("vcas_linear").main(
        [*argv, "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out)]
    )
    assert "sampled/dense" in capsys.readouterr().out
    rows = result["results"]
    assert len(rows) == 3 * 2 * 2  # three MiniLM Linear shapes x r x nu
    for row in rows:
        assert row["ideal"] == pytest.approx(row["kept_rows"] / row["batch"] * (1 + row["nu"]) / 2)
        if row["r"] == 1 and row["nu"] == 1:
            assert row["flops_tally"] == pytest.approx(1.0)  # nothing sampled: dense work
        else:
            assert row["flops_tally"] < 1.0  # fewer FLOPs actually run, as tallied by the layer
    assert len(json.loads(out.read_text())["results"]) == len(rows)


def test_vcas_linear_benchmark_times_the_token_draw_tiny(capsys):
    argv = [
        "--draw",
        "--shapes",
        "minilm",
        "--seq-len",
        "4",
        "--batch",
        "2",
        "--rs",
        "1",
        "--nus",
        "1",
        "0.5",
    ]
    result = _import("vcas_linear").main([*argv, "--repeats", "1", "--warmup", "0", "--threads", "1"])
    assert "fused/pytorch" in capsys.readouterr().out
    rows = result["results"]
    assert len(rows) == 3  # three MiniLM Linear shapes; nu = 1 draws nothing, so is left out
    assert all(row["tokens"] == 8 and row["nu"] == 0.5 and row["ratio"] > 0 for row in rows)


def test_vcas_step_benchmark_runs_tiny(tmp_path, capsys):
    out = tmp_path / "vcas_step.json"
    argv = ["--models", "vit", "resnet", "--batch", "4", "--rs", "1", "0.5", "--nus", "1", "0.5"]
    result = _import("vcas_step").main(
        [*argv, "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    assert "GLIBC_TUNABLES" in printed and "#### vit" in printed and "#### resnet" in printed
    assert "| r | nu |" in printed and "fp32, dropout off," in printed
    rows = result["results"]
    grid = [(1, 1), (1, 0.5), (0.5, 1), (0.5, 0.5)]
    expected = [(m, *rn) for m in ("vit", "resnet") for rn in grid]
    assert [(row["model"], row["r"], row["nu"]) for row in rows] == expected
    for row in rows:
        blocks = 6 if row["model"] == "vit" else 8
        assert len(row["seen_rows"]) == blocks and all(seen == 4 for seen in row["seen_rows"].values())
        assert all(t[0] > 0 for v in row["per_repeat_s"].values() for t in v.values())
        assert set(row["step_ratio"]) == {"vcas", "compact"}
        # VCAS's account of the counted step (dense count minus the tallied saving) is the count.
        assert row["flops_account"] == pytest.approx(row["flops_counted"], rel=1e-12)
        sampled_tokens = row["nu"] < 1 and row["model"] == "vit"  # the ResNet's blocks have no Linear
        if row["r"] == 1 and not sampled_tokens:
            assert row["flops_tally"]["vcas"] == pytest.approx(1.0)  # dense layer work
            if row["model"] == "vit":  # the exact last block runs on its live cls token only
                assert row["flops_tally"]["compact"] < 1.0
            else:
                assert row["flops_tally"]["compact"] == pytest.approx(1.0)
            assert row["flops_counted"]["vcas"] == pytest.approx(1.0)
        else:
            assert row["flops_tally"]["vcas"] < 1.0 and row["flops_tally"]["compact"] < 1.0
        if row["r"] == 1:
            assert all(kept == 4 for kept in row["kept_rows"].values())
        _assert_step_memory(row["memory"], {"dense", "vcas", "compact"})
        tensors = row["tensor_memory"]
        assert set(tensors) == {"dense", "vcas", "compact"}
        assert all(t["peak_mib"] > 0 for t in tensors.values())
        assert abs(tensors["compact"]["held_mib"]) < 0.01  # the step leaves nothing held
    assert len(json.loads(out.read_text())["results"]) == len(rows)


def test_vcas_step_benchmark_sets_the_last_blocks_ratio_apart(capsys):
    argv = ["--models", "resnet", "--batch", "8", "--rs", "1", "--nus", "1", "--last-r", "0.3"]
    result = _import("vcas_step").main([*argv, "--repeats", "1", "--warmup", "0", "--threads", "1"])
    assert "| 1 (last 0.3) | 1 |" in capsys.readouterr().out
    (row,) = result["results"]
    assert row["r"] == 1 and row["last_r"] == 0.3
    kept = row["kept_rows"]
    assert 0 < kept[7] < 8 and set(kept.values()) == {kept[7]}  # the blocks at 1 keep its rows


def test_vcas_step_benchmark_times_the_token_policy_too(capsys):
    argv = ["--models", "vit", "--batch", "4", "--rs", "1", "--nus", "1", "0.5", "--policy", "--rerun"]
    result = _import("vcas_step").main([*argv, "--repeats", "1", "--warmup", "0", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "break-even ratios" in printed and "rerun = the same with `direct=False`" in printed
    break_even = result["models"]["vit"]["break_even"]
    assert len(break_even) == 24 and all(0.0 <= b <= 1.0 for b in break_even.values())
    for row in result["results"]:
        assert row["step_ratio"]["policy"] > 0 and row["step_ratio"]["rerun"] > 0
        assert set(row["per_repeat_s"]) == {"dense", "vcas", "compact", "rerun", "policy"}


def test_vcas_step_benchmark_times_minilm_at_several_lengths_with_its_dropout(capsys):
    argv = ["--models", "minilm", "--batch", "2", "--seq-len", "4", "6", "--rs", "0.5", "--nus", "1"]
    argv += ["--data", "random", "--keep-dropout", "--skip-uncompacted", "--times-only"]
    result = _import("vcas_step").main([*argv, "--repeats", "1", "--warmup", "0", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "input 2 x 2 x 4" in printed and "input 2 x 2 x 6" in printed
    assert "the model's dropout on (--keep-dropout)" in printed and "dropout off" not in printed
    assert set(result["models"]) == {"minilm/4", "minilm/6"}
    rows = result["results"]
    assert len(rows) == 2
    for row in rows:
        assert set(row["per_repeat_s"]) == {"dense", "compact"}  # no uncompacted variant
        assert row["memory"]["compact"]["growth_mib"] is None and row["tensor_memory"]["compact"] is None
        assert row["flops_tally"]["compact"] < 1.0  # the timed steps sampled
    module = _import("vcas_step")
    kept = module.build("minilm", 0, keep_dropout=True)
    dropouts = [m.p for m in kept.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and max(dropouts) > 0  # the checkpoint's own dropout
    off = module.build("minilm", 0)
    assert all(m.p == 0 for m in off.modules() if isinstance(m, torch.nn.Dropout))


def test_vcas_step_benchmark_reads_the_compact_max_ratio_and_refuses_a_bad_one(capsys):
    module = _import("vcas_step")
    assert module.parse_args([]).compact_max_ratio == 0.7  # VCASConfig's default
    assert module.parse_args(["--compact-max-ratio", "1"]).compact_max_ratio == 1.0
    assert module.parse_args([]).direct_max_ratio == 0.9
    assert module.parse_args([]).sample_max_ratio == VCASConfig().sample_max_ratio
    with pytest.raises(SystemExit):
        module.main(["--sample-max-ratio", "0"])
    assert "--sample-max-ratio must be in (0, 1], got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(["--direct-max-ratio", "-0.5"])
    assert "--direct-max-ratio must be in [0, 1], got -0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--compact-max-ratio", "1.5"])
    assert exit_info.value.code == 2
    assert "--compact-max-ratio must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_vcas_linear_benchmark_shows_the_ratio_under_the_token_policy():
    argv = ["--shapes", "minilm", "--seq-len", "4", "--rs", "1", "--nus", "1", "0.5", "--policy"]
    result = _import("vcas_linear").main([*argv, "--repeats", "1", "--warmup", "0", "--threads", "1"])
    rows = result["results"]
    for row in rows:
        one = next(r for r in rows if r["layers"] == row["layers"] and r["nu"] == 1)
        # Below the break-even the layer samples (its own time), else it runs exact tokens.
        want = row["ratio"] if row["nu"] < row["break_even"] else one["ratio"]
        assert 0 <= row["break_even"] <= 1 and row["policy_ratio"] == want


@pytest.mark.parametrize("model", ["vit", "resnet"])
def test_vcas_estimation_benchmark_reports_the_share_and_the_controller_path(tmp_path, capsys, model):
    variants = ["update_every=2", "update_every=2,estimation_fraction=0.25"]
    argv = ["--steps", "3", "--subset", "40", "--batch", "32", "--threads", "1", "--variants", *variants]
    result = _import("vcas_estimation").main([*argv, "--model", model])
    out = capsys.readouterr().out
    assert "estimation share" in out and ("ResNet-18-GN" in out) == (model == "resnet")
    for row in result["results"]:
        assert row["updates"] == 2 and len(row["history"]) == 2  # steps 0 and 2
        assert 0 < row["share"] < 1
        assert row["share"] == pytest.approx(row["estimation_s"] / (row["estimation_s"] + row["training_s"]))


@pytest.mark.text
def test_vcas_zero_tokens_script_measures_a_share():
    result = _import("vcas_zero_tokens").main(["--batches", "1", "--threads", "1"])
    assert result["layers"] == 36  # 6 Linears in each of MiniLM's 6 layers
    # Padding and the last layer's non-CLS tokens carry exactly-zero terms: a real share, not all.
    assert 0.1 < result["share_of_grad_w"] < 0.95
    assert result["share_of_linear_backward"] == pytest.approx(result["share_of_grad_w"] / 2)


@pytest.mark.slow
def test_ddp_scaling_runs_one_and_two_processes_and_resumes(tmp_path, monkeypatch, capsys):
    """A tiny sweep: both runs of the pair, the table from their records, no rerun the second time."""
    module = _import("ddp_scaling")
    tiny = "--model cnn --dataset digits --subset 128 --test-subset 64 --epochs 2 --batch-size 64"
    monkeypatch.setattr(module, "RUNS", [("gradsamp:strategy=pe:2", tiny)])
    monkeypatch.setenv("PYTHONPATH", str(BENCHMARKS.parent / "src"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # main() sets it for its runs: restored after the test
    module.main(["--out", str(tmp_path), "--seeds", "1"])
    row = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| cnn-")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[0] == "cnn-gradsamp_strategy_pe_2" and cells[4] == "0"  # the ranks agree
    assert cells[7] == "1.000"  # the total batch is split: the same backward FLOPs
    walls = sorted(tmp_path.rglob("wall.json"))
    assert [p.parent.name for p in walls] == ["np1", "np2"]
    stamps = [p.stat().st_mtime_ns for p in walls]
    module.main(["--out", str(tmp_path), "--seeds", "1"])  # finished runs are read, not run again
    assert [p.stat().st_mtime_ns for p in walls] == stamps
    assert "| cnn-gradsamp_strategy_pe_2 |" in capsys.readouterr().out


# --------------------------------------------------------------------------- gpu_check


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return _import("gpu_check")


def test_gpu_check_smoke_runs_every_check_and_timing_on_cpu(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--smoke", "--device", "cpu", "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "### gpu_check on CPU" in printed and "| part | model | variant |" in printed
    assert result["passed"] and "FAILED" not in printed
    checks = result["gradients"]
    # ResNet-18 at keep 1 and ViT/MiniLM at ratio 1, each fp32 and bf16; 8 layer checks; GradSamp.
    assert len(checks) == 2 + 8 + 4 + 1
    assert {c["dtype"] for c in checks} == {"fp32", "bf16"}
    assert all(c["passed"] and c["error"] <= c["tolerance"] for c in checks)
    variants = [(t["model"], t["variant"]) for t in result["step_times"]]
    assert ("vit", "VCAS r 0.5 nu 0.3") in variants and ("minilm", "VCAS r 0.5 nu 0.3") in variants
    assert ("resnet18", "ssProp keep 0.4") in variants and ("resnet18", "first-k floor keep 0.6") in variants
    assert variants[-1] == ("resnet18 (1x28x28)", "sampled epoch")
    for timing in result["step_times"]:
        assert timing["median_ms"] > 0 and timing["ratio"] > 0
        _assert_step_memory({"step": timing["memory"]}, {"step"})
    assert json.loads(out.read_text())["device_name"].startswith("CPU")


def test_gpu_check_gradient_checks_fail_where_gradients_differ(gpu_check):
    sizes = gpu_check.sizes_for(torch.device("cpu"), smoke=True)
    cpu = torch.device("cpu")
    # Below keep / ratio 1 the gradients are not the dense ones: the same checks must say so.
    assert not any(c.passed for c in gpu_check.check_ssprop_model(sizes, cpu, seed=0, keep=0.5))
    model, batch, _ = gpu_check.build_encoders(sizes, seed=0)["vit"]
    assert not any(c.passed for c in gpu_check.check_vcas("vit", model, batch, cpu, ratio=0.3))
    want = [torch.ones(4), torch.full((2,), 1e-9)]  # the second: a near-zero gradient
    assert gpu_check.relative_error([w.clone() for w in want], want) == 0.0
    assert gpu_check.relative_error([want[0] * 1.01, want[1]], want) == pytest.approx(0.01, rel=1e-4)
    assert gpu_check.relative_error([want[0], want[1] + 1e-6], want) < 1e-4  # noise on it is not an error


@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda", "no CUDA device"), ("mps", "must be cpu or cuda"), ("nonsense", "not a device")],
)
def test_gpu_check_refuses_a_device_it_cannot_use(gpu_check, device, message, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--device", device, "--smoke"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_smollm_step_benchmark_runs_tiny(tmp_path, capsys, monkeypatch):
    """The script's own logic on a tiny random llama (the real loader is tested in test_smollm.py)."""
    transformers = pytest.importorskip("transformers")
    module = _import("smollm_step")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    asked = []

    def tiny(num_layers=None):
        asked.append(num_layers)
        return transformers.LlamaForCausalLM(config)

    monkeypatch.setattr(module, "load_smollm2", tiny)
    out = tmp_path / "smollm.json"
    argv = ["--shapes", "2x8", "3x4", "--repeats", "2", "--num-layers", "2", "--threads", "1"]
    result = module.main([*argv, "--json", str(out)])
    printed = capsys.readouterr().out
    assert asked == [2]
    assert "| batch x tokens |" in printed and "| 2x8 |" in printed and "load average" in printed
    rows = result["results"]
    assert [(r["shape"], r["predicted_tokens"]) for r in rows] == [("2x8", 16), ("3x4", 12)]
    for row in rows:
        assert len(row["per_repeat_s"]) == 2 and all(t > 0 for t in row["per_repeat_s"])
        assert len(row["cpu_per_repeat_s"]) == 2 and row["cpu_median_s"] > 0  # the timed steps only
        assert row["forward_backward_flops"] > 0
    assert rows[0]["forward_backward_flops"] > rows[1]["forward_backward_flops"]  # 16 tokens vs 12
    assert json.loads(out.read_text())["parameters"] == sum(p.numel() for p in tiny().parameters())
    with pytest.raises(SystemExit):
        module.main(["--shapes", "8by64"])


def test_parts_benchmark_covers_every_conv_and_runs_tiny(tmp_path, capsys):
    from greenprop import models

    parts = _import("ssprop_parts")
    model = models.create("resnet18", in_channels=3, image_size=32, width=64)
    convs = sorted(
        (m.out_channels, m.in_channels, m.kernel_size[0])
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    )
    listed = sorted((c, c_in, k) for n, c, _, c_in, k in parts.resnet18_convs(64, 32) for _ in range(n))
    assert listed == convs
    if not kernels.load():
        pytest.skip("the C++ channel ops could not be built here")
    out = tmp_path / "parts.json"
    argv = ["--batch", "2", "--width", "8", "--image-size", "8", "--repeats", "2", "--threads", "1"]
    result = parts.main([*argv, "--channels-last", "--thread-share", "--json", str(out)])
    assert "| score (C++ op) |" in capsys.readouterr().out
    assert all(p["ms_per_step"] > 0 for p in result["parts"].values())
    assert json.loads(out.read_text())["parts"].keys() == result["parts"].keys()


@pytest.mark.parametrize("rerun", [False, True])
def test_vcas_phases_benchmark_splits_the_compacted_step(capsys, rerun):
    argv = ["--models", "vit", "resnet", "--batch", "4", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    result = _import("vcas_phases").main(argv + ["--rerun"] * rerun)
    assert "#### vit" in capsys.readouterr().out
    by_model = {row["model"]: row["median_s"] for row in result["results"]}
    linear = "- VCAS Linear backward (re-run: part of the backprop)"
    conv = "- VCAS Conv2d backward (re-run: part of the backprop)"
    for name, med in by_model.items():
        blocks = med["block forward (graph-free)"] + med["block backward, all of it"]
        assert 0 < blocks <= med["compact step"]
        assert med["rest of the step"] == pytest.approx(med["compact step"] - blocks)
        layer = med[linear if name == "vit" else conv]
        if rerun:
            inner = med["- re-run on the kept rows"] + med["- backprop through the re-run"]
            assert 0 < inner <= med["block backward, all of it"]  # nested phases are parts of the outer one
            assert 0 < layer <= med["- backprop through the re-run"]
        else:  # nothing re-runs where a direct rule knows the block (whichever rules are registered)
            assert med["- backprop through the re-run"] <= med["block backward, all of it"]
            assert 0 < layer <= med["block backward, all of it"]
    assert by_model["vit"]["--- token draw, gather and 1/p scale of the kept rows"] > 0  # nu = 0.3: sampled
    assert by_model["resnet"][linear] == 0  # no Linear in the ResNet's blocks
    assert compaction_functions_restored()


def compaction_functions_restored() -> bool:
    """The timers are gone after the run: the library's functions are its own again."""
    phases = _import("vcas_phases")
    return all(not hasattr(getattr(owner, name), "__wrapped__") for _, owner, name in phases.PHASES)


def test_row_scatter_benchmark_times_the_three_variants_tiny(capsys):
    if not kernels.load():
        pytest.skip("the C++ ops could not be built here")
    result = _import("row_scatter").main(["--small", "--repeats", "1", "--warmup", "0", "--threads", "1"])
    assert {c["layout"] for c in result["cases"]} == {"NCHW", "channels_last", "-"}
    assert all(set(c["ms"]) == {"C++ op", "index_fill_", "zeros"} for c in result["cases"])
    assert "| fill/zeros |" in capsys.readouterr().out


def test_vcas_block_policy_benchmark_runs_tiny(tmp_path, capsys):
    out = tmp_path / "block_policy.json"
    argv = ["--models", "vit", "resnet", "--batch", "4", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    result = _import("vcas_block_policy").main([*argv, "--json", str(out)])
    printed = capsys.readouterr().out
    assert (
        "#### vit" in printed and "#### resnet" in printed and "| round | block [input] params |" in printed
    )
    for name, blocks, timings in (("vit", 6, 1), ("resnet", 8, 7)):
        (only,) = result["models"][name]["rounds"]
        assert len(only["limits"]) == blocks and all(0.0 <= v <= 1.0 for v in only["limits"].values())
        assert len(only["timings"]) == timings and only["seconds"] > 0
    assert json.loads(out.read_text())["benchmark"] == "vcas_block_policy"


def test_vcas_exact_tail_benchmark_times_three_variants_tiny(capsys):
    argv = ["--models", "vit", "--batch", "4", "--repeats", "2", "--warmup", "0", "--threads", "1"]
    result = _import("vcas_exact_tail").main(argv)
    vit = result["models"]["vit"]
    assert set(vit["median_s"]) == {"dense", "functions", "plain"}
    assert all(t > 0 for t in vit["median_s"].values())
    assert set(vit["ratio"]) == {"functions", "plain"}
    assert "| functions / dense |" in capsys.readouterr().out
    assert VCASRuntime.exact_tail.__name__ == "exact_tail"  # the patch is undone


@pytest.mark.text
def test_trim_step_benchmark_runs_tiny(tmp_path, capsys):
    tiny = ["--threads", "1", "--batches", "2", "--rounds", "1", "--warmup", "0"]
    out = _import("trim_step").main([*tiny, "--json", str(tmp_path / "t.json")])
    assert out["lengths"] == [53, 56] and set(out["median_s"]) == {"padded", "trimmed"}
    assert out["flops"]["trimmed"] < out["flops"]["padded"]
    assert "trimmed / padded" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["lengths"] == [53, 56]


def _epoch(forward: float, backward: float, hooks: float = 0.0, ratio: float | None = None) -> dict:
    seconds = {"forward": forward, "backward": backward, "optimizer": 1.0, "hooks": hooks}
    record = {"time": {phase: {"value": value} for phase, value in seconds.items()}}
    if ratio is not None:
        record["vcas"] = {"realised_activation_ratio": {"blocks.0": ratio, "blocks.1": ratio, "head": None}}
    return record


def test_vcas_run_vs_step_predicts_each_epoch_from_the_step_table(tmp_path) -> None:
    """The whole-run check: an epoch's prediction is the exact epoch's forward + backward times
    the table's step cost at the epoch's realised ratio (interpolated), plus the exact optimizer
    and VCAS's own hooks; the runs are read from a compare folder."""
    module = _import("vcas_run_vs_step")
    table = module.parse_pairs(["1=1.0", "0.5=0.8"])
    assert table == [(0.5, 0.8), (1.0, 1.0)]
    assert module.interpolate(table, 0.75) == pytest.approx(0.9)
    assert module.interpolate(table, 0.2) == 0.8  # held beyond the ends
    exact = {"epochs": [_epoch(2.0, 7.0), _epoch(2.0, 7.0)]}
    vcas = {"epochs": [_epoch(2.0, 7.0, hooks=0.5, ratio=1.0), _epoch(1.5, 4.0, hooks=0.5, ratio=0.75)]}
    runs = []
    for method, metrics in (("baseline", exact), ("vcas:initial_s=0.8", vcas)):
        path = tmp_path / method.split(":")[0]
        path.mkdir()
        (path / "metrics.json").write_text(json.dumps(metrics))
        runs.append({"method": method, "seed": 3, "path": str(path)})
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    result = module.main([str(tmp_path), "--step", "0.5=0.8", "1=1.0"])[3]
    # epoch 1: ratio 1, cost 1.0 -> 9 + 1 + 0.5 = 10.5; epoch 2: 0.9 * 9 + 1 + 0.5 = 9.6; exact 10 each
    assert [e["predicted"] for e in result["epochs"]] == pytest.approx([1.05, 0.96])
    assert [e["measured"] for e in result["epochs"]] == pytest.approx([1.05, 0.7])
    assert result["predicted"] == pytest.approx(20.1 / 20)
    assert result["measured"] == pytest.approx(17.5 / 20)
    assert result["hooks_share"] == pytest.approx(1.0 / 17.5)


def test_optimizer_step_benchmark_times_every_adamw_variant(tmp_path, capsys):
    tiny = ["--threads", "1", "--models", "mlp", "--rounds", "2", "--warmup", "1"]
    out = _import("optimizer_step").main([*tiny, "--json", str(tmp_path / "o.json")])
    mlp = out["models"]["mlp"]
    assert set(mlp["median_s"]) == {"loop", "foreach", "fused"}
    assert all(v > 0 for v in mlp["median_s"].values())
    model = models.create("mlp", **_import("optimizer_step").MODELS["mlp"])
    assert mlp["parameters"] == sum(p.numel() for p in model.parameters())
    assert "fused / loop" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.json").read_text())["models"]["mlp"]["parameters"] == mlp["parameters"]


@pytest.mark.text
@pytest.mark.parametrize(
    ("ab", "variants", "states"),
    [("trim", ["trimmed", "untrimmed"], {"later"}), ("fold", ["folded", "two passes"], {"step 0", "later"})],
)
def test_vcas_update_cost_script_times_both_variants_and_implies_a_share(capsys, ab, variants, states):
    argv = ["--rounds", "1", "--steps", "1", "--subset", "64", "--threads", "1", "--ab", ab]
    result = _import("vcas_update_cost").main(argv)
    assert "implied share" in capsys.readouterr().out
    assert [r["variant"] for r in result["results"]] == variants
    assert set(result["folds"]) == states and result["folds"].get("step 0", True)  # nothing samples at 0
    for row in result["results"]:
        assert set(row["updates_s"]) == states and all(len(t) == 1 for t in row["updates_s"].values())
        assert all(t > 0 for t in row["median_update_s"].values()) and 0 < row["share"] < 1
        first = result["first_update_s"]
        if ab == "fold":  # the policy's timing plus the variant's own update at step 0
            first = result["policy_s"] + row["median_update_s"]["step 0"]
        assert row["first_update_s"] == pytest.approx(first)
        assert row["hooks_s"] == pytest.approx(first + 5 * row["median_update_s"]["later"])


#: A tiny vcas-minilm: 32 samples in batches of 8 (4 steps an epoch), 16 test samples, 2 epochs.
_TINY_MINILM = ["--preset", "vcas-minilm", "--subset", "32", "--batch-size", "8", "--test-subset", "16"]
_TINY_MINILM += ["--epochs", "2"]
_PHASES = ("data", "hooks", "forward", "backward", "optimizer")


def test_vcas_run_forward_times_the_presets_runs_as_the_trainer_trains_them(capsys):
    """Stepped side by side, on the same batches, each run's epochs are what Trainer.fit makes
    of it alone (the same loss at every step, test accuracy and loss; MiniLM's dropout draws
    from the global RNG, so each run needs its own stream, seeded per epoch), and every step's
    phases add up to the epoch times the trainer books."""
    module = _import("vcas_run_forward")
    result = module.main([*_TINY_MINILM, "--threads", "1"])
    printed = capsys.readouterr().out
    assert "vcas-minilm preset's runs stepped side by side" in printed and "GC on" in printed
    assert "Test set after each epoch" in printed
    lengths = result["lengths"]
    assert len(lengths["exact"]) == 8 and lengths["exact"] == lengths["vcas"]  # the same batch each step
    assert len(set(lengths["exact"])) > 1  # trimmed, length-grouped: the token count changes
    assert result["epoch_of"] == [0] * 4 + [1] * 4
    for run in ("exact", "vcas"):
        times = result["times"][run]
        assert set(times) == {*_PHASES, "train", "wall", "estimation"}
        assert all(len(t) == 8 for t in times.values()) and all(min(times[p]) > 0 for p in _PHASES)
        for i in range(8):  # a step's train time is its phases' sum, under its wall time
            assert times["train"][i] == pytest.approx(sum(times[p][i] for p in _PHASES))
            assert times["train"][i] < times["wall"][i]
        for epoch, record in enumerate(result["records"][run]):  # the trainer's own epoch times
            at = range(4 * epoch, 4 * epoch + 4)
            booked = {k: v["value"] for k, v in record["time"].items() if k != "eval"}
            assert booked == pytest.approx({p: sum(times[p][i] for i in at) for p in _PHASES})
            assert record["time"]["eval"]["value"] == result["result"]["eval_s"][run][epoch]
    estimation = result["times"]["vcas"]["estimation"]  # VCAS estimates at step 0 (update_every 50)
    assert estimation[0] > 0 and estimation[1:] == [0.0] * 7
    assert result["times"]["exact"]["estimation"] == [0.0] * 8
    assert (
        estimation[0] == result["result"]["estimation"]["updates_s"][0] < result["times"]["vcas"]["hooks"][0]
    )
    phases = result["result"]["phases"]
    assert set(phases) == {*_PHASES, "train"} and set(phases["forward"]) == {"epoch 1", "epoch 2", "run"}
    run = phases["train"]["run"]
    assert run["sum_exact_s"] == pytest.approx(sum(result["times"]["exact"]["train"]))
    assert run["sum_ratio"] == pytest.approx(run["sum_vcas_s"] / run["sum_exact_s"])
    share = result["result"]["estimation"]["spans"]["run"]["share_of_vcas_train"]
    assert share == pytest.approx(estimation[0] / run["sum_vcas_s"])
    assert sum(b["steps"] for b in result["result"]["by_length"].values()) == 8
    assert all(len(f) == 8 for f in result["faults"].values())  # training forwards, not estimation's

    for label, config in module.run_configs(module.parse_args(_TINY_MINILM)):
        stepped, alone = result["records"][label], Trainer(config).fit()["epochs"]
        assert len(stepped) == len(alone) == 2
        for ours, theirs in zip(stepped, alone, strict=True):
            assert len(ours["step_losses"]) == 4
            # Equal but for the last bits: a tiny VCAS run's loss was seen to move at 1e-7 from
            # one process to another; the RNG and the schedule move it at 1e-3.
            for key in ("step_losses", "train_loss", "loss"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (label, ours["epoch"], key)
            assert ours["acc1"] == theirs["acc1"], (label, ours["epoch"])


def test_vcas_run_forward_vcas_options_override_the_presets_method():
    """--vcas-options reach the VCAS run's controller (overriding the preset's own values) and
    leave the exact run alone; a bad value fails when the run is built, naming it."""
    module = _import("vcas_run_forward")
    args = module.parse_args([*_TINY_MINILM, "--vcas-options", "tau_act=0.05,update_every=7"])
    (exact_label, exact), (vcas_label, vcas) = module.run_configs(args)
    assert vcas_label == "vcas"
    assert (exact_label, exact.method) == ("exact", "baseline")
    options = parse_method(vcas.method).options
    assert options["tau_act"] == "0.05" and options["update_every"] == "7"  # the preset says 50
    (vcas_controller,) = Trainer(vcas).controllers
    assert vcas_controller.config.tau_act == 0.05 and vcas_controller.config.update_every == 7
    bad = module.run_configs(module.parse_args([*_TINY_MINILM, "--vcas-options", "tau_act=-1"]))[1][1]
    with pytest.raises(GreenpropError, match="tau_act"):
        Trainer(bad)
