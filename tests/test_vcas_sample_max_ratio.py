"""``sample_max_ratio``: blocks whose ratio is above it run exact instead of sampling.

Near ratio 1 the sampler's norms, draw and gathers cost more than the few rows it drops, so
such a block keeps every row with weight 1: its gradients are dense autograd's, and the
tally says every row was kept. At or below the limit it samples as before.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fixtures import stack
from greenprop.errors import GreenpropError
from greenprop.vcas import VCASConfig
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import fixed_ratios, step_grads

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("compact", [True, False])
def test_a_block_above_the_limit_runs_exact(compact: bool) -> None:
    reference = stack(depth=3)
    model = fixed_ratios(copy.deepcopy(reference), 0.85, 1.0, sample_max_ratio=0.8, compact=compact)
    handle = vcas_handle(model)
    assert [s.drawn_ratio for s in handle.samplers] == [1.0, 1.0, 1.0]
    for got, want in zip(step_grads(model, 4), step_grads(reference, 4), strict=True):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)
    rows = handle.runtime.tally.rows
    assert rows and all(kept == seen for kept, seen in rows.values())


@pytest.mark.parametrize("limit", [0.85, 1.0])
def test_at_or_below_the_limit_the_block_samples(limit: float) -> None:
    reference = stack(depth=3)
    model = fixed_ratios(copy.deepcopy(reference), 0.85, 1.0, sample_max_ratio=limit)
    handle = vcas_handle(model)
    assert [s.drawn_ratio for s in handle.samplers] == [0.85] * 3
    got, want = step_grads(model, 4), step_grads(reference, 4)
    differs = any(not torch.equal(g[n], w[n]) for g, w in zip(got, want, strict=True) for n in w)
    assert differs, "sampling at ratio 0.85 should change some gradient"
    kept = sum(k for k, _ in handle.runtime.tally.rows.values())
    seen = sum(s for _, s in handle.runtime.tally.rows.values())
    assert kept < seen


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_the_limit_must_be_in_zero_one(bad: float) -> None:
    with pytest.raises(GreenpropError, match="sample_max_ratio"):
        VCASConfig(sample_max_ratio=bad)
