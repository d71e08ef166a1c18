"""Shared pytest fixtures: small real data (scikit-learn digits), a quick config, one thread.

The plain helpers behind them (models, batches, a recording controller) are in fixtures.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from fixtures import digits_run, digits_subset
from greenprop import data as gp_data
from greenprop.train.config import TrainConfig

# Two threads at most in all: under pytest-xdist (``-n 2``) each worker gets one, so the
# workers do not oversubscribe a 2-core machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _WORKERS))

#: The default suite's longest files, longest first (serial seconds in session 29: 120, 79, 76,
#: 47, 44, 42, 41; the rest take under 25 each).
LONGEST_FILES = (
    "test_distributed.py",
    "test_reliability.py",
    "test_fl_simulation.py",
    "test_smollm.py",
    "test_benchmarks_smoke.py",
    "test_vcas_layers.py",
    "test_adapters_kill.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist, hand the longest files out first: one handed out last runs alone at the end.

    A serial run keeps the usual order; the sort is stable, so files keep theirs otherwise.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# CI replays the same examples every run (a landing must not hinge on a lucky draw);
# local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def digits() -> gp_data.DatasetPair:
    """All of scikit-learn digits: 1437 train / 360 test 8x8 images."""
    return digits_subset()


@pytest.fixture
def quick_config() -> TrainConfig:
    """Two fast epochs of a small CNN on digits (1437 train / 360 test), no progress output."""
    return digits_run(model="cnn", epochs=2, batch_size=64, lr=0.05)


@pytest.fixture()
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (up to 10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
