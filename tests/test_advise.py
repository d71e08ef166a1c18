"""greenprop advise: the recommendation rules on injected timings, the measurements, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from greenprop.advise import (
    LayerTiming,
    Measurements,
    ProbeResult,
    StepTiming,
    VCASTiming,
    choose_ssprop,
    format_advice,
    recommend,
    to_json,
)
from greenprop.advise.measure import time_ssprop_layers, vcas_refusal
from greenprop.advise.recommend import predict_spec, vcas_update_every
from greenprop.cli import main

KEEPS = (0.8, 0.6, 0.4, 0.2)


def _layer(
    name: str, channels: int, dense: float, sparse: dict[float, float], kind: str = "conv"
) -> LayerTiming:
    """A layer whose counted backward FLOPs scale with keep (dense: 1000 * channels)."""
    flops = 1000.0 * channels
    return LayerTiming(name, kind, channels, dense, flops, sparse, {k: flops * k for k in sparse})


def _measurements(vcas: VCASTiming | None = None, epochs: int = 4) -> Measurements:
    # A narrow layer whose sparse backward is slower than dense, and two wide ones that pay.
    layers = [
        _layer("stem", 8, 0.010, {0.8: 0.012, 0.6: 0.012, 0.4: 0.013, 0.2: 0.013}),
        _layer("wide1", 64, 0.040, {0.8: 0.034, 0.6: 0.026, 0.4: 0.018, 0.2: 0.010}),
        _layer("wide2", 128, 0.060, {0.8: 0.050, 0.6: 0.038, 0.4: 0.026, 0.2: 0.014}),
    ]
    step = StepTiming(forward_s=0.050, backward_s=0.150, forward_flops=1e6, backward_flops=2e6)
    return Measurements(epochs=epochs, steps_per_epoch=32, step=step, layers=layers, vcas=vcas)


def test_ssprop_choice_by_hand():
    choice = choose_ssprop(_measurements().layers, KEEPS, max_drop=0.4)
    # Mean keep >= 0.6: constant 0.8/0.6 or interleaved 0.8/0.6/0.4/0.2. Wide layers only
    # (min_channels=64) since the stem is slower sparse. Per sparse step: constant 0.6 saves
    # (0.040-0.026)+(0.060-0.038) = 0.036 s; interleaved 0.2 saves (0.030+0.046)/2 = 0.038 s: best.
    assert choice is not None
    assert (choice.keep, choice.interleave, choice.min_channels) == (0.2, True, 64)
    assert choice.layers == ["wide1", "wide2"]
    assert choice.saved_s == pytest.approx(0.076)
    assert choice.spec() == "ssprop:keep=0.2,interleave=true,min_channels=64"
    # With no drop allowed beyond 20% on average: constant 0.8 (0.016 s) loses to interleaved 0.6 (0.018 s).
    mild = choose_ssprop(_measurements().layers, KEEPS, max_drop=0.2)
    assert mild is not None and (mild.keep, mild.interleave) == (0.6, True)


def test_ssprop_not_chosen_where_sparse_is_never_faster():
    slow = [
        _layer("a", 16, 0.010, {k: 0.011 for k in KEEPS}),
        _layer("b", 32, 0.02, {k: 0.03 for k in KEEPS}),
    ]
    assert choose_ssprop(slow, KEEPS) is None
    m = _measurements()
    m.layers = slow
    row = recommend(m, KEEPS).rows[0]
    assert row.method == "ssprop" and row.spec is None and not row.recommended
    assert "faster than dense" in row.reasons[0]


def test_recommendation_is_deterministic_and_matches_hand_arithmetic():
    vcas = VCASTiming(
        ratios={"blocks": [0.5, 0.3], "weights": {}},
        dense_backward_s=0.150,
        backward_s=0.090,
        backward_flops=1.2e6,
    )
    m = _measurements(vcas)
    first, second = recommend(m, KEEPS), recommend(m, KEEPS)
    assert first == second
    rows = {r.method: r for r in first.rows}
    # ssProp: 0.076 s per sparse step, half the epochs sparse, of a 0.2 s step.
    assert rows["ssprop"].time_saving == pytest.approx(0.076 / 2 / 0.2)
    # FLOPs: (64k + 128k) * 0.8 saved per sparse step, half the epochs, of 3e6.
    assert rows["ssprop"].flops_saving == pytest.approx(192_000 * 0.8 / 2 / 3e6)
    # VCAS: 128 steps -> update every 16; estimation 2 * (0.05 + 3 * 0.15) / 16 s per step.
    every = vcas_update_every(128)
    assert every == 16
    overhead = 2 * (0.05 + 3 * 0.15) / every
    assert rows["vcas"].time_saving == pytest.approx((0.150 - 0.090 - overhead) / 0.2)
    assert rows["vcas"].flops_saving == pytest.approx((2e6 - 1.2e6 - 2 * (1e6 + 6e6) / 16) / 3e6)
    assert rows["vcas"].spec == "vcas:update_every=16,s_step=0.05,weight_ratio_multiplier=0.8"
    # GradSamp Pe=2 over 4 epochs replaces epoch 2 only (first and last always train).
    assert rows["gradsamp"].flops_saving == pytest.approx(0.25)
    # The combination takes the partner saving more time (ssProp: VCAS's estimation costs more
    # than it saves), epoch by epoch: ssProp sparse in epochs 1 and 3 (0.38 of a step each),
    # GradSamp replaces epoch 2, which ssProp ran dense: (0 + 0.38 + 1 + 0.38) / 4.
    assert rows["vcas"].time_saving < rows["ssprop"].time_saving
    combined = rows["gradsamp+ssprop"]
    assert combined.time_saving == pytest.approx((0.38 + 1 + 0.38) / 4)
    assert combined.spec == f"gradsamp:strategy=pe:2;{rows['ssprop'].spec}"
    assert first.best is combined


def test_vcas_not_recommended_when_slower_and_refusal_shown():
    slower = VCASTiming(
        ratios={"blocks": [0.9]}, dense_backward_s=0.15, backward_s=0.16, backward_flops=1.9e6
    )
    row = recommend(_measurements(slower), KEEPS).rows[1]
    assert row.method == "vcas" and not row.recommended and row.time_saving < 0
    assert any("not recommended" in r for r in row.reasons)
    refused = VCASTiming(refused="block 'x' contains BatchNorm")
    row = recommend(_measurements(refused), KEEPS).rows[1]
    assert row.spec is None and "BatchNorm" in row.reasons[0]


def test_gradsamp_needs_three_epochs():
    rows = {r.method: r for r in recommend(_measurements(epochs=2), KEEPS).rows}
    assert rows["gradsamp"].spec is None and not rows["gradsamp"].recommended
    assert not any(r.method.startswith("gradsamp+") for r in rows.values())


def test_format_has_every_section():
    m = _measurements(VCASTiming(refused="no blocks"))
    m.probes = {
        "baseline": ProbeResult("baseline", steps=9, train_loss=1.0, acc1=50.0, flops=100.0),
        "ssprop": ProbeResult("ssprop:keep=0.6", steps=9, train_loss=1.1, acc1=48.0, flops=80.0),
    }
    text = format_advice(m, recommend(m, KEEPS), title="t", environment="env", keeps=KEEPS)
    for fragment in (
        "| wide2 | conv | 128 | 60.00 |",
        "| ssprop | `ssprop:keep=0.6` | 9 | 0 | 1.100 | 48.0 | 0.800 |",
    ):
        assert fragment in text
    assert (
        "recommended: --method 'gradsamp:strategy=pe:2;ssprop:keep=0.2,interleave=true,min_channels=64'"
        in text
    )


def test_layer_timings_count_fewer_flops_at_lower_keep():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 32), nn.Linear(32, 4)
    )
    timings = time_ssprop_layers(model, torch.randn(4, 1, 6, 6), (0.5,), repeats=1, warmup=0)
    assert [t.name for t in timings] == ["0", "3"]  # the output layer stays dense
    conv, linear = timings
    assert (conv.kind, conv.channels, linear.kind, linear.channels) == ("conv", 8, "linear", 32)
    # The first layer's input needs no gradient: only grad_weight, which halves at keep 0.5.
    assert conv.sparse_flops[0.5] == pytest.approx(conv.dense_flops / 2)
    assert 0 < linear.sparse_flops[0.5] < linear.dense_flops
    assert all(t.dense_s > 0 and t.sparse_s[0.5] > 0 for t in timings)


def test_vcas_refusal_names_batchnorm():
    blocks = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(2)))
    assert "BatchNorm" in vcas_refusal(nn.Sequential(blocks))
    assert (
        vcas_refusal(nn.Sequential(nn.Sequential(*(nn.Sequential(nn.Linear(4, 4)) for _ in range(2)))))
        is None
    )


TINY = [
    "--dataset",
    "digits",
    "--subset",
    "256",
    "--batch-size",
    "16",
    "--epochs",
    "4",
    "--repeats",
    "1",
    "--warmup",
    "0",
]
TINY += ["--probe-subset", "32", "--probe-epochs", "3", "--keeps", "0.2", "--no-progress"]


def test_cli_end_to_end_on_a_tiny_vit(tmp_path, capsys):
    out = tmp_path / "advice.json"
    args = ["advise", "--model", "vit:depth=2,heads=2", "--width", "16", *TINY, "--json", str(out)]
    args += ["--predict", "gradsamp:strategy=pe:1;vcas:update_every=20", "ssprop:keep=0.2,layers=linear"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for fragment in ("ssProp, each converted layer's backward", "Probes (", "Advice, predicted for 4 epochs"):
        assert fragment in printed
    saved = json.loads(out.read_text())
    rows = {r["method"]: r for r in saved["advice"]}
    assert set(rows) >= {"ssprop", "vcas", "gradsamp"}
    probes = saved["measurements"]["probes"]
    assert probes["vcas"]["refused"] is None and len(probes["vcas"]["vcas_blocks"]) == 2
    assert rows["vcas"]["spec"].startswith("vcas:update_every=16")  # 64 steps: the minimum, 16
    assert "recommended:" in printed
    predicted = {r["method"]: r for r in saved["predictions"]}
    assert predicted["gradsamp:strategy=pe:1;vcas:update_every=20"]["flops_saving"] is not None
    assert "| `ssprop:keep=0.2,layers=linear` |" in printed


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--keeps", "1.5"], "keeps must be numbers in (0, 1)"),
        (["--method", "ssprop"], "advise tries every method itself"),
        (["--model", "nonsense"], "unknown model 'nonsense'"),
        (["--model", "ddpm-unet"], "advise supports classification models"),
        (["--subset", "8"], "batch-size 16 is larger than the 8 training examples"),
        (["--repeats", "0"], "repeats must be a positive integer"),
        (["--max-drop", "1"], "max-drop must be in [0, 1)"),
        (["--device", "cuda"], "advise times and probes on the CPU"),
    ],
)
def test_bad_input_is_one_error_line(capsys, extra, fragment):
    base = ["advise", "--model", "mlp", *TINY]
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("greenprop: error: ") and fragment in err[0], err


def test_predict_given_specs_by_hand():
    m = _measurements(VCASTiming(refused="no blocks"))
    ssprop = predict_spec(m, "ssprop:keep=0.6")
    # Every conv layer, the slower stem included: (-0.002 + 0.014 + 0.022) s of a 0.2 s step.
    assert ssprop.time_saving == pytest.approx(0.034 / 0.2)
    assert predict_spec(m, "ssprop:keep=0.6,min_channels=64").time_saving == pytest.approx(0.036 / 0.2)
    # Pe=1 over 4 epochs: epoch 1 sampled; 3 would be, but the last epoch always trains.
    assert predict_spec(m, "gradsamp:strategy=pe:1").flops_saving == pytest.approx(0.25)
    both = predict_spec(m, "gradsamp:strategy=pe:1;ssprop:keep=0.6")
    assert both.time_saving == pytest.approx(1 - 0.75 * (1 - 0.034 / 0.2))
    assert predict_spec(m, "vcas").spec is None  # refused on this model
    assert predict_spec(m, "baseline").time_saving == 0.0


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("vcas;ssprop", "only gradsamp;ssprop and gradsamp;vcas"),
        ("ssprop:keep=0.3", "keep 0.3 is not in --keeps"),
        ("ssprop:schedule=linear,min_keep=0.2", "only a constant or interleaved keep"),
        ("mezo", "advise models gradsamp, ssprop and vcas"),
        ("ssprop:keep=2", "keep"),
    ],
)
def test_unpredictable_specs_are_refused_before_measuring(capsys, spec, fragment):
    assert main(["advise", "--model", "mlp", *TINY, "--predict", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_progress_goes_to_stderr(capsys):
    args = ["advise", "--model", "mlp", "--width", "8", *[a for a in TINY if a != "--no-progress"]]
    assert main(args) == 0
    captured = capsys.readouterr()
    progress = captured.err.strip().splitlines()
    assert progress and all(line.startswith("advise: ") for line in progress)
    assert any("probe 1/" in line for line in progress)
    assert "\nadvise: " not in captured.out and "recommended:" in captured.out


def test_measurements_survive_json():
    m = _measurements(
        VCASTiming(ratios={"blocks": [0.5]}, dense_backward_s=0.15, backward_s=0.1, backward_flops=1e6)
    )
    m.probes = {"baseline": ProbeResult("baseline", steps=3, train_loss=1.0)}
    again = Measurements.from_dict(json.loads(json.dumps(to_json(m, recommend(m, KEEPS))["measurements"])))
    assert again == m and recommend(again, KEEPS) == recommend(m, KEEPS)
