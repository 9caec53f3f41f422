"""Vision tasks: MNIST-1D (generated locally) and Fashion-MNIST (IDX files of a Debian package).

**MNIST-1D** (Greydanus 2020; PyPI ``mnist1d`` 0.0.2.post1, Apache-2.0, a 52 kB pure-Python
generator): ten 1-D digit templates are padded, sheared, translated and given correlated and iid
noise, then resampled to 40 points, so every example is a float signal of length 40 with a label
in ``0..9``. The data are *generated here*, never downloaded: only ``mnist1d.data.make_dataset`` is
called (``mnist1d.data.get_dataset`` would try to download a pickle first). Traps handled here:

* ``make_dataset`` reseeds the *global* ``numpy.random`` and ``random`` generators; their states are
  saved and restored around the call, so building a task does not change anyone's random stream;
* importing ``mnist1d`` pulls in scipy, matplotlib and requests (about 1 s): it is imported lazily,
  on the first load, and generation (about 0.8 s for 5 000 signals) is cached per
  ``(seed, num_samples)`` in-process (:func:`functools.lru_cache`);
* the generator standardizes the whole set (train and test together) and splits 80 / 20 in its own
  shuffled order; classes are near-balanced (about 400 +- 10 per class in the 4 000 training rows).

The generator seed is ``42 + data_seed`` (``data_seed = 0`` gives the generator's default seed).
Sizes (train / val / test rows): ``"quick"`` and ``"full"`` use the standard MNIST-1D set of
5 000 signals, i.e. the standard 4 000 training + 1 000 test rows, with 10 % of the training rows
held out, stratified (:func:`~flatminima.bench.tasks.digits.stratified_split`, seeded by
``data_seed``), as the validation split: about 3 600 / 400 / 1 000 (10 % of each class, rounded
per class, e.g. 3 601 / 399 for ``data_seed = 0``; ``"full"`` differs only in epochs); ``"tiny"``
generates 500 signals: about 360 / 40 / 100.

**Fashion-MNIST** (Xiao, Rasul & Vollgraf 2017; Zalando SE, MIT/Expat licence): 60 000 training +
10 000 test grey images of 28 x 28 pixels, 10 balanced clothing classes (6 000 / 1 000 per class),
read from the four original gzip'ed IDX files that the Debian / Ubuntu package
``dataset-fashion-mnist`` (about 30 MB) installs under ``/usr/share/datasets/fashion-mnist``. The
folder is found with ``dpkg -L dataset-fashion-mnist`` (standard path as fallback); a folder of
one's own is given by ``data_dir=``, the module variable :data:`FASHION_MNIST_DIR` or the environment
variable ``FLATMINIMA_FASHION_MNIST_DIR``. :func:`read_idx` is a self-contained IDX reader (gzip or
raw, big-endian header, magic number and size checked). Pixels are scaled to ``[0, 1]`` and
standardized with the mean and standard deviation of the 60 000 training images
(:data:`FASHION_MEAN`, :data:`FASHION_STD`); ``x`` has shape ``(n, 1, 28, 28)``. Sizes (train / val
/ test rows, all subsets stratified and seeded by ``data_seed``): ``"quick"`` a 5 000-image
training subset split 4 500 / 500, tested on a stratified 2 000-image subset of the official test
images (sized so that the quick suite fits its 10 minutes on 2 cores; its numbers are a smoke-level
comparison, not the literature's); ``"full"`` all 60 000 training images split 55 000 / 5 000,
and the official 10 000 test images; ``"tiny"`` 400 / 100 / 200.

Tasks (default hparams are SGD lr / AdamW lr / weight decay / batch / quick, full epochs; measured
with SGD momentum 0.9, no schedule, on 2 CPU cores, torch 2.13, quick size, seeds 0-2, timing
noise on that machine about +-30 %):

* ``mnist1d-mlp``: MLP 40-100-100-10 (15 210 parameters); 0.05 / 1e-3 / 5e-4 / 100 / 30, 150;
  about 0.01 s per epoch; test 63.3 +- 1.3 % after 50 epochs (train 92 %): a large gap;
* ``mnist1d-cnn``: 1-D CNN with GroupNorm (:func:`make_mnist1d_cnn`, 6 922 parameters);
  0.02 / 3e-3 / 5e-4 / 100 / 15, 100; 0.07-0.10 s per epoch; test 96.7 +- 0.9 % after 30 epochs;
* ``fashion-mnist-cnn``: CNN conv 16 / 32 + fc 64 (:func:`make_fashion_cnn`, 105 866 parameters);
  0.05 / 1e-3 / 5e-4 / 64 / 3, 20; 0.7-0.9 s per epoch of 9 000 images (4.7 s per full epoch of
  55 000 images), 0.7-1.0 s per evaluation of the 10 000 test images; test 87.5 +- 0.1 % after 10
  epochs on 9 000 images (train 95 %).

Every task records the rows it uses: ``train_index`` and ``val_index`` index the source's training
rows (MNIST-1D: the generator's 80 %; Fashion-MNIST: the official 60 000), ``test_index`` its test
rows; train and validation rows are disjoint.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import random
import struct
import subprocess
import zlib
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from .base import ClassificationTask, TaskHParams, TaskUnavailable, register_task
from .digits import make_mlp, stratified_split

__all__ = [
    "FASHION_MEAN",
    "FASHION_MNIST_DIR",
    "FASHION_STD",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "FashionMNISTTask",
    "GlobalMaxPool1d",
    "MNIST1DCNNTask",
    "MNIST1DMLPTask",
    "fashion_mnist_availability",
    "fashion_mnist_dir",
    "load_fashion_mnist",
    "load_mnist1d",
    "make_fashion_cnn",
    "make_mnist1d_cnn",
    "mnist1d_availability",
    "parse_idx",
    "read_idx",
]

NUM_CLASSES = 10

# ----------------------------------------------------------------------------------------------
# MNIST-1D
# ----------------------------------------------------------------------------------------------

MNIST1D_PIP = "pip install mnist1d==0.0.2.post1"
#: The generator's default seed; ``data_seed`` is added to it.
MNIST1D_BASE_SEED = 42
#: Length of every MNIST-1D signal.
MNIST1D_LENGTH = 40
#: Signals generated per size (the generator keeps 80 % for training, 20 % for testing).
MNIST1D_SAMPLES = {"tiny": 500, "quick": 5000, "full": 5000}
#: Share of the generator's training rows held out as the validation split.
MNIST1D_VAL_FRACTION = 0.1


def mnist1d_availability() -> str | None:
    """``None`` when the ``mnist1d`` package can be imported, else how to install it (one line)."""
    try:
        found = importlib.util.find_spec("mnist1d") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"MNIST-1D needs the mnist1d generator package: {MNIST1D_PIP}"


@lru_cache(maxsize=8)
def _generate_mnist1d(seed: int, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # installed but broken (e.g. a dependency missing)
        raise TaskUnavailable(f"mnist1d cannot be imported ({exc}): {MNIST1D_PIP}") from exc

    args = get_dataset_args()  # an ObjectView of the standard settings (length 40, 80/20 split)
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)  # offline; reseeds the global numpy / random generators
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (
        np.ascontiguousarray(data["x"], dtype=np.float32),
        np.ascontiguousarray(data["y"], dtype=np.int64),
        np.ascontiguousarray(data["x_test"], dtype=np.float32),
        np.ascontiguousarray(data["y_test"], dtype=np.int64),
    )
    for a in arrays:
        a.setflags(write=False)
    return arrays


def load_mnist1d(data_seed: int = 0, num_samples: int = 5000) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Generate MNIST-1D offline with seed ``42 + data_seed``: ``x_train, y_train, x_test, y_test``
    (float32 ``(n, 40)``, int64 labels; 80 % / 20 % of ``num_samples``). Fresh tensors each call;
    the generation itself is cached in-process. :class:`TaskUnavailable` without ``mnist1d``."""
    message = mnist1d_availability()
    if message is not None:
        raise TaskUnavailable(message)
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10 (one per class), got {num_samples}")
    arrays = _generate_mnist1d(MNIST1D_BASE_SEED + int(data_seed), int(num_samples))
    x_tr, y_tr, x_te, y_te = (torch.from_numpy(a.copy()) for a in arrays)
    return x_tr, y_tr, x_te, y_te


class GlobalMaxPool1d(nn.Module):
    """The maximum over the last (position) dimension: ``(n, c, length) -> (n, c)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(dim=-1)


def make_mnist1d_cnn(channels: int = 32, num_classes: int = NUM_CLASSES, groups: int = 4) -> nn.Sequential:
    """A small 1-D CNN for signals of length 40 (input ``(n, 40)``): three blocks ``Conv1d -> GroupNorm
    (groups) -> ReLU`` with ``channels`` channels (kernel 5, then 3, padded), a ``MaxPool1d(2)`` after
    the first two (40, 20, 10 points), a global max over positions and ``Linear(channels -> 10)``.
    6 922 parameters with the defaults.

    GroupNorm normalizes each sample on its own, so per-sample losses do not depend on the rest of
    the batch (unlike batch norm); it also tames the sudden loss spikes that the same network without
    normalization shows under constant-lr SGD with momentum (6 seeds, 30 epochs, lr 0.02: test
    accuracy 97.3 +- 0.9 % with it, 90 +- 13 % without)."""
    c = channels

    def block(c_in: int, kernel: int) -> list[nn.Module]:
        return [nn.Conv1d(c_in, c, kernel, padding=kernel // 2), nn.GroupNorm(groups, c), nn.ReLU()]

    return nn.Sequential(
        nn.Unflatten(1, (1, MNIST1D_LENGTH)),
        *block(1, 5),
        nn.MaxPool1d(2),
        *block(c, 3),
        nn.MaxPool1d(2),
        *block(c, 3),
        GlobalMaxPool1d(),
        nn.Linear(c, num_classes),
    )


class _MNIST1DTask(ClassificationTask):
    """MNIST-1D data (see the module docstring for sizes); subclasses choose the model."""

    domain = "vision"
    train_index: Tensor  #: rows of the generator's training split used for training (sorted)
    val_index: Tensor  #: rows of the generator's training split held out for validation
    test_index: Tensor  #: rows of the generator's test split (all of them)

    @classmethod
    def availability(cls) -> str | None:
        return mnist1d_availability()

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        x_tr, y_tr, x_te, y_te = load_mnist1d(self.data_seed, MNIST1D_SAMPLES[self.size])
        frac = MNIST1D_VAL_FRACTION
        train_i, val_i = stratified_split(y_tr, (1.0 - frac, frac), seed=self.data_seed)
        self.train_index, self.val_index = train_i, val_i
        self.test_index = torch.arange(y_te.numel())
        return x_tr[train_i], y_tr[train_i], x_tr[val_i], y_tr[val_i], x_te, y_te


@register_task
class MNIST1DMLPTask(_MNIST1DTask):
    """MNIST-1D with the 40-100-100-10 ReLU MLP (15 210 parameters): a task with a large
    generalization gap (the MLP fits the training set, tests at about 60-65 %)."""

    name = "mnist1d-mlp"
    hparams = TaskHParams(
        lr=0.05, lr_adam=1e-3, weight_decay=5e-4, batch_size=100, epochs_quick=30, epochs_full=150
    )

    def make_model(self) -> nn.Module:
        return make_mlp(MNIST1D_LENGTH, NUM_CLASSES, hidden=(100, 100))


@register_task
class MNIST1DCNNTask(_MNIST1DTask):
    """MNIST-1D with a small 1-D CNN (:func:`make_mnist1d_cnn`): translation equivariance makes it
    far better than the MLP on the same data."""

    name = "mnist1d-cnn"
    hparams = TaskHParams(
        lr=0.02, lr_adam=3e-3, weight_decay=5e-4, batch_size=100, epochs_quick=15, epochs_full=100
    )

    def make_model(self) -> nn.Module:
        return make_mnist1d_cnn()


# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------

#: IDX type codes (third byte of the magic number) and their big-endian element types.
_IDX_TYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
#: Magic numbers of the MNIST-style files: unsigned bytes with 3 (images) or 1 (labels) dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode the bytes of one (uncompressed) IDX file into a read-only array of native byte order.

    Layout: a 4-byte magic number ``0x00 0x00 TT NN`` (type code ``TT``: 08 uint8, 09 int8, 0B
    int16, 0C int32, 0D float32, 0E float64; ``NN`` dimensions), ``NN`` big-endian uint32 sizes,
    then the elements in row-major order, big-endian. ``ValueError`` (naming ``name``) on a bad
    magic number, a truncated header or body, or trailing bytes.
    """
    if len(data) < 4:
        raise ValueError(f"{name}: not an IDX file ({len(data)} bytes, shorter than the magic number)")
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or code not in _IDX_TYPES or ndim == 0:
        raise ValueError(
            f"{name}: bad IDX magic number 0x{magic:08x} (expected 0x0000TTNN with type code TT in "
            f"08, 09, 0b, 0c, 0d, 0e and NN >= 1 dimensions); not an IDX file or a damaged one"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{name}: truncated IDX header ({len(data)} bytes, {header} needed for {ndim} dimensions)"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    count = math.prod(shape)
    needed, found = count * dtype.itemsize, len(data) - header
    if found < needed:
        raise ValueError(
            f"{name}: truncated IDX file: shape {tuple(shape)} of {dtype.name} needs {needed} data "
            f"bytes, found {found}"
        )
    if found > needed:
        raise ValueError(
            f"{name}: {found - needed} trailing bytes after the data of shape {tuple(shape)}; "
            f"damaged IDX file"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("="))
    array.setflags(write=False)
    return array


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file, gzip-compressed (recognized by its content, not its name) or raw, with
    :func:`parse_idx`; with ``expected_magic`` (e.g. :data:`IDX_IMAGES_MAGIC`) the magic number must
    match too. ``ValueError`` on damaged files, ``OSError`` when the file cannot be read."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise ValueError(f"{path}: damaged or truncated gzip file ({exc})") from exc
    if expected_magic is not None and len(raw) >= 4:
        magic = int.from_bytes(raw[:4], "big")
        if magic != expected_magic:
            raise ValueError(
                f"{path}: IDX magic number 0x{magic:08x} ({magic}), expected 0x{expected_magic:08x} "
                f"({expected_magic}); wrong or damaged file"
            )
    return parse_idx(raw, str(path))


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------

FASHION_DEBIAN_PACKAGE = "dataset-fashion-mnist"
#: Where the Debian package puts the files (used when ``dpkg`` cannot tell).
FASHION_STANDARD_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable naming a folder holding the four IDX files.
FASHION_ENV = "FLATMINIMA_FASHION_MNIST_DIR"
#: Module-level override of the data folder (tests, other installs); ``data_dir=`` takes precedence.
FASHION_MNIST_DIR: str | os.PathLike[str] | None = None
#: Mean and standard deviation of the 60 000 training images' pixels scaled to [0, 1].
FASHION_MEAN = 0.28604
FASHION_STD = 0.35302
_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
#: (train, val, test) rows per size; ``None`` is "all the rest" / "the whole official test set".
FASHION_SIZES: dict[str, tuple[int | None, int, int | None]] = {
    "tiny": (400, 100, 200),
    "quick": (4500, 500, 2000),
    "full": (None, 5000, None),
}


@lru_cache(maxsize=1)
def _dpkg_fashion_dir() -> Path | None:
    try:
        out = subprocess.run(
            ["dpkg", "-L", FASHION_DEBIAN_PACKAGE], capture_output=True, text=True, timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.endswith("/" + _FASHION_FILES["x_train"] + ".gz"):
            return Path(line).parent
    return None


def fashion_mnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder to read Fashion-MNIST from: ``data_dir`` if given, else :data:`FASHION_MNIST_DIR`,
    else ``$FLATMINIMA_FASHION_MNIST_DIR``, else where ``dpkg -L dataset-fashion-mnist`` puts the
    files, else :data:`FASHION_STANDARD_DIR`."""
    for candidate in (data_dir, FASHION_MNIST_DIR, os.environ.get(FASHION_ENV) or None):
        if candidate is not None:
            return Path(candidate)
    found = _dpkg_fashion_dir()
    return found if found is not None else FASHION_STANDARD_DIR


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    files = {}
    for key, stem in _FASHION_FILES.items():
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                files[key] = folder / name
                break
        else:
            return None
    return files


def fashion_mnist_availability(data_dir: str | os.PathLike[str] | None = None) -> str | None:
    """``None`` when the four Fashion-MNIST IDX files are in :func:`fashion_mnist_dir`, else one
    line saying how to get them."""
    folder = fashion_mnist_dir(data_dir)
    if _fashion_files(folder) is not None:
        return None
    return (
        f"Fashion-MNIST IDX files not found in {folder}: apt-get install {FASHION_DEBIAN_PACKAGE} "
        f"(Debian/Ubuntu), or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a folder named by {FASHION_ENV}"
    )


def _read_fashion(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    files = _fashion_files(folder)
    if files is None:
        raise TaskUnavailable(fashion_mnist_availability(folder))
    # the cache key names the files with their size and modification time: a changed file is reread
    stamps = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files.values())
    return _read_fashion_files(folder, stamps)


@lru_cache(maxsize=2)
def _read_fashion_files(
    folder: Path, stamps: tuple[tuple[str, int, int], ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    files = dict(zip(_FASHION_FILES, (Path(name) for name, _, _ in stamps)))
    x_tr = read_idx(files["x_train"], IDX_IMAGES_MAGIC)
    y_tr = read_idx(files["y_train"], IDX_LABELS_MAGIC)
    x_te = read_idx(files["x_test"], IDX_IMAGES_MAGIC)
    y_te = read_idx(files["y_test"], IDX_LABELS_MAGIC)
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if x.shape[1:] != (28, 28) or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{folder}: Fashion-MNIST {split} files disagree: images {x.shape}, labels {y.shape} "
                f"(expected (n, 28, 28) and (n,))"
            )
        if y.size and int(y.max()) >= NUM_CLASSES:
            raise ValueError(f"{folder}: Fashion-MNIST {split} label {int(y.max())} is not in 0..9")
    y_tr, y_te = y_tr.astype(np.int64), y_te.astype(np.int64)
    y_tr.setflags(write=False)
    y_te.setflags(write=False)
    return x_tr, y_tr, x_te, y_te


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The raw official split as read-only arrays: ``x_train`` uint8 ``(60000, 28, 28)``,
    ``y_train`` int64 ``(60000,)``, ``x_test`` ``(10000, 28, 28)``, ``y_test`` (cached per folder;
    :class:`TaskUnavailable` when the files are missing, ``ValueError`` when damaged)."""
    return _read_fashion(fashion_mnist_dir(data_dir).resolve())


def _subset(y: Tensor, n: int | None, seed: int) -> Tensor:
    """Sorted indices of a stratified subset of ``n`` rows of ``y`` (all rows for ``None``)."""
    total = int(y.numel())
    if n is None or n == total:
        return torch.arange(total)
    if not 0 < n < total:
        raise ValueError(f"cannot take a subset of {n} rows out of {total}")
    return stratified_split(y, (n / total, 1.0 - n / total), seed=seed)[0]


def _images(x: np.ndarray, rows: Tensor) -> Tensor:
    pixels = torch.from_numpy(x[rows.numpy()]).to(torch.float32).unsqueeze(1)
    return pixels.div_(255.0).sub_(FASHION_MEAN).div_(FASHION_STD)  # in place: 55k images are 172 MB


def make_fashion_cnn(num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """A small 2-D CNN for ``(n, 1, 28, 28)`` images: ``Conv(1->16, 3x3) -> ReLU -> MaxPool 2 ->
    Conv(16->32, 3x3) -> ReLU -> MaxPool 2 -> Linear(32*7*7 -> 64) -> ReLU -> Linear(64 -> 10)``
    (105 866 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


@register_task
class FashionMNISTTask(ClassificationTask):
    """Fashion-MNIST with a small CNN (:func:`make_fashion_cnn`); data from the Debian package
    ``dataset-fashion-mnist`` or ``data_dir`` (see the module docstring for sizes)."""

    name = "fashion-mnist-cnn"
    domain = "vision"
    data_dir: Path  #: the folder the IDX files are read from
    train_index: Tensor  #: rows of the official training set used for training (sorted)
    val_index: Tensor  #: rows of the official training set held out for validation
    test_index: Tensor  #: rows of the official test set
    hparams = TaskHParams(
        lr=0.05, lr_adam=1e-3, weight_decay=5e-4, batch_size=64, epochs_quick=3, epochs_full=20
    )
    #: (train, val, test) rows per size (``None``: all the rest / the whole official test set).
    sizes: ClassVar[dict[str, tuple[int | None, int, int | None]]] = FASHION_SIZES

    def __init__(
        self,
        *,
        size: str = "quick",
        data_seed: int = 0,
        label_noise: float = 0.0,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.data_dir = fashion_mnist_dir(data_dir)
        super().__init__(size=size, data_seed=data_seed, label_noise=label_noise)

    @classmethod
    def availability(cls, data_dir: str | os.PathLike[str] | None = None) -> str | None:
        return fashion_mnist_availability(data_dir)

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        x_tr, y_tr, x_te, y_te = load_fashion_mnist(self.data_dir)
        n_train, n_val, n_test = self.sizes[self.size]
        y_all = torch.from_numpy(y_tr.copy())
        pool = _subset(y_all, None if n_train is None else n_train + n_val, seed=self.data_seed)
        train_p, val_p = stratified_split(
            y_all[pool], (1.0 - n_val / pool.numel(), n_val / pool.numel()), seed=self.data_seed + 1
        )
        train_i, val_i = pool[train_p], pool[val_p]
        y_test_all = torch.from_numpy(y_te.copy())
        test_i = _subset(y_test_all, n_test, seed=self.data_seed + 3)
        self.train_index, self.val_index, self.test_index = train_i, val_i, test_i
        return (
            _images(x_tr, train_i), y_all[train_i], _images(x_tr, val_i), y_all[val_i],
            _images(x_te, test_i), y_test_all[test_i],
        )

    def make_model(self) -> nn.Module:
        return make_fashion_cnn()
