"""Offline datasets: real data installed by system or Python packages, never downloaded.

``load(name)`` returns in-memory tensors: normalised images in :class:`ImageDataset`,
tokenised text in :class:`TokenDataset`; both can return a whole batch in one
indexing op.
"""

from greenprop.data.catalog import DATASETS, load
from greenprop.data.dataset import (
    DatasetInfo,
    DatasetPair,
    ImageDataset,
    InMemoryDataset,
    TokenDataset,
    trim_mapping_to_longest,
    trim_padding,
    trim_to_longest,
)
from greenprop.data.idx import read_idx, write_idx
from greenprop.data.locate import locate_fashion_mnist, locate_minilm, locate_rotten_tomatoes

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetPair",
    "ImageDataset",
    "InMemoryDataset",
    "TokenDataset",
    "load",
    "locate_fashion_mnist",
    "locate_minilm",
    "locate_rotten_tomatoes",
    "read_idx",
    "trim_mapping_to_longest",
    "trim_padding",
    "trim_to_longest",
    "write_idx",
]
