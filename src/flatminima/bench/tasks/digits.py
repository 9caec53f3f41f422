"""scikit-learn's digits (UCI optical recognition of handwritten digits), bundled with the package.

1797 grey-level 8x8 images (64 integer pixels in ``0..16``) of the digits 0-9, read from
``flatminima/bench/data/digits.csv.gz`` (see the ``README.md`` next to it). Everything here is
deterministic given a seed and uses only torch and numpy:

* :func:`load_digits` gives float32 pixels scaled to ``[0, 1]`` and int64 labels;
* :func:`stratified_split` splits the rows into train / val / test with each class split in the
  same proportions (to within one example per class and split);
* :func:`add_label_noise` flips an exact number of training labels to a different class
  (symmetric noise);
* :func:`make_digits` does all three and returns a :class:`DigitsData`;
* :func:`make_mlp` builds the small ReLU network used by :mod:`flatminima.bench.quick`.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
import torch
from torch import Tensor, nn

from .base import ClassificationTask, TaskHParams, register_task

__all__ = [
    "CLASS_COUNTS",
    "NUM_CLASSES",
    "NUM_FEATURES",
    "NUM_ROWS",
    "DigitsData",
    "DigitsTask",
    "add_label_noise",
    "load_digits",
    "load_digits_raw",
    "make_digits",
    "make_mlp",
    "stratified_split",
]

NUM_ROWS = 1797
NUM_FEATURES = 64
NUM_CLASSES = 10
#: Number of images of each digit 0..9 in the bundled file.
CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
#: Largest pixel value (pixels count "on" bits in 4x4 blocks of a 32x32 bitmap).
PIXEL_MAX = 16

_DATA_FILE = "digits.csv.gz"


@lru_cache(maxsize=1)
def _read_raw() -> tuple[np.ndarray, np.ndarray]:
    raw = resources.files("flatminima.bench").joinpath("data", _DATA_FILE).read_bytes()
    text = gzip.decompress(raw).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape != (NUM_ROWS, NUM_FEATURES + 1):
        raise RuntimeError(
            f"{_DATA_FILE}: expected {NUM_ROWS} rows of {NUM_FEATURES + 1} columns, got "
            f"{table.shape}; the bundled data file is damaged"
        )
    pixels, labels = table[:, :NUM_FEATURES], table[:, NUM_FEATURES]
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """The bundled file as integer arrays: pixels ``(1797, 64)`` in ``0..16`` and labels ``(1797,)``
    in ``0..9`` (fresh, writable copies, in the file's row order)."""
    pixels, labels = _read_raw()
    return pixels.copy(), labels.copy()


def load_digits() -> tuple[Tensor, Tensor]:
    """All rows as tensors: ``x`` float32 ``(1797, 64)`` with pixels divided by 16 (so in
    ``[0, 1]``) and ``y`` int64 ``(1797,)``, in the file's row order."""
    pixels, labels = _read_raw()
    x = torch.from_numpy(pixels.astype(np.float32) / PIXEL_MAX)
    y = torch.from_numpy(labels.copy())
    return x, y


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def stratified_split(
    y: Tensor, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[Tensor, ...]:
    """Split the row indices of ``y`` into disjoint parts, stratified by class.

    Within every class the rows are shuffled (``torch.Generator`` seeded with ``seed``) and cut in
    ``fractions`` (which must sum to 1): each part but the last gets ``round(fraction * n_class)``
    rows of that class, the last the rest, so every part holds within one example of its exact
    share of each class. Returns one sorted int64 index tensor per fraction; together they cover
    every row exactly once. Same ``y``, ``fractions`` and ``seed`` give the same split.
    """
    fr = [float(f) for f in fractions]
    if len(fr) < 1 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    y = torch.as_tensor(y)
    gen = _generator(seed)
    parts: list[list[Tensor]] = [[] for _ in fr]
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_c, start = idx.numel(), 0
        for k, f in enumerate(fr):
            stop = n_c if k == len(fr) - 1 else min(n_c, start + round(f * n_c))
            parts[k].append(idx[start:stop])
            start = stop
    return tuple(torch.sort(torch.cat(p)).values for p in parts)


def add_label_noise(
    y: Tensor, fraction: float, num_classes: int = NUM_CLASSES, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Symmetric label noise: exactly ``round(fraction * len(y))`` labels, chosen uniformly without
    replacement, are replaced by a different class drawn uniformly from the other
    ``num_classes - 1``.

    Returns ``(noisy_labels, flipped)`` where ``flipped`` is the boolean mask of changed rows; ``y``
    is not modified. ``fraction = 0`` returns a copy of ``y``.
    """
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label-noise fraction must be in [0, 1], got {fraction}")
    if num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    y = torch.as_tensor(y)
    noisy = y.clone()
    flipped = torch.zeros(y.shape, dtype=torch.bool)
    n_flip = round(fraction * y.numel())
    if n_flip == 0:
        return noisy, flipped
    gen = _generator(seed)
    rows = torch.randperm(y.numel(), generator=gen)[:n_flip]
    shift = torch.randint(1, num_classes, (n_flip,), generator=gen, dtype=y.dtype)
    noisy[rows] = (y[rows] + shift) % num_classes
    flipped[rows] = True
    return noisy, flipped


@dataclass(frozen=True)
class DigitsData:
    """A train / val / test split of digits; only ``y_train`` carries label noise."""

    x_train: Tensor
    y_train: Tensor  #: training labels as trained on (noisy where ``flipped``)
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    y_train_clean: Tensor  #: the true training labels
    flipped: Tensor  #: boolean mask of the training labels changed by the noise
    train_index: Tensor  #: rows of the file in the training set (in ``x_train`` order)
    val_index: Tensor
    test_index: Tensor

    @property
    def num_features(self) -> int:
        """Input dimension (64)."""
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes (10)."""
        return NUM_CLASSES


def make_digits(
    seed: int = 0,
    *,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    label_noise: float = 0.0,
    max_train: int | None = None,
) -> DigitsData:
    """Load digits and split it with :func:`stratified_split` (``seed``); then optionally keep a
    random ``max_train`` training rows (chosen with ``seed``) and apply :func:`add_label_noise`
    with ``label_noise`` to the training labels only (seeded by ``seed`` too). Validation and test
    sets are never subsampled and never noisy."""
    x, y = load_digits()
    train_i, val_i, test_i = stratified_split(y, fractions, seed=seed)
    if max_train is not None:
        if max_train < 1:
            raise ValueError(f"max_train must be >= 1, got {max_train}")
        keep = torch.randperm(train_i.numel(), generator=_generator(seed + 1))[:max_train]
        train_i = torch.sort(train_i[keep]).values
    y_train_clean = y[train_i]
    y_train, flipped = add_label_noise(y_train_clean, label_noise, NUM_CLASSES, seed=seed + 2)
    return DigitsData(
        x_train=x[train_i], y_train=y_train, x_val=x[val_i], y_val=y[val_i],
        x_test=x[test_i], y_test=y[test_i], y_train_clean=y_train_clean, flipped=flipped,
        train_index=train_i, val_index=val_i, test_index=test_i,
    )


def make_mlp(
    in_features: int = NUM_FEATURES,
    num_classes: int = NUM_CLASSES,
    hidden: Sequence[int] = (128, 128),
    *,
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A ReLU MLP ``in_features -> hidden... -> num_classes`` (default 64-128-128-10).

    Each hidden block is ``Linear -> [BatchNorm1d] -> ReLU -> [Dropout(dropout)]``; the output
    layer returns logits. Initialization uses torch's defaults (seed with ``torch.manual_seed``).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_task
class DigitsTask(ClassificationTask):
    """Bundled digits with the 64-128-128-10 MLP: the smoke-test task of the suite (no extra data)."""

    name = "digits-mlp"
    domain = "vision"
    hparams = TaskHParams(lr=0.05, weight_decay=5e-4, batch_size=64, epochs_quick=10, epochs_full=30)

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        d = make_digits(self.data_seed, max_train=256 if self.size == "tiny" else None)
        return d.x_train, d.y_train_clean, d.x_val, d.y_val, d.x_test, d.y_test

    def make_model(self) -> nn.Module:
        return make_mlp(NUM_FEATURES, NUM_CLASSES)
