"""Seeding: the stream function for new streams, and the existing streams' exact values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from greenprop import seeding


def test_stream_seed_is_a_pure_function_that_keeps_streams_apart():
    a = seeding.stream_seed(0, "vcas", 3)
    assert a == seeding.stream_seed(0, "vcas", 3)
    assert 0 <= a < 1 << 63
    others = {
        seeding.stream_seed(0, "vcas", 4),
        seeding.stream_seed(1, "vcas", 3),
        seeding.stream_seed(0, "ssprop", 3),
    }
    assert a not in others and len(others) == 3
    assert seeding.stream_seed(-1, 0) == seeding.stream_seed((1 << 64) - 1, 0)  # negative seeds wrap
    torch.Generator().manual_seed(a)  # usable by torch and numpy alike
    np.random.default_rng(a)
    with pytest.raises(ValueError, match="stream keys"):
        seeding.stream_seed(0, -1)


@pytest.mark.parametrize(("seed", "epoch"), [(0, 0), (3, 7), (-5, 12), (2**70, 1)])
def test_existing_streams_keep_their_values(seed, epoch):
    # The formulas every published number was produced with; they must never change.
    assert seeding.trainer_epoch_seed(seed, epoch) == seed * 1_000_003 + epoch
    assert seeding.ssprop_layer_seed(seed, epoch) == seed * 1_000_003 + epoch
    assert seeding.ggd_check_seed(seed, epoch, 2) == seed * 1_000_003 + epoch * 10_007 + 2
    assert [
        seeding.vcas_activation_seed(seed),
        seeding.vcas_weight_seed(seed),
        seeding.vcas_estimation_seed(seed),
        seeding.vcas_entries_seed(seed),
    ] == [seed, seed + 1, seed + 2, seed + 3]
    words = np.random.SeedSequence([seed % (1 << 64), epoch, 0x6D5AD7A3]).generate_state(2)
    draw_seed = ((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)
    assert seeding.gradsamp_draw_seed(seed, epoch) == draw_seed
    coin = float(np.random.default_rng([seed % (1 << 64), epoch, 0x5EEDC011]).random())
    assert seeding.strategy_coin(seed, epoch) == coin


def test_gradsamp_draw_seeds_are_pinned():
    # Spot values, so a change of numpy's SeedSequence would show here first.
    assert seeding.gradsamp_draw_seed(0, 0) == 4942830585090282592
    assert seeding.gradsamp_draw_seed(11, 5) == 4028130851890216518
