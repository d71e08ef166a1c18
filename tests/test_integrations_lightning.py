"""The Lightning adapter: surgery keeps keys and Parameters, sampled epochs run no forward/backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fixtures import (
    PaddedTexts,
    check_parts_cut_to_longest,
    digits_subset,
    estimation_parts,
    pad_to_longest,
    tiny_bert,
)
from greenprop import models as gp_models
from greenprop.integrations.driver import EpochShuffle

pl = pytest.importorskip("lightning.pytorch")
from greenprop.integrations.lightning import GreenpropCallback  # noqa: E402


class Digits(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = gp_models.create("cnn", num_classes=10, in_channels=1, image_size=8)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loss(module: nn.Module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def _fit(callback, epochs=4):
    data = digits_subset(subset=256, test_subset=64)
    loader = DataLoader(data.train, batch_size=64, sampler=EpochShuffle(len(data.train), seed=0))
    module = Digits()
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    return module, trainer, loader


def test_surgery_keeps_state_dict_keys_and_parameters():
    callback = GreenpropCallback("ssprop:keep=0.5", loss_fn=_loss)
    module, trainer, loader = _fit(callback, epochs=1)
    keys, params = list(module.state_dict()), [id(p) for p in module.parameters()]
    trainer.fit(module, loader)
    assert list(module.state_dict()) == keys
    assert [id(p) for p in module.parameters()] == params
    assert callback.controllers[0].name == "ssprop"
    flops = callback.total_flops()
    assert flops is not None and 0 < flops["backward"] < 2 * flops["forward"]


def test_sampled_epoch_runs_no_forward_or_backward():
    callback = GreenpropCallback("gradsamp:strategy=pe:2", loss_fn=_loss)
    module, trainer, loader = _fit(callback, epochs=4)
    per_epoch: list[tuple[int, int]] = []
    seen = {"n": 0}
    module.register_forward_hook(lambda *a: seen.__setitem__("n", seen["n"] + 1))
    backwards = {"n": 0}
    next(module.parameters()).register_hook(lambda g: backwards.__setitem__("n", backwards["n"] + 1))

    class Count(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.start = (seen["n"], backwards["n"])

        def on_train_epoch_end(self, trainer, pl_module):
            per_epoch.append((seen["n"] - self.start[0], backwards["n"] - self.start[1]))

    trainer.callbacks.append(Count())
    trainer.fit(module, loader)
    sampled = callback.driver.sampled_epochs
    assert sampled, "pe:2 over 4 epochs samples at least one epoch"
    for epoch, (forwards, backs) in enumerate(per_epoch):
        if epoch in sampled:
            assert (forwards, backs) == (0, 0)
        else:
            assert forwards > 0 and backs > 0
    replaced = [r["replaced_by"] for r in callback.history if r["epoch"] in sampled]
    assert replaced == ["gradsamp"] * len(sampled)


class _StopAfter(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _fit_checkpointed(directory, ckpt_path=None, stop_after=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = GreenpropCallback("gradsamp:strategy=pe:2;ssprop:keep=0.6", loss_fn=_loss)
    module, trainer, loader = _fit(callback, epochs=4)
    trainer = pl.Trainer(
        max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
        callbacks=[callback, ModelCheckpoint(dirpath=directory, save_last=True)]
        + ([_StopAfter(stop_after)] if stop_after is not None else []),
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, callback


def test_resume_across_a_sampled_epoch_gives_the_uninterrupted_weights(tmp_path):
    """Stopped after the sampled epoch (no checkpoint written for it), resumed from the one before."""
    full, full_cb = _fit_checkpointed(tmp_path / "full")
    sampled = full_cb.driver.sampled_epochs
    assert sampled == [2]
    _fit_checkpointed(tmp_path / "cut", stop_after=2)
    resumed, resumed_cb = _fit_checkpointed(tmp_path / "cut", ckpt_path=tmp_path / "cut" / "last.ckpt")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_cb.driver.sampled_epochs == sampled
    assert resumed_cb.total_flops() == full_cb.total_flops()


class TextClassifier(pl.LightningModule):
    """A Hugging Face model in Lightning, fed dict batches: ``self.model(**batch).loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_vcas_estimates_on_dict_parts_cut_to_their_longest_sequence(monkeypatch):
    """Dynamically padded dict batches in Lightning: VCAS's estimation part (8 of 32 samples)
    loses the columns that are padding in all 8 rows, as in the Hugging Face adapter."""
    pytest.importorskip("transformers")
    parts = estimation_parts(monkeypatch)
    callback = GreenpropCallback(
        "vcas:update_every=1,estimation_fraction=0.25,mc_repeats=2",
        loss_fn=lambda module, batch: module.model(**batch).loss,
    )
    data = PaddedTexts(64, longest=32)
    sampler = EpochShuffle(len(data), seed=0)
    loader = DataLoader(data, batch_size=32, sampler=sampler, collate_fn=pad_to_longest)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(TextClassifier(), loader)
    assert callback.controllers[0].updates == 2 and len(parts) == 4
    check_parts_cut_to_longest(parts, 8)
