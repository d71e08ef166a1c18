"""Random streams: one function for new streams, and the existing streams' exact formulas.

Every random decision in greenprop comes from a seed derived from the run's seed, so a run
(and a resumed run) is reproducible without storing generator state. New streams use
:func:`stream_seed`: a numpy ``SeedSequence`` of ``(seed, *keys)``, where a key is an
integer (an epoch, a layer index) or a stream name, so two streams never share values
by accident.

The streams that existed before this module keep their own formulas below (a stride of
``1_000_003``, offsets ``seed + 1/2/3``, fixed spawn keys). Switching them to
:func:`stream_seed` would change every random draw, and so every number published in
``docs/`` and every stored run that a resume or a reused comparison relies on; the
named functions keep those values exactly while putting the literals in one place.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = [
    "ggd_check_seed",
    "gradsamp_draw_seed",
    "ssprop_layer_seed",
    "strategy_coin",
    "stream_seed",
    "trainer_epoch_seed",
    "vcas_activation_seed",
    "vcas_entries_seed",
    "vcas_estimation_seed",
    "vcas_weight_seed",
]

_MASK_63 = (1 << 63) - 1
_STRIDE = 1_000_003  # legacy: keeps (seed, index) streams apart
_GRADSAMP_DRAW_KEY = 0x6D5A_D7A3  # legacy: separates GradSamp's draws from its coins
_STRATEGY_COIN_KEY = 0x5EED_C011  # legacy: the strategies' coin stream


def _key(key: int | str) -> int:
    if isinstance(key, str):
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise ValueError(f"stream keys are names or integers >= 0, got {key!r}")
    return key


def stream_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the stream named by ``keys`` under the run's ``seed``.

    A pure function of its arguments (``stream_seed(0, "vcas", 3)`` is the same on every
    machine), valid for ``torch.Generator.manual_seed`` and ``numpy.random.default_rng``.
    """
    words = np.random.SeedSequence([seed % (1 << 64), *map(_key, keys)]).generate_state(2)
    return (int(words[0]) << 31 ^ int(words[1])) & _MASK_63


# -- the existing streams, value for value ----------------------------------------------------


def trainer_epoch_seed(seed: int, epoch: int) -> int:
    """The trainer's per-epoch seed (global torch seed and batch order)."""
    return seed * _STRIDE + epoch


def ssprop_layer_seed(seed: int, index: int) -> int:
    """Seed of the random channel selection of ssProp's ``index``-th converted layer."""
    return seed * _STRIDE + index


def ggd_check_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the GGD check's subsample of tensor ``index`` at 1-based ``epoch``."""
    return seed * _STRIDE + epoch * 10_007 + index


def vcas_activation_seed(seed: int) -> int:
    """Seed of VCAS's activation (row) sampler."""
    return seed


def vcas_weight_seed(seed: int) -> int:
    """Seed of VCAS's weight-gradient (token) sampler."""
    return seed + 1


def vcas_estimation_seed(seed: int) -> int:
    """Seed of VCAS's variance-estimation batches."""
    return seed + 2


def vcas_entries_seed(seed: int) -> int:
    """Seed of VCAS's fixed subset of weight entries the variances are measured on."""
    return seed + 3


def gradsamp_draw_seed(seed: int, epoch: int) -> int:
    """Seed of GradSamp's draws in ``epoch`` (the same in a resumed run)."""
    return stream_seed(seed, epoch, _GRADSAMP_DRAW_KEY)


def strategy_coin(seed: int, epoch: int) -> float:
    """The random strategies' uniform [0, 1) coin for ``epoch``."""
    return float(np.random.default_rng([seed % (1 << 64), epoch, _STRATEGY_COIN_KEY]).random())
