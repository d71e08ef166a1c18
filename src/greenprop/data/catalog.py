"""The dataset catalog and ``load(name)``: from a name to normalised tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch

from greenprop.data import lm, sources, text
from greenprop.data.dataset import DatasetInfo, DatasetPair, ImageDataset, TokenDataset
from greenprop.errors import GreenpropError

# Subsets come from one fixed permutation, independent of the run seed, so every run
# and every method trains and tests on the same examples. A smaller subset is a subset
# of a larger one.
SUBSET_SEED = 1234


@dataclass(frozen=True)
class _Spec:
    num_classes: int
    image_size: int
    # Mean and std of the training pixels scaled to [0, 1] (computed once, in float64).
    mean: float
    std: float
    read: Callable[[str | Path | None], sources.RawSplits]


_SPECS: dict[str, _Spec] = {
    "fashion-mnist": _Spec(10, 28, 0.2860406, 0.3530242, sources.fashion_mnist),
    "digits": _Spec(10, 8, 0.3053834, 0.3761192, lambda _data_dir: sources.digits()),
}

# Text datasets: a reader of tokenised splits, and the number of classes.
_TEXT: dict[str, tuple[Callable[[], text.RawText], int]] = {
    "rotten-tomatoes": (text.rotten_tomatoes, len(text.CLASSES)),
}

# Causal-LM text: token blocks for next-token prediction (greenprop.data.lm).
_LM: dict[str, Callable[[], lm.LMText]] = {
    "rotten-tomatoes-lm": lm.rotten_tomatoes_lm,
}

# Sentiment classification with a language model, the label as its next token (greenprop.data.lm).
_LM_SENTIMENT: dict[str, Callable[[], lm.LMSentiment]] = {
    "rotten-tomatoes-lm-sentiment": lm.rotten_tomatoes_lm_sentiment,
}

DATASETS: tuple[str, ...] = (*_SPECS, *_TEXT, *_LM, *_LM_SENTIMENT)


def load(
    name: str,
    *,
    data_dir: str | Path | None = None,
    subset: int | None = None,
    test_subset: int | None = None,
    pad_to_32: bool = False,
) -> DatasetPair:
    """Load a dataset into memory as tensors; nothing is downloaded.

    Images come normalised in an :class:`ImageDataset`; text (``rotten-tomatoes``, see
    :mod:`greenprop.data.text`) comes tokenised in a :class:`TokenDataset`, whose
    tokenised splits are kept in memory for the rest of the process; so do the
    causal-LM token blocks (``rotten-tomatoes-lm``, see :mod:`greenprop.data.lm`), whose
    ``info.task`` is ``"causal-lm"`` and ``info.num_classes`` the vocabulary size, and the
    prompted reviews for sentiment with a language model (``rotten-tomatoes-lm-sentiment``,
    ``info.task`` ``"lm-classification"``, ``info.label_tokens`` the label words' tokens).

    Args:
        name: one of :data:`DATASETS` (case-insensitive; ``_`` works for ``-``).
        data_dir: folder holding the Fashion-MNIST IDX files (see
            :func:`greenprop.data.locate.locate_fashion_mnist` for the default search).
            Ignored for ``digits``, which ships inside scikit-learn, and for text, which
            ships inside Python packages.
        subset: keep this many training examples, chosen by a fixed permutation. None
            keeps all.
        test_subset: the same for the test split.
        pad_to_32: make images 3x32x32 for CIFAR-shaped models. Fashion-MNIST is
            zero-padded by 2 pixels per side (zero = background, padded before
            normalisation); digits are enlarged 4x by nearest neighbour, since an 8x8
            digit in a 32x32 frame would be mostly border. The grey channel is repeated
            to 3 channels as a broadcast view (no extra memory; do not modify
            ``images`` in place). Images only.

    Returns:
        A :class:`DatasetPair` with ``train``, ``test`` and ``info``.

    Raises:
        GreenpropError: unknown name, bad subset size, or missing/corrupt data files.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in _SPECS:
        if key not in _TEXT and key not in _LM and key not in _LM_SENTIMENT:
            raise GreenpropError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
        if pad_to_32:
            raise GreenpropError(f"pad_to_32 applies to image datasets, not to the text dataset {key}")
        if key in _LM:
            return _load_lm(key, subset, test_subset)
        if key in _LM_SENTIMENT:
            return _load_lm_sentiment(key, subset, test_subset)
        return _load_text(key, subset, test_subset)
    spec = _SPECS[key]
    raw = spec.read(data_dir)

    train_idx = _subset_indices(len(raw.train_labels), subset, "subset", key, "training")
    test_idx = _subset_indices(len(raw.test_labels), test_subset, "test_subset", key, "test")

    def build(images: np.ndarray, labels: np.ndarray, idx: np.ndarray | None) -> ImageDataset:
        if idx is not None:
            images, labels = images[idx], labels[idx]
        x = torch.from_numpy(_resize_to_32(images, key) if pad_to_32 else images)
        x = x.to(torch.float32, copy=True).div_(raw.max_value).sub_(spec.mean).div_(spec.std)
        x = x.unsqueeze(1)
        if pad_to_32:
            x = x.expand(-1, 3, -1, -1)
        return ImageDataset(x, torch.from_numpy(np.asarray(labels, dtype=np.int64)))

    info = DatasetInfo(
        name=key,
        num_classes=spec.num_classes,
        in_channels=3 if pad_to_32 else 1,
        image_size=32 if pad_to_32 else spec.image_size,
        mean=spec.mean,
        std=spec.std,
    )
    return DatasetPair(
        train=build(raw.train_images, raw.train_labels, train_idx),
        test=build(raw.test_images, raw.test_labels, test_idx),
        info=info,
    )


def _load_text(key: str, subset: int | None, test_subset: int | None) -> DatasetPair:
    read, num_classes = _TEXT[key]
    return _token_pair(key, read(), subset, test_subset, num_classes=num_classes)


def _load_lm_sentiment(key: str, subset: int | None, test_subset: int | None) -> DatasetPair:
    raw = _LM_SENTIMENT[key]()
    return _token_pair(
        key,
        raw,
        subset,
        test_subset,
        num_classes=raw.vocab_size,
        task="lm-classification",
        label_tokens=raw.label_tokens,
    )


def _token_pair(
    key: str,
    raw: text.RawText | lm.LMSentiment,
    subset: int | None,
    test_subset: int | None,
    **info_fields: Any,
) -> DatasetPair:
    """Labelled token rows, subset, with their :class:`DatasetInfo` (``info_fields`` added)."""
    train_idx = _subset_indices(len(raw.train_labels), subset, "subset", key, "training")
    test_idx = _subset_indices(len(raw.test_labels), test_subset, "test_subset", key, "test")

    def build(tokens: torch.Tensor, labels: torch.Tensor, idx: np.ndarray | None) -> TokenDataset:
        # Indexing copies, so the process-wide tokenised splits stay untouched.
        index = torch.arange(len(labels)) if idx is None else torch.from_numpy(idx)
        return TokenDataset(tokens[index], labels[index])

    train = build(raw.train_tokens, raw.train_labels, train_idx)
    info = DatasetInfo(
        name=key,
        in_channels=2,
        image_size=train.seq_len,
        mean=0.0,
        std=1.0,
        modality="text",
        **info_fields,
    )
    return DatasetPair(train=train, test=build(raw.test_tokens, raw.test_labels, test_idx), info=info)


def _load_lm(key: str, subset: int | None, test_subset: int | None) -> DatasetPair:
    raw = _LM[key]()

    def build(blocks: torch.Tensor, size: int | None, option: str, split: str) -> TokenDataset:
        idx = _subset_indices(len(blocks), size, option, key, split)
        chosen = blocks.clone() if idx is None else blocks[torch.from_numpy(idx)]
        tokens = torch.stack([chosen, torch.ones_like(chosen)], dim=1)  # ids, attention mask
        return TokenDataset(tokens, torch.zeros(len(chosen), dtype=torch.int64))  # blocks have no label

    train = build(raw.train_blocks, subset, "subset", "training")
    info = DatasetInfo(
        name=key,
        num_classes=raw.vocab_size,
        in_channels=2,
        image_size=train.seq_len,
        mean=0.0,
        std=1.0,
        modality="text",
        task="causal-lm",
    )
    return DatasetPair(
        train=train, test=build(raw.test_blocks, test_subset, "test_subset", "test"), info=info
    )


def _subset_indices(total: int, size: int | None, option: str, name: str, split: str) -> np.ndarray | None:
    """Sorted indices of the first `size` entries of a fixed permutation of `total`."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, Integral) or size <= 0:
        raise GreenpropError(f"{option} must be a positive integer, got {size!r}")
    if size > total:
        raise GreenpropError(f"{option}={size} is larger than the {total} {split} examples of {name}")
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    chosen = torch.randperm(total, generator=generator)[: int(size)]
    return chosen.sort().values.numpy()


def _resize_to_32(images: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) -> (N, 32, 32): zero-pad 28x28, upsample 8x8 by 4 (see :func:`load`)."""
    height, width = images.shape[1:]
    if (height, width) == (28, 28):
        return np.pad(images, ((0, 0), (2, 2), (2, 2)))
    if (height, width) == (8, 8):
        return images.repeat(4, axis=1).repeat(4, axis=2)
    raise GreenpropError(f"pad_to_32 does not support {height}x{width} images ({name})")
