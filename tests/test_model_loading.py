"""Loading pretrained models once per process (TemplateCache) and quietly when asked (load_progress)."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from greenprop.models.loading import TemplateCache, keep_loaded, load_progress, progress_shown


class Tied(nn.Module):
    """A module with a tied weight, like a language model's embedding and output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def _storages(module: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_copies_come_from_one_load_share_nothing_and_keep_ties():
    cache, made = TemplateCache(), []

    def load() -> nn.Module:
        made.append(Tied())
        return made[-1]

    with keep_loaded():
        first, second = cache.get("a", load), cache.get("a", load)
    assert cache.loads == 1 and len(made) == 1
    for copy in (first, second):
        assert copy is not made[0] and copy.head.weight is copy.embed.weight  # tied inside the copy
        torch.testing.assert_close(copy.embed.weight, made[0].embed.weight, rtol=0, atol=0)
    assert not _storages(first) & _storages(second) and not _storages(first) & _storages(made[0])
    with torch.no_grad():  # training one run leaves the others and the template alone
        first.embed.weight.add_(1.0)
    torch.testing.assert_close(second.embed.weight, made[0].embed.weight, rtol=0, atol=0)
    assert not torch.equal(first.embed.weight, second.embed.weight)


def test_a_new_key_loads_again_and_frees_the_old_template():
    cache = TemplateCache()
    with keep_loaded():
        cache.get(("file", 1), Tied)
        old = weakref.ref(cache._template)
        cache.get(("file", 2), Tied)  # e.g. another num_layers or a changed file
        gc.collect()
        assert cache.loads == 2 and old() is None  # one template at most
        cache.get(("file", 2), Tied)
        assert cache.loads == 2
        cache.clear()
        cache.get(("file", 2), Tied)
        assert cache.loads == 3


def test_nothing_is_kept_outside_keep_loaded_and_the_outermost_block_frees_it():
    cache, made = TemplateCache(), []

    def load() -> nn.Module:
        made.append(Tied())
        return made[-1]

    assert cache.get("a", load) is made[0] and cache.get("a", load) is made[1]  # a plain load, twice
    assert cache._template is None and cache.loads == 2
    with keep_loaded():
        with keep_loaded():  # e.g. advise inside a compare: one template for both
            cache.get("b", Tied)
        assert cache._template is not None
        cache.get("b", Tied)
        template = weakref.ref(cache._template)
    gc.collect()
    assert cache.loads == 3 and cache._template is None and template() is None


def test_load_progress_is_scoped_and_restored():
    assert progress_shown()
    with load_progress(False):
        assert not progress_shown()
        with load_progress(True):
            assert progress_shown()
        assert not progress_shown()
    assert progress_shown()
