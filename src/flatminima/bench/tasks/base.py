"""The task interface of the benchmark suite: data, model, loss and metric behind one small API.

A benchmark run is (task, optimizer, hyperparameters, seed, budget). The runner only talks to a task
through :class:`Task`, so vision, text, graph and alignment tasks (and their label-noise variants)
train with one loop:

* ``task = TaskClass(size="quick", data_seed=0, label_noise=0.0)`` loads or generates the data
  (offline only: packaged files or local generators; :meth:`Task.availability` says why a task cannot
  run and how to get its data);
* ``model = task.make_model()`` (the caller seeds torch first);
* each epoch, ``for batch in task.train_batches(generator)`` with a ``torch.Generator`` for the order;
* ``task.loss(model, batch)`` is the scalar training loss; ``task.sample_losses(model, batch)`` the
  per-sample losses (``None`` support: losses that do not split per sample, e.g. contrastive ones,
  set ``per_sample = False``), and ``task.select(batch, rows)`` the sub-batch of the given rows, for
  ESAM's data selection;
* ``task.val_batches(generator)`` are minibatches of the validation split, shaped like training
  batches (for methods that train on held-out data, e.g. LETS's validation closure);
* ``task.evaluate(model, "val" | "test")`` returns metrics in eval mode (``task.metric`` is the primary
  one, higher is better); the validation split always comes from the training data;
* ``task.hparams`` are the task's default optimizer settings (base learning rate, weight decay,
  batch size, epochs for the quick and full suites).
"""

from __future__ import annotations

import abc
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "TASKS", "ClassificationTask", "Task", "TaskHParams", "TaskUnavailable", "package_dir", "register_task",
]


class TaskUnavailable(RuntimeError):
    """The task's data is not on this machine; the message says how to get it."""


def package_dir(package: str) -> Path | None:
    """The folder of the installed top-level ``package``, found with
    :func:`importlib.util.find_spec`, which does not import it (none of its code runs, so its
    dependencies need not be installed); ``None`` when it is not installed. Tasks read data files
    shipped inside packages this way."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if Path(loc).is_dir():
            return Path(loc)
    return None


@dataclass(frozen=True)
class TaskHParams:
    """Default training settings of a task (the suite may override them)."""

    lr: float = 0.05  #: SGD learning rate (momentum 0.9); AdamW-based runs use ``lr_adam``
    lr_adam: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs_quick: int = 10
    epochs_full: int = 50
    extra: dict[str, Any] = field(default_factory=dict)


class Task(abc.ABC):
    """One benchmark task. Subclasses set the class attributes and implement the methods."""

    #: Registry name, e.g. ``"mnist1d-mlp"`` or ``"rotten-tomatoes-noise20"``.
    name: ClassVar[str] = ""
    #: ``"vision"``, ``"text"``, ``"graph"``, ``"alignment"`` or ``"toy"``.
    domain: ClassVar[str] = ""
    #: The primary metric returned by :meth:`evaluate` (higher is better), e.g. ``"accuracy"``.
    metric: ClassVar[str] = "accuracy"
    #: Whether :meth:`sample_losses` and :meth:`select` are supported (ESAM's data selection).
    per_sample: ClassVar[bool] = True
    hparams: ClassVar[TaskHParams] = TaskHParams()

    def __init__(self, *, size: str = "quick", data_seed: int = 0, label_noise: float = 0.0) -> None:
        if size not in ("quick", "full", "tiny"):
            raise ValueError(f"invalid size: {size!r} (must be 'tiny', 'quick' or 'full')")
        if not 0.0 <= float(label_noise) < 1.0:
            raise ValueError(f"invalid label_noise: {label_noise!r} (must be in [0, 1))")
        self.size = size
        self.data_seed = int(data_seed)
        self.label_noise = float(label_noise)

    @classmethod
    def availability(cls) -> str | None:
        """``None`` when the data is available offline, else one line saying how to get it."""
        return None

    @abc.abstractmethod
    def make_model(self) -> nn.Module:
        """A fresh model (seed torch before calling for a reproducible initialization)."""

    @abc.abstractmethod
    def train_batches(self, generator: torch.Generator) -> Iterator[Any]:
        """One epoch of training batches, in an order drawn from ``generator``."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The scalar training loss of ``model`` on ``batch`` (mean over its samples)."""

    def val_batches(self, generator: torch.Generator) -> Iterator[Any]:
        """One pass over the validation split in minibatches shaped like :meth:`train_batches`'
        (same batch size, order drawn from ``generator``, clean labels), for methods that learn
        from held-out data (LETS's validation closure)."""
        raise NotImplementedError(f"task {self.name!r} has no validation batches")

    def sample_losses(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-sample training losses (1-D); their mean is :meth:`loss`."""
        raise NotImplementedError(f"task {self.name!r} has no per-sample losses")

    def select(self, batch: Any, rows: Tensor) -> Any:
        """The sub-batch made of ``rows`` (indices into the batch's samples)."""
        raise NotImplementedError(f"task {self.name!r} cannot select rows of a batch")

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics on ``"val"`` or ``"test"`` in eval mode (the model's mode is restored)."""

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (default: counts :meth:`train_batches` once)."""
        return sum(1 for _ in self.train_batches(torch.Generator().manual_seed(0)))


#: Task classes by name.
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task to :data:`TASKS` (``ValueError`` on a duplicate name)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is already registered")
    TASKS[cls.name] = cls
    return cls


class ClassificationTask(Task):
    """A task over in-memory tensors ``x`` (any trailing shape) and int64 labels, trained with
    cross-entropy on shuffled minibatches; subclasses implement :meth:`load_arrays` and
    :meth:`make_model`.

    :meth:`load_arrays` returns the six tensors of a train / val / test split (the validation rows
    come from the training data; use :func:`~flatminima.bench.tasks.digits.stratified_split`), with
    clean training labels; label noise is then applied to the training labels only
    (:func:`~flatminima.bench.tasks.digits.add_label_noise`, seeded by ``data_seed``), and
    ``y_train_clean`` keeps the clean ones.
    """

    num_classes: ClassVar[int] = 10

    def __init__(self, *, size: str = "quick", data_seed: int = 0, label_noise: float = 0.0) -> None:
        super().__init__(size=size, data_seed=data_seed, label_noise=label_noise)
        from .digits import add_label_noise  # the one implementation of symmetric label noise

        x_tr, y_tr, x_va, y_va, x_te, y_te = self.load_arrays()
        self.x_train, self.x_val, self.x_test = x_tr, x_va, x_te
        self.y_val, self.y_test = y_va, y_te
        self.y_train_clean = y_tr
        self.y_train, self.flipped = add_label_noise(
            y_tr, self.label_noise, self.num_classes, seed=self.data_seed + 2
        )

    @abc.abstractmethod
    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``x_train, y_train, x_val, y_val, x_test, y_test`` (clean labels) for ``self.size`` and
        ``self.data_seed``; raise :class:`TaskUnavailable` when the data is missing."""

    @property
    def batch_size(self) -> int:
        return self.hparams.batch_size

    def train_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        return self._minibatches(self.x_train, self.y_train, generator)

    def val_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        return self._minibatches(self.x_val, self.y_val, generator)

    def _minibatches(self, x: Tensor, y: Tensor, generator: torch.Generator
                     ) -> Iterator[tuple[Tensor, Tensor]]:
        n = x.shape[0]
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield x[idx], y[idx]

    def steps_per_epoch(self) -> int:
        return -(-self.x_train.shape[0] // self.batch_size)

    def sample_losses(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def select(self, batch: tuple[Tensor, Tensor], rows: Tensor) -> tuple[Tensor, Tensor]:
        x, y = batch
        return x[rows], y[rows]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        if split not in ("val", "test", "train"):
            raise ValueError(f"invalid split: {split!r} (must be 'val', 'test' or 'train')")
        x, y = {"val": (self.x_val, self.y_val), "test": (self.x_test, self.y_test),
                "train": (self.x_train, self.y_train_clean)}[split]
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            correct, loss = 0, 0.0
            for start in range(0, x.shape[0], 1024):
                out = model(x[start : start + 1024])
                yb = y[start : start + 1024]
                loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(dim=1) == yb).sum())
        finally:
            for m, flag in flags:
                m.training = flag
        return {"accuracy": correct / x.shape[0], "loss": loss / x.shape[0]}
