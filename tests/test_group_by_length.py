"""Training batches of similar length (``group_by_length``): less padding, same samples, seeded.

Trimming a text batch (``trim_padding``) cuts only the columns that are padding in every
row; grouping snippets of similar length into a batch, as the Hugging Face Trainer's
``group_by_length`` does, removes most of the rest. The order must still show every
sample once an epoch, come from the run's seed and epoch alone (so a resumed run sees the
batches of an uninterrupted one), and split over DDP ranks as the plain order does.
"""

from __future__ import annotations

import pytest
import torch

from greenprop import data as gp_data
from greenprop.data.dataset import TokenDataset
from greenprop.data.grouping import length_grouped_order, sequence_lengths
from greenprop.errors import GreenpropError
from greenprop.seeding import trainer_epoch_seed
from greenprop.train.config import TrainConfig
from greenprop.train.distributed import DataParallel, SingleProcess
from greenprop.train.trainer import Trainer
from test_trim_padding import _tokens

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.text]


def _dataset(n: int = 803, seq_len: int = 24, seed: int = 0) -> TokenDataset:
    """``n`` trimmed rows of random real lengths in [1, seq_len]; label i is row i's index."""
    lengths = torch.randint(1, seq_len + 1, (n,), generator=torch.Generator().manual_seed(seed))
    return TokenDataset(_tokens(lengths.tolist(), seq_len, seed=seed), torch.arange(n)).trimmed()


def _padding(batches) -> float:
    """Share of the positions in the (trimmed) batches that are padding."""
    real = sum(int(x[:, 1].sum()) for x, _ in batches)
    return 1 - real / sum(x.shape[0] * x.shape[2] for x, _ in batches)


def _epoch(data, batch_size=8, seed=0, epoch=0, grouped=True, parallel=None):
    lengths = sequence_lengths(data) if grouped else None
    return list((parallel or SingleProcess()).epoch_batches(data, batch_size, seed, epoch, lengths=lengths))


def test_grouped_batches_hold_similar_lengths_and_every_sample_once() -> None:
    data = _dataset()
    for epoch in range(2):
        grouped, plain = _epoch(data, epoch=epoch), _epoch(data, epoch=epoch, grouped=False)
        assert len(grouped) == len(plain) == 101  # ceil(803 / 8), the last batch short
        seen = torch.cat([y for _, y in grouped])
        assert sorted(seen.tolist()) == list(range(803))  # each sample once
        assert _padding(grouped) < 0.25 * _padding(plain)
        spread = [int(x[:, 1].sum(1).max() - x[:, 1].sum(1).min()) for x, _ in grouped]
        assert sorted(spread)[len(spread) // 2] <= 1  # a median batch spans two of the 24 lengths at most


def test_the_order_is_the_plain_shuffle_sorted_within_megabatches() -> None:
    """Randomness from (seed, epoch) only: the megabatches (here 25 batches of 8: 803 // 32)
    hold the samples of the plain shuffle's consecutive 200, longest first."""
    data = _dataset()
    lengths = sequence_lengths(data)
    generator = torch.Generator().manual_seed(trainer_epoch_seed(3, 1))
    order = length_grouped_order(lengths, 8, generator)
    shuffled = torch.randperm(803, generator=torch.Generator().manual_seed(trainer_epoch_seed(3, 1)))
    for start in range(0, 803, 200):
        mega = order[start : start + 200]
        assert sorted(mega.tolist()) == sorted(shuffled[start : start + 200].tolist())
        assert (lengths[mega][1:].diff() <= 0).all()  # sorted (its first may be the swapped longest)
    assert int(lengths[order[0]]) == int(lengths.max())  # the longest sample comes first
    assert torch.equal(
        order, length_grouped_order(lengths, 8, torch.Generator().manual_seed(trainer_epoch_seed(3, 1)))
    )


def test_batches_are_a_function_of_seed_and_epoch() -> None:
    data = _dataset()

    def labels(**kwargs):
        return torch.cat([y for _, y in _epoch(data, **kwargs)])

    assert torch.equal(labels(seed=1, epoch=2), labels(seed=1, epoch=2))
    assert not torch.equal(labels(seed=1, epoch=2), labels(seed=2, epoch=2))
    assert not torch.equal(labels(seed=1, epoch=2), labels(seed=1, epoch=3))


def test_ddp_ranks_split_each_grouped_batch() -> None:
    """Each step's two rank batches together are the single-process run's grouped batch."""
    data = _dataset(n=800)
    ranks = [DataParallel(rank, 2, "gloo") for rank in range(2)]
    single = _epoch(data, batch_size=8)
    per_rank = [_epoch(data, batch_size=8, parallel=rank) for rank in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single) == ranks[0].steps_per_epoch(800, 8)
    for step, (_, y) in enumerate(single):
        together = torch.cat([per_rank[0][step][1], per_rank[1][step][1]])
        assert sorted(together.tolist()) == sorted(y.tolist())
    odd = _dataset(n=801)  # one sample repeated so the shards are equal, as DistributedSampler does
    shards = [torch.cat([y for _, y in _epoch(odd, batch_size=8, parallel=r)]) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == 401
    assert set(torch.cat(shards).tolist()) == set(range(801))


def test_grouping_cuts_the_padding_of_the_minilm_preset_s_batches() -> None:
    """Rotten Tomatoes as vcas-minilm trains on it: 4,800 snippets, batches of 32, trimmed."""
    from greenprop.experiments.presets import PRESETS

    preset = PRESETS["vcas-minilm"].config
    assert preset["group_by_length"] is True  # the preset trains on grouped batches
    train = gp_data.trim_padding(
        gp_data.load("rotten-tomatoes", subset=preset["subset"], test_subset=8)
    ).train
    plain = _epoch(train, batch_size=preset["batch_size"], grouped=False)
    grouped = _epoch(train, batch_size=preset["batch_size"])
    assert _padding(plain) > 0.4  # rows shorter than their batch's longest
    assert _padding(grouped) < 0.1
    mean_length = [sum(x.shape[2] for x, _ in batches) / len(batches) for batches in (plain, grouped)]
    assert mean_length[1] < 0.7 * mean_length[0]


def _settings(**changes) -> TrainConfig:
    settings = dict(model="minilm", dataset="rotten-tomatoes", epochs=2, batch_size=8, lr=5e-5)
    settings.update(optimizer="adamw", subset=32, test_subset=4, flops_samples=2, progress=False)
    return TrainConfig(**{**settings, "trim_padding": True, "group_by_length": True, **changes})


def test_the_trainer_runs_the_grouped_batches_and_resumes_to_the_same_run(tmp_path) -> None:
    ran: list[torch.Tensor] = []

    def spy(trainer: Trainer) -> Trainer:
        epoch_batches = trainer.parallel.epoch_batches

        def recorded(*args, **kwargs):
            for x, y in epoch_batches(*args, **kwargs):
                ran.append(y)
                yield x, y

        trainer.parallel.epoch_batches = recorded
        return trainer

    whole = spy(Trainer(_settings())).fit()
    train = Trainer(_settings(epochs=1)).data.train
    expected = [y for epoch in range(2) for _, y in _epoch(train, batch_size=8, epoch=epoch)]
    assert all(torch.equal(a, b) for a, b in zip(ran, expected, strict=True))
    plain = [y for _, y in _epoch(train, batch_size=8, grouped=False)]
    assert not all(torch.equal(a, b) for a, b in zip(ran, plain, strict=False))
    ran.clear()
    spy(Trainer(_settings(), tmp_path)).fit(until_epoch=1)
    resumed = spy(Trainer(_settings(), tmp_path, resume=True)).fit()
    assert all(torch.equal(a, b) for a, b in zip(ran, expected, strict=True))
    steps = [[e["step_losses"] for e in run["epochs"]] for run in (whole, resumed)]
    assert steps[0] == steps[1]
    assert Trainer(_settings(), tmp_path, resume=True).start_epoch == 2


def test_bad_settings_are_refused(digits) -> None:
    with pytest.raises(GreenpropError, match="group_by_length='yes' must be True or False"):
        TrainConfig(group_by_length="yes")
    with pytest.raises(
        GreenpropError, match=r"group_by_length applies to tokenised text.*image dataset 'digits'"
    ):
        Trainer(TrainConfig(model="mlp", dataset="digits", group_by_length=True, progress=False), data=digits)
    with pytest.raises(GreenpropError, match="batch_size=0 must be a positive integer"):
        length_grouped_order(torch.tensor([3, 1]), 0, torch.Generator())
    with pytest.raises(
        GreenpropError, match=r"group_by_length applies to tokenised text.*not to this dataset"
    ):
        sequence_lengths(digits.train)


def test_the_cli_turns_grouping_on_and_off() -> None:
    from greenprop.cli import _config_overrides, build_parser

    parser = build_parser()
    on = _config_overrides(parser.parse_args(["compare", "--preset", "vcas-minilm", "--group-by-length"]))
    off = _config_overrides(parser.parse_args(["train", "--no-group-by-length"]))
    assert on["group_by_length"] is True and off["group_by_length"] is False
    assert "group_by_length" not in _config_overrides(parser.parse_args(["train"]))
    assert TrainConfig().group_by_length is False


def test_estimation_batches_are_drawn_as_the_loop_draws_them() -> None:
    """VCAS's own batches (``RunContext.draw_batch``): grouped when training is grouped.

    The draw is one batch of a length-grouped order from the controller's generator (the
    same generator state gives the same batch), so its lengths are as close as a training
    batch's; ungrouped runs draw a plain random batch, as before."""
    trainer = Trainer(_settings(subset=400, batch_size=16))
    spreads = {}
    for grouped in (True, False):
        if not grouped:
            trainer.train_lengths = None
        draws = []
        for seed in range(12):
            x, _ = trainer.run.draw_batch(torch.Generator().manual_seed(seed))
            assert x.shape[0] == 16
            draws.append(x[:, 1].sum(1))
        spreads[grouped] = sorted(int(d.max() - d.min()) for d in draws)[6]
        # the same generator state draws the same batch
        again = trainer.run.draw_batch(torch.Generator().manual_seed(0))[0]
        first = trainer.run.draw_batch(torch.Generator().manual_seed(0))[0]
        assert torch.equal(again, first)
    assert spreads[True] < 0.5 * spreads[False]  # megabatches of 96 here (transformers': N // 4B)


def test_a_grouped_estimation_batch_is_one_batch_of_the_grouped_order() -> None:
    trainer = Trainer(_settings(subset=400, batch_size=16))
    generator = torch.Generator().manual_seed(3)
    replay = torch.Generator().manual_seed(3)
    x, y = trainer.run.draw_batch(generator)
    order = length_grouped_order(trainer.train_lengths, 16, replay)
    start = int(torch.randint(400 // 16, (1,), generator=replay)) * 16
    expected_x, expected_y = trainer.data.train[order[start : start + 16]]
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)


def test_a_rank_s_estimation_batch_is_grouped_on_its_own_shard() -> None:
    """Under DDP a rank draws from its static shard (``Parallelism.estimation_data``): the
    grouped order must use the shard's lengths, position for position."""
    from greenprop.train.distributed import Shard

    trainer = Trainer(_settings(subset=400, batch_size=16))
    shard = Shard(trainer.data.train, torch.arange(1, 400, 2))
    generator, replay = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    picked = trainer._estimation_indices(shard, 16, generator)
    order = length_grouped_order(trainer.train_lengths[shard.indices], 16, replay)
    start = int(torch.randint(200 // 16, (1,), generator=replay)) * 16
    assert torch.equal(picked, order[start : start + 16])
