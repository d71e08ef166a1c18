"""Tests for greenprop.data: IDX reader, file lookup, datasets and load()."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from greenprop.data import (
    DATASETS,
    ImageDataset,
    load,
    locate_fashion_mnist,
    read_idx,
    write_idx,
)
from greenprop.data import locate as locate_module
from greenprop.errors import GreenpropError

FILES = locate_module.FASHION_MNIST_FILES
SYSTEM_FILES_PRESENT = all((locate_module.SYSTEM_DIR / f"{name}.gz").is_file() for name in FILES.values())


def write_fake_fmnist(
    folder: Path, *, n_train: int = 30, n_test: int = 12, seed: int = 0, gz: bool = True
) -> dict[str, np.ndarray]:
    """Four small IDX files in the Fashion-MNIST layout; returns what was written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for role, array in arrays.items():
        write_idx(folder / (FILES[role] + (".gz" if gz else "")), array)
    return arrays


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No env var, an empty system folder and an empty working directory."""
    monkeypatch.delenv(locate_module.ENV_VAR, raising=False)
    monkeypatch.setattr(locate_module, "SYSTEM_DIR", tmp_path / "system")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


# --- IDX reader ---------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, dtype, compress):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = write_idx(tmp_path / "a.idx", array, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == (3, 4, 5)
    np.testing.assert_array_equal(back, array)
    back[0, 0, 0] = 0  # writable, so torch.from_numpy will not warn


def test_idx_reads_hand_written_bytes(tmp_path):
    """Check against the format itself, not only against our own writer."""
    raw = bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2, 3) + bytes(range(6))
    (tmp_path / "u8").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "u8"), [[0, 1, 2], [3, 4, 5]])

    raw = bytes([0, 0, 0x0B, 1]) + struct.pack(">I", 2) + struct.pack(">hh", -2, 300)
    (tmp_path / "i16.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "i16.gz"), [-2, 300])


def corruptions(tmp_path: Path) -> dict[str, Path]:
    good = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 100) + bytes(100)
    gz = gzip.compress(good)
    cases = {
        "bad_magic": b"\x01\x02\x08\x01" + good[4:],
        "bad_dtype": bytes([0, 0, 0x07, 1]) + good[4:],
        "short_header": good[:6],
        "tiny": b"\x00\x00",
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "truncated_gz": gz[: len(gz) // 2],
        "garbage_gz": b"\x1f\x8b" + bytes(range(50)),
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = tmp_path / f"{name}.idx"
        paths[name].write_bytes(data)
    paths["missing"] = tmp_path / "missing.idx"
    return paths


def test_idx_corrupt_files_raise_naming_the_file(tmp_path):
    for name, path in corruptions(tmp_path).items():
        with pytest.raises(GreenpropError) as info:
            read_idx(path)
        assert str(path) in str(info.value), name


def test_write_idx_rejects_unstorable_dtype(tmp_path):
    with pytest.raises(GreenpropError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


# --- lookup order -------------------------------------------------------------------


def loaded_train_labels(data_dir=None) -> np.ndarray:
    return load("fashion-mnist", data_dir=data_dir).train.labels.numpy()


def test_explicit_dir_flat_and_torchvision_layout(isolated):
    flat = write_fake_fmnist(isolated / "flat", seed=1)
    nested = write_fake_fmnist(isolated / "tv" / "FashionMNIST" / "raw", seed=2, gz=False)
    np.testing.assert_array_equal(loaded_train_labels(isolated / "flat"), flat["train_labels"])
    np.testing.assert_array_equal(loaded_train_labels(isolated / "tv"), nested["train_labels"])
    assert locate_fashion_mnist(isolated / "tv")["test_images"].name == FILES["test_images"]


def test_explicit_dir_missing_files_does_not_fall_through(isolated, monkeypatch):
    write_fake_fmnist(isolated / "env")
    monkeypatch.setenv(locate_module.ENV_VAR, str(isolated / "env"))
    partial = isolated / "partial"
    write_fake_fmnist(partial)
    (partial / (FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(GreenpropError) as info:
        load("fashion-mnist", data_dir=partial)
    assert str(partial) in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_env_var_beats_system_dir_and_cwd(isolated, monkeypatch):
    env = write_fake_fmnist(isolated / "env", seed=1)
    write_fake_fmnist(isolated / "system", seed=2)
    write_fake_fmnist(isolated / "work" / "data" / "FashionMNIST" / "raw", seed=3)
    monkeypatch.setenv(locate_module.ENV_VAR, str(isolated / "env"))
    np.testing.assert_array_equal(loaded_train_labels(), env["train_labels"])


def test_explicit_dir_beats_env_var(isolated, monkeypatch):
    explicit = write_fake_fmnist(isolated / "explicit", seed=1)
    write_fake_fmnist(isolated / "env", seed=2)
    monkeypatch.setenv(locate_module.ENV_VAR, str(isolated / "env"))
    np.testing.assert_array_equal(loaded_train_labels(isolated / "explicit"), explicit["train_labels"])


def test_system_dir_then_torchvision_folder(isolated, monkeypatch):
    # An env var pointing at an empty folder falls through to the defaults.
    monkeypatch.setenv(locate_module.ENV_VAR, str(isolated / "nothing-here"))
    system = write_fake_fmnist(isolated / "system", seed=2)
    cwd = write_fake_fmnist(isolated / "work" / "data" / "FashionMNIST" / "raw", seed=3)
    np.testing.assert_array_equal(loaded_train_labels(), system["train_labels"])
    monkeypatch.setattr(locate_module, "SYSTEM_DIR", isolated / "gone")
    np.testing.assert_array_equal(loaded_train_labels(), cwd["train_labels"])


def test_missing_everywhere_names_every_place(isolated, monkeypatch):
    monkeypatch.setenv(locate_module.ENV_VAR, str(isolated / "envdir"))
    with pytest.raises(GreenpropError) as info:
        load("fashion-mnist")
    message = str(info.value)
    for place in [
        isolated / "envdir",
        isolated / "system",
        isolated / "work" / "data" / "FashionMNIST" / "raw",
    ]:
        assert str(place) in message
    assert "GREENPROP_DATA" in message and "--data-dir" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message


def test_fake_files_are_normalised_with_the_constants(isolated):
    arrays = write_fake_fmnist(isolated / "d", n_train=30, n_test=12)
    pair = load("fashion-mnist", data_dir=isolated / "d")
    assert len(pair.train) == 30 and len(pair.test) == 12
    mean, std = pair.info.mean, pair.info.std
    expected = (arrays["test_images"].astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(pair.test.images[:, 0].numpy(), expected, atol=1e-5)
    assert pair.test.labels.dtype == torch.int64
    np.testing.assert_array_equal(pair.test.labels.numpy(), arrays["test_labels"])


def test_inconsistent_files_are_rejected_by_name(isolated):
    folder = isolated / "d"
    write_fake_fmnist(folder)
    labels_path = folder / (FILES["train_labels"] + ".gz")
    write_idx(labels_path, np.zeros(29, dtype=np.uint8))  # 30 images, 29 labels
    with pytest.raises(GreenpropError, match="29 labels"):
        load("fashion-mnist", data_dir=folder)
    write_idx(labels_path, np.full(30, 10, dtype=np.uint8))
    with pytest.raises(GreenpropError) as info:
        load("fashion-mnist", data_dir=folder)
    assert str(labels_path) in str(info.value)
    write_idx(labels_path, np.zeros(30, dtype=np.uint8))
    load("fashion-mnist", data_dir=folder)  # consistent again
    images_path = folder / (FILES["test_images"] + ".gz")
    images_path.write_bytes(images_path.read_bytes()[:-10])
    with pytest.raises(GreenpropError) as info:
        load("fashion-mnist", data_dir=folder)
    assert str(images_path) in str(info.value)


# --- real Fashion-MNIST -------------------------------------------------------------

needs_system_data = pytest.mark.skipif(
    not SYSTEM_FILES_PRESENT, reason="Debian package dataset-fashion-mnist not installed"
)


@pytest.fixture(scope="module")
def fashion():
    return load("fashion-mnist", data_dir=locate_module.SYSTEM_DIR)


@needs_system_data
def test_real_fashion_mnist(fashion):
    assert fashion.info.name == "fashion-mnist"
    assert (fashion.info.num_classes, fashion.info.in_channels, fashion.info.image_size) == (
        10,
        1,
        28,
    )
    assert fashion.train.images.shape == (60000, 1, 28, 28)
    assert fashion.test.images.shape == (10000, 1, 28, 28)
    assert fashion.train.images.dtype == torch.float32
    for split in (fashion.train, fashion.test):
        assert split.labels.dtype == torch.int64
        assert split.labels.min() == 0 and split.labels.max() == 9
    # The mean/std constants in code must match the data they normalise.
    images = fashion.train.images.double()
    assert abs(images.mean().item()) < 1e-3
    assert abs(images.std().item() - 1) < 1e-3


@needs_system_data
def test_real_fashion_mnist_pad_to_32_and_subset(fashion):
    pair = load(
        "fashion-mnist",
        data_dir=locate_module.SYSTEM_DIR,
        subset=300,
        test_subset=50,
        pad_to_32=True,
    )
    assert (pair.info.in_channels, pair.info.image_size) == (3, 32)
    assert pair.train.images.shape == (300, 3, 32, 32)
    assert pair.test.images.shape == (50, 3, 32, 32)
    x, _ = pair.train[list(range(len(pair.train)))]
    background = -pair.info.mean / pair.info.std
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.allclose(x[:, :, border], torch.tensor(background))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # The centre holds the same subset as without padding.
    plain = load("fashion-mnist", data_dir=locate_module.SYSTEM_DIR, subset=300, test_subset=50)
    assert torch.allclose(x[:, :, 2:30, 2:30], plain.train.images, atol=1e-6)


# --- digits, subsets, indexing ------------------------------------------------------


def raw_digit_rows(pair) -> np.ndarray:
    """Undo normalisation back to sklearn's 0..16 integers, one row per image."""
    images = torch.cat([pair.train.images, pair.test.images]).double()
    raw = (images * pair.info.std + pair.info.mean) * 16
    return np.rint(raw.reshape(len(raw), -1).numpy()).astype(np.int64)


def test_digits_split_is_deterministic_stratified_and_complete():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    first = load("digits")
    torch.manual_seed(123)  # the run seed must not change the split
    rng_state = torch.get_rng_state()
    second = load("digits")
    assert torch.equal(torch.get_rng_state(), rng_state)  # and load must not use it
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)

    assert first.train.images.shape == (1437, 1, 8, 8)
    assert first.test.images.shape == (360, 1, 8, 8)
    assert (first.info.num_classes, first.info.in_channels, first.info.image_size) == (10, 1, 8)

    bunch = load_digits()
    all_counts = np.bincount(bunch.target, minlength=10)
    test_counts = np.bincount(first.test.labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)

    # Train + test is exactly the original data set (nothing lost or duplicated).
    rows = raw_digit_rows(first)
    labels = torch.cat([first.train.labels, first.test.labels]).numpy()
    ours = sorted(zip(map(tuple, rows), labels, strict=True))
    theirs = sorted(zip(map(tuple, bunch.data.astype(np.int64)), bunch.target, strict=True))
    assert ours == theirs

    images = first.train.images.double()
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-4


def test_subsets_are_fixed_nested_and_drawn_from_the_data():
    full = load("digits")
    a = load("digits", subset=200, test_subset=40)
    b = load("digits", subset=200, test_subset=40)
    small = load("digits", subset=50)
    assert len(a.train) == 200 and len(a.test) == 40 and len(small.test) == 360
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.labels, b.test.labels)
    assert set(a.train.labels.unique().tolist()) == set(range(10))

    def rows(ds: ImageDataset) -> set[bytes]:
        return {row.numpy().tobytes() for row in ds.images.reshape(len(ds), -1)}

    assert rows(small.train) <= rows(a.train) <= rows(full.train)
    assert rows(a.test) <= rows(full.test)
    # Not simply the first examples.
    assert not torch.equal(a.train.images, full.train.images[:200])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10", 1438])
def test_bad_subset_sizes(bad):
    with pytest.raises(GreenpropError) as info:
        load("digits", subset=bad)
    assert str(bad) in str(info.value)
    with pytest.raises(GreenpropError, match="test_subset"):
        load("digits", test_subset=bad if bad != 1438 else 361)


def test_unknown_dataset_lists_choices():
    with pytest.raises(GreenpropError) as info:
        load("cifar10")
    assert "cifar10" in str(info.value)
    for name in DATASETS:
        assert name in str(info.value)
    assert load("Digits").info.name == "digits"


def test_batched_indexing_equals_stacked_items():
    ds = load("digits", subset=64).train
    x, y = ds[5]
    assert x.shape == (1, 8, 8) and y.ndim == 0 and y.dtype == torch.int64
    picks = [5, 0, 63, 5, -1]
    expected_x = torch.stack([ds[i][0] for i in picks])
    expected_y = torch.stack([ds[i][1] for i in picks])
    for index in (picks, torch.tensor(picks), np.array(picks)):
        bx, by = ds[index]
        assert torch.equal(bx, expected_x) and torch.equal(by, expected_y)
    assert torch.equal(ds[2:6][0], ds[[2, 3, 4, 5]][0])
    assert ds[np.int64(3)][1] == ds[3][1] and ds[torch.tensor(3)][1] == ds[3][1]
    with pytest.raises(GreenpropError):
        ds[torch.zeros(2, 2, dtype=torch.long)]
    with pytest.raises(IndexError):
        ds[64]


def test_dataloader_with_batch_sampler_needs_no_collation():
    ds = load("digits", test_subset=50).test
    loader = DataLoader(ds, batch_size=None, sampler=BatchSampler(SequentialSampler(ds), 16, False))
    batches = list(loader)
    assert [len(by) for _, by in batches] == [16, 16, 16, 2]
    assert batches[0][0].shape == (16, 1, 8, 8)
    assert torch.equal(torch.cat([bx for bx, _ in batches]), ds.images)


def test_digits_pad_to_32_upsamples():
    plain = load("digits", test_subset=20)
    big = load("digits", test_subset=20, pad_to_32=True)
    assert (big.info.in_channels, big.info.image_size) == (3, 32)
    x = big.test.images
    assert x.shape == (20, 3, 32, 32)
    expected = plain.test.images.repeat_interleave(4, 2).repeat_interleave(4, 3)
    for channel in range(3):
        assert torch.allclose(x[:, channel : channel + 1], expected)


def test_image_dataset_validates_inputs():
    with pytest.raises(GreenpropError, match="float32"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(GreenpropError, match="int64"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(GreenpropError, match="3 labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long))
