"""Text batches trimmed to their longest sequence (``trim_padding``): same outputs, FLOPs per length.

A Hugging Face user pads each batch to its longest sequence; greenprop's text data is
padded to a fixed length, so ``trim_padding`` cuts every batch to the largest row sum
of its attention mask. The models that read this data must give the padded batch's
outputs (float64, MiniLM and a causal LM on the label-as-next-token data), and FLOPs,
counted per sample on one batch, must be counted per batch length: the trainer's total
equals a direct count of every batch, and VCAS books its estimation passes and its
dense reference at each batch's own length.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from greenprop import data as gp_data
from greenprop import models
from greenprop.data.dataset import TokenDataset, trim_padding, trim_to_longest
from greenprop.errors import GreenpropError
from greenprop.experiments.presets import PRESETS
from greenprop.lm.task import LMClassificationTask, answer_logits
from greenprop.metering.flops import FlopCount, count_flops, sample_shapes
from greenprop.seeding import trainer_epoch_seed
from greenprop.train.config import TrainConfig
from greenprop.train.distributed import Shard
from greenprop.train.evaluate import iterate_batches
from greenprop.train.trainer import Trainer
from greenprop.vcas import VCAS

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(lengths: list[int], seq_len: int = 8, vocab: int = 30, seed: int = 0) -> Tensor:
    """``(N, 2, seq_len)`` ids and right-padded masks with these real lengths (padding id 0)."""
    ids = torch.randint(1, vocab, (len(lengths), seq_len), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(seq_len) < torch.tensor(lengths)[:, None]).long()
    return torch.stack([ids * mask, mask], dim=1)


# ------------------------------------------------------------------------------------ the cut
def test_a_batch_is_cut_to_its_longest_row_and_only_padding_goes() -> None:
    tokens = _tokens([3, 5, 2])
    trimmed = trim_to_longest(tokens)
    assert trimmed.shape == (3, 2, 5)
    assert torch.equal(trimmed, tokens[:, :, :5])
    assert not tokens[:, :, 5:].any()  # what was cut: padding ids and mask zeros only
    full = _tokens([8, 1])
    assert torch.equal(trim_to_longest(full), full)


@pytest.mark.parametrize(
    ("mask_row", "message"),
    [
        ([1, 1, 2, 0], "values other than 0 and 1"),
        ([1, 0, 1, 0], "not right padding"),
        ([0, 1, 1, 0], "not right padding"),
        ([0, 0, 0, 0], "not right padding"),
    ],
    ids=["value-2", "hole", "left-padded", "empty"],
)
def test_masks_that_are_not_right_padding_are_refused(mask_row, message) -> None:
    tokens = _tokens([4, 2], seq_len=4)
    tokens[1, 1] = torch.tensor(mask_row)
    with pytest.raises(GreenpropError, match=f"row 1 .*{message}"):
        trim_to_longest(tokens)
    with pytest.raises(GreenpropError, match=message):  # a dataset fails before training
        TokenDataset(tokens, torch.zeros(2, dtype=torch.int64)).trimmed()


def test_bad_shapes_and_flags_are_refused() -> None:
    with pytest.raises(GreenpropError, match=r"\(B, 2, L\).*\(3, 4\)"):
        trim_to_longest(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(GreenpropError, match=r"\(0, 2, 4\)"):
        trim_to_longest(torch.ones(0, 2, 4, dtype=torch.int64))
    with pytest.raises(GreenpropError, match="trim='yes' must be True or False"):
        TokenDataset(_tokens([2]), torch.zeros(1, dtype=torch.int64), trim="yes")
    with pytest.raises(GreenpropError, match="trim_padding=1 must be True or False"):
        TrainConfig(trim_padding=1)


def test_batches_of_a_trimmed_dataset_come_cut_single_items_do_not(digits) -> None:
    lengths = [3, 5, 2, 7, 1, 4]
    data = TokenDataset(_tokens(lengths), torch.arange(6)).trimmed()
    assert data.trim and data.seq_len == 8 and "trim=True" in repr(data)
    x, y = data[[0, 2, 4]]
    assert x.shape == (3, 2, 3) and y.tolist() == [0, 2, 4]
    assert data[1:4][0].shape == (3, 2, 7)
    assert data[2][0].shape == (2, 8)  # one item keeps its length, so collated items stack
    shard = Shard(data, torch.tensor([4, 2, 0, 5]))  # DDP's shards index through
    assert shard[torch.tensor([0, 1])][0].shape == (2, 2, 2)
    shapes = [tuple(x.shape) for x, _ in iterate_batches(data, 2)]
    assert shapes == [(2, 2, 5), (2, 2, 7), (2, 2, 4)]
    with pytest.raises(GreenpropError, match=r"tokenised text.*image dataset 'digits'"):
        trim_padding(digits)
    with pytest.raises(GreenpropError, match=r"tokenised text.*image dataset 'digits'"):
        Trainer(TrainConfig(model="mlp", dataset="digits", trim_padding=True, progress=False), data=digits)


def test_the_vcas_minilm_preset_trims_the_others_keep_their_documented_length() -> None:
    assert PRESETS["vcas-minilm"].config["trim_padding"] is True
    assert "trim_padding" not in PRESETS["mezo-minilm"].config


# ------------------------------------------------------------------------- same outputs
@pytest.mark.text
def test_minilm_gives_the_padded_batchs_logits_loss_and_gradients_in_float64() -> None:
    pair = gp_data.load("rotten-tomatoes", subset=64, test_subset=8)
    x, y = pair.train[torch.arange(12)]
    trimmed = trim_to_longest(x)
    assert trimmed.shape[2] < x.shape[2]
    torch.manual_seed(0)
    model = models.create("minilm", num_classes=2).double().eval()  # eval: no dropout draws

    def outputs(batch: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = model(batch)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), loss.detach(), grads

    logits, loss, grads = outputs(x)
    logits_t, loss_t, grads_t = outputs(trimmed)
    torch.testing.assert_close(logits_t, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_t, loss, rtol=1e-12, atol=1e-12)
    assert grads_t.keys() == grads.keys()
    for name, grad in grads.items():  # the position embeddings of the cut columns get none either way
        torch.testing.assert_close(grads_t[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_a_causal_lm_gives_the_padded_batchs_answer_and_loss_in_float64() -> None:
    """The label-as-next-token data (rotten-tomatoes-lm-sentiment) pads after the prompt; the
    task reads the answer at the last real token, which no padding reaches under a causal mask."""
    vocab, length = 53, 12
    torch.manual_seed(0)
    model = models.create("gpt2-tiny", num_classes=vocab, image_size=length, width=16, depth=2, heads=2)
    model = model.double().eval()
    task = LMClassificationTask(vocab, label_tokens=(7, 9))
    x, y = _tokens([5, 9, 3, 6], seq_len=length, vocab=vocab), torch.tensor([0, 1, 1, 0])
    trimmed = trim_to_longest(x)
    assert trimmed.shape[2] == 9
    answers, losses = [], []
    for batch in (x, trimmed):
        inputs, targets = task.batch(batch, y)
        logits = model(inputs)
        answers.append(answer_logits(logits, targets))
        losses.append(task.loss_fn(logits, targets))
    torch.testing.assert_close(answers[1], answers[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------- FLOPs
@pytest.mark.text
def test_the_trainer_counts_each_batch_at_its_own_length() -> None:
    """The trainer counts one slice per distinct batch shape; its total equals a direct
    FlopCounterMode count of every batch it ran, and is below the padded run's."""
    settings = dict(model="minilm", dataset="rotten-tomatoes", epochs=1, batch_size=4, lr=5e-5)
    settings.update(optimizer="adamw", subset=12, test_subset=4, flops_samples=2, progress=False)
    trainer = Trainer(TrainConfig(**settings, trim_padding=True))
    epoch = trainer.fit()["epochs"][0]
    generator = torch.Generator().manual_seed(trainer_epoch_seed(0, 0))
    batches = list(iterate_batches(trainer.data.train, 4, generator=generator))
    assert len({x.shape[2] for x, _ in batches}) > 1  # lengths differ, so one count would be wrong
    direct = FlopCount(0, 0)
    for x, y in batches:
        direct = direct + count_flops(trainer.model, x, y, F.cross_entropy)
    assert epoch["flops"]["forward"]["value"] == pytest.approx(direct.forward, rel=1e-12)
    assert epoch["flops"]["backward"]["value"] == pytest.approx(direct.backward, rel=1e-12)
    assert "sample shape changes" in epoch["flops"]["forward"]["source"]
    padded = Trainer(TrainConfig(**settings)).fit()["epochs"][0]
    assert epoch["flops"]["forward"]["value"] < padded["flops"]["forward"]["value"]
    # Evaluation trims too (batches of 3 here), with the padded data's results.
    trimmed_sums = trainer.task.evaluate_sums(trainer.model, trainer.data.test, batch_size=3)
    assert max(x.shape[2] for x, _ in iterate_batches(trainer.data.test, 3)) < 56
    test = trainer.data.test
    padded_sums = trainer.task.evaluate_sums(
        trainer.model, TokenDataset(test.tokens, test.labels), batch_size=3
    )
    assert trimmed_sums == pytest.approx(padded_sums, rel=1e-5)


# ----------------------------------------------------------------------------------- VCAS
def _vcas_bert_run(train: list[Tensor]) -> tuple[nn.Module, object, list, list]:
    """VCAS (controller updating every step) on a tiny BERT, stepped as the trainer steps it:
    each batch's dense count booked, then the account's adjustment. Returns the model, the
    controller, the estimation batches it drew, and each step's (booked, adjustment)."""
    from test_vcas_direct_bert import BATCH, HIDDEN, TinyBert, _vcas

    target = torch.randn(BATCH, HIDDEN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def loss(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return (net(batch)[:, 0].tanh() * target).sum()

    model = _vcas(TinyBert(dropout=0.0), 0.5, 0.5, update_every=1)
    vcas = VCAS(model)
    drawn: list[tuple[Tensor, Tensor]] = []

    def estimation():
        while True:
            for tokens in reversed(train):
                drawn.append((tokens[:, 0], tokens[:, 1]))
                yield drawn[-1]

    account, steps, batches = vcas.flop_account, [], estimation()
    collect, vcas.sampled_passes = account.collect_overhead, []

    def collect_overhead(batch: tuple[Tensor, Tensor], sampled_pass: bool = True) -> None:
        vcas.sampled_passes.append(sampled_pass)  # whether the estimation ran its sampled backward
        collect(batch, sampled_pass)

    account.collect_overhead = collect_overhead
    for tokens in train:
        batch = (tokens[:, 0], tokens[:, 1])
        vcas.step(batches, loss)
        with account.counting():
            booked = count_flops(model, (batch,), None, lambda out, _: (out[:, 0].tanh() * target).sum())
        account.booked(booked, BATCH)
        torch.manual_seed(len(steps))
        loss(model, batch).backward()
        steps.append((booked, account.adjustment(0, len(steps))))
    return model, vcas, drawn, steps


@pytest.mark.text
def test_vcas_books_each_batch_at_its_own_length() -> None:
    pytest.importorskip("transformers")
    from test_vcas_direct_bert import BATCH, TOKENS

    train = [
        trim_to_longest(_tokens(lengths, seq_len=TOKENS, vocab=40, seed=i))
        for i, lengths in enumerate(([5, 3, 2, 5, 4, 1], [2, 3, 1, 2, 3, 3], [4, 4, 2, 1, 1, 3]))
    ]
    assert [t.shape[2] for t in train] == [5, 3, 4]
    model, vcas, drawn, steps = _vcas_bert_run(train)
    account = vcas.flop_account
    assert {sample_shapes(batch)[0] for batch in drawn} == {(5,), (3,), (4,)}

    def dense(batch: tuple[Tensor, Tensor]) -> FlopCount:  # a direct count of the whole batch
        with account.counting():
            return count_flops(model, (batch,), None, lambda out, _: out[:, 0].sum())

    estimation, backwards = FlopCount(0, 0), 0.0
    assert len(vcas.sampled_passes) == len(drawn) and any(vcas.sampled_passes)
    for batch, sampled_pass in zip(drawn, vcas.sampled_passes, strict=True):
        estimation = estimation + dense(batch)
        backwards += (1 + sampled_pass) * dense(batch).backward  # the exact and the sampled pass
    overhead = account.overhead_flops()
    assert overhead["forward"] == pytest.approx(estimation.forward, rel=1e-12)
    assert overhead["backward"] == pytest.approx(backwards - account.overhead.saved, rel=1e-12)
    # The trainer's record: the booked dense counts plus the adjustments, the estimation included.
    forward = sum(booked.forward + adjustment.get("forward", 0.0) for booked, adjustment in steps)
    training = FlopCount(0, 0)
    for booked, _ in steps:
        training = training + booked
    assert forward == pytest.approx(training.forward + estimation.forward, rel=1e-12)
    report = vcas.flops_report()
    assert report["train_samples"] == 3 * BATCH
    saved = report["sampled_backward_saved"]
    assert saved > 0
    assert report["backward_ratio"] == pytest.approx(1 - saved / training.backward, rel=1e-12)
    assert report["total_ratio_with_overhead"] == pytest.approx(
        (training.total - saved + overhead["forward"] + overhead["backward"]) / training.total, rel=1e-12
    )
    # A checkpoint keeps the per-length counts: a fresh account reports the same.
    again = type(account)(model, account.runtime)
    again.load_state_dict(account.state_dict())
    assert again.report() == account.report()


def test_the_framework_adapters_count_each_batch_at_its_own_length() -> None:
    """A Hugging Face or Lightning user pads each batch to its longest sequence: the adapters'
    driver counts per batch shape too, so its total is a direct count of every batch."""
    from greenprop.integrations.driver import MethodDriver

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8))

    def loss(net: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return net(batch["input_ids"]).sum()

    driver = MethodDriver("baseline", loss_fn=loss, flops_samples=2)
    driver.apply(model, epochs=1, steps_per_epoch=2, seed=0)
    driver.start(epochs=1, steps_per_epoch=2)
    batches = [
        {"input_ids": trim_to_longest(_tokens(lengths, seed=i))[:, 0]}
        for i, lengths in enumerate(([3, 5], [2, 7]))
    ]
    driver.epoch_start(0)
    direct = FlopCount(0, 0)
    for step, batch in enumerate(batches):
        driver.step_start(0, step, batch)
        driver.step_end(0, step, 0.0)
        direct = direct + count_flops(model, batch["input_ids"], None, lambda out, _: out.sum())
    record = driver.epoch_end(0)
    assert [b["input_ids"].shape[1] for b in batches] == [5, 7]
    assert record["flops"] == pytest.approx(
        {"forward": direct.forward, "backward": direct.backward}, rel=1e-12
    )


def test_the_cli_turns_trimming_on_and_a_presets_off() -> None:
    from greenprop.cli import _config_overrides, build_parser

    parser = build_parser()
    on = _config_overrides(parser.parse_args(["train", "--trim-padding"]))
    off = _config_overrides(parser.parse_args(["compare", "--preset", "vcas-minilm", "--no-trim-padding"]))
    assert on["trim_padding"] is True and off["trim_padding"] is False
    assert "trim_padding" not in _config_overrides(parser.parse_args(["train"]))


# ------------------------------------------------------------------ VCAS's estimation part
_PART_SETTINGS = dict(model="minilm", dataset="rotten-tomatoes", epochs=1, batch_size=16, progress=False)
_PART_SETTINGS.update(subset=64, test_subset=4)


def test_the_trainers_batch_head_trims_a_part_only_where_the_run_trims() -> None:
    """A part of a trimmed batch is cut to its own longest sequence (what its samples' batch
    would be); an untrimmed run's part is plainly the first samples."""
    trimmed = Trainer(TrainConfig(**_PART_SETTINGS, trim_padding=True))
    x, y = trimmed.run.draw_batch(torch.Generator().manual_seed(0))
    hx, hy = trimmed.run.batch_head((x, y), 4)
    longest = int(x[:4, 1].sum(dim=1).max())
    assert hx.shape == (4, 2, longest) and longest < x.shape[2]  # the part is shorter than its batch
    assert torch.equal(hx, x[:4, :, :longest]) and torch.equal(hy, y[:4])
    padded = Trainer(TrainConfig(**_PART_SETTINGS))
    x, y = padded.run.draw_batch(torch.Generator().manual_seed(0))
    hx, hy = padded.run.batch_head((x, y), 4)
    assert torch.equal(hx, x[:4]) and hx.shape[2] == 56 and torch.equal(hy, y[:4])


def test_vcas_estimates_on_trimmed_parts_and_books_them_at_their_length() -> None:
    """In a trimmed run VCAS's estimation part (8 of 16 samples) is cut by the run's batch_head,
    and its passes are booked at the part's own length (FLOPs counted per part shape)."""
    method = "vcas:update_every=1,estimation_fraction=0.5,mc_repeats=3"
    trainer = Trainer(TrainConfig(**_PART_SETTINGS, method=method, trim_padding=True, seed=1))
    vcas = trainer.controllers[0]
    fulls, parts = [], []
    cut = trainer.run.batch_head

    def spy(batch, n):
        fulls.append(batch[0].shape[2])
        parts.append(cut(batch, n))
        return parts[-1]

    trainer.run.batch_head = spy
    vcas.on_train_start(trainer.run)
    trainer.model.train()
    vcas.on_step_start(0, 0)
    assert len(parts) == 3
    assert all(x.shape[2] == int(x[:, 1].sum(dim=1).max()) for x, _ in parts)  # each cut to its longest
    assert any(x.shape[2] < full for (x, _), full in zip(parts, fulls, strict=True))
    booked: dict = {}
    for part in parts:
        booked[sample_shapes(part)] = booked.get(sample_shapes(part), 0) + 8
    account = vcas.flop_account
    assert account._overhead_by_shape == booked
    direct = FlopCount(0, 0)
    for x, y in parts:
        with account.counting():
            direct = direct + count_flops(trainer.model, x, y, F.cross_entropy)
    assert account.overhead_flops()["forward"] == pytest.approx(direct.forward, rel=1e-12)
