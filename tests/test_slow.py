"""End-to-end runs on real Fashion-MNIST; minutes, so excluded by default (`make test-slow`)."""

from __future__ import annotations

import json

import pytest

from greenprop.cli import main

pytestmark = pytest.mark.slow


def test_demo_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["compare", "--preset", "demo", "--out", str(out), "--no-progress"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"baseline", "ssprop:keep=0.2,interleave=true", "gradsamp:strategy=pe:2"}
    assert rows["baseline"]["acc1_mean"] > 80
    # ssProp saves backward FLOPs only; GradSamp skips one of four epochs entirely.
    assert rows["ssprop:keep=0.2,interleave=true"]["backward_saved_pct"] > 20
    assert rows["gradsamp:strategy=pe:2"]["flops_saved_pct"] == pytest.approx(25, abs=0.5)
    for row in rows.values():
        assert row["acc1_mean"] > 70, row
