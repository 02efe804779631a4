"""Tests for ``applications.sparsify.data`` (all offline, no downloads)."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from applications.sparsify.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DatasetNotFoundError,
    DatasetSplits,
    available_datasets,
    load_dataset,
    random_cifar_like,
    read_cifar_folder,
    read_idx,
    read_mnist_folder,
)

# --------------------------------------------------------------------------- #
# Helpers writing tiny files in the real on-disk formats
# --------------------------------------------------------------------------- #


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """Encode a uint8 array as an IDX file (big-endian header)."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, payload: bytes, compress: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _write_mnist(folder: Path, rng: np.random.Generator, *, compress: bool = False) -> dict:
    arrays = {
        "train_images": rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=7, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=4, dtype=np.uint8),
    }
    arrays["train_images"][0, 0, 0] = 255  # make sure the extremes occur
    arrays["train_images"][0, 0, 1] = 0
    names = {
        "train_images": ("train-images-idx3-ubyte", 2051),
        "train_labels": ("train-labels-idx1-ubyte", 2049),
        "test_images": ("t10k-images-idx3-ubyte", 2051),
        "test_labels": ("t10k-labels-idx1-ubyte", 2049),
    }
    for key, (name, magic) in names.items():
        _write(folder / name, _idx_bytes(arrays[key], magic), compress)
    return arrays


def _cifar_batch(rng: np.random.Generator, n: int, label_key: bytes, num_classes: int) -> dict:
    return {
        b"batch_label": b"tiny batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _write_cifar10(root: Path, rng: np.random.Generator) -> tuple[list[dict], dict]:
    folder = root / "cifar-10-batches-py"
    train = [_cifar_batch(rng, 2 + i, b"labels", 10) for i in range(5)]
    for i, batch in enumerate(train, start=1):
        _dump(folder / f"data_batch_{i}", batch)
    test = _cifar_batch(rng, 3, b"labels", 10)
    _dump(folder / "test_batch", test)
    return train, test


def _unnormalize(x: torch.Tensor, mean, std) -> np.ndarray:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x * s + m) * 255.0).numpy()


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #


def test_available_datasets() -> None:
    names = available_datasets()
    assert set(names) >= {"mnist5k", "mnist1d", "mnist", "cifar10", "cifar100"}
    assert names == sorted(names)


def test_unknown_name_raises_value_error_listing_names() -> None:
    with pytest.raises(ValueError, match="available") as info:
        load_dataset("imagenet")
    for name in available_datasets():
        assert name in str(info.value)


def test_unknown_option_raises_type_error() -> None:
    with pytest.raises(TypeError, match="num_sampels"):
        load_dataset("mnist1d", num_sampels=100)


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit_rejected(limit) -> None:
    with pytest.raises(ValueError, match="limit"):
        load_dataset("mnist5k", limit=limit)


# --------------------------------------------------------------------------- #
# mnist5k
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def mnist5k() -> DatasetSplits:
    return load_dataset("mnist5k", seed=0)


def test_mnist5k_shapes_and_types(mnist5k: DatasetSplits) -> None:
    x_tr, y_tr = mnist5k.train.tensors
    x_te, y_te = mnist5k.test.tensors
    assert isinstance(mnist5k.train, TensorDataset)
    assert mnist5k.name == "mnist5k"
    assert mnist5k.input_shape == (1, 28, 28)
    assert mnist5k.num_classes == 10
    assert x_tr.shape == (4000, 1, 28, 28) and y_tr.shape == (4000,)
    assert x_te.shape == (1000, 1, 28, 28) and y_te.shape == (1000,)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert x_te.dtype == torch.float32 and y_te.dtype == torch.int64


def test_mnist5k_value_range_and_classes(mnist5k: DatasetSplits) -> None:
    for ds in (mnist5k.train, mnist5k.test):
        x, y = ds.tensors
        assert float(x.min()) == 0.0
        assert float(x.max()) == 1.0
        assert set(y.tolist()) == set(range(10))
    # Stratified split: 100 test digits per class, and the labels are shuffled.
    assert torch.bincount(mnist5k.test.tensors[1]).tolist() == [100] * 10
    assert torch.bincount(mnist5k.train.tensors[1]).tolist() == [400] * 10
    y_tr = mnist5k.train.tensors[1]
    assert not bool((y_tr[1:] >= y_tr[:-1]).all())


def test_mnist5k_split_disjoint(mnist5k: DatasetSplits) -> None:
    tr = mnist5k.train.tensors[0].flatten(1).numpy()
    te = mnist5k.test.tensors[0].flatten(1).numpy()
    # Together they hold all 5,000 distinct bundled digits (no overlap).
    all_rows = np.concatenate([tr, te])
    n_unique = len(np.unique(all_rows, axis=0))
    n_unique_tr = len(np.unique(tr, axis=0))
    n_unique_te = len(np.unique(te, axis=0))
    assert n_unique == n_unique_tr + n_unique_te == 5000


def test_mnist5k_seed_determinism(mnist5k: DatasetSplits) -> None:
    again = load_dataset("mnist5k", seed=0)
    other = load_dataset("mnist5k", seed=1)
    for a, b in zip(
        mnist5k.train.tensors + mnist5k.test.tensors,
        again.train.tensors + again.test.tensors,
        strict=True,
    ):
        assert torch.equal(a, b)
    assert not torch.equal(mnist5k.test.tensors[1], other.test.tensors[1])


def test_mnist5k_limit(mnist5k: DatasetSplits) -> None:
    small = load_dataset("mnist5k", seed=0, limit=50)
    assert len(small.train) == 50 and len(small.test) == 50
    assert small.input_shape == mnist5k.input_shape
    again = load_dataset("mnist5k", seed=0, limit=50)
    assert torch.equal(small.train.tensors[0], again.train.tensors[0])
    big = load_dataset("mnist5k", seed=0, limit=10_000)
    assert len(big.train) == 4000 and len(big.test) == 1000


def test_mnist5k_ignores_data_root(tmp_path: Path) -> None:
    splits = load_dataset("MNIST5K", data_root=tmp_path / "nothing", limit=5)
    assert splits.name == "mnist5k"


# --------------------------------------------------------------------------- #
# validation_split
# --------------------------------------------------------------------------- #


def test_validation_split_sizes_disjoint_deterministic() -> None:
    x = torch.arange(100, dtype=torch.float32).view(100, 1)
    y = torch.arange(100) % 10
    splits = DatasetSplits(
        train=TensorDataset(x, y),
        test=TensorDataset(x[:5], y[:5]),
        input_shape=(1,),
        num_classes=10,
        name="toy",
    )
    tr, val = splits.validation_split(0.2, seed=3)
    assert len(tr) == 80 and len(val) == 20
    ids_tr = set(tr.tensors[0].view(-1).tolist())
    ids_val = set(val.tensors[0].view(-1).tolist())
    assert ids_tr.isdisjoint(ids_val)
    assert ids_tr | ids_val == set(range(100))
    # Labels travel with their inputs.
    assert torch.equal(val.tensors[1], val.tensors[0].view(-1).long() % 10)

    tr2, val2 = splits.validation_split(0.2, seed=3)
    assert torch.equal(val.tensors[0], val2.tensors[0])
    assert torch.equal(tr.tensors[0], tr2.tensors[0])
    _, val3 = splits.validation_split(0.2, seed=4)
    assert not torch.equal(val.tensors[0], val3.tensors[0])
    # Test split untouched.
    assert len(splits.test) == 5

    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            splits.validation_split(bad, seed=0)


def test_validation_split_on_mnist5k(mnist5k: DatasetSplits) -> None:
    tr, val = mnist5k.validation_split(0.1, seed=0)
    assert len(tr) == 3600 and len(val) == 400
    assert tr.tensors[0].shape[1:] == (1, 28, 28)


# --------------------------------------------------------------------------- #
# mnist1d
# --------------------------------------------------------------------------- #


def test_mnist1d_shapes_and_rng_untouched() -> None:
    np_before = np.random.get_state()  # noqa: NPY002
    py_before = random.getstate()

    splits = load_dataset("mnist1d", num_samples=500, seed=1)

    # mnist1d reseeds the global generators; the loader must restore them.
    np_after = np.random.get_state()  # noqa: NPY002
    assert random.getstate() == py_before
    assert np_after[0] == np_before[0] and np_after[2:] == np_before[2:]
    np.testing.assert_array_equal(np_after[1], np_before[1])
    assert splits.input_shape == (1, 40)
    assert splits.num_classes == 10
    x_tr, y_tr = splits.train.tensors
    x_te, y_te = splits.test.tensors
    assert x_tr.shape == (400, 1, 40) and x_te.shape == (100, 1, 40)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert y_tr.min() >= 0 and y_tr.max() <= 9 and y_te.max() <= 9
    again = load_dataset("mnist1d", num_samples=500, seed=1)
    assert torch.equal(x_tr, again.train.tensors[0])


# --------------------------------------------------------------------------- #
# MNIST (IDX files)
# --------------------------------------------------------------------------- #


def test_read_idx_roundtrip_plain_and_gzip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(arr, 2051))
    with gzip.open(tmp_path / "b.gz", "wb") as fh:
        fh.write(_idx_bytes(arr, 2051))
    for name in ("a", "b.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, arr)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "l").write_bytes(_idx_bytes(labels, 2049))
    np.testing.assert_array_equal(read_idx(tmp_path / "l"), labels)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    arr = np.zeros((2, 2), dtype=np.uint8)
    (tmp_path / "short").write_bytes(_idx_bytes(arr, 2050)[:-1])
    with pytest.raises(ValueError, match="bytes"):
        read_idx(tmp_path / "short")


def test_mnist_torchvision_layout(tmp_path: Path) -> None:
    arrays = _write_mnist(tmp_path / "MNIST" / "raw", np.random.default_rng(0))
    splits = load_dataset("mnist", data_root=tmp_path)
    assert splits.name == "mnist" and splits.num_classes == 10
    assert splits.input_shape == (1, 28, 28)
    x_tr, y_tr = splits.train.tensors
    x_te, y_te = splits.test.tensors
    assert x_tr.shape == (7, 1, 28, 28) and x_te.shape == (4, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    np.testing.assert_allclose(x_tr[:, 0].numpy() * 255.0, arrays["train_images"], atol=1e-4)
    np.testing.assert_allclose(x_te[:, 0].numpy() * 255.0, arrays["test_images"], atol=1e-4)
    np.testing.assert_array_equal(y_tr.numpy(), arrays["train_labels"])
    np.testing.assert_array_equal(y_te.numpy(), arrays["test_labels"])


def test_mnist_gzip_files_directly_in_root(tmp_path: Path) -> None:
    arrays = _write_mnist(tmp_path, np.random.default_rng(1), compress=True)
    assert (tmp_path / "train-images-idx3-ubyte.gz").is_file()
    x_tr, y_tr, x_te, y_te = read_mnist_folder(tmp_path)
    np.testing.assert_array_equal(x_tr, arrays["train_images"])
    np.testing.assert_array_equal(y_tr, arrays["train_labels"])
    np.testing.assert_array_equal(x_te, arrays["test_images"])
    np.testing.assert_array_equal(y_te, arrays["test_labels"])
    splits = load_dataset("mnist", data_root=str(tmp_path), limit=3, seed=5)
    assert len(splits.train) == 3 and len(splits.test) == 3


def test_mnist_wrong_magic_rejected(tmp_path: Path) -> None:
    arrays = _write_mnist(tmp_path, np.random.default_rng(2))
    # Swap in a label file where images belong.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(arrays["train_labels"], 2049))
    with pytest.raises(ValueError, match="2051"):
        read_mnist_folder(tmp_path)


def test_mnist_missing_folder_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", data_root=tmp_path / "missing")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "train-images-idx3-ubyte" in msg
    assert "t10k-labels-idx1-ubyte" in msg
    assert str(tmp_path / "missing" / "MNIST" / "raw") in msg
    assert "torchvision.datasets.MNIST" in msg and "download=True" in msg
    # the option on the command line, the argument in Python
    assert "--data-root on the command line, data_root= in Python" in msg


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_data_root_that_is_a_file_is_named_as_such(tmp_path: Path, name: str) -> None:
    # e.g. the path of an IDX file instead of its folder: it exists, it is no folder
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_root=path)
    msg = str(info.value)
    assert f"({path} is not a folder)" in msg
    assert "does not exist" not in msg
    with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
        load_dataset(name, data_root=tmp_path / "missing")
    assert "--data-root" in str(info.value) and "data_root=" in str(info.value)


def test_mnist_partially_missing_names_the_missing_file(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "MNIST" / "raw", np.random.default_rng(3))
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_dataset("mnist", data_root=tmp_path)
    assert "train-images-idx3-ubyte (or" not in str(info.value)


def test_mnist_without_data_root() -> None:
    with pytest.raises(DatasetNotFoundError, match="no data folder was given") as info:
        load_dataset("mnist")
    assert "train-images-idx3-ubyte" in str(info.value)


# --------------------------------------------------------------------------- #
# CIFAR (python pickles)
# --------------------------------------------------------------------------- #


def test_cifar10_pickle_roundtrip(tmp_path: Path) -> None:
    train, test = _write_cifar10(tmp_path, np.random.default_rng(0))
    splits = load_dataset("cifar10", data_root=tmp_path)
    assert splits.name == "cifar10" and splits.num_classes == 10
    assert splits.input_shape == (3, 32, 32)
    x_tr, y_tr = splits.train.tensors
    x_te, y_te = splits.test.tensors
    n_train = sum(len(b[b"labels"]) for b in train)
    assert x_tr.shape == (n_train, 3, 32, 32) and x_te.shape == (3, 3, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64

    raw_tr = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    lab_tr = np.concatenate([b[b"labels"] for b in train])
    np.testing.assert_allclose(_unnormalize(x_tr, CIFAR10_MEAN, CIFAR10_STD), raw_tr, atol=1e-3)
    np.testing.assert_array_equal(y_tr.numpy(), lab_tr)
    raw_te = test[b"data"].reshape(-1, 3, 32, 32)
    np.testing.assert_allclose(_unnormalize(x_te, CIFAR10_MEAN, CIFAR10_STD), raw_te, atol=1e-3)
    np.testing.assert_array_equal(y_te.numpy(), test[b"labels"])
    # Channel-major layout: first 1024 bytes are the red plane.
    assert float(x_tr[0, 0, 0, 1]) == pytest.approx(
        (raw_tr[0, 0, 0, 1] / 255.0 - CIFAR10_MEAN[0]) / CIFAR10_STD[0], abs=1e-5
    )
    assert raw_tr[0, 1, 0, 0] == train[0][b"data"][0, 1024]


def test_cifar100_pickle_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    train = _cifar_batch(rng, 6, b"fine_labels", 100)
    train[b"coarse_labels"] = [0] * 6
    test = _cifar_batch(rng, 4, b"fine_labels", 100)
    test[b"coarse_labels"] = [0] * 4
    _dump(folder / "train", train)
    _dump(folder / "test", test)

    x_tr, y_tr, x_te, y_te = read_cifar_folder(tmp_path, "cifar100")
    np.testing.assert_array_equal(x_tr, train[b"data"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(y_te, test[b"fine_labels"])

    splits = load_dataset("cifar100", data_root=tmp_path)
    assert splits.num_classes == 100 and splits.input_shape == (3, 32, 32)
    np.testing.assert_array_equal(splits.train.tensors[1].numpy(), train[b"fine_labels"])
    np.testing.assert_allclose(
        _unnormalize(splits.test.tensors[0], CIFAR100_MEAN, CIFAR100_STD),
        test[b"data"].reshape(-1, 3, 32, 32),
        atol=1e-3,
    )


def test_cifar10_missing_batch_named(tmp_path: Path) -> None:
    _write_cifar10(tmp_path, np.random.default_rng(2))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3") as info:
        load_dataset("cifar10", data_root=tmp_path)
    assert "torchvision.datasets.CIFAR10" in str(info.value)


@pytest.mark.parametrize(
    ("name", "expected"), [("cifar10", "test_batch"), ("cifar100", "cifar-100-python")]
)
def test_cifar_missing_folder_message(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DatasetNotFoundError, match=expected) as info:
        load_dataset(name, data_root=tmp_path)
    assert "download=True" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="data_root"):
        load_dataset(name)


# --------------------------------------------------------------------------- #
# random_cifar_like
# --------------------------------------------------------------------------- #


def test_random_cifar_like() -> None:
    x, y = random_cifar_like(16, num_classes=5, seed=7)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 5
    x2, y2 = random_cifar_like(16, num_classes=5, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = random_cifar_like(16, num_classes=5, seed=8)
    assert not torch.equal(x, x3)
    assert len(TensorDataset(x, y)) == 16
