"""An in-memory image dataset that can hand out a whole batch in one indexing op.

Small datasets fit in memory as one tensor, so per-sample ``__getitem__`` plus
collation is pure overhead. Indexing with a list or 1-D LongTensor returns the batch
directly, which lets a loop use
``DataLoader(ds, batch_size=None, sampler=BatchSampler(RandomSampler(ds), bs, False))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from greenprop.errors import GreenpropError

Index = int | slice | Sequence[int] | torch.Tensor | np.ndarray


class ImageDataset(Dataset):
    """Normalised float32 images ``(N, C, H, W)`` and int64 labels ``(N,)``.

    ``ds[i]`` gives ``(x, y)`` with ``x`` of shape ``(C, H, W)`` and ``y`` a 0-d tensor;
    ``ds[[i, j, ...]]`` (list, 1-D tensor or array, or a slice) gives ``(X, Y)`` equal
    to stacking the single items.
    """

    #: Tells batch iterators they may index a whole batch at once.
    supports_batch_indexing = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4 or images.dtype != torch.float32:
            raise GreenpropError(
                f"images must be a float32 (N, C, H, W) tensor, got {images.dtype} "
                f"of shape {tuple(images.shape)}"
            )
        if labels.ndim != 1 or labels.dtype != torch.int64:
            raise GreenpropError(
                f"labels must be an int64 (N,) tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        if len(images) != len(labels):
            raise GreenpropError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Index) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            i = int(index)
            return self.images[i], self.labels[i]
        if isinstance(index, slice):
            return self.images[index], self.labels[index]
        idx = torch.as_tensor(index, dtype=torch.int64)
        if idx.ndim != 1:
            raise GreenpropError(f"batch index must be 1-D, got shape {tuple(idx.shape)}")
        return self.images[idx], self.labels[idx]

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:])
        return f"{type(self).__name__}(n={len(self)}, image_shape={shape})"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset to be built for it.

    ``mean`` and ``std`` are the constants the pixels (scaled to [0, 1]) were
    normalised with; the same value applies to every channel.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: float
    std: float


@dataclass(frozen=True)
class DatasetPair:
    """Train and test splits of one dataset, plus its :class:`DatasetInfo`."""

    train: ImageDataset
    test: ImageDataset
    info: DatasetInfo
