"""Combined methods that want the same layers: the CLI says what clashes and how to combine them."""

from __future__ import annotations

import pytest

from greenprop.cli import main

VIT = ["--dataset", "digits", "--model", "vit", "--width", "16", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize(
    ("method", "fragments"),
    [
        (
            "vcas;ssprop:layers=linear",
            ["'ssprop:layers=linear' would convert layers that 'vcas' converted first (blocks.0.attn.qkv",
             "a layer takes one method", "give ssprop other layers with its layers= option"],
        ),
        (
            "ssprop:layers=linear;vcas",
            ["'vcas' would convert layers that 'ssprop:layers=linear' converted first",
             "no order of them works on this model"],
        ),
        (
            "ssprop:layers=conv+linear;vcas",
            ["'vcas' would convert layers that 'ssprop:layers=conv+linear' converted first",
             "list them as 'vcas;ssprop:layers=conv+linear'"],
        ),
        (
            "ssprop:layers=conv+linear;gradsamp;vcas",
            ["list them as 'vcas;ssprop:layers=conv+linear;gradsamp'"],
        ),
        ("ssprop;ssprop:keep=0.5", ["a method appears twice", "give each method once"]),
    ],
)  # fmt: skip
def test_a_clash_names_the_methods_and_how_to_combine_them(tmp_path, capsys, method, fragments):
    assert main(["train", *VIT, "--method", method, "--out", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("greenprop: error: "), lines
    assert "Traceback" not in captured.err and "first: call apply_" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_compare_refuses_a_clashing_combination_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    methods = ["baseline", "ssprop:layers=linear;vcas"]
    assert main(["compare", *VIT, "--methods", *methods, "--out", str(out)]) == 2
    assert "methods clash in 'ssprop:layers=linear;vcas'" in capsys.readouterr().err
    assert not (out / "baseline").exists()
