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
    combined = "gradsamp:strategy=pe:2;ssprop:keep=0.2,interleave=true"
    assert set(rows) == {"baseline", "ssprop:keep=0.2,interleave=true", "gradsamp:strategy=pe:2", combined,
                         "dense@1ep", "dense@2ep", "dense@3ep"}
    assert rows["baseline"]["acc1_mean"] > 75
    # ssProp saves backward FLOPs only; GradSamp skips one of four epochs entirely.
    assert rows["ssprop:keep=0.2,interleave=true"]["backward_saved_pct"] > 20
    assert rows["gradsamp:strategy=pe:2"]["flops_saved_pct"] == pytest.approx(25, abs=0.5)
    assert rows[combined]["flops_saved_pct"] > rows["gradsamp:strategy=pe:2"]["flops_saved_pct"]
    dense = {"baseline", "dense@1ep", "dense@2ep", "dense@3ep"}
    assert {r["method"] for r in data["frontier"]} == set(rows) - dense
    for name in ("frontier_flops.png", "frontier_time.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert "Against the dense frontier" in capsys.readouterr().out
