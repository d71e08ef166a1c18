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

from greenprop.ssprop import SparseConv2d

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
    result = step_module.main([*argv, "--keeps", "0.4", "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "GLIBC_TUNABLES" in printed and "| keep |" in printed and "--image-size 16" in printed
    (row,) = result["results"]
    assert row["layers_converted"] == 20  # every conv of ResNet-18; the head stays dense
    assert row["k_total"] < row["channels_total"]
    assert row["flops_b_over_a"] == pytest.approx(row["flops_c_over_a"])  # same k, same counted work
    assert row["flops_b_over_a"] < 1.0
    assert all(len(t) == 1 and t[0] > 0 for t in row["per_round_s"].values())
    assert json.loads(out.read_text())["results"][0]["keep"] == 0.4


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


def test_vcas_step_benchmark_runs_tiny(tmp_path, capsys):
    out = tmp_path / "vcas_step.json"
    argv = ["--models", "vit", "--batch", "4", "--rs", "1", "0.5", "--nus", "1", "0.5"]
    result = _import("vcas_step").main(
        [*argv, "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    assert "GLIBC_TUNABLES" in printed and "#### vit" in printed and "| r | nu |" in printed
    rows = result["results"]
    assert [(row["r"], row["nu"]) for row in rows] == [(1, 1), (1, 0.5), (0.5, 1), (0.5, 0.5)]
    for row in rows:
        assert len(row["seen_rows"]) == 6 and all(seen == 4 for seen in row["seen_rows"].values())
        assert all(t[0] > 0 for v in row["per_repeat_s"].values() for t in v.values())
        if row["r"] == 1 and row["nu"] == 1:
            assert row["flops_tally"] == pytest.approx(1.0)  # nothing sampled: dense Linear work
            assert row["flops_counted"] == pytest.approx(1.0)
        else:
            assert row["flops_tally"] < 1.0
        if row["r"] == 1:
            assert all(kept == 4 for kept in row["kept_rows"].values())
    assert len(json.loads(out.read_text())["results"]) == len(rows)


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
