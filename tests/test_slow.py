"""End-to-end runs on real Fashion-MNIST; minutes, so excluded by default (`make test-slow`)."""

from __future__ import annotations

import json

import pytest

from greenprop.cli import main

pytestmark = pytest.mark.slow


def test_demo_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["compare", "--preset", "demo", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    gradsamp, ssprop = "gradsamp:strategy=pe:2", "ssprop:keep=0.2,interleave=true"
    vcas = "vcas:update_every=16,s_step=0.05,weight_ratio_multiplier=0.8"
    methods = {"baseline", gradsamp, ssprop, vcas, f"{gradsamp};{ssprop}", f"{gradsamp};{vcas}"}
    assert set(rows) == methods | {"dense@1ep", "dense@2ep", "dense@3ep"}
    assert rows["baseline"]["acc1_mean"] > 70
    # ssProp saves backward FLOPs only; GradSamp skips one of four epochs entirely.
    assert rows[ssprop]["backward_saved_pct"] > 20
    assert rows[gradsamp]["flops_saved_pct"] == pytest.approx(25, abs=0.5)
    assert rows[f"{gradsamp};{ssprop}"]["flops_saved_pct"] > rows[gradsamp]["flops_saved_pct"]
    # VCAS's controller lowers its ratios within the 128 steps (it starts exact).
    metrics = json.loads(
        (out / "vcas_update_every=16_s_step=0.05_weight_ratio_multiplier=0.8/seed0/metrics.json").read_text()
    )
    last = metrics["epochs"][-1]["vcas"]
    assert max(last["activation_ratios"].values()) < 0.9 and last["backward_ratio"] < 0.95
    assert {r["method"] for r in data["frontier"]} == methods - {"baseline"}
    for name in ("frontier_flops.png", "frontier_time.png", "report.md", "vcas_ratios.png"):
        assert (out / name).stat().st_size > 0
    assert "Against the dense frontier" in capsys.readouterr().out
