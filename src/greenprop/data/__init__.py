"""Offline datasets: real data installed by system or Python packages, never downloaded.

``load(name)`` returns normalised in-memory tensors wrapped in :class:`ImageDataset`,
which can return a whole batch in one indexing op.
"""

from greenprop.data.catalog import DATASETS, load
from greenprop.data.dataset import DatasetInfo, DatasetPair, ImageDataset
from greenprop.data.idx import read_idx, write_idx
from greenprop.data.locate import locate_fashion_mnist

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetPair",
    "ImageDataset",
    "load",
    "locate_fashion_mnist",
    "read_idx",
    "write_idx",
]
