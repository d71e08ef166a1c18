"""The GGD hypothesis test on one update, without training: row, KS verdict, histogram, table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from greenprop.gradsamp import ggd
from greenprop.gradsamp.check import check_update, format_rows


def test_ggd_draws_pass_and_gaussian_draws_fail_a_laplace_shape():
    params = ggd.GGDParams(0.0, 0.01, 1.0)
    laplace = ggd.sample(params, (300, 100), torch.Generator().manual_seed(0))
    row, hist = check_update("w", laplace, 3, seed=1, replaced_by="gradsamp")
    assert (row.epoch, row.layer, row.shape, row.n) == (3, "w", (300, 100), 30_000)
    assert row.replaced_by == "gradsamp"
    assert row.passed and row.p >= 0.05 and row.beta == pytest.approx(1.0, rel=0.1)
    assert row.ks_n == 30_000 and row.note is None
    widths = np.diff(hist.edges)
    assert float(np.sum(np.asarray(hist.density) * widths)) == pytest.approx(1 - hist.outside, abs=1e-6)
    fitted = ggd.fit(laplace)
    assert (row.loc, row.scale, row.beta) == pytest.approx((fitted.loc, fitted.scale, fitted.beta))


def test_a_constant_update_is_a_noted_fallback_and_the_table_marks_it():
    row, hist = check_update("b", torch.full((16,), 0.5), 1, alpha=0.01)
    assert row.note == "all elements equal" and row.scale == 0.0 and row.passed
    assert len(hist.edges) == len(hist.density) + 1
    text = format_rows([row])
    assert text.splitlines()[0].split()[:3] == ["epoch", "layer", "shape"] and "yes *" in text
    assert format_rows([row], markdown=True).startswith("| epoch | layer |")
