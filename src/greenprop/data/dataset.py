"""In-memory datasets (images, tokenised text) that hand out a whole batch in one indexing op.

Small datasets fit in memory as one tensor, so per-sample ``__getitem__`` plus
collation is pure overhead. Indexing with a list or 1-D LongTensor returns the batch
directly, which lets a loop use
``DataLoader(ds, batch_size=None, sampler=BatchSampler(RandomSampler(ds), bs, False))``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from greenprop.errors import GreenpropError

Index = int | slice | Sequence[int] | torch.Tensor | np.ndarray


class InMemoryDataset(Dataset):
    """Inputs ``(N, ...)`` and int64 labels ``(N,)`` held as two tensors.

    ``ds[i]`` gives ``(x, y)`` with ``x = inputs[i]`` and ``y`` a 0-d tensor;
    ``ds[[i, j, ...]]`` (list, 1-D tensor or array, or a slice) gives ``(X, Y)`` equal
    to stacking the single items. Subclasses check the inputs' dtype and shape.
    """

    #: Tells batch iterators they may index a whole batch at once.
    supports_batch_indexing = True
    #: What the inputs are called in error messages.
    _noun = "inputs"

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        if labels.ndim != 1 or labels.dtype != torch.int64:
            raise GreenpropError(
                f"labels must be an int64 (N,) tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        if len(inputs) != len(labels):
            raise GreenpropError(f"{len(inputs)} {self._noun} but {len(labels)} labels")
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Index) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            i = int(index)
            return self.inputs[i], self.labels[i]
        if isinstance(index, slice):
            return self.inputs[index], self.labels[index]
        idx = torch.as_tensor(index, dtype=torch.int64)
        if idx.ndim != 1:
            raise GreenpropError(f"batch index must be 1-D, got shape {tuple(idx.shape)}")
        return self.inputs[idx], self.labels[idx]

    def __repr__(self) -> str:
        shape = tuple(self.inputs.shape[1:])
        return f"{type(self).__name__}(n={len(self)}, input_shape={shape})"


class ImageDataset(InMemoryDataset):
    """Normalised float32 images ``(N, C, H, W)`` and int64 labels ``(N,)``.

    ``ds[i]`` gives ``(x, y)`` with ``x`` of shape ``(C, H, W)`` and ``y`` a 0-d tensor;
    ``ds[[i, j, ...]]`` (list, 1-D tensor or array, or a slice) gives ``(X, Y)`` equal
    to stacking the single items.
    """

    _noun = "images"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4 or images.dtype != torch.float32:
            raise GreenpropError(
                f"images must be a float32 (N, C, H, W) tensor, got {images.dtype} "
                f"of shape {tuple(images.shape)}"
            )
        super().__init__(images, labels)

    @property
    def images(self) -> torch.Tensor:
        return self.inputs

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:])
        return f"{type(self).__name__}(n={len(self)}, image_shape={shape})"


def trim_to_longest(tokens: torch.Tensor) -> torch.Tensor:
    """A ``(B, 2, L)`` token batch cut to its longest sequence: the largest row sum of its mask.

    This is a Hugging Face user's dynamic padding (each batch padded to its longest
    sequence), so a dense step does not compute the padding. The mask must be 1s then
    0s in every row (right padding), so every column cut is padding in every row; a
    model that honours the mask gives the padded batch's outputs.

    Raises:
        GreenpropError: the batch is not ``(B, 2, L)`` with ``B, L >= 1``, or its mask
            is not right padding (values other than 0 and 1, a 1 after a 0, an empty row).
    """
    if tokens.ndim != 3 or tokens.shape[1] != 2 or tokens.shape[0] == 0 or tokens.shape[2] == 0:
        raise GreenpropError(
            f"a token batch to trim must be (B, 2, L) with B, L >= 1, got shape {tuple(tokens.shape)}"
        )
    mask = tokens[:, 1]
    check_right_padded(mask)
    return tokens[:, :, : int(mask.sum(dim=1).max())]


def check_right_padded(mask: torch.Tensor) -> None:
    """Raise unless every row of the ``(N, L)`` attention mask is 1s then 0s, with at least one 1."""
    bad_values = ((mask != 0) & (mask != 1)).any(dim=1)
    if bad_values.any():
        row = int(bad_values.nonzero()[0])
        raise GreenpropError(
            f"attention mask row {row} holds values other than 0 and 1: {mask[row].unique().tolist()}"
        )
    right_padded = _right_padded_rows(mask)
    if not right_padded.all():
        row = int((~right_padded).nonzero()[0])
        raise GreenpropError(
            f"attention mask row {row} is not right padding (1s then 0s, at least one 1): "
            f"{mask[row].tolist()}; only right-padded batches can be trimmed"
        )


def _right_padded_rows(mask: torch.Tensor) -> torch.Tensor:
    """Per row of an ``(N, L)`` attention mask: whether it is 1s then 0s, with at least one 1."""
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask == (positions < lengths[:, None])).all(dim=1) & (lengths > 0)


#: The label Hugging Face's collators pad per-token labels with: the loss ignores it.
IGNORE_INDEX = -100


def trim_mapping_to_longest(batch: Any) -> Any:
    """A Hugging Face batch (a mapping with an ``(B, L)`` ``attention_mask``) cut to its longest sequence.

    :func:`trim_to_longest` for dict batches (``input_ids``, ``attention_mask``,
    ``token_type_ids``, ``labels``, ...): every tensor of shape ``(B, L, ...)`` loses the
    columns past the longest row of the mask, which for right padding are padding in
    every row. Kept tokens keep their positions, so a model that honours the mask gives
    the uncut batch's loss and gradients; ``(B, L)`` labels must hold only
    :data:`IGNORE_INDEX` in the cut columns (as Hugging Face's collators pad them).
    Returned as is: a batch that is not a mapping, has no 2-D mask, a mask that is not
    right padding (left padding, a hole, an empty row), or labels the cut would lose.
    """
    if not isinstance(batch, Mapping):
        return batch
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.numel() == 0:
        return batch
    if not _right_padded_rows(mask).all():
        return batch
    rows, length = mask.shape
    longest = int(mask.sum(dim=1).max())

    def per_token(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[:2] == (rows, length)

    labels = batch.get("labels")
    if longest == length or (per_token(labels) and bool((labels[:, longest:] != IGNORE_INDEX).any())):
        return batch
    # Contiguous: Hugging Face's losses view() their labels, which a column slice cannot.
    return {k: v[:, :longest].contiguous() if per_token(v) else v for k, v in batch.items()}


class TokenDataset(InMemoryDataset):
    """Tokenised text: int64 ``(N, 2, L)`` inputs and int64 labels ``(N,)``.

    Row 0 of an input holds the token ids (padded to ``L``), row 1 the attention mask
    (1 for real tokens, 0 for padding), so a batch is one ``(B, 2, L)`` LongTensor, as
    :class:`greenprop.models.hf.MiniLMClassifier` takes it.

    With ``trim=True`` (:meth:`trimmed`) a batch (a list, 1-D tensor or array of indices,
    or a slice) comes cut to its own longest sequence (:func:`trim_to_longest`); a
    single item ``ds[i]`` keeps the full length, so collated items stack.
    """

    _noun = "token rows"

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, *, trim: bool = False) -> None:
        if tokens.ndim != 3 or tokens.shape[1] != 2 or tokens.dtype != torch.int64:
            raise GreenpropError(
                f"tokens must be an int64 (N, 2, L) tensor (ids, attention mask), got {tokens.dtype} "
                f"of shape {tuple(tokens.shape)}"
            )
        if not isinstance(trim, bool):
            raise GreenpropError(f"trim={trim!r} must be True or False")
        super().__init__(tokens, labels)
        if trim and len(tokens):
            check_right_padded(tokens[:, 1])  # once here, so a bad row fails before training
        self.trim = trim

    def trimmed(self) -> TokenDataset:
        """The same rows (shared, not copied), whose batches come cut to their longest sequence."""
        return TokenDataset(self.tokens, self.labels, trim=True)

    def __getitem__(self, index: Index) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(index)
        if self.trim and x.ndim == 3 and len(x):
            x = trim_to_longest(x)
        return x, y

    @property
    def tokens(self) -> torch.Tensor:
        return self.inputs

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[2])

    def __repr__(self) -> str:
        trim = ", trim=True" if self.trim else ""
        return f"{type(self).__name__}(n={len(self)}, seq_len={self.seq_len}{trim})"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset to be built for it.

    ``modality`` is ``"image"`` or ``"text"``. For images, ``mean`` and ``std`` are the
    constants the pixels (scaled to [0, 1]) were normalised with; the same value
    applies to every channel. For text one input is a ``(2, L)`` LongTensor (token ids,
    attention mask; see :class:`TokenDataset`): ``in_channels`` is 2, ``image_size``
    is the sequence length ``L``, and ``mean``/``std`` are 0/1 (ids are not normalised).
    ``task`` is what the data is for: ``"classification"`` (``num_classes`` labels),
    ``"causal-lm"`` (next-token prediction; ``num_classes`` is the vocabulary size) or
    ``"lm-classification"`` (a language model writes the label as its next token:
    ``num_classes`` is the vocabulary size, ``label_tokens`` the token of each label).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: float
    std: float
    modality: str = "image"
    task: str = "classification"
    label_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class DatasetPair:
    """Train and test splits of one dataset, plus its :class:`DatasetInfo`."""

    train: InMemoryDataset
    test: InMemoryDataset
    info: DatasetInfo


def trim_padding(pair: DatasetPair) -> DatasetPair:
    """``pair`` whose batches come cut to their longest sequence (:meth:`TokenDataset.trimmed`).

    Raises:
        GreenpropError: the data is not token rows with an attention mask, or a mask
            is not right padding.
    """
    train, test = pair.train, pair.test
    if not isinstance(train, TokenDataset) or not isinstance(test, TokenDataset):
        raise GreenpropError(
            f"trim_padding applies to tokenised text (token ids and attention mask), "
            f"not to the {pair.info.modality} dataset {pair.info.name!r}"
        )
    return DatasetPair(train=train.trimmed(), test=test.trimmed(), info=pair.info)
