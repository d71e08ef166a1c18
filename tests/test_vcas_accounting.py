"""VCAS's FLOP account of a training step against a FlopCounterMode count of what the step ran.

The account takes the dense step's count and subtracts what the layers' tally says the
sampled backward saved. On the zoo ViT a compacted block runs its attention backward on
the kept rows (and the re-run path runs the attention forward again on them), so the
tally must hold the attention too for the account to match the count.
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from torch import Tensor, nn

from fixtures import tiny_vit
from greenprop.metering.flops import count_step_flops
from greenprop.vcas import VCASConfig
from greenprop.vcas.accounting import VCASFlops
from greenprop.vcas.surgery import vcas_handle
from vcas_helpers import fixed_ratios, graph_nodes

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


#: VCASConfig's own limits: at ratio 1 every block runs exact, the last on the direct path's live
#: tokens once it saw its gradient is cls-only (compaction.CompactedForward), the others plain.
SHIPPED = {
    key: getattr(VCASConfig(), key) for key in ("compact_max_ratio", "direct_max_ratio", "sample_max_ratio")
}


@pytest.mark.parametrize(
    ("ratio", "direct", "node", "limits"),
    [
        (1.0, True, "_DirectBlockBackward", {}),
        (1.0, True, "_DirectBlockBackward", SHIPPED),
        (0.5, True, "_DirectBlockBackward", {}),
        (0.5, False, "_CompactedBlockBackward", {}),
    ],
    ids=["ratio-1", "exact-live", "direct-0.5", "rerun-0.5"],
)
def test_the_account_of_a_vit_step_is_the_count_of_what_it_ran(digits, ratio, direct, node, limits) -> None:
    model = fixed_ratios(tiny_vit(seed=4, depth=3), ratio, direct=direct, **limits)
    batch = digits.train[:16]  # the account's dense count runs on 16 samples: no rounding
    account = VCASFlops(model, vcas_handle(model).runtime)
    account.remember_batch(batch, _loss)
    dense = account.dense_per_sample
    for _ in range(2):  # the first training forward checks the blocks; a re-run counts its attention
        _loss(model, batch).backward()
    assert node in graph_nodes(model(batch[0]))
    account.runtime.take_tally()

    counted = count_step_flops(model, lambda: _loss(model, batch).backward())
    account.collect_train()
    tally = account.train
    assert tally.samples == 16 and tally.rows.keys() == {0, 1, 2}
    assert counted.forward == 16 * dense.forward
    assert counted.backward == 16 * dense.backward - tally.saved
    if ratio == 1:  # every row kept; the saving: the last block ran on the cls token only
        assert tally.saved > 0 and all(kept == seen for kept, seen in tally.rows.values())
    else:
        assert all(kept < seen for kept, seen in tally.rows.values())
        assert counted.backward < 16 * dense.backward
    if limits:  # above the direct path's limit: the last block took it for its cls-only gradient
        assert [block.forward.live_gradient for block in model.blocks] == [False, False, True]
