"""Raw pixel arrays of each dataset, before subsetting, padding and normalisation."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from greenprop.data.idx import read_idx
from greenprop.data.locate import locate_fashion_mnist
from greenprop.errors import GreenpropError

# The digits split is fixed (not tied to a run's seed) so every run and every method is
# evaluated on the same 360 test images.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class RawSplits(NamedTuple):
    """Images ``(N, H, W)`` with values in ``[0, max_value]`` and integer labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    max_value: float


def fashion_mnist(data_dir: str | Path | None = None) -> RawSplits:
    """Read the four Fashion-MNIST IDX files (see :mod:`greenprop.data.locate`)."""
    paths = locate_fashion_mnist(data_dir)
    train = _image_label_pair(paths["train_images"], paths["train_labels"])
    test = _image_label_pair(paths["test_images"], paths["test_labels"])
    return RawSplits(*train, *test, max_value=255.0)


def digits() -> RawSplits:
    """scikit-learn's bundled 8x8 digits, split 80/20, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=labels,
    )
    return RawSplits(x_train, y_train, x_test, y_test, max_value=16.0)


def _image_label_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check one split so a mismatched or odd file fails here, by name."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise GreenpropError(
            f"{images_path} should hold uint8 images of shape (N, 28, 28), "
            f"found {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise GreenpropError(
            f"{labels_path} should hold uint8 labels of shape (N,), found {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise GreenpropError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= 10:
        raise GreenpropError(f"{labels_path} has label {labels.max()}; expected 0..9")
    return images, labels.astype(np.int64)
