"""The ggd-check experiment (GradSamp Figures 2-3) and the GradSamp CLI shorthands."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from greenprop.cli import main
from greenprop.controller import Controller
from greenprop.errors import GreenpropError
from greenprop.experiments.ggd_check import ggd_check
from greenprop.gradsamp import ggd
from greenprop.train import trainer as trainer_mod
from greenprop.train.config import TrainConfig

# A width-4 CNN on digits: its first BatchNorm has 4 < 8 elements per tensor (skipped).
CONFIG = TrainConfig(
    model="cnn",
    dataset="digits",
    width=4,
    epochs=3,
    batch_size=64,
    lr=0.05,
    subset=512,
    test_subset=128,
    progress=False,
)


class _Witness(Controller):
    """Records every parameter before and after each epoch, independently of the check."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def _copy(self) -> dict[str, torch.Tensor]:
        assert self.model is not None
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def on_epoch_start(self, epoch: int) -> None:
        self.before[epoch + 1] = self._copy()

    def on_epoch_end(self, epoch: int, record) -> None:
        self.after[epoch + 1] = self._copy()


@pytest.fixture(scope="module")
def checked(tmp_path_factory, digits_module):
    """One 3-epoch check of every epoch, with the real updates witnessed on the side.

    A controller sees hooks only, so the witness is handed the trainer's model by wrapping
    ``Trainer.__init__`` for the duration of the run.
    """
    out = tmp_path_factory.mktemp("ggd")
    witness = _Witness()
    real_init = trainer_mod.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        witness.model = self.model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod.Trainer, "__init__", init)
        result = ggd_check(CONFIG, out, progress=False, keep_updates=True, data=digits_module,
                           controllers=[witness])  # fmt: skip
    return result, witness, out


@pytest.fixture(scope="module")
def digits_module():
    from greenprop import data as gp_data

    return gp_data.load("digits", subset=CONFIG.subset, test_subset=CONFIG.test_subset)


def test_writes_every_output(checked):
    result, _, out = checked
    for name in ("ggd_check.csv", "ggd_check.json", "ggd_check.md", "run/metrics.json"):
        assert (out / name).stat().st_size > 0, name
    for k in (1, 2, 3):
        assert (out / f"ggd_hist_epoch{k}.png").stat().st_size > 10_000
    assert set(result.paths) == {"csv", "json", "markdown", "hist_epoch1", "hist_epoch2", "hist_epoch3"}
    csv_rows = list(csv.DictReader((out / "ggd_check.csv").open()))
    assert len(csv_rows) == len(result.rows)
    assert [r["passed"] for r in csv_rows] == [str(r.passed) for r in result.rows]
    saved = json.loads((out / "ggd_check.json").read_text())
    assert saved["summary"]["passed"] == result.passed and saved["epochs"] == [1, 2, 3]
    assert saved["config"]["model"] == "cnn" and len(saved["histograms"]) == len(result.rows)
    report = (out / "ggd_check.md").read_text()
    assert "| epoch | layer |" in report and "overall:" in report and "ggd_hist_epoch2.png" in report
    # The trainer's own metrics are kept, with the check's per-epoch summary in each record.
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["complete"] and [e["ggd_check"]["checked"] for e in metrics["epochs"]] == [8, 8, 8]


def test_one_row_per_epoch_and_tensor_with_sane_values(checked):
    result, witness, _ = checked
    sizes = {n: t.numel() for n, t in witness.before[1].items()}
    big = [n for n, size in sizes.items() if size >= ggd.MIN_FIT_SIZE]
    assert result.skipped == {"features.0.1.weight": 4, "features.0.1.bias": 4}
    assert [(r.epoch, r.layer) for r in result.rows] == [(k, n) for k in (1, 2, 3) for n in big]
    lo, hi = ggd.BETA_RANGE
    for r in result.rows:
        assert r.n == sizes[r.layer] and r.ks_n == r.n
        assert lo <= r.beta <= hi and r.scale > 0 and r.std > 0
        assert 0.0 <= r.ks_d <= 1.0 and 0.0 <= r.p <= 1.0
        assert r.passed == (r.p >= result.alpha) and r.replaced_by is None
    assert result.by_epoch() == {
        k: (sum(r.passed for r in result.rows if r.epoch == k), 8) for k in (1, 2, 3)
    }
    assert 0.0 <= result.share_passed <= 1.0


def test_recorded_update_is_the_real_change_of_that_epoch(checked):
    result, witness, _ = checked
    for k in (1, 2, 3):
        for name in ("fc.0.weight", "features.2.0.weight"):
            real = witness.after[k][name] - witness.before[k][name]
            assert real.abs().max() > 0
            assert torch.equal(result.updates[(k, name)], real)
            row = next(r for r in result.rows if r.epoch == k and r.layer == name)
            fitted = ggd.fit(real)
            assert (row.loc, row.scale, row.beta) == pytest.approx((fitted.loc, fitted.scale, fitted.beta))
    # Consecutive epochs differ: the check did not reuse one snapshot.
    assert not torch.equal(result.updates[(1, "fc.0.weight")], result.updates[(2, "fc.0.weight")])


def test_histograms_are_density_normalised(checked):
    result, _, _ = checked
    for (k, name), hist in result.histograms.items():
        widths = np.diff(hist.edges)
        assert float(np.sum(np.asarray(hist.density) * widths)) == pytest.approx(1 - hist.outside, abs=1e-6)
        assert 0.0 <= hist.outside < 0.02, (k, name)


def test_chosen_epochs_layers_cap_and_mle(tmp_path, digits_module):
    config = CONFIG.replace(epochs=2)
    result = ggd_check(
        config,
        tmp_path,
        epochs_to_check=[2, 2],
        layers=["fc.*", "head.weight"],
        max_layers=2,
        fit_method="mle",
        alpha=0.01,
        progress=False,
        log_y=True,
        data=digits_module,
    )
    assert result.epochs == [2] and [r.layer for r in result.rows] == ["fc.0.weight", "fc.0.bias"]
    assert all(r.passed == (r.p >= 0.01) for r in result.rows) and result.fit_method == "mle"
    assert (tmp_path / "ggd_hist_epoch2.png").exists() and not (tmp_path / "ggd_hist_epoch1.png").exists()
    with pytest.raises(GreenpropError, match="already holds"):
        ggd_check(config, tmp_path, progress=False, data=digits_module)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"epochs_to_check": [0]}, "outside the run"),
        ({"epochs_to_check": [4]}, "1..3"),
        ({"epochs_to_check": []}, "no epochs"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"fit_method": "lsq"}, "fit method"),
        ({"max_layers": 0}, "max_layers"),
        ({"layers": ["nothing.*"]}, "nothing"),
    ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, digits_module, kwargs, fragment):
    with pytest.raises(GreenpropError, match=fragment):
        ggd_check(CONFIG, tmp_path / "x", progress=False, data=digits_module, **kwargs)
    assert not (tmp_path / "x" / "ggd_check.json").exists()


QUICK = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--batch-size", "64",
         "--subset", "256", "--test-subset", "128", "--no-progress"]  # fmt: skip


def test_cli_ggd_check_prints_table_and_paths(tmp_path, capsys):
    out = tmp_path / "check"
    args = ["ggd-check", *QUICK, "--epochs", "2", "--check-epochs", "2", "--alpha", "0.05", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "layer" in printed and "overall:" in printed and str(out / "ggd_check.md") in printed
    saved = json.loads((out / "ggd_check.json").read_text())
    assert saved["epochs"] == [2] and saved["summary"]["checked"] == len(saved["rows"]) > 0
    assert "greenprop ggd-check" in (out / "ggd_check.md").read_text()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--check-epochs", "5"], "check epoch 5"),
        (["--layers", "conv*"], "conv*"),
        (["--alpha", "2"], "alpha"),
    ],
)
def test_cli_ggd_check_errors_are_one_line(tmp_path, capsys, extra, fragment):
    assert main(["ggd-check", *QUICK, "--epochs", "2", *extra, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("greenprop: error: ") and fragment in err[0]


# ----------------------------------------------------------- train --strategy (GradSamp sugar)
def test_train_strategy_is_gradsamp_sugar(tmp_path, capsys):
    for method, label in [
        ([], "gradsamp:strategy=pe:1"),
        (["--method", "gradsamp:update=extrapolate"], "gradsamp:update=extrapolate,strategy=pe:1"),
    ]:
        out = tmp_path / label.replace(":", "_")
        assert main(["train", *QUICK, "--epochs", "3", *method, "--strategy", "pe:1", "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["config"]["method"] == label
        assert [e["replaced_by"] for e in metrics["epochs"]] == [None, "gradsamp", None]
    capsys.readouterr()


@pytest.mark.parametrize(
    ("method", "fragment"),
    [
        ("ssprop", "--method is 'ssprop'"),
        ("baseline", "baseline"),
        ("gradsamp:strategy=pe:2", "give it once"),
    ],
)
def test_train_strategy_with_another_method_is_an_error(tmp_path, capsys, method, fragment):
    args = ["train", *QUICK, "--epochs", "1", "--method", method, "--strategy", "pe:5"]
    assert main([*args, "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_train_bad_strategy_names_the_option(tmp_path, capsys):
    assert main(["train", *QUICK, "--epochs", "1", "--strategy", "pe:x", "--out", str(tmp_path / "t")]) == 2
    assert "strategy" in capsys.readouterr().err
