"""The Hugging Face adapter: surgery, sampled epochs, bookkeeping and exact resume."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments

from adapter_runner import BATCH, EPOCHS, SAMPLED, STEPS, cnn, digits, hf_trainer
from fixtures import (
    PaddedTexts,
    check_parts_cut_to_longest,
    estimation_parts,
    pad_to_longest,
    tiny_bert,
    tiny_vit,
)
from greenprop.errors import GreenpropError
from greenprop.integrations.hf import (
    STATE_FILE,
    Classifier,
    GreenpropCallback,
    LabelledDataset,
    last_checkpoint,
)


def _training_args(out, **args) -> TrainingArguments:
    """Quiet CPU TrainingArguments writing to ``out`` (no reports, bars or checkpoints), seed 0."""
    settings = dict(
        output_dir=str(out), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0
    )
    return TrainingArguments(**{**settings, **args})


def _plain_trainer(out, callback, model=None, **args):
    pair = digits()
    model = model or Classifier(cnn())
    return model, Trainer(
        model=model,
        args=_training_args(out, **{"num_train_epochs": 1, "per_device_train_batch_size": BATCH, **args}),
        train_dataset=LabelledDataset(pair.train),
        callbacks=[callback],
    )


def test_callback_surgery_keeps_state_dict_keys_and_parameters(tmp_path):
    model = Classifier(cnn())
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    convs = [type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    callback = GreenpropCallback("ssprop:keep=0.5")
    _, trainer = _plain_trainer(tmp_path, callback, model=model)
    converted = [type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert converted != convs, "the surgery happened inside Trainer.__init__"
    trainer.train()
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == set(params)
    assert callback.controllers[0].name == "ssprop"
    assert [r["steps"] for r in callback.history] == [STEPS]
    assert callback.total_flops() is None  # a plain Trainer shows its callbacks no batch


def test_a_plain_trainer_refuses_what_needs_greenprop_trainer(tmp_path):
    _, trainer = _plain_trainer(tmp_path, GreenpropCallback("gradsamp:strategy=pe:2"), num_train_epochs=4)
    with pytest.raises(GreenpropError, match="GreenpropTrainer"):
        trainer.train()
    with pytest.raises(GreenpropError, match="whole number of epochs"):
        _plain_trainer(tmp_path, GreenpropCallback("ssprop:keep=0.5"), num_train_epochs=1.5)


class _Counts(TrainerCallback):
    """Forward calls and weight gradients between each epoch's begin and end events."""

    def __init__(self, model) -> None:
        self.forwards = self.backwards = 0
        self.per_epoch: list[tuple[int, int]] = []
        model.register_forward_hook(lambda *a: self._add("forwards"))
        next(model.parameters()).register_hook(lambda g: self._add("backwards"))

    def _add(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = (self.forwards, self.backwards)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.per_epoch.append((self.forwards - self.start[0], self.backwards - self.start[1]))


def test_a_sampled_epoch_runs_no_forward_or_backward_and_keeps_the_step_count(tmp_path):
    trainer = hf_trainer(tmp_path, save_strategy="no", eval_strategy="epoch")
    counts = _Counts(trainer.model)
    trainer.add_callback(counts)
    trainer.train()
    history = trainer.greenprop.history
    assert trainer.greenprop.driver.sampled_epochs == SAMPLED
    for epoch, (forwards, backwards) in enumerate(counts.per_epoch):
        if epoch in SAMPLED:
            assert (forwards, backwards) == (0, 0)
            assert history[epoch]["flops"] == {"forward": 0.0, "backward": 0.0}
        else:
            assert forwards >= STEPS and backwards >= STEPS
            assert history[epoch]["steps"] == STEPS and history[epoch]["flops"]["backward"] > 0
    assert trainer.state.global_step == EPOCHS * STEPS and trainer.state.epoch == EPOCHS
    assert trainer.lr_scheduler.last_epoch == EPOCHS * STEPS  # stepped through the sampled epoch
    assert all("eval_loss" in r["eval"] for r in history)  # HF evaluates the sampled epoch too
    logged = [entry["epoch"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [float(e + 1) for e in range(EPOCHS) if e not in SAMPLED]  # no loss without steps


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer = hf_trainer(out)
    trainer.train()
    return out, trainer


@pytest.mark.parametrize(
    ("after_epoch", "restore_flag"), [(1, False), (2, True)], ids=["before-sampled", "after-sampled"]
)
def test_resume_across_a_sampled_epoch_is_exact_and_keeps_the_bookkeeping(
    full_run, after_epoch, restore_flag
):
    out, full = full_run
    checkpoint = out / f"checkpoint-{(after_epoch + 1) * STEPS}"
    assert (checkpoint / STATE_FILE).is_file()
    resumed = hf_trainer(out, restore_callback_states_from_checkpoint=restore_flag, save_strategy="no")
    callback = resumed.greenprop
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.greenprop is callback and callback in resumed.callback_handler.callbacks
    for (name, a), b in zip(_weights(full).items(), _weights(resumed).values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.state.global_step == EPOCHS * STEPS and resumed.state.epoch == EPOCHS
    assert resumed.lr_scheduler.last_epoch == EPOCHS * STEPS
    assert callback.driver.sampled_epochs == SAMPLED
    assert [r["epoch"] for r in callback.history] == list(range(EPOCHS))
    assert callback.total_flops() == full.greenprop.total_flops()


def test_resume_true_takes_the_newest_checkpoint_greenprop_finished(full_run, tmp_path):
    out, _ = full_run
    assert last_checkpoint(out).name == f"checkpoint-{EPOCHS * STEPS}"
    (tmp_path / "checkpoint-99").mkdir()  # the Trainer's files, killed before greenprop's state
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / STATE_FILE).write_bytes(b"")
    assert last_checkpoint(tmp_path).name == "checkpoint-8"
    with pytest.raises(GreenpropError, match="no checkpoint with greenprop's state"):
        last_checkpoint(tmp_path / "checkpoint-99")


def test_a_checkpoint_from_inside_an_epoch_is_refused(tmp_path):
    _, trainer = _plain_trainer(
        tmp_path, GreenpropCallback("ssprop:keep=0.5"), save_strategy="steps", save_steps=1
    )
    trainer.train()
    _, again = _plain_trainer(tmp_path, GreenpropCallback("ssprop:keep=0.5"))
    with pytest.raises(GreenpropError, match="inside an epoch"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    (tmp_path / "checkpoint-3" / STATE_FILE).unlink()
    _, third = _plain_trainer(tmp_path, GreenpropCallback("ssprop:keep=0.5"))
    with pytest.raises(GreenpropError, match="greenprop's state\\) is missing"):
        third.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_vcas_estimates_on_batches_of_its_own(tmp_path):
    net = tiny_vit()
    trainer = hf_trainer(tmp_path, method="vcas:update_every=2", epochs=1, save_strategy="no", net=net)
    trainer.train()
    vcas = trainer.greenprop.controllers[0]
    assert vcas.updates == STEPS // 2
    record = trainer.greenprop.history[0]
    assert record["vcas"]["updates"] == STEPS // 2 and record["flops"]["backward"] > 0


def test_with_gradient_accumulation_a_step_is_an_update_and_every_micro_batch_is_counted(full_run, tmp_path):
    _, full = full_run
    trainer = hf_trainer(
        tmp_path, save_strategy="no", per_device_train_batch_size=BATCH // 2, gradient_accumulation_steps=2
    )
    trainer.train()
    history = trainer.greenprop.history
    assert [r["steps"] for r in history] == [0 if e in SAMPLED else STEPS for e in range(EPOCHS)]
    assert [r["samples"] for r in history] == [r["samples"] for r in full.greenprop.history]
    assert trainer.greenprop.total_flops() == full.greenprop.total_flops()
    assert trainer.state.global_step == EPOCHS * STEPS



def test_vcas_estimates_on_parts_cut_to_their_longest_sequence(tmp_path, monkeypatch):
    """A dynamically padded BERT run: VCAS's estimation part (8 of 32 samples) loses the
    columns that are padding in all 8 rows, as the adapter's batch_head cuts it."""
    parts = estimation_parts(monkeypatch)
    trainer = _bert_trainer(
        tmp_path,
        method="vcas:update_every=1,estimation_fraction=0.25,mc_repeats=2",
        batch=32,
        texts=64,
        num_train_epochs=1,
    )
    trainer.train()
    assert trainer.greenprop.controllers[0].updates == 2 and len(parts) == 4
    check_parts_cut_to_longest(parts, 8)


def _bert_trainer(out, method="vcas", batch=8, texts=300, **args):
    """A dynamically padded BERT trainer over ``PaddedTexts(texts)``, its training loader built
    (as ``train`` builds it) so that ``draw_batch`` can draw without a run."""
    from greenprop.integrations.hf import GreenpropTrainer

    trainer = GreenpropTrainer(
        method=method,
        model=tiny_bert(),
        args=_training_args(out, **{"per_device_train_batch_size": batch, **args}),
        train_dataset=PaddedTexts(texts, longest=32),
        data_collator=pad_to_longest,
    )
    trainer.callback_handler.train_dataloader = trainer.get_train_dataloader()
    return trainer


def _spread(batch) -> int:
    """Longest minus shortest real sequence in a padded batch."""
    lengths = batch["attention_mask"].sum(dim=1)
    return int(lengths.max() - lengths.min())


@pytest.mark.parametrize("accumulation", [1, 2])
def test_vcas_draws_one_batch_of_a_length_grouped_order_when_training_groups(tmp_path, accumulation):
    """With ``train_sampling_strategy="group_by_length"`` an estimation batch is one batch of
    the order HF's own ``LengthGroupedSampler`` gives (its lengths, grouped by batch size x
    accumulation steps) from the draw's generator; random draws of mixed length would be
    padded, and VCAS's token sampler keeps a share of the positions, padding included.
    (300 samples: megabatches of 72 grouped by 8, of 64 by 16, so the group size shows.)"""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    trainer = _bert_trainer(
        tmp_path, train_sampling_strategy="group_by_length", gradient_accumulation_steps=accumulation
    )
    dataset = trainer.train_dataset
    for seed in (0, 7):
        replay = torch.Generator().manual_seed(seed)
        order = list(LengthGroupedSampler(8 * accumulation, dataset=dataset, generator=replay))
        start = int(torch.randint(300 // 8, (1,), generator=replay)) * 8
        expected = pad_to_longest([dataset[i] for i in order[start : start + 8]])
        drawn = trainer.draw_batch(torch.Generator().manual_seed(seed))
        assert drawn.keys() == expected.keys()
        assert all(torch.equal(drawn[key], expected[key]) for key in expected)

    random = _bert_trainer(tmp_path)  # the default strategy: random draws, as before
    spreads = {
        name: sorted(_spread(t.draw_batch(torch.Generator().manual_seed(seed))) for seed in range(12))[6]
        for name, t in (("grouped", trainer), ("random", random))
    }
    assert spreads["grouped"] <= 0.25 * spreads["random"]


@pytest.mark.parametrize("strategy", ["random", "sequential"])
def test_without_grouping_vcas_draws_a_random_batch_as_before(tmp_path, strategy):
    trainer = _bert_trainer(tmp_path, train_sampling_strategy=strategy)
    dataset = trainer.train_dataset
    index = torch.randperm(300, generator=torch.Generator().manual_seed(4))[:8]
    expected = pad_to_longest([dataset[int(i)] for i in index])
    drawn = trainer.draw_batch(torch.Generator().manual_seed(4))
    assert all(torch.equal(drawn[key], expected[key]) for key in expected)


def test_the_lengths_are_found_once_per_dataset(tmp_path, monkeypatch):
    trainer = _bert_trainer(tmp_path, train_sampling_strategy="group_by_length")
    built, sampler = [], trainer._get_train_sampler

    def counted(dataset):
        built.append(dataset)
        return sampler(dataset)

    monkeypatch.setattr(trainer, "_get_train_sampler", counted)
    for seed in range(3):
        trainer.draw_batch(torch.Generator().manual_seed(seed))
    assert built == [trainer.train_dataset]
    trainer.train_dataset = PaddedTexts(64, longest=16)  # another dataset: its own lengths
    trainer.callback_handler.train_dataloader = trainer.get_train_dataloader()
    built.clear()
    for seed in range(2):
        assert trainer.draw_batch(torch.Generator().manual_seed(seed))["input_ids"].shape[1] <= 16
    assert built == [trainer.train_dataset]


def test_a_grouped_run_estimates_on_grouped_batches(tmp_path, monkeypatch):
    """In a training run the batches VCAS draws are the grouped ones (random ones of this
    dataset spread many times more, see above)."""
    parts = estimation_parts(monkeypatch)
    trainer = _bert_trainer(
        tmp_path,
        method="vcas:update_every=10,estimation_fraction=0.5,mc_repeats=2",
        train_sampling_strategy="group_by_length",
        num_train_epochs=1,
    )
    trainer.train()
    updates = trainer.greenprop.controllers[0].updates
    assert updates >= 3 and len(parts) == 2 * updates
    spreads = sorted(_spread(batch) for batch, _ in parts)
    assert spreads[len(spreads) // 2] <= 3
