"""compare's plots with diverged runs: drawn and marked, or named as absent; never an empty legend."""

from __future__ import annotations

import pytest

from fixtures import digits_run, diverging_method
from greenprop.cli import main
from greenprop.experiments import plots
from greenprop.experiments.compare import RunResult, run_compare
from greenprop.experiments.report import aggregate

QUICK = ["--dataset", "digits", "--model", "mlp", "--epochs", "2", "--batch-size", "64"]
QUICK += ["--subset", "128", "--test-subset", "64", "--no-progress", "--seeds", "0"]


@pytest.fixture
def figures(monkeypatch) -> dict:
    """Every figure the plots save, by file name (kept open for inspection)."""
    saved = {}
    real = plots.save_figure

    def keep(fig, path, **kwargs):
        saved[path.name] = fig
        real(fig, path, **kwargs)

    monkeypatch.setattr(plots, "save_figure", keep)
    return saved


def _texts(fig) -> str:
    """Legend entries and free text of every axes, joined."""
    parts = []
    for ax in fig.axes:
        legend = ax.get_legend()
        parts += [t.get_text() for t in legend.get_texts()] if legend else []
        parts += [t.get_text() for t in ax.texts]
    return " | ".join(parts)


@pytest.mark.filterwarnings("error:No artists with labels")
def test_diverged_runs_are_marked_in_the_curves_and_named_where_absent(tmp_path, figures, capsys):
    out = tmp_path / "cmp"
    with diverging_method("late", at=1), diverging_method("early", at=0):
        assert main(["compare", *QUICK, "--methods", "baseline", "late", "early", "--out", str(out)]) == 0
    curves = _texts(figures["curves.png"])
    assert "late seed 0 (diverged in epoch 2)" in curves  # its epoch 1 is drawn, ending in an X
    assert "not shown: early seed 0 (diverged in epoch 1), no epoch finished" in curves
    saving = _texts(figures["accuracy_vs_saving.png"])
    assert "baseline" in saving and "late (diverged in every seed)" in saving
    assert "early (diverged in every seed)" in saving
    steps = _texts(figures["loss_steps.png"])
    assert "not shown: late seed 0 (diverged in epoch 2); early seed 0 (diverged in epoch 1)" in steps


@pytest.mark.filterwarnings("error:No artists with labels")
def test_plots_where_every_run_diverged_say_so_instead_of_an_empty_legend(tmp_path, figures, capsys):
    config = digits_run(model="mlp", epochs=2, batch_size=64, subset=128, test_subset=64)
    with diverging_method("early", at=0):
        _, early = run_compare(config, ["baseline", "early"], [0], tmp_path / "cmp")
    everything_diverged = [RunResult("baseline", 0, early.path, early.metrics), early]
    plots.plot_accuracy_vs_saving(aggregate(everything_diverged), tmp_path / "saving.png")
    plots.plot_curves(everything_diverged, tmp_path / "curves.png")
    assert _texts(figures["saving.png"]).startswith("not shown: baseline (diverged in every seed)")
    assert "not shown: baseline seed 0 (diverged in epoch 1)" in _texts(figures["curves.png"])
