"""VCAS's estimation leaves its activation pass out where no block samples, with the same results.

Each case runs :func:`two_backwards` both ways from the same generator states (``fold=False``
is the estimation as it was: always two backwards) and asks for the very same numbers,
bit for bit: the exact, activation and token-sampled entries, the block norms and the
generators' states after; and for the pass to be left out exactly where no block samples.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fixtures import cross_entropy_loss, digits_batches, tiny_vit
from greenprop.vcas import VCAS, VCASConfig, apply_vcas
from greenprop.vcas.estimation import GradientDraws, pick_entries, two_backwards

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(block_ratios: list[float], nu: float, sample_max_ratio: float = 1.0) -> tuple[torch.nn.Module, Any]:
    model = apply_vcas(tiny_vit(), VCASConfig(sample_max_ratio=sample_max_ratio)).train()
    handle = model._greenprop_vcas
    for sampler, ratio in zip(handle.samplers, block_ratios, strict=True):
        sampler.ratio = ratio
    for layer in handle.linears.values():
        layer.vcas_weight_ratio = nu
    return model, handle


def _states(handle) -> list[Tensor]:
    runtime = handle.runtime
    generators = (runtime.activation_generator, runtime.weight_generator)
    return [g.get_state() for g in generators] + [torch.get_rng_state()]


def _set_states(handle, states: list[Tensor]) -> None:
    runtime = handle.runtime
    runtime.activation_generator.set_state(states[0])
    runtime.weight_generator.set_state(states[1])
    torch.set_rng_state(states[2])


def _run(monkeypatch, model, handle, batch, loss_fn, fold: bool) -> tuple[GradientDraws, int, list[Tensor]]:
    """The draws, the backward passes run and the generators' states after."""
    passes = []
    grad = torch.autograd.grad

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(1)
        return grad(*args, **kwargs)

    entries = pick_entries(handle.linears, 0.2, torch.Generator().manual_seed(0))
    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd, "grad", counted)
        draws = two_backwards(model, handle, batch, loss_fn, handle.linears, entries, fold=fold)
    return draws, len(passes), _states(handle)


def _assert_same(old: GradientDraws, new: GradientDraws) -> None:
    for field in ("exact", "activation", "full"):
        mine, theirs = getattr(new, field), getattr(old, field)
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), (field, name)
    assert len(new.norms) == len(old.norms)
    for mine, theirs in zip(new.norms, old.norms, strict=True):
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)
    assert new.samples == old.samples


def _both_ways(monkeypatch, model, handle, batch, loss_fn=cross_entropy_loss):
    start = _states(handle)
    old, old_passes, old_after = _run(monkeypatch, model, handle, batch, loss_fn, fold=False)
    _set_states(handle, start)
    new, new_passes, new_after = _run(monkeypatch, model, handle, batch, loss_fn, fold=True)
    assert old_passes == 2 and old.sampled_pass
    _assert_same(old, new)
    for mine, theirs in zip(new_after, old_after, strict=True):
        assert torch.equal(mine, theirs)  # the same draws from every generator
    return old, new, new_passes


@pytest.mark.parametrize(
    ("block_ratios", "nu", "sample_max_ratio", "folds"),
    [
        ([1.0, 1.0], 1.0, 1.0, True),  # the first update: nothing samples
        ([1.0, 1.0], 0.3, 1.0, True),  # tokens sample: their draws taken on the exact pass
        ([0.95, 0.95], 0.3, 0.9, True),  # above the blocks' limit they run exact
        ([0.5, 0.5], 0.3, 1.0, False),  # blocks sample: the activation pass runs
        ([1.0, 0.5], 0.3, 1.0, False),  # one block samples
        ([0.5, 1.0], 1.0, 1.0, False),
    ],
)
def test_the_activation_pass_is_left_out_where_no_block_samples(
    monkeypatch, digits, block_ratios, nu, sample_max_ratio, folds
) -> None:
    model, handle = _vit(block_ratios, nu, sample_max_ratio)
    batch = digits_batches(digits, 1, size=32)[0]
    _, new, passes = _both_ways(monkeypatch, model, handle, batch)
    assert passes == (1 if folds else 2) and new.sampled_pass is not folds
    if folds:
        assert all(new.activation[name] is new.exact[name] for name in new.exact)
    if nu < 1.0:  # the token draws were taken (on the exact pass where it folds)
        assert any(not torch.equal(new.full[n], new.activation[n]) for n in handle.linears)


def test_a_zero_gradient_row_runs_the_activation_pass(monkeypatch, digits) -> None:
    """A sample the loss ignores has a zero gradient: the activation pass's Linears draw their
    tokens without it, so the draws on the exact pass are undone and that pass runs."""
    model, handle = _vit([1.0, 1.0], 0.3)
    batch = digits_batches(digits, 1, size=32)[0]

    def first_ignored(model: torch.nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        weights = torch.ones(len(y))
        weights[0] = 0.0
        return (F.cross_entropy(model(x), y, reduction="none") * weights).mean()

    _, new, passes = _both_ways(monkeypatch, model, handle, batch, first_ignored)
    assert passes == 2 and new.sampled_pass
    assert any(bool((n == 0).any()) for n in new.norms if n is not None)


def test_the_controller_takes_the_same_course_and_books_the_passes_it_ran(digits) -> None:
    """Updates from the first (nothing samples) on: the same history both ways; the FLOP
    account books a sampled backward only where one ran."""
    config = VCASConfig(update_every=1, initial_s=0.5, tau_act=1e6, tau_w=1e6, seed=2)
    histories, overheads = {}, {}
    for fold in (False, True):
        torch.manual_seed(0)
        vcas = VCAS(apply_vcas(tiny_vit(), config).train())
        if not fold:  # the default folds
            vcas.fold_exact = False
        batches = iter(digits_batches(digits, 6, size=24))
        overheads[fold] = []
        for _ in range(3):
            vcas.update(batches, cross_entropy_loss)
            overheads[fold].append(dict(vcas.flop_account.overhead_samples))
        histories[fold] = vcas.history
        account, dense, samples = vcas.flop_account, vcas.dense_per_sample, overheads[fold][-1]
        backward = (samples["exact_backward"] + samples["sampled_backward"]) * dense.backward
        assert account.overhead_flops() == {
            "forward": pytest.approx(samples["forward"] * dense.forward, rel=1e-12),
            "backward": pytest.approx(backward - account.overhead.saved, rel=1e-12),
        }
    assert histories[True] == histories[False]
    assert histories[True][0]["activation_variance_ratio"] == 0.0
    assert histories[True][1]["activation_variance_ratio"] > 0  # the later updates sample
    # 2 x 24 samples per update; the first update's sampled backward left out
    assert overheads[False][0] == {"forward": 48, "exact_backward": 48, "sampled_backward": 48}
    assert overheads[True][0] == {"forward": 48, "exact_backward": 48, "sampled_backward": 0}
    assert overheads[True][2] == {"forward": 144, "exact_backward": 144, "sampled_backward": 96}


@pytest.mark.text
@pytest.mark.parametrize(("ratio", "folds"), [(1.0, True), (0.5, False)])
def test_a_bert_on_the_direct_path_with_dropout_gives_the_same_draws(monkeypatch, ratio, folds) -> None:
    """MiniLM's path: HF BERT layers on the direct rule (here at every ratio), dropout drawing
    from torch's generator, padded samples; tokens sampled."""
    pytest.importorskip("transformers")
    from test_vcas_direct_bert import TinyBert, _batch, _target, _vcas

    model = _vcas(TinyBert(dropout=0.1), ratio, 0.5).train()
    handle = model._greenprop_vcas
    target = _target()

    def loss_fn(net: torch.nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return (net(batch) * target).sum()

    _, new, passes = _both_ways(monkeypatch, model, handle, _batch(), loss_fn)
    assert passes == (1 if folds else 2)
    assert any(not torch.equal(new.full[n], new.activation[n]) for n in handle.linears)


def test_the_account_state_keeps_the_sampled_passes(digits) -> None:
    """A resumed account books what ran; a state saved before the fold (no sampled counts) had
    every estimation run both backwards."""
    vcas = VCAS(apply_vcas(tiny_vit(), VCASConfig(update_every=1)).train())
    batches = iter(digits_batches(digits, 4, size=16))
    vcas.update(batches, cross_entropy_loss)  # ratio 1: folded
    for sampler in vcas.handle.samplers:
        sampler.ratio = 0.5
    vcas.update(batches, cross_entropy_loss)
    account = vcas.flop_account
    want = {"forward": 64, "exact_backward": 64, "sampled_backward": 32}
    assert account.overhead_samples == want
    state = account.state_dict()
    account.load_state_dict(copy.deepcopy(state))
    assert account.overhead_samples == want
    del state["sampled_by_shape"]
    account.load_state_dict(state)
    assert account.overhead_samples == {**want, "sampled_backward": 64}
