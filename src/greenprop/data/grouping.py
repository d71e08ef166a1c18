"""Training order that puts sequences of similar length in the same batch (``group_by_length``).

Trimming a batch to its longest sequence (:func:`greenprop.data.trim_to_longest`) removes
only the columns that are padding in every row; a short row in a batch with a long one
is still mostly padding, which a dense step computes. A Hugging Face user removes most of
it with the Trainer's ``group_by_length``: shuffle, cut the order into megabatches of
(up to) 50 batches, sort each megabatch by length, longest first, and put the longest
sequence in the first batch (an out-of-memory error comes at once, not late). We call
that library function, so the order is the one a Hugging Face user gets from the same
permutation.
"""

from __future__ import annotations

import torch

from greenprop.errors import GreenpropError

__all__ = ["grouped_batch", "length_grouped_order", "sequence_lengths"]


def sequence_lengths(dataset: object, what: str = "this dataset") -> torch.Tensor:
    """Real tokens per row of a token dataset (row sums of its attention mask), int64 ``(N,)``.

    ``what`` names the dataset in the error.

    Raises:
        GreenpropError: ``dataset`` is not tokenised text with an attention mask.
    """
    from greenprop.data.dataset import TokenDataset  # here: dataset.py stays free of this module

    if not isinstance(dataset, TokenDataset):
        raise GreenpropError(
            f"group_by_length applies to tokenised text (token ids and attention mask), not to {what}"
        )
    return dataset.tokens[:, 1].sum(dim=1)


def length_grouped_order(lengths: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation of ``range(len(lengths))`` whose consecutive ``batch_size`` slices hold
    similar lengths: ``transformers``' ``get_length_grouped_indices`` with ``generator``.

    Its one random draw is ``torch.randperm(N, generator=generator)``, so the megabatches hold
    the same samples as the plain shuffle with that generator would, in sorted order.

    Raises:
        GreenpropError: ``batch_size`` is not positive, or transformers is not installed.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise GreenpropError(f"batch_size={batch_size!r} must be a positive integer")
    from greenprop.data.locate import require_transformers

    require_transformers()
    from transformers.trainer_pt_utils import get_length_grouped_indices

    order = get_length_grouped_indices(lengths.tolist(), batch_size, generator=generator)
    return torch.tensor(order, dtype=torch.int64)


def grouped_batch(
    lengths: torch.Tensor, batch_size: int, generator: torch.Generator, group_size: int | None = None
) -> torch.Tensor:
    """The indices of one batch a loop over a length-grouped order takes, drawn with ``generator``.

    The order is :func:`length_grouped_order` of ``lengths`` grouped by ``group_size`` (default
    ``batch_size``; the Hugging Face Trainer groups by its batch size times the gradient
    accumulation steps), and the batch is one of its consecutive ``batch_size`` slices, a full
    one where there is one. VCAS estimates on such a batch when training is grouped: a random
    batch of mixed lengths is padded otherwise, and would measure another sampler.
    """
    order = length_grouped_order(lengths, batch_size if group_size is None else group_size, generator)
    batches = max(1, len(order) // batch_size)
    start = int(torch.randint(batches, (1,), generator=generator)) * batch_size
    return order[start : start + batch_size]
