"""A small run through the Lightning or the Hugging Face adapter, killable at a training batch.

    python tests/adapter_runner.py lightning|hf OUT [--kill-at N] [--resume]

Trains the zoo CNN on 128 digits (4 steps of 32 a epoch, 4 epochs) with
``gradsamp:strategy=pe:2;ssprop:keep=0.6`` (epoch 2 is sampled), checkpointing every
epoch into OUT. ``--kill-at N``: the process sends itself SIGKILL when the N-th training
batch (1-based, over the whole run) starts. ``--resume``: continue from OUT's last
checkpoint. The final weights go to OUT/final.pt. One intra-op thread, so runs compare
bitwise (the tests run the uninterrupted reference in-process with :func:`train`).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from greenprop import data as gp_data
from greenprop import models as gp_models

METHOD = "gradsamp:strategy=pe:2;ssprop:keep=0.6"
EPOCHS, BATCH, SUBSET, SEED, LR = 4, 32, 128, 0, 0.05
STEPS = SUBSET // BATCH
SAMPLED = [2]


def digits() -> gp_data.DatasetPair:
    return gp_data.load("digits", subset=SUBSET, test_subset=64)


def cnn() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return gp_models.create("cnn", num_classes=10, in_channels=1, image_size=8)


def hf_trainer(
    out: Path,
    *,
    method: str = METHOD,
    epochs: int = EPOCHS,
    callbacks: Any = (),
    net: Any = None,
    **args: Any,
):
    """A GreenpropTrainer on digits (``net``, default the CNN) with plain SGD and a constant LR."""
    from transformers import TrainingArguments

    from greenprop.integrations.hf import Classifier, GreenpropTrainer, LabelledDataset

    pair = digits()
    model = Classifier(cnn() if net is None else net)
    settings = dict(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="epoch",
        logging_strategy="epoch",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=SEED,
    )
    settings.update(args)
    return GreenpropTrainer(
        method=method,
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=LabelledDataset(pair.train),
        eval_dataset=LabelledDataset(pair.test),
        optimizers=(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), None),
        callbacks=list(callbacks),
    )


def _killer_hf(kill_at: int):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        seen = 0

        def on_step_begin(self, args, state, control, **kwargs):
            Kill.seen += 1
            if Kill.seen == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    return Kill()


def _train_hf(out: Path, resume: bool, kill_at: int | None) -> dict[str, torch.Tensor]:
    trainer = hf_trainer(out, callbacks=[_killer_hf(kill_at)] if kill_at else [])
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer.model.state_dict()


def _train_lightning(out: Path, resume: bool, kill_at: int | None) -> dict[str, torch.Tensor]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from greenprop.integrations.driver import EpochShuffle
    from greenprop.integrations.lightning import GreenpropCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = cnn()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

    class Kill(pl.Callback):
        seen = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not callback._skipping:  # a sampled epoch loads one batch but trains none
                Kill.seen += 1
                if Kill.seen == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

    pair = digits()
    loader = DataLoader(pair.train, batch_size=BATCH, sampler=EpochShuffle(len(pair.train), seed=SEED))
    callback = GreenpropCallback(METHOD, seed=SEED)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=[callback, ModelCheckpoint(dirpath=out, save_last=True), *([Kill()] if kill_at else [])],
    )
    module = Module()
    trainer.fit(module, loader, ckpt_path=out / "last.ckpt" if resume else None)
    return module.net.state_dict()


def train(
    framework: str, out: Path, *, resume: bool = False, kill_at: int | None = None
) -> dict[str, torch.Tensor]:
    """The run's final weights (of the zoo CNN, without the framework's wrapper)."""
    run = {"hf": _train_hf, "lightning": _train_lightning}[framework]
    weights = run(Path(out), resume, kill_at)
    return {k.removeprefix("model."): v for k, v in weights.items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=["hf", "lightning"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    final = train(options.framework, options.out, resume=options.resume, kill_at=options.kill_at)
    torch.save(final, options.out / "final.pt")
