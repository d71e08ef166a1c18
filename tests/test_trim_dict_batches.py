"""VCAS's estimation part in the framework adapters: a dict batch's head cut to its longest sequence.

A Hugging Face user pads each batch to its longest sequence (DataCollatorWithPadding);
the first samples of such a batch, VCAS's estimation part, are mostly padding. The
adapters' ``batch_head`` cuts the part's right padding (the columns where every kept
row's mask is 0) and nothing else; the cut must leave the estimation exact: the same
exact gradients, activation-sampled gradients and per-sample gradient norms (float64,
a tiny BERT) as on the uncut part.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from fixtures import tiny_bert
from greenprop.data import trim_mapping_to_longest
from greenprop.integrations.driver import batch_head_to_longest
from greenprop.metering.flops import batch_head

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [3, 5, 2, 7, 4, 1]
PADDED = 9


def _mask(lengths: list[int], length: int = PADDED) -> Tensor:
    return (torch.arange(length) < torch.tensor(lengths)[:, None]).long()


def _batch(lengths: list[int] = LENGTHS, **extra: Tensor) -> dict[str, Tensor]:
    """A right-padded dict batch as Hugging Face's collators build it (padding id 0)."""
    mask = _mask(lengths)
    ids = torch.randint(1, 40, mask.shape, generator=torch.Generator().manual_seed(0))
    types = torch.randint(0, 2, mask.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(len(lengths))
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "token_type_ids": types * mask,
        "labels": labels,
        **extra,
    }


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, Tensor):
            assert got[key].shape == value.shape and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


# ------------------------------------------------------------------------------------ the cut
def test_the_head_loses_exactly_the_columns_that_are_padding_in_every_kept_row() -> None:
    token_labels = torch.where(_mask(LENGTHS) == 1, torch.arange(PADDED) % 3, -100)
    other = torch.randn(len(LENGTHS), PADDED - 2)  # a second dimension that is not the sequence's
    batch = _batch(token_labels=token_labels, other=other, note="kept")
    head = batch_head_to_longest(batch, 3)  # rows of lengths 3, 5, 2
    plain = batch_head(batch, 3)
    for key in ("input_ids", "attention_mask", "token_type_ids", "token_labels"):
        assert torch.equal(head[key], plain[key][:, :5]) and head[key].is_contiguous(), key
    assert not plain["attention_mask"][:, 5:].any()  # only padding was cut ...
    assert plain["attention_mask"][:, 4].any()  # ... and all of it: column 4 is a real token
    assert torch.equal(head["labels"], plain["labels"]) and torch.equal(head["other"], other[:3])
    assert head["note"] == "kept"
    # Per-token labels padded with -100 (Hugging Face's collators) go with the tokens.
    labelled = batch_head_to_longest(_batch(labels=token_labels), 3)
    assert torch.equal(labelled["labels"], token_labels[:3, :5])
    # A part that holds a full-length row has nothing to cut.
    _same(batch_head_to_longest(_batch([3, PADDED, 2]), 2), batch_head(_batch([3, PADDED, 2]), 2))


def _left_padded() -> dict[str, Tensor]:
    batch = _batch()
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    return batch


def _with_hole() -> dict[str, Tensor]:
    batch = _batch()
    batch["attention_mask"][1, 1] = 0
    return batch


def _with_empty_row() -> dict[str, Tensor]:
    batch = _batch()
    batch["attention_mask"][2] = 0
    return batch


def _without_mask() -> dict[str, Tensor]:
    batch = _batch()
    del batch["attention_mask"]
    return batch


def _labels_not_padding() -> dict[str, Tensor]:
    """(B, L) labels that are not per token (e.g. multi-label targets): the cut would lose them."""
    return _batch(labels=torch.ones(len(LENGTHS), PADDED))


@pytest.mark.parametrize(
    "make",
    [_left_padded, _with_hole, _with_empty_row, _without_mask, _labels_not_padding],
    ids=["left-padded", "hole", "empty-row", "no-mask", "labels-not-padding"],
)
def test_batches_the_cut_cannot_prove_padding_are_only_headed(make) -> None:
    batch = make()
    _same(batch_head_to_longest(batch, 3), batch_head(batch, 3))
    assert trim_mapping_to_longest(batch) is batch


def test_batches_that_are_not_mappings_are_only_headed() -> None:
    batch = _batch()
    pair = (batch["input_ids"], batch["attention_mask"])
    head = batch_head_to_longest(pair, 3)
    assert isinstance(head, tuple) and all(torch.equal(h, t[:3]) for h, t in zip(head, pair, strict=True))
    flat = torch.randn(6, PADDED)
    assert torch.equal(batch_head_to_longest(flat, 3), flat[:3])
    wide_mask = _batch(attention_mask=torch.ones(6, 1, PADDED))  # not (B, L): left alone
    _same(batch_head_to_longest(wide_mask, 3), batch_head(wide_mask, 3))


# ---------------------------------------------------------------------------------- exactness
def _hf_loss(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch).loss


@pytest.mark.parametrize("head", ["Sequence", "Token"])
def test_vcas_estimates_the_same_gradients_and_norms_on_the_cut_part(head) -> None:
    """two_backwards (one VCAS estimation draw, blocks sampled at ratio 0.5) on the cut part
    equals the uncut part's: exact and sampled weight gradients, per-sample norms of every block."""
    pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertLayer

    from greenprop.vcas.estimation import pick_entries, two_backwards
    from greenprop.vcas.surgery import vcas_handle
    from vcas_helpers import fixed_ratios

    lengths = [4, 6, 3, 5, 2, 4, 6, 3, PADDED, 5]
    batch = _batch(lengths)
    if head == "Token":
        batch["labels"] = torch.where(batch["attention_mask"] == 1, batch["input_ids"] % 3, -100)
    else:
        batch["labels"] = batch["labels"] % 3
    uncut, cut = batch_head(batch, 8), batch_head_to_longest(batch, 8)
    assert cut["input_ids"].shape[1] == 6 < uncut["input_ids"].shape[1]
    base = tiny_bert(head, positions=PADDED, dropout=0.0).double().train()
    draws = []
    for part in (uncut, cut):
        model = fixed_ratios(copy.deepcopy(base), 0.5, 1.0, block_types=(BertLayer,))
        handle = vcas_handle(model)
        entries = pick_entries(handle.linears, 0.5, torch.Generator().manual_seed(1))
        draws.append(two_backwards(model, handle, part, _hf_loss, handle.linears, entries))
    want, got = draws
    for kind in ("exact", "activation", "full"):
        for name, value in getattr(want, kind).items():
            torch.testing.assert_close(getattr(got, kind)[name], value, rtol=1e-10, atol=1e-13, msg=name)
    for name in want.exact:  # the activation pass really sampled
        assert not torch.allclose(want.exact[name], want.activation[name])
    assert got.samples == want.samples == 8
    for got_norms, want_norms in zip(got.norms, want.norms, strict=True):
        torch.testing.assert_close(got_norms, want_norms, rtol=1e-10, atol=1e-13)
