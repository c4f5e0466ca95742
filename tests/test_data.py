"""Tests of studies.lab.data: every dataset's shapes, dtypes, determinism, standardization and errors.

Fashion-MNIST and CIFAR-10 are checked on tiny synthetic files in the real formats; the real
Fashion-MNIST directory (Debian ``dataset-fashion-mnist``) is used when it exists.
"""

# ruff: noqa: NPY002 -- the legacy global numpy RNG state is what some tests check is left alone

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from studies.lab import data
from studies.lab.data import DATASETS, DatasetInfo, dataset_info, load_dataset


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """Each test gets its own empty on-disk cache, an empty in-process cache and no dataset env vars."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv(data.CACHE_ENV, str(cache))
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    monkeypatch.delenv(data.CIFAR10_ENV, raising=False)
    data.clear_memory_cache()
    yield cache
    data.clear_memory_cache()


def arrays(ds: TensorDataset) -> tuple[np.ndarray, np.ndarray]:
    x, y = ds.tensors
    return x.numpy(), y.numpy()


def assert_same(a: TensorDataset, b: TensorDataset) -> None:
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert torch.equal(ta, tb)


# --------------------------------------------------------------------------------------------------
# registry and metadata


def test_registry_names():
    assert set(DATASETS) == {"mnist1d", "fashion_mnist", "digits", "gaussian", "cifar10"}


def test_unknown_dataset_lists_names():
    with pytest.raises(KeyError) as err:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(err.value)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="n_trian"):
        load_dataset("gaussian", n_trian=10)
    with pytest.raises(TypeError, match="root"):  # mnist1d is generated: it has no root
        load_dataset("mnist1d", root="/tmp")


def test_bad_option_values():
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("gaussian", n_train=0)
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)


def test_dataset_info_of_plain_tensor_dataset():
    ds = TensorDataset(torch.zeros(5, 3, 4), torch.tensor([0, 2, 1, 2, 0]))
    assert dataset_info(ds) == DatasetInfo("unknown", "unknown", (3, 4), 3)


# --------------------------------------------------------------------------------------------------
# mnist1d


def test_mnist1d_default_shapes_and_metadata():
    train, test = load_dataset("mnist1d")
    x, y = train.tensors
    assert x.shape == (4000, 40) and x.dtype == torch.float32
    assert y.shape == (4000,) and y.dtype == torch.int64
    assert test.tensors[0].shape == (1000, 40)
    assert set(y.tolist()) == set(range(10))
    info = dataset_info(train)
    assert (info.name, info.split, info.in_shape, info.num_classes) == ("mnist1d", "train", (40,), 10)
    assert dataset_info(test).split == "test"
    assert info.options == {"num_samples": 5000, "seed": 42, "shuffle_seq": False}
    assert isinstance(train, TensorDataset)
    # the package standardizes over all 5000 samples before splitting
    both = torch.cat([x, test.tensors[0]]).double()
    assert abs(both.mean().item()) < 1e-5 and abs(both.std().item() - 1) < 1e-3


def test_mnist1d_deterministic_and_seeded():
    a = load_dataset("mnist1d", num_samples=500, cache=False)
    b = load_dataset("mnist1d", num_samples=500, cache=False)
    assert_same(a[0], b[0])
    assert_same(a[1], b[1])
    assert a[0].tensors[0].shape == (400, 40)
    c = load_dataset("mnist1d", num_samples=500, seed=1, cache=False)
    assert not torch.equal(a[0].tensors[0], c[0].tensors[0])


@pytest.mark.parametrize(
    "options, match",
    [({"seed": 1.5}, "seed must be a non-negative integer"), ({"seed": -1}, "seed"),
     ({"shuffle_seq": "no"}, "shuffle_seq must be True or False")],
)  # fmt: skip
def test_mnist1d_options_of_the_wrong_type_are_refused(options, match):
    """seed=1.5 generated seed 1's data but recorded 1.5; shuffle_seq="no" permuted the positions
    (bool("no") is True) while the options said "no"."""
    with pytest.raises(ValueError, match=match):
        data.load_mnist1d(num_samples=500, cache=False, **options)


def test_mnist1d_cache_hit_equals_build(isolated: Path):
    built = load_dataset("mnist1d", num_samples=500, cache=False)
    first = load_dataset("mnist1d", num_samples=500)
    files = list(isolated.glob("mnist1d-*.npz"))
    assert len(files) == 1
    assert not [p for p in isolated.iterdir() if p.suffix == ".tmp"]
    data.clear_memory_cache()
    mtime = files[0].stat().st_mtime_ns
    from_disk = load_dataset("mnist1d", num_samples=500)
    assert files[0].stat().st_mtime_ns == mtime  # read, not rewritten
    for split in (0, 1):
        assert_same(built[split], first[split])
        assert_same(built[split], from_disk[split])
    # another argument set gets another file
    load_dataset("mnist1d", num_samples=500, shuffle_seq=True)
    assert len(list(isolated.glob("mnist1d-*.npz"))) == 2


def test_mnist1d_in_process_cache_is_not_aliased():
    train, _ = load_dataset("mnist1d", num_samples=500)
    expected = train.tensors[0].clone()
    train.tensors[0].zero_()  # a caller mutating its copy must not corrupt the cache
    again, _ = load_dataset("mnist1d", num_samples=500)
    assert torch.equal(again.tensors[0], expected)


@pytest.mark.parametrize("garbage", [b"", b"not an npz file", b"PK\x03\x04truncated zip"])
def test_mnist1d_corrupt_cache_is_rebuilt(isolated: Path, garbage: bytes):
    reference = load_dataset("mnist1d", num_samples=500)
    (path,) = isolated.glob("mnist1d-*.npz")
    path.write_bytes(garbage)
    data.clear_memory_cache()
    rebuilt = load_dataset("mnist1d", num_samples=500)
    assert_same(reference[0], rebuilt[0])
    with np.load(path) as f:  # and the file was rewritten whole
        np.testing.assert_array_equal(f["x"], reference[0].tensors[0].numpy())


def test_mnist1d_wrong_arrays_in_cache_are_rebuilt(isolated: Path):
    reference = load_dataset("mnist1d", num_samples=500)
    (path,) = isolated.glob("mnist1d-*.npz")
    np.savez(path, x=np.zeros((3, 7), np.float32), y=np.zeros(3, np.int64))  # wrong shape, keys missing
    data.clear_memory_cache()
    assert_same(reference[0], load_dataset("mnist1d", num_samples=500)[0])


def test_mnist1d_leaves_global_rng_alone():
    random.seed(123)
    np.random.seed(456)
    torch.manual_seed(789)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    load_dataset("mnist1d", num_samples=500, cache=False)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_mnist1d_writes_nothing_in_cwd(tmp_path: Path, monkeypatch, isolated: Path):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    load_dataset("mnist1d", num_samples=500)
    assert list(work.iterdir()) == []
    assert list(isolated.glob("mnist1d-*.npz"))  # the cache went where it belongs


def test_cache_dir_precedence(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == Path(os.environ[data.CACHE_ENV])
    monkeypatch.delenv(data.CACHE_ENV)
    assert data.cache_dir() == tmp_path / "xdg" / "whybn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.cache_dir() == Path.home() / ".cache" / "whybn"


# --------------------------------------------------------------------------------------------------
# fashion_mnist on tiny synthetic IDX files


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, truncate: int = 0) -> None:
    """An IDX file as LeCun specifies it: magic (0, 0, type 0x08, ndim), big-endian dims, uint8 data."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - truncate])


def make_fashion(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": np.arange(n_test)[::-1] % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, name in data.FASHION_MNIST_FILES.items():
        write_idx(root / name, arrays[key])
    return arrays


def test_read_idx_roundtrip(tmp_path: Path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), a)


def test_fashion_mnist_parsing_shapes_and_standardization(tmp_path: Path):
    raw = make_fashion(tmp_path / "fm")
    train, test = load_dataset("fashion_mnist", root=tmp_path / "fm")
    x, y = arrays(train)
    assert x.shape == (60, 1, 28, 28) and x.dtype == np.float32
    assert test.tensors[0].shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(y, raw["train_labels"])
    np.testing.assert_array_equal(arrays(test)[1], raw["test_labels"])
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-4
    # standardization is (pixel / 255 - mean) / std with the train statistics, applied to test too
    scaled = raw["train_images"].astype(np.float64) / 255
    mean, std = scaled.mean(), scaled.std()
    expected_test = (raw["test_images"][:, None] / 255 - mean) / std
    np.testing.assert_allclose(arrays(test)[0], expected_test, atol=1e-5)
    info = dataset_info(train)
    assert info.in_shape == (1, 28, 28) and info.num_classes == 10


def test_fashion_mnist_unstandardized_in_unit_interval(tmp_path: Path):
    raw = make_fashion(tmp_path)
    train, _ = load_dataset("fashion_mnist", root=tmp_path, standardize=False)
    np.testing.assert_allclose(arrays(train)[0][:, 0], raw["train_images"] / 255, atol=1e-7)


def test_fashion_mnist_subsets_stratified_nested_deterministic(tmp_path: Path):
    make_fashion(tmp_path, n_train=200, n_test=50)
    small, small_test = load_dataset("fashion_mnist", root=tmp_path, n_train=30, n_test=10, standardize=False)
    big, _ = load_dataset("fashion_mnist", root=tmp_path, n_train=55, standardize=False)
    again, _ = load_dataset("fashion_mnist", root=tmp_path, n_train=30, n_test=10, standardize=False)
    assert len(small) == 30 and len(small_test) == 10
    assert np.bincount(arrays(small)[1], minlength=10).tolist() == [3] * 10
    assert np.bincount(arrays(small_test)[1], minlength=10).tolist() == [1] * 10
    counts = np.bincount(arrays(big)[1], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert_same(small, again)
    rows = {r.tobytes() for r in arrays(big)[0]}
    assert all(r.tobytes() in rows for r in arrays(small)[0])  # nested
    other, _ = load_dataset("fashion_mnist", root=tmp_path, n_train=30, seed=1, standardize=False)
    assert not torch.equal(other.tensors[0], small.tensors[0])
    standardized, _ = load_dataset("fashion_mnist", root=tmp_path, n_train=30)
    x = arrays(standardized)[0]
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-4  # statistics of the subset
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("fashion_mnist", root=tmp_path, n_train=201)


def test_fashion_mnist_root_beats_env_beats_default(tmp_path: Path, monkeypatch):
    make_fashion(tmp_path / "env", n_train=40)
    make_fashion(tmp_path / "opt", n_train=30)
    monkeypatch.setattr(data, "FASHION_MNIST_DEFAULT_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        load_dataset("fashion_mnist")
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "env"))
    assert len(load_dataset("fashion_mnist")[0]) == 40
    assert len(load_dataset("fashion_mnist", root=str(tmp_path / "opt"))[0]) == 30


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion_mnist", root=tmp_path / "empty")
    message = str(err.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert data.FASHION_MNIST_ENV in message and "root=" in message
    for name in data.FASHION_MNIST_FILES.values():
        assert name in message


@pytest.mark.parametrize(
    "corruption, match",
    [({"magic": 0x0802}, "dimension"), ({"magic": 0x12340803}, "magic"), ({"truncate": 100}, "truncated")],
)
def test_fashion_mnist_bad_file_names_it(tmp_path: Path, corruption, match):
    raw = make_fashion(tmp_path)
    bad = tmp_path / data.FASHION_MNIST_FILES["train_images"]
    write_idx(bad, raw["train_images"], **corruption)
    with pytest.raises(ValueError, match=match) as err:
        load_dataset("fashion_mnist", root=tmp_path)
    assert str(bad) in str(err.value)


def test_fashion_mnist_files_with_foreign_contents_name_the_file(tmp_path: Path):
    # a label of 200, 8×8 images or float pixels used to load (and fail far away, or not at all)
    raw = make_fashion(tmp_path)
    labels = tmp_path / data.FASHION_MNIST_FILES["test_labels"]
    write_idx(labels, np.where(np.arange(20) == 3, 200, raw["test_labels"]))
    with pytest.raises(ValueError, match=r"labels must be 0\.\.9, found 200") as err:
        load_dataset("fashion_mnist", root=tmp_path)
    assert str(labels) in str(err.value)
    make_fashion(tmp_path)
    images = tmp_path / data.FASHION_MNIST_FILES["train_images"]
    write_idx(images, np.zeros((60, 8, 8)))
    with pytest.raises(ValueError, match=r"expected images of \(28, 28\), got \(8, 8\)") as err:
        load_dataset("fashion_mnist", root=tmp_path)
    assert str(images) in str(err.value)
    floats = np.full((60, 28, 28), 1000.0, dtype=">f4")  # IDX type 0x0D: big-endian float32
    with gzip.open(images, "wb") as f:
        f.write(struct.pack(">I", 0x0D03) + struct.pack(">3I", 60, 28, 28) + floats.tobytes())
    with pytest.raises(ValueError, match="expected uint8 values, got float32") as err:
        load_dataset("fashion_mnist", root=tmp_path, standardize=False)
    assert str(images) in str(err.value)


def test_fashion_mnist_not_gzip_names_it(tmp_path: Path):
    make_fashion(tmp_path)
    bad = tmp_path / data.FASHION_MNIST_FILES["test_labels"]
    bad.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(ValueError) as err:
        load_dataset("fashion_mnist", root=tmp_path)
    assert str(bad) in str(err.value)


@pytest.mark.skipif(
    not (data.FASHION_MNIST_DEFAULT_DIR / data.FASHION_MNIST_FILES["train_images"]).is_file(),
    reason="Debian dataset-fashion-mnist not installed",
)
def test_fashion_mnist_real_files_subset():
    train, test = load_dataset("fashion_mnist", n_train=1000, n_test=200)
    x, y = arrays(train)
    assert x.shape == (1000, 1, 28, 28) and test.tensors[0].shape == (200, 1, 28, 28)
    assert np.bincount(y, minlength=10).tolist() == [100] * 10
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-4
    assert dataset_info(train).options["root"] == str(data.FASHION_MNIST_DEFAULT_DIR)


# --------------------------------------------------------------------------------------------------
# digits and gaussian


def test_digits_shapes_split_and_standardization():
    train, test = load_dataset("digits")
    x, y = arrays(train)
    xt, yt = arrays(test)
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797
    assert abs(len(xt) / 1797 - 0.2) < 0.01
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-4
    # stratified: each class is split 80/20 up to rounding
    full = np.bincount(np.concatenate([y, yt]), minlength=10)
    assert np.all(np.abs(np.bincount(yt, minlength=10) - 0.2 * full) <= 0.5 + 1e-9)
    assert dataset_info(train).in_shape == (1, 8, 8)
    again = load_dataset("digits")
    assert_same(train, again[0])
    assert_same(test, again[1])
    other, _ = load_dataset("digits", seed=1)
    assert not torch.equal(other.tensors[1], train.tensors[1])


def test_gaussian_shapes_balance_determinism_and_rng():
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    train, test = load_dataset("gaussian", n_train=300, n_test=100, dim=5, num_classes=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    x, y = arrays(train)
    assert x.shape == (300, 5) and x.dtype == np.float32 and test.tensors[0].shape == (100, 5)
    assert np.bincount(y).tolist() == [100, 100, 100]
    assert dataset_info(train).num_classes == 3
    assert_same(train, load_dataset("gaussian", n_train=300, n_test=100, dim=5, num_classes=3, seed=7)[0])
    # the test size does not change the train set
    assert_same(train, load_dataset("gaussian", n_train=300, n_test=7, dim=5, num_classes=3, seed=7)[0])
    assert not torch.equal(
        train.tensors[0], load_dataset("gaussian", n_train=300, seed=8, dim=5)[0].tensors[0]
    )


def test_gaussian_matches_its_generative_model():
    train, test = load_dataset("gaussian", n_train=20_000, n_test=20_000, dim=4, num_classes=2, class_sep=3.0)
    x, y = arrays(train)
    xt, yt = arrays(test)
    mean0, mean1 = x[y == 0].mean(0), x[y == 1].mean(0)
    np.testing.assert_allclose(xt[yt == 0].mean(0), mean0, atol=0.05)  # train and test share the means
    np.testing.assert_allclose(x[y == 0].std(0), 1.0, atol=0.03)  # noise = 1
    assert np.linalg.norm(mean0 - mean1) > 1  # class_sep * |z0 - z1|
    no_signal, _ = load_dataset("gaussian", n_train=20_000, dim=4, num_classes=2, class_sep=0.0)
    np.testing.assert_allclose(arrays(no_signal)[0].mean(0), 0.0, atol=0.03)


# --------------------------------------------------------------------------------------------------
# cifar10 on tiny fake pickle batches


def make_cifar(directory: Path, per_batch: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Batches in the real format: pickled dicts with b'data' (n, 3072) uint8 and b'labels'."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in (*data.CIFAR10_TRAIN_BATCHES, data.CIFAR10_TEST_BATCH):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        x[:, :1024] //= 2  # give the channels different statistics
        labels = [int(v) for v in rng.permutation(np.arange(per_batch) % 10)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": x, b"filenames": []}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)
        xs.append(x)
        ys.append(np.array(labels))
    return {"x": np.concatenate(xs[:5]), "y": np.concatenate(ys[:5]), "x_test": xs[5], "y_test": ys[5]}


@pytest.mark.parametrize("layout", ["batches_dir", "parent"])
def test_cifar10_both_layouts(tmp_path: Path, layout: str):
    raw = make_cifar(tmp_path / data.CIFAR10_SUBDIR)
    root = tmp_path / data.CIFAR10_SUBDIR if layout == "batches_dir" else tmp_path
    train, test = load_dataset("cifar10", root=root)
    x, y = arrays(train)
    assert x.shape == (50, 3, 32, 32) and x.dtype == np.float32 and test.tensors[0].shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(y, raw["y"])
    np.testing.assert_array_equal(arrays(test)[1], raw["y_test"])
    # per-channel standardization with train statistics
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1, atol=1e-4)
    images = raw["x"].reshape(-1, 3, 32, 32) / 255
    mean, std = images.mean(axis=(0, 2, 3)), images.std(axis=(0, 2, 3))
    expected = (raw["x_test"].reshape(-1, 3, 32, 32) / 255 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(arrays(test)[0], expected, atol=1e-5)
    assert dataset_info(train).in_shape == (3, 32, 32)


def test_cifar10_env_and_subsets(tmp_path: Path, monkeypatch):
    make_cifar(tmp_path / data.CIFAR10_SUBDIR)
    monkeypatch.setenv(data.CIFAR10_ENV, str(tmp_path))
    train, test = load_dataset("cifar10", n_train=20, n_test=10)
    assert len(train) == 20 and len(test) == 10
    assert np.bincount(arrays(train)[1], minlength=10).tolist() == [2] * 10
    assert_same(train, load_dataset("cifar10", n_train=20, n_test=10)[0])


@pytest.mark.parametrize("root", [None, "missing"])
def test_cifar10_missing_says_how_to_get_it(tmp_path: Path, root):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", **({} if root is None else {"root": tmp_path / root}))
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert data.CIFAR10_ENV in message and "root=" in message


def test_cifar10_corrupt_batch_names_it(tmp_path: Path):
    make_cifar(tmp_path)
    bad = tmp_path / "data_batch_3"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError) as err:
        load_dataset("cifar10", root=tmp_path)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize(
    "field, value, match",
    [
        (b"labels", [10, -1, 42, 3] + [0] * 6, r"labels must be 0\.\.9, found -1\.\.42"),
        (b"data", np.full((10, 3072), 300, dtype=np.int64), r"pixels must be integers 0\.\.255"),  # wrapped
        (b"data", [[300] * 3072] * 10, r"pixels must be integers 0\.\.255"),  # an OverflowError
        (
            b"labels",
            [0.5, 1.7, 2.2, 3.9, 9.99] * 2,
            r"labels must be integers, got float64",
        ),  # was cast to 0, 1, …
    ],
)
def test_cifar10_batch_with_foreign_contents_names_it(tmp_path: Path, field, value, match):
    make_cifar(tmp_path)
    bad = tmp_path / "data_batch_2"
    batch = pickle.loads(bad.read_bytes())
    batch[field] = value
    bad.write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=match) as err:
        load_dataset("cifar10", root=tmp_path)
    assert str(bad) in str(err.value)


def test_digits_refuses_a_split_that_leaves_a_class_no_training_example():
    with pytest.raises(ValueError, match=r"test_fraction=0.998 leaves class 0 \(178 images\) no training"):
        load_dataset("digits", test_fraction=0.998)  # it gave 0 training examples and a nan test set


def test_mnist1d_unwritable_cache_warns_and_still_loads(tmp_path: Path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(data.CACHE_ENV, str(blocker / "cache"))
    with pytest.warns(UserWarning, match="could not write the MNIST-1D cache"):
        train, _ = load_dataset("mnist1d", num_samples=500)
    assert train.tensors[0].shape == (400, 40)
