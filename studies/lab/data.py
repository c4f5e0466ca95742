"""Datasets by name: ``load_dataset(name, **options) -> (train, test)``.

Every loader returns two :class:`ClassificationDataset` objects — ``torch.utils.data.TensorDataset``
subclasses holding ``(inputs float32, labels int64)`` — that also carry a :class:`DatasetInfo`
(``in_shape``, ``num_classes``, the resolved options), so a study builds its net with::

    train, test = load_dataset("fashion_mnist", n_train=5000)
    info = dataset_info(train)                 # DatasetInfo(name, in_shape=(1, 28, 28), num_classes=10, ...)
    net = make_net("mlp", norm="bn", in_shape=info.in_shape, num_classes=info.num_classes)

| name            | source                                                       | inputs           |
|-----------------|--------------------------------------------------------------|------------------|
| ``mnist1d``     | generated offline by the ``mnist1d`` package (the default)   | ``(N, 40)``      |
| ``fashion_mnist``| IDX ``.gz`` files in a local directory                      | ``(N, 1, 28, 28)``|
| ``digits``      | scikit-learn's bundled ``load_digits``                       | ``(N, 1, 8, 8)`` |
| ``gaussian``    | synthetic Gaussian classes, generated from ``seed``          | ``(N, dim)``     |
| ``cifar10``     | the python pickle batches in a local directory               | ``(N, 3, 32, 32)``|

Nothing here touches the network, writes to the working directory, or changes a global RNG state.
The only file whybn writes is MNIST-1D's ``.npz`` cache (see :func:`cache_dir`); importing the
``mnist1d`` package imports matplotlib, which builds its font cache under ``~/.cache/matplotlib`` the
first time on a machine.

Subsets (``n_train``, ``n_test`` for the image datasets) are *seeded stratified* choices: within each
class the examples are put in a seeded random order, and the subset takes the first ``n`` of the
interleaving of these orders, so class counts differ by at most one (while classes last), and the
subset for ``n`` is contained in the subset for any larger ``n`` with the same ``seed``. The chosen
examples keep the file's order. Standardization uses the statistics of the (sub)set returned as
``train``, so that ``train`` has mean 0 and standard deviation 1 exactly (per channel for CIFAR-10),
except for MNIST-1D: the ``mnist1d`` package standardizes over all 5000 samples before its split (two
scalars from train and test together; train has mean −3.2e-4 and std 0.998), and whybn keeps the
package's dataset as it is, so that it equals ``make_dataset`` exactly.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
import pickle
import random
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from studies.lab.store import atomic_file

__all__ = [
    "DATASETS",
    "ClassificationDataset",
    "DatasetInfo",
    "cache_dir",
    "check_dataset_available",
    "clear_memory_cache",
    "dataset_info",
    "dataset_options",
    "load_dataset",
    "read_idx",
]

FASHION_MNIST_ENV = "WHYBN_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CIFAR10_ENV = "WHYBN_CIFAR10_DIR"
CIFAR10_SUBDIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CACHE_ENV = "WHYBN_CACHE_DIR"

_CACHE_FORMAT = 1  # bump when the cached arrays change meaning; old files are then simply not found
_memory_cache: dict[Any, Any] = {}
_memory_lock = threading.Lock()


# --------------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class DatasetInfo:
    """What a network builder and a run manifest need to know about a loaded split."""

    name: str  # registry name, e.g. "mnist1d"
    split: str  # "train" or "test"
    in_shape: tuple[int, ...]  # one example's shape: (40,), (1, 28, 28), ...
    num_classes: int  # labels are 0 .. num_classes - 1
    options: dict[str, Any] = field(default_factory=dict, hash=False)  # resolved options, JSON-friendly


class ClassificationDataset(TensorDataset):
    """A ``TensorDataset`` of ``(inputs float32, labels int64)`` that carries its :class:`DatasetInfo`."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
        if inputs.dtype != torch.float32 or labels.dtype != torch.int64:
            raise TypeError(f"expected float32 inputs and int64 labels, got {inputs.dtype}, {labels.dtype}")
        if tuple(inputs.shape[1:]) != info.in_shape:
            raise ValueError(f"inputs of shape {tuple(inputs.shape)} do not match in_shape {info.in_shape}")
        super().__init__(inputs, labels)
        self.info = info

    def __repr__(self) -> str:
        info = self.info
        return f"ClassificationDataset({info.name}/{info.split}, n={len(self)}, in_shape={info.in_shape})"


Splits = tuple[ClassificationDataset, ClassificationDataset]  # (train, test)


def dataset_info(dataset: TensorDataset) -> DatasetInfo:
    """The :class:`DatasetInfo` of a split returned by :func:`load_dataset`.

    A plain ``TensorDataset`` of ``(inputs, labels)`` works too: its ``in_shape`` is read from the
    inputs and ``num_classes`` is ``max(label) + 1`` (which undercounts if the top classes are absent).
    """
    info = getattr(dataset, "info", None)
    if isinstance(info, DatasetInfo):
        return info
    inputs, labels = dataset.tensors[0], dataset.tensors[1]
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    return DatasetInfo("unknown", "unknown", tuple(inputs.shape[1:]), num_classes)


def _make_splits(
    name: str,
    num_classes: int,
    options: dict[str, Any],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> Splits:
    in_shape = tuple(int(s) for s in x_train.shape[1:])
    splits = []
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        info = DatasetInfo(name, split, in_shape, num_classes, dict(options))
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        splits.append(ClassificationDataset(xt, yt, info))
    return splits[0], splits[1]


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded order of ``range(len(labels))`` in which every prefix is as class-balanced as possible.

    Each class is shuffled; then the ``r``-th example of every class comes before the ``r+1``-th of
    any class (classes in a seeded random order within a round).
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    class_rank = np.empty(len(labels), dtype=np.int64)  # rank of each example within its class
    for c in classes:
        idx = np.flatnonzero(labels == c)
        class_rank[idx[rng.permutation(len(idx))]] = np.arange(len(idx))
    tiebreak = rng.permutation(len(classes))[np.searchsorted(classes, labels)]
    return np.lexsort((tiebreak, class_rank))  # primary key: class_rank


def _stratified_subset(labels: np.ndarray, n: int | None, seed: int, what: str) -> np.ndarray:
    """Indices (ascending) of a seeded stratified subset of size ``n``; all indices when ``n`` is None."""
    if n is None:
        return np.arange(len(labels))
    _check_positive_int(what, n)
    if n > len(labels):
        raise ValueError(f"{what}={n} exceeds the {len(labels)} examples available")
    return np.sort(_stratified_order(labels, seed)[:n])


def _standardize(
    x_train: np.ndarray, x_test: np.ndarray, axis: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """``(x - mean) / std`` with the train statistics over ``axis`` (float64 statistics, float32 out)."""
    mean = x_train.mean(axis=axis, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axis, keepdims=True, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)  # a constant feature stays constant instead of becoming NaN
    scale = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return scale(x_train), scale(x_test)


def _memoized(key: Any, build: Callable[[], Any]) -> Any:
    """The in-process cache: ``build()`` once per ``key``. Cached values are never handed out as is."""
    with _memory_lock:
        if key in _memory_cache:
            return _memory_cache[key]
    value = build()
    with _memory_lock:
        _memory_cache[key] = value
    return value


def clear_memory_cache() -> None:
    """Forget every dataset built or read in this process (on-disk caches are kept)."""
    with _memory_lock:
        _memory_cache.clear()


def cache_dir() -> Path:
    """Where whybn caches generated data: ``$WHYBN_CACHE_DIR``, else ``$XDG_CACHE_HOME/whybn``, else
    ``~/.cache/whybn``. Not created until something is written."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "whybn"
    return Path.home() / ".cache" / "whybn"


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` so that readers see either no file or the whole file."""
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)


# --------------------------------------------------------------------------------------------------
# MNIST-1D


def _mnist1d_version() -> str:
    try:
        return metadata.version("mnist1d")
    except metadata.PackageNotFoundError:
        return "unknown"


def _mnist1d_args(num_samples: int, seed: int, shuffle_seq: bool) -> dict[str, Any]:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # only get_dataset (never called here) downloads
    args.update(num_samples=int(num_samples), seed=int(seed), shuffle_seq=bool(shuffle_seq))
    return args


def _build_mnist1d(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run the package's generator with the global ``random``/``numpy`` RNG states saved and restored
    (``make_dataset`` calls ``set_seed``, which reseeds both)."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def _read_mnist1d_cache(path: Path, seq_len: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is absent, unreadable or malformed."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.array(f[k]) for k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = (
        arrays["x"].dtype == np.float32
        and arrays["x_test"].dtype == np.float32
        and arrays["y"].dtype == np.int64
        and arrays["y_test"].dtype == np.int64
        and arrays["x"].ndim == arrays["x_test"].ndim == 2
        and arrays["x"].shape[1] == arrays["x_test"].shape[1] == seq_len
        and arrays["x"].shape[0] == arrays["y"].shape[0]
        and arrays["x_test"].shape[0] == arrays["y_test"].shape[0]
    )
    return arrays if ok else None


def _mnist1d_arrays(args: dict[str, Any], cache: bool) -> dict[str, np.ndarray]:
    if not cache:
        return _build_mnist1d(args)
    key_text = json.dumps(
        {"args": args, "mnist1d": _mnist1d_version(), "format": _CACHE_FORMAT}, sort_keys=True
    )
    digest = hashlib.sha256(key_text.encode()).hexdigest()[:16]

    def from_disk_or_build() -> dict[str, np.ndarray]:
        path = cache_dir() / f"mnist1d-{digest}.npz"
        arrays = _read_mnist1d_cache(path, args["final_seq_length"])
        if arrays is None:  # absent or corrupt: (re)build and (re)write
            arrays = _build_mnist1d(args)
            try:
                _atomic_savez(path, arrays)
            except OSError as err:  # a read-only cache only costs time
                warnings.warn(f"could not write the MNIST-1D cache {path}: {err}", stacklevel=4)
        return arrays

    return _memoized(("mnist1d", str(cache_dir()), digest), from_disk_or_build)


def load_mnist1d(
    *, num_samples: int = 5000, seed: int = 42, shuffle_seq: bool = False, cache: bool = True
) -> Splits:
    """MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024;
    github.com/greydanus/mnist1d): ten 1-D digit templates, padded, sheared, translated and noised into
    length-40 signals. Built offline by ``mnist1d.data.make_dataset`` with the package's default
    arguments (``get_dataset_args``) except the options below; ``get_dataset`` (download + pickle in
    the working directory) is never called.

    Options: ``num_samples`` (5000; ``num_samples // 10`` per class, split 80/20 into train/test, so
    4000/1000), ``seed`` (42, the package's), ``shuffle_seq`` (False; True permutes the 40 positions,
    the paper's spatial-bias control), ``cache`` (True: keep the result in this process and in
    ``cache_dir()/mnist1d-<hash>.npz``, keyed by the generation arguments and the package version;
    a corrupt file is rebuilt).

    Inputs are ``(N, 40)`` float32, standardized by the package (over all samples before the split).
    """
    _check_positive_int("num_samples", num_samples)
    if num_samples < 10:
        raise ValueError(f"num_samples must be at least 10 (one per class), got {num_samples}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        # int(1.5) generated seed 1's data while the options recorded 1.5
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(shuffle_seq, bool | np.bool_):  # bool("no") is True: it permuted the positions
        raise ValueError(f"shuffle_seq must be True or False, got {shuffle_seq!r}")
    args = _mnist1d_args(num_samples, seed, shuffle_seq)
    arrays = _mnist1d_arrays(args, cache)
    options = {"num_samples": num_samples, "seed": seed, "shuffle_seq": shuffle_seq}
    x, y, x_test, y_test = (arrays[k].copy() for k in ("x", "y", "x_test", "y_test"))  # never alias the cache
    return _make_splits("mnist1d", 10, options, x, y, x_test, y_test)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4")}
_IDX_DTYPES |= {0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format; gzip-compressed when the name ends in ``.gz``).

    Header: two zero bytes, a type byte (0x08 = uint8, ...), a byte giving the number of dimensions,
    then one big-endian uint32 per dimension; the data follow in C order. Raises ValueError naming
    the file on a wrong magic number, an unexpected ``ndim``, or a truncated/overlong body.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: not a readable gzip file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        magic = raw[:4].hex() if len(raw) >= 4 else repr(raw)
        raise ValueError(f"{path}: not an IDX file (magic number {magic})")
    dims_n = raw[3]
    if ndim is not None and dims_n != ndim:
        raise ValueError(
            f"{path}: expected an IDX file of {ndim} dimension(s), its magic number says {dims_n}"
        )
    header = 4 + 4 * dims_n
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=dims_n, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: truncated or corrupt IDX file "
            f"({len(raw) - header} data bytes, shape {shape} needs {expected})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_mnist_missing(root: Path, missing: list[str], source: str) -> FileNotFoundError:
    names = "\n".join(f"    {n}" for n in FASHION_MNIST_FILES.values())
    return FileNotFoundError(
        f"Fashion-MNIST not found in {root} ({source}); missing: {', '.join(missing)}.\n"
        f"Get it with one of:\n"
        f"  * sudo apt-get install dataset-fashion-mnist   (installs into {FASHION_MNIST_DEFAULT_DIR})\n"
        f"  * put the four IDX files\n{names}\n"
        f"    (from https://github.com/zalandoresearch/fashion-mnist) in a directory DIR and set\n"
        f"    {FASHION_MNIST_ENV}=DIR, or pass load_dataset('fashion_mnist', root=DIR)\n"
        f"    (in a study: --set data_root=DIR)."
    )


def _resolve_root(
    root: str | os.PathLike[str] | None, env: str, default: Path | None
) -> tuple[Path | None, str]:
    """``root`` option > environment variable > default; returns the directory and where it came from."""
    if root is not None:
        return Path(root).expanduser(), "option root"
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser(), f"${env}"
    return default, "default directory"


def _fashion_mnist_file(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_paths(root: str | os.PathLike[str] | None) -> dict[str, Path]:
    """The four IDX files (``FASHION_MNIST_FILES`` keys → paths) under ``root`` > ``$WHYBN_FASHION_MNIST_DIR``
    > the default directory; ``FileNotFoundError`` naming the directory and the missing files."""
    directory, source = _resolve_root(root, FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT_DIR)
    assert directory is not None
    files = {k: _fashion_mnist_file(directory, n) for k, n in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] for k, p in files.items() if p is None]
    if missing:
        raise _fashion_mnist_missing(directory, missing, source)
    return {k: p for k, p in files.items() if p is not None}


def _file_key(paths: list[Path]) -> tuple[Any, ...]:
    """Identity of files on disk for the in-process cache: path, size and modification time."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _check_file_contents(path: Path, values: np.ndarray, image_shape: tuple[int, ...] | None) -> None:
    """A data file holds what its dataset promises: uint8 images of ``image_shape`` (pixels 0..255), or
    labels 0..9 (``image_shape=None``); ``ValueError`` naming the file otherwise (a damaged or foreign
    file used to load, with a label of 200 or 8×8 images, and fail far away or not at all)."""
    if values.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 values, got {values.dtype}")
    if image_shape is not None and values.shape[1:] != image_shape:
        raise ValueError(f"{path}: expected images of {image_shape}, got {values.shape[1:]}")
    if image_shape is None and values.size and values.max() > 9:
        raise ValueError(f"{path}: labels must be 0..9, found {int(values.max())}")


def load_fashion_mnist(
    *,
    root: str | os.PathLike[str] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    standardize: bool = True,
) -> Splits:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747): 70 000 28×28 grey images of
    clothing in 10 classes, 60 000 train / 10 000 test.

    Read from the four IDX ``.gz`` files in ``root`` > ``$WHYBN_FASHION_MNIST_DIR`` >
    ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``); uncompressed
    files of the same names without ``.gz`` are accepted too.

    Options: ``n_train``, ``n_test`` (None: all) take seeded stratified subsets (module docstring)
    with ``seed`` (0); ``standardize`` (True) maps pixels to [0, 1] and then standardizes with the
    mean and std of the returned train set (a single scalar pair); False leaves them in [0, 1].
    Inputs are ``(N, 1, 28, 28)`` float32.
    """
    paths = _fashion_mnist_paths(root)

    def read() -> dict[str, np.ndarray]:
        raw = {k: read_idx(p, ndim=3 if k.endswith("images") else 1) for k, p in paths.items()}
        for split in ("train", "test"):
            images, labels = raw[f"{split}_images"], raw[f"{split}_labels"]
            if len(images) != len(labels):
                raise ValueError(
                    f"{paths[f'{split}_images']} has {len(images)} images but "
                    f"{paths[f'{split}_labels']} has {len(labels)} labels"
                )
            _check_file_contents(paths[f"{split}_images"], images, (28, 28))
            _check_file_contents(paths[f"{split}_labels"], labels, None)
        return raw

    raw = _memoized(("fashion_mnist", _file_key(list(paths.values()))), read)
    train_idx = _stratified_subset(raw["train_labels"], n_train, seed, "n_train")
    test_idx = _stratified_subset(raw["test_labels"], n_test, seed, "n_test")
    x_train = raw["train_images"][train_idx, None].astype(np.float32) / 255.0  # (N, 1, 28, 28)
    x_test = raw["test_images"][test_idx, None].astype(np.float32) / 255.0
    if standardize:
        x_train, x_test = _standardize(x_train, x_test, axis=(0, 1, 2, 3))
    options = {
        "root": str(paths["train_images"].parent),  # the directory the files were found in
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "standardize": standardize,
    }
    y_train, y_test = raw["train_labels"][train_idx], raw["test_labels"][test_idx]
    return _make_splits("fashion_mnist", 10, options, x_train, y_train, x_test, y_test)


# --------------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(*, test_fraction: float = 0.2, seed: int = 0, standardize: bool = True) -> Splits:
    """The UCI optical handwritten digits (Alpaydin & Kaynak 1998; scikit-learn's bundled
    ``sklearn.datasets.load_digits``): 1797 8×8 images with 17 grey levels, 10 classes.

    Options: ``test_fraction`` (0.2) of each class goes to the test set, chosen by ``seed`` (0) — a
    seeded stratified split; ``standardize`` (True) scales to [0, 1] and standardizes with the train
    mean and std. Inputs are ``(N, 1, 8, 8)`` float32.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")

    def read() -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)

    images, labels = _memoized(("digits",), read)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test_c = max(1, round(test_fraction * len(idx)))
        if n_test_c >= len(idx):
            raise ValueError(
                f"test_fraction={test_fraction!r} leaves class {c} ({len(idx)} images) no training example"
            )
        test_mask[rng.choice(idx, size=n_test_c, replace=False)] = True
    x_train, x_test = images[~test_mask, None], images[test_mask, None]  # (N, 1, 8, 8)
    if standardize:
        x_train, x_test = _standardize(x_train, x_test, axis=(0, 1, 2, 3))
    options = {"test_fraction": test_fraction, "seed": seed, "standardize": standardize}
    return _make_splits("digits", 10, options, x_train, labels[~test_mask], x_test, labels[test_mask])


# --------------------------------------------------------------------------------------------------
# Synthetic Gaussian classes


def load_gaussian(
    *,
    n_train: int = 4000,
    n_test: int = 1000,
    dim: int = 40,
    num_classes: int = 10,
    class_sep: float = 0.3,
    noise: float = 1.0,
    seed: int = 0,
) -> Splits:
    """Synthetic Gaussian classes, the kind of data of the deep-linear-network experiments of
    Santurkar et al., "How Does Batch Normalization Help Optimization?" (NeurIPS 2018).

    Class means ``mu_k = class_sep * z_k`` with ``z_k ~ N(0, I_dim)``; an example of class ``y`` is
    ``x = mu_y + noise * e`` with ``e ~ N(0, I_dim)``. Labels are balanced (``i % num_classes``, then
    shuffled). Train and test share the means and draw independent noise. The defaults give the
    shape of MNIST-1D (40 features, 10 classes, 4000/1000) with class means about
    ``class_sep * sqrt(2 * dim) ≈ 2.7`` noise standard deviations apart: the nearest-class-mean
    classifier (about Bayes-optimal here) scores ≈ 0.6 test accuracy, so a linear net neither fails
    nor is perfect. (The paper's appendix does not pin these numbers; they are ours.)

    Every random number comes from ``numpy.random.default_rng`` streams spawned from ``seed`` (means,
    train, test), so ``n_test`` does not change the train set and no global RNG is touched.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test), ("dim", dim)):
        _check_positive_int(name, value)
    _check_positive_int("num_classes", num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if class_sep < 0 or noise < 0:
        raise ValueError(f"class_sep and noise must be non-negative, got {class_sep!r}, {noise!r}")
    means_rng, train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    means = class_sep * means_rng.standard_normal((num_classes, dim))  # (K, dim)

    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes)
        x = means[y] + noise * rng.standard_normal((n, dim))  # (n, dim)
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = sample(train_rng, n_train)
    x_test, y_test = sample(test_rng, n_test)
    options = {
        "n_train": n_train,
        "n_test": n_test,
        "dim": dim,
        "num_classes": num_classes,
        "class_sep": class_sep,
        "noise": noise,
        "seed": seed,
    }
    return _make_splits("gaussian", num_classes, options, x_train, y_train, x_test, y_test)


# --------------------------------------------------------------------------------------------------
# CIFAR-10


def _cifar10_missing(directory: Path | None, source: str, detail: str) -> FileNotFoundError:
    where = f"{directory} ({source})" if directory else f"nowhere (no root option, no ${CIFAR10_ENV})"
    return FileNotFoundError(
        f"CIFAR-10 not found: looked {where}; {detail}.\n"
        f"Get it: download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html,\n"
        f"extract it (tar xzf cifar-10-python.tar.gz, giving {CIFAR10_SUBDIR}/ with data_batch_1..5 and\n"
        f"test_batch), then set {CIFAR10_ENV}=DIR or pass load_dataset('cifar10', root=DIR)\n"
        f"(in a study: --set data_root=DIR), DIR being {CIFAR10_SUBDIR}/ or the directory containing it."
    )


def _cifar10_dir(directory: Path) -> Path | None:
    for candidate in (directory, directory / CIFAR10_SUBDIR):
        if all((candidate / b).is_file() for b in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)):
            return candidate
    return None


def _cifar10_batches_dir(root: str | os.PathLike[str] | None) -> Path:
    """The directory holding the CIFAR-10 batches (``root`` > ``$WHYBN_CIFAR10_DIR``, or its
    ``cifar-10-batches-py/``); ``FileNotFoundError`` saying where it looked and how to get the data."""
    directory, source = _resolve_root(root, CIFAR10_ENV, None)
    if directory is None:
        raise _cifar10_missing(None, source, "no directory given")
    batches_dir = _cifar10_dir(directory)
    if batches_dir is None:
        raise _cifar10_missing(
            directory, source, f"neither it nor {CIFAR10_SUBDIR}/ in it holds data_batch_1..5 and test_batch"
        )
    return batches_dir


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch: a dict with ``b'data'`` (n, 3072) uint8 (channel-major 32×32 planes) and
    ``b'labels'`` (n ints). The files are pickles: load only the ones from the official archive."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch.get(b"data", batch.get("data")))
        labels = np.asarray(batch.get(b"labels", batch.get("labels")))
        if labels.size and not np.issubdtype(labels.dtype, np.integer):  # 1.7 was cast to class 1
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: expected data (n, 3072) and n labels, got {data.shape} and {labels.shape}")
    if data.dtype != np.uint8 and (
        not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255))
    ):
        raise ValueError(
            f"{path}: pixels must be integers 0..255, got {data.dtype} in [{data.min()}, {data.max()}]"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be 0..9, found {int(labels.min())}..{int(labels.max())}")
    data = data.astype(np.uint8)
    return data.reshape(-1, 3, 32, 32), labels  # (n, C, H, W)


def load_cifar10(
    *,
    root: str | os.PathLike[str] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    standardize: bool = True,
) -> Splits:
    """CIFAR-10 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images";
    https://www.cs.toronto.edu/~kriz/cifar.html): 60 000 32×32 colour images in 10 classes,
    50 000 train (``data_batch_1..5``) / 10 000 test (``test_batch``).

    Read from the python pickle batches in ``root`` > ``$WHYBN_CIFAR10_DIR`` (no default; nothing is
    downloaded), either the extracted ``cifar-10-batches-py`` directory or its parent.

    Options: ``n_train``, ``n_test`` (None: all) take seeded stratified subsets with ``seed`` (0);
    ``standardize`` (True) scales to [0, 1] and standardizes each channel with the returned train
    set's mean and std. Inputs are ``(N, 3, 32, 32)`` float32.
    """
    batches_dir = _cifar10_batches_dir(root)
    train_paths = [batches_dir / b for b in CIFAR10_TRAIN_BATCHES]
    test_path = batches_dir / CIFAR10_TEST_BATCH

    def read() -> dict[str, np.ndarray]:
        train = [_read_cifar10_batch(p) for p in train_paths]
        x_test, y_test = _read_cifar10_batch(test_path)
        return {
            "x": np.concatenate([x for x, _ in train]),
            "y": np.concatenate([y for _, y in train]),
            "x_test": x_test,
            "y_test": y_test,
        }

    raw = _memoized(("cifar10", _file_key([*train_paths, test_path])), read)
    train_idx = _stratified_subset(raw["y"], n_train, seed, "n_train")
    test_idx = _stratified_subset(raw["y_test"], n_test, seed, "n_test")
    x_train = raw["x"][train_idx].astype(np.float32) / 255.0
    x_test = raw["x_test"][test_idx].astype(np.float32) / 255.0
    if standardize:
        x_train, x_test = _standardize(x_train, x_test, axis=(0, 2, 3))  # per channel
    options = {
        "root": str(batches_dir),
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "standardize": standardize,
    }
    return _make_splits("cifar10", 10, options, x_train, raw["y"][train_idx], x_test, raw["y_test"][test_idx])


# --------------------------------------------------------------------------------------------------
# Registry

DATASETS: dict[str, Callable[..., Splits]] = {
    "mnist1d": load_mnist1d,
    "fashion_mnist": load_fashion_mnist,
    "digits": load_digits,
    "gaussian": load_gaussian,
    "cifar10": load_cifar10,
}


def dataset_options(name: str) -> dict[str, Any]:
    """The options of dataset ``name`` with their defaults."""
    loader = _loader(name)
    return {p.name: p.default for p in inspect.signature(loader).parameters.values()}


def _loader(name: str) -> Callable[..., Splits]:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


#: The datasets read from local files, and how their files are found (without reading them): the
#: function each loader calls first, so a check and a load cannot disagree.
_FILE_CHECKS: dict[str, Callable[..., Any]] = {
    "fashion_mnist": lambda root=None: _fashion_mnist_paths(root),
    "cifar10": lambda root=None: _cifar10_batches_dir(root),
}


def check_dataset_available(name: str, **options: Any) -> None:
    """Raise the ``FileNotFoundError`` that ``load_dataset(name, **options)`` would raise for missing
    files, without reading any file: the same directory resolution (option ``root`` >
    ``$WHYBN_FASHION_MNIST_DIR`` / ``$WHYBN_CIFAR10_DIR`` > default) and the same message.

    Datasets that are generated or bundled (``mnist1d``, ``digits``, ``gaussian``) are always available.
    Only ``root`` is read from ``options``; the others do not decide whether the files are there. An
    unknown ``name`` raises ``KeyError`` listing the known datasets, as :func:`load_dataset` does.

    >>> check_dataset_available("mnist1d")  # generated: always there
    >>> check_dataset_available("cifar10", root="/nonexistent")  # doctest: +SKIP
    FileNotFoundError: CIFAR-10 not found: looked /nonexistent (option root); neither it nor ...
    """
    _loader(name)
    check = _FILE_CHECKS.get(name)
    if check is not None:
        check(options.get("root"))


def run_data_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`load_dataset` options of a study's run config: ``data_root`` (as ``root``), ``n_train``
    and ``n_test``, for those the dataset ``config["dataset"]`` takes and the config sets (not None).

    >>> run_data_options({"dataset": "fashion_mnist", "data_root": "/d", "n_train": 100, "n_test": None})
    {'root': '/d', 'n_train': 100}
    >>> run_data_options({"dataset": "mnist1d", "n_train": 100})
    {}
    """
    accepted = dataset_options(config["dataset"])
    given = {"root": config.get("data_root"), **{k: config.get(k) for k in ("n_train", "n_test")}}
    return {k: v for k, v in given.items() if k in accepted and v is not None}


def load_dataset(name: str = "mnist1d", **options: Any) -> Splits:
    """The ``(train, test)`` splits of dataset ``name`` as ``TensorDataset``s of (float32 inputs,
    int64 labels), each carrying a :class:`DatasetInfo` (see :func:`dataset_info`).

    ``name`` is one of ``DATASETS`` (an unknown name raises KeyError listing them); ``options`` are the
    keyword options of that dataset's loader (``load_mnist1d``, ...; :func:`dataset_options` lists
    them with defaults) — an unknown option raises TypeError naming it and the valid ones.
    """
    loader = _loader(name)
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"dataset {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"options: {', '.join(f'{k}={v!r}' for k, v in valid.items())}"
        )
    return loader(**options)
