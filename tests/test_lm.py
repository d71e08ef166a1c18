"""Causal language modelling: the Rotten Tomatoes token blocks, the next-token task, gpt2-tiny
and every method on it, the CLI."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixtures import digits_subset
from greenprop import apply_ssprop
from greenprop import data as gp_data
from greenprop.cli import main
from greenprop.data import catalog, lm
from greenprop.data.dataset import DatasetInfo, DatasetPair, TokenDataset
from greenprop.errors import GreenpropError
from greenprop.experiments.frontier import ONE_SEED
from greenprop.lm.task import IGNORE, CausalLMTask, LMClassificationTask
from greenprop.methods import build_method, parse_method
from greenprop.models import LM_MODELS, MODELS, GPT2Tiny, create, task_of
from greenprop.models.vit import Block
from greenprop.ssprop.config import SSPropConfig
from greenprop.ssprop.layers import SparseLinear
from greenprop.train.config import TrainConfig
from greenprop.train.trainer import Trainer
from greenprop.vcas import apply_vcas, vcas_handle
from greenprop.vcas.config import VCASConfig

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LENGTH = 97, 13


def tiny_gpt(seed: int = 0) -> GPT2Tiny:
    torch.manual_seed(seed)
    return create("gpt2-tiny", num_classes=VOCAB, image_size=LENGTH, width=16, depth=2, heads=2)


def token_batch(n: int = 4, seed: int = 0) -> torch.Tensor:
    """``(n, 2, LENGTH)`` ids and mask; the last sample ends in 3 padding tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0
    return torch.stack([ids, mask], dim=1)


def fake_lm_data(train: int = 16, test: int = 8) -> DatasetPair:
    """Random token blocks in the ``rotten-tomatoes-lm`` layout (for runs that need no tokenizer)."""

    def split(n: int, seed: int) -> TokenDataset:
        return TokenDataset(token_batch(n, seed), torch.zeros(n, dtype=torch.int64))

    info = DatasetInfo("rotten-tomatoes-lm", VOCAB, 2, LENGTH, 0.0, 1.0, modality="text", task="causal-lm")
    return DatasetPair(split(train, 1), split(test, 2), info)


def lm_run(**fields) -> TrainConfig:
    settings = {"model": "gpt2-tiny:depth=2,heads=2", "dataset": "rotten-tomatoes-lm", "width": 16}
    settings.update(epochs=1, batch_size=4, optimizer="adamw", lr=1e-3, flops_samples=2, progress=False)
    return TrainConfig(**{**settings, **fields})


def grads_of(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    task = CausalLMTask(VOCAB)
    ids, targets = task.batch(x, torch.zeros(len(x), dtype=torch.int64))
    model.zero_grad(set_to_none=True)
    task.loss_fn(model(ids), targets).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------ data


class FakeTokenizer:
    """A character tokenizer: ids are code points, EOS is 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def __len__(self):
        return 256


def test_token_blocks_join_texts_with_eos_and_drop_the_remainder():
    blocks = lm.token_blocks(["ab", "cde", "fg"], FakeTokenizer(), block_len=3)
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [
        [97, 98, 0],
        [99, 100, 101],
        [0, 102, 103],
    ]  # 10 tokens: last EOS dropped
    with pytest.raises(GreenpropError, match="one block"):
        lm.token_blocks(["a"], FakeTokenizer(), block_len=5)


def test_unique_snippets_and_split_are_deterministic():
    texts = ["Good.", " good. ", "Bad.", "bad.", "Fine."] + [f"review {i}" for i in range(20)]
    labels = np.array([1, 1, 0, 1, 1] + [i % 2 for i in range(20)])
    keep = lm.unique_snippets(texts, labels)
    assert keep.tolist() == [0, 4, *range(5, 25)]  # "good." once; "bad." disagrees, dropped whole
    train, test = lm.split_snippets(labels[keep])
    again = lm.split_snippets(labels[keep])
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(keep)
    assert len(test) == math.ceil(0.2 * len(keep))


def test_sentiment_rows_cut_the_review_then_prompt_then_pad():
    rows = lm.sentiment_rows(["abcdef", "xy"], FakeTokenizer(), seq_len=6, prompt=":)")
    assert rows.shape == (2, 2, 6) and rows.dtype == torch.int64
    assert rows[0, 0].tolist() == [97, 98, 99, 100, 58, 41]  # 4 review tokens fit, then the prompt
    assert rows[1, 0].tolist() == [120, 121, 58, 41, 0, 0]  # padded with EOS
    assert rows[:, 1].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert lm.single_tokens(["a", "b"], FakeTokenizer()) == (97, 98)
    with pytest.raises(GreenpropError, match="'ab' is 2 tokens"):
        lm.single_tokens(["ab"], FakeTokenizer())
    with pytest.raises(GreenpropError, match="no room"):
        lm.sentiment_rows(["a"], FakeTokenizer(), seq_len=2, prompt=":)")


@pytest.fixture(scope="module")
def rt_lm() -> DatasetPair:
    return gp_data.load("rotten-tomatoes-lm")


@pytest.mark.text
def test_rotten_tomatoes_lm_blocks(rt_lm):
    info = rt_lm.info
    assert (info.task, info.modality, info.num_classes, info.image_size) == ("causal-lm", "text", 49152, 65)
    assert (len(rt_lm.train), len(rt_lm.test)) == (4072, 1013)
    for split in (rt_lm.train, rt_lm.test):
        assert split.tokens.shape[1:] == (2, lm.BLOCK_LEN)
        assert bool((split.tokens[:, 1] == 1).all()) and bool((split.labels == 0).all())
        assert int(split.tokens[:, 0].min()) >= 0 and int(split.tokens[:, 0].max()) < info.num_classes
    again = gp_data.load("rotten-tomatoes-lm", subset=100, test_subset=10)
    chosen = torch.from_numpy(catalog._subset_indices(4072, 100, "subset", "rotten-tomatoes-lm", "training"))
    assert torch.equal(again.train.tokens, rt_lm.train.tokens[chosen]) and len(again.test) == 10


@pytest.mark.text
def test_rotten_tomatoes_lm_sentiment_rows(rt_lm):
    pair = gp_data.load("rotten-tomatoes-lm-sentiment")
    info = pair.info
    assert (info.task, info.num_classes, info.image_size) == ("lm-classification", 49152, lm.SENTIMENT_LEN)
    assert info.label_tokens == (3524, 2731)  # " negative", " positive"
    assert (len(pair.train), len(pair.test)) == (10_200, 2_551)  # as rotten-tomatoes: 12,751 unique
    from greenprop.models.smollm import load_tokenizer

    prompt = load_tokenizer()([lm.PROMPT], add_special_tokens=False)["input_ids"][0]
    for split in (pair.train, pair.test):
        assert set(split.labels.tolist()) == {0, 1}
        lengths = split.tokens[:, 1].sum(dim=1)
        for row, n in zip(split.tokens[:50], lengths[:50], strict=True):
            assert row[0, n - len(prompt) : n].tolist() == prompt  # every review ends in the prompt
            assert bool((row[1, :n] == 1).all()) and bool((row[1, n:] == 0).all())


# ------------------------------------------------------------------------------ task


def test_the_loss_is_the_mean_next_token_cross_entropy_without_padding():
    task = CausalLMTask(VOCAB)
    x = token_batch(3)
    ids, targets = task.batch(x, torch.zeros(3, dtype=torch.int64))
    assert torch.equal(ids, x[:, 0, :-1])
    assert (targets[-1, -3:] == IGNORE).all() and torch.equal(targets[:2], x[:2, 0, 1:])
    logits = torch.randn(3, LENGTH - 1, VOCAB)
    log_p = logits.log_softmax(-1)
    terms = [
        -float(log_p[b, i, int(x[b, 0, i + 1])])
        for b in range(3)
        for i in range(LENGTH - 1)
        if x[b, 1, i + 1] == 1
    ]
    assert len(terms) == 3 * (LENGTH - 1) - 3
    assert float(task.loss_fn(logits, targets)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_evaluation_sums_every_predicted_token_in_bounded_batches(monkeypatch):
    model = tiny_gpt().eval()
    task = CausalLMTask(VOCAB)
    data = fake_lm_data(train=4, test=9)
    ids, targets = task.batch(data.test.tokens, data.test.labels)
    with torch.no_grad():
        expected = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    monkeypatch.setattr("greenprop.lm.task._EVAL_LOGITS", 2 * (LENGTH - 1) * VOCAB)  # 2 blocks at once
    sums = task.evaluate_sums(model, data.test, batch_size=512)
    assert sums["total"] == 9 * (LENGTH - 1) - 3
    means = task.evaluation_means(sums)
    assert means["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert means["ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-5)
    assert model.training is False


def test_the_label_loss_is_the_cross_entropy_of_the_answer_position():
    task = LMClassificationTask(VOCAB, (5, 7))
    x, y = token_batch(3), torch.tensor([1, 0, 1])
    ids, targets = task.batch(x, y)
    assert torch.equal(ids, x[:, 0])
    assert targets.tolist() == [[LENGTH - 1, 7], [LENGTH - 1, 5], [LENGTH - 4, 7]]  # the last real token
    logits = torch.randn(3, LENGTH, VOCAB)
    logits[0, LENGTH - 1, 7] = 50.0  # right
    logits[1, LENGTH - 1, 7] = 50.0  # wrong (label 0 is token 5)
    logits[2, LENGTH - 4, 7], logits[2, LENGTH - 4, 5] = 3.0, 2.0  # right among the labels
    logits[2, LENGTH - 4, 11] = 60.0  # a non-label token is likelier: does not count
    expected = sum(
        -float(logits[b, pos].log_softmax(-1)[tok]) for b, (pos, tok) in enumerate(targets.tolist())
    )
    assert float(task.loss_fn(logits, targets)) == pytest.approx(expected / 3, rel=1e-5)
    assert task.train_sums(logits, targets) == {"correct": 2.0}


# ------------------------------------------------------------------------------ model


def test_gpt2_tiny_is_causal_tied_and_a_language_model():
    model = tiny_gpt()
    assert model.head.weight is model.embed.weight
    assert task_of("gpt2-tiny") == "causal-lm" and "gpt2-tiny" in LM_MODELS and "gpt2-tiny" not in MODELS
    x = token_batch(2)[:, 0]
    out = model(x)
    assert out.shape == (2, LENGTH, VOCAB)
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    again = model(changed)
    assert torch.allclose(out[:, :7], again[:, :7], atol=1e-6)  # earlier tokens do not see later ones
    assert not torch.allclose(out[:, 7:], again[:, 7:])
    default = create("gpt2-tiny", num_classes=49152, image_size=65)
    assert sum(p.numel() for p in default.parameters()) == pytest.approx(7.1e6, rel=0.02)
    with pytest.raises(GreenpropError, match="integer token ids"):
        model(torch.randn(2, LENGTH))
    with pytest.raises(GreenpropError, match="13 tokens"):
        model(torch.zeros(1, LENGTH + 1, dtype=torch.int64))


# ------------------------------------------------------------------------------ methods


def test_ssprop_converts_the_block_linears_not_the_tied_head_and_is_exact_at_keep_1():
    dense = tiny_gpt()
    model = copy.deepcopy(dense)
    keys = list(model.state_dict())
    apply_ssprop(model, SSPropConfig(keep=1.0, layers="linear"))
    converted = {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    linears = {n for n, m in dense.named_modules() if isinstance(m, nn.Linear)}
    assert converted == linears - {"head"} and "blocks.0.attn.qkv" in converted
    assert list(model.state_dict()) == keys and model.head.weight is model.embed.weight
    x = token_batch(4)
    expected, got = grads_of(dense, x), grads_of(model, x)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-5), name


def test_vcas_samples_after_the_decoder_blocks_exact_at_ratio_1():
    dense = tiny_gpt()
    model = copy.deepcopy(dense)
    keys = list(model.state_dict())
    build_method(parse_method("vcas:check_rows=true"), model, epochs=2, steps_per_epoch=2, seed=0)
    handle = vcas_handle(model)
    assert [s.name for s in handle.samplers] == ["blocks.0", "blocks.1"]
    assert "blocks.1.mlp.fc2" in handle.linears and "head" not in handle.linears
    assert list(model.state_dict()) == keys
    x = token_batch(6)
    expected, got = grads_of(dense, x), grads_of(model, x)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-5), name


def test_vcas_row_assumption_holds_under_causal_attention():
    """Attention mixes tokens within a sample only: a dropped sample gets no gradient in any block."""
    model = tiny_gpt()
    apply_vcas(model, VCASConfig(check_rows=True), block_types=GPT2Tiny.vcas_block_types)
    assert GPT2Tiny.vcas_block_types == (Block,)
    for sampler in vcas_handle(model).samplers:
        sampler.ratio = 0.5
    grads = grads_of(model, token_batch(8))  # check_rows raises if a skipped row carried gradient
    assert all(torch.isfinite(g).all() for g in grads.values())
    kept = vcas_handle(model).runtime.tally.rows
    assert kept and all(k < seen for k, seen in kept.values())


def test_every_method_trains_gpt2_tiny_and_keeps_the_keys():
    data = fake_lm_data()
    baseline = Trainer(lm_run(epochs=3), data=data)
    keys = list(baseline.model.state_dict())
    dense = baseline.fit()
    assert dense["task"]["name"] == "causal-lm" and "acc1" not in dense["summary"]
    assert dense["summary"]["ppl"] == pytest.approx(math.exp(dense["summary"]["test_loss"]))
    for spec in ("ssprop:keep=1.0,layers=linear", "vcas:check_rows=true", "gradsamp:strategy=pe:1"):
        # (VCAS's exactness at ratio 1 is tested above: a run adapts its ratios from step 1)
        trainer = Trainer(lm_run(epochs=3, method=spec), data=data)
        metrics = trainer.fit()
        assert list(trainer.model.state_dict()) == keys, spec
        assert trainer.model.head.weight is trainer.model.embed.weight, spec
        losses = [r["loss"] for r in metrics["epochs"]]
        assert all(math.isfinite(v) for v in losses), spec
        if spec.startswith("gradsamp"):
            assert [r["replaced_by"] for r in metrics["epochs"]] == [None, "gradsamp", None]
        elif spec.startswith("ssprop"):  # exact at keep 1: the dense run's first epoch
            first = [dense["epochs"][0]["step_losses"], metrics["epochs"][0]["step_losses"]]
            assert np.allclose(*first, rtol=1e-5), spec


def test_gpt2_tiny_learns_labels_as_next_tokens_with_accuracy():
    data = fake_lm_data()
    data = DatasetPair(
        TokenDataset(data.train.tokens, torch.arange(16) % 2),
        TokenDataset(data.test.tokens, torch.arange(8) % 2),
        DatasetInfo(
            "rotten-tomatoes-lm-sentiment", VOCAB, 2, LENGTH, 0.0, 1.0, "text", "lm-classification", (5, 7)
        ),
    )
    metrics = Trainer(lm_run(dataset="rotten-tomatoes-lm-sentiment", epochs=2), data=data).fit()
    assert metrics["task"]["name"] == "lm-classification"
    summary = metrics["summary"]
    assert 0 <= summary["acc1"] <= 100 and summary["acc1"] * 8 % 100 == 0  # 8 test samples
    assert metrics["epochs"][-1]["train_acc"] is not None and math.isfinite(summary["test_loss"])


# ------------------------------------------------------------------------------ CLI


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("greenprop: error: ")
    return err[0]


def test_a_model_and_dataset_of_different_tasks_are_refused(capsys):
    with pytest.raises(GreenpropError, match=r"is a causal language model .* dataset 'digits'"):
        Trainer(lm_run(dataset="digits"), data=digits_subset(32, 16))
    with pytest.raises(GreenpropError, match=r"is for a language model \(causal-lm\), which model 'cnn'"):
        Trainer(lm_run(model="cnn", width=None), data=fake_lm_data())
    with pytest.raises(GreenpropError, match="takes token ids but the dataset is image"):
        create("gpt2-tiny", num_classes=10, modality="image")
    assert main(["train", "--model", "gpt2-tiny", "--dataset", "digits", "--no-progress"]) == 2
    assert "use rotten-tomatoes-lm" in _error_line(capsys)


@pytest.mark.text
def test_train_cli_on_rotten_tomatoes_lm_writes_perplexity(rt_lm, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        "gpt2-tiny:depth=1,heads=2",
        "--dataset",
        "rotten-tomatoes-lm",
        "--width",
        "8",
    ]
    argv += ["--subset", "8", "--test-subset", "4", "--epochs", "1", "--batch-size", "4"]
    argv += [
        "--optimizer",
        "adamw",
        "--lr",
        "0.001",
        "--flops-samples",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "Perplexity" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    assert metrics["task"]["metrics"][0] == {"key": "ppl", "label": "Perplexity", "higher_is_better": False}
    assert summary["ppl"] == pytest.approx(math.exp(summary["test_loss"]))
    assert 10_000 < summary["ppl"] < 200_000  # near uniform over 49,152 tokens after 2 steps
    assert summary["flops"]["backward"]["value"] > summary["flops"]["forward"]["value"] > 0


@pytest.mark.text
def test_compare_ranks_by_perplexity_and_trains_the_dense_frontier(rt_lm, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "gpt2-tiny:depth=1,heads=2", "--dataset", "rotten-tomatoes-lm"]
    argv += ["--width", "8", "--subset", "8", "--test-subset", "4", "--epochs", "3", "--batch-size", "4"]
    argv += ["--optimizer", "adamw", "--lr", "0.001", "--flops-samples", "2", "--no-progress"]
    argv += ["--methods", "baseline", "gradsamp:strategy=pe:1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Perplexity ↓" in printed and "dense@1ep" in printed and "dense@2ep" in printed
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"baseline", "gradsamp:strategy=pe:1", "dense@1ep", "dense@2ep"}
    assert all(math.isfinite(row["ppl_mean"]) for row in rows.values())
    assert rows["dense@1ep"]["tflops_backward"] < rows["baseline"]["tflops_backward"]
    sampled = json.loads((out / "gradsamp_strategy=pe_1" / "seed0" / "metrics.json").read_text())
    assert [r["replaced_by"] for r in sampled["epochs"]] == [None, "gradsamp", None]
    # The frontier reads perplexity (lower is better), in its logarithm: GradSamp costs what
    # dense@2ep costs, so dense's value at its FLOPs is dense@2ep's.
    results = json.loads((out / "results.json").read_text())
    (row,) = results["frontier"]
    assert row["method"] == "gradsamp:strategy=pe:1" and row["metrics"] == ["ppl"]
    assert row["dense_ppl_at_flops"] == pytest.approx(rows["dense@2ep"]["ppl_mean"], rel=1e-6)
    delta = row["delta_ppl_flops"]
    assert delta == pytest.approx(rows["gradsamp:strategy=pe:1"]["ppl_mean"] - rows["dense@2ep"]["ppl_mean"])
    assert row["verdict_flops"] == (("above" if delta < 0 else "below") + " the frontier" + ONE_SEED)
    assert results["frontier_metrics"] == [
        {"key": "ppl", "label": "Perplexity", "higher_is_better": False, "scale": "log"}
    ]
    assert "Δ Perplexity ↓ (FLOPs)" in printed and "At the same FLOPs:" in printed
    report = (out / "report.md").read_text()
    assert "Δ Perplexity ↓ (FLOPs)" in report and (out / "frontier_flops.png").stat().st_size > 0
    assert "![ppl vs saving](ppl_vs_saving.png)" in report and (out / "ppl_vs_saving.png").stat().st_size > 0
    assert not (out / "accuracy_vs_saving.png").exists()  # it plots perplexity, and says so
