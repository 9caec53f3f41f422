"""Image-text alignment: Fashion-MNIST images against frozen MiniLM embeddings of class captions.

A locked-text-tower setting (LiT, Zhai et al. 2022): the text side is all-MiniLM-L6-v2
(:mod:`~flatminima.bench.tasks.encoder`, frozen) applied to captions built from
:data:`CAPTION_TEMPLATES` x :data:`CAPTION_CLASSES` (8 x 10 = 80 sentences, encoded once and
cached); the image side is the small CNN of ``fashion-mnist-cnn`` with a 384-d output,
L2-normalised. An image ``x`` of class ``y`` is trained to match its class's caption against the
other classes' captions written with the same template:

``logits_c(x, k) = <f(x), t_{c,k}> / tau``,  ``loss = cross_entropy(logits(x, k), y)``,

with one template ``k`` drawn per image and epoch from the batch-order generator (the batch is
``(images, labels, templates)``, so SAM's two passes see the same captions). Evaluation is the
prompt-ensemble classifier of CLIP: each class is the normalised mean of its 8 caption embeddings,
and an image is assigned to the class whose caption it is closest to (``accuracy``; ``loss`` is the
cross-entropy of those logits). The per-sample loss makes ESAM's data selection possible, and
label noise (captions of another class) is defined.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import TaskHParams, TaskUnavailable, register_task
from .encoder import MINILM_DIM, minilm_availability, sentence_embeddings
from .vision import FashionMNISTTask, fashion_mnist_availability, make_fashion_cnn

__all__ = ["CAPTION_CLASSES", "CAPTION_TEMPLATES", "CaptionAlignedCNN", "FashionCaptionsTask"]

#: Fashion-MNIST's classes as they are written in captions (label order).
CAPTION_CLASSES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")
#: Caption templates (``{}`` is the class phrase).
CAPTION_TEMPLATES = (
    "a photo of a {}.", "a black and white photo of a {}.", "a low-resolution photo of a {}.",
    "a product photo of a {}.", "a picture of a {}.", "a grayscale image of a {}.",
    "a small photo of the {}.", "a close-up photo of a {}.",
)


def caption_texts() -> list[str]:
    """The captions, class-major: ``CAPTION_TEMPLATES[k].format(CAPTION_CLASSES[c])`` at ``c * 8 + k``."""
    return [t.format(c) for c in CAPTION_CLASSES for t in CAPTION_TEMPLATES]


class CaptionAlignedCNN(nn.Module):
    """An image tower (:func:`make_fashion_cnn` with a ``MINILM_DIM`` output) scored against fixed
    caption embeddings.

    ``captions`` is ``(classes, templates, dim)`` (L2-normalised rows; a buffer: saved with the
    model, moved with it, never trained or perturbed). ``forward(x)`` returns the prompt-ensemble
    logits ``(B, classes)``; ``forward(x, k)`` the logits against the captions of template ``k[i]``
    for image ``i``. ``tau`` (fixed) scales the cosines."""

    def __init__(self, captions: Tensor, tau: float = 0.05) -> None:
        super().__init__()
        if captions.dim() != 3:
            raise ValueError(f"captions must be (classes, templates, dim), got {tuple(captions.shape)}")
        if not tau > 0:
            raise ValueError(f"invalid tau: {tau!r} (must be > 0)")
        self.tower = make_fashion_cnn(captions.shape[2])
        self.register_buffer("captions", nn.functional.normalize(captions.float(), dim=2))
        self.register_buffer("prototypes", nn.functional.normalize(self.captions.mean(dim=1), dim=1))
        self.tau = float(tau)

    def embed(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(self.tower(x), dim=1)

    def forward(self, x: Tensor, templates: Tensor | None = None) -> Tensor:
        z = self.embed(x)
        if templates is None:
            return z @ self.prototypes.T / self.tau
        text = self.captions[:, templates]  # (classes, B, dim)
        return torch.einsum("bd,cbd->bc", z, text) / self.tau


@register_task
class FashionCaptionsTask(FashionMNISTTask):
    """``"fashion-mnist-captions"``: Fashion-MNIST images aligned to frozen MiniLM caption
    embeddings (see the module docstring). Sizes (train / val / test images): ``"tiny"``
    400 / 100 / 200, ``"quick"`` 4 500 / 500 / 2 000 (as ``fashion-mnist-cnn``), ``"full"`` a
    stratified 10 000 / 2 000 of the training images and the official 10 000 test images (a tenth
    of ``fashion-mnist-cnn``'s cost per epoch). Needs the Fashion-MNIST files and the MiniLM
    weights."""

    name = "fashion-mnist-captions"
    domain = "alignment"
    metric = "accuracy"
    sizes: ClassVar[dict[str, tuple[int | None, int, int | None]]] = {
        "tiny": (400, 100, 200), "quick": (4500, 500, 2000), "full": (10_000, 2000, None)}
    hparams = TaskHParams(lr=0.05, lr_adam=1e-3, weight_decay=5e-4, batch_size=64, epochs_quick=3,
                          epochs_full=10, extra={"tau": 0.05})

    def __init__(self, *, size: str = "quick", data_seed: int = 0, label_noise: float = 0.0,
                 data_dir: str | os.PathLike[str] | None = None) -> None:
        why = minilm_availability()
        if why is not None and fashion_mnist_availability(data_dir) is None:
            raise TaskUnavailable(f"{self.name}: {why}")
        super().__init__(size=size, data_seed=data_seed, label_noise=label_noise, data_dir=data_dir)
        emb = sentence_embeddings(caption_texts())
        self.captions = emb.reshape(len(CAPTION_CLASSES), len(CAPTION_TEMPLATES), MINILM_DIM)

    @classmethod
    def availability(cls, data_dir: str | os.PathLike[str] | None = None) -> str | None:
        why = fashion_mnist_availability(data_dir)
        if why is None and minilm_availability() is not None:
            why = f"{cls.name}: {minilm_availability()}"
        return why

    def make_model(self) -> nn.Module:
        return CaptionAlignedCNN(self.captions, tau=float(self.hparams.extra["tau"]))

    def _minibatches(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Any:
        n = x.shape[0]
        order = torch.randperm(n, generator=generator)
        templates = torch.randint(len(CAPTION_TEMPLATES), (n,), generator=generator)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield x[idx], y[idx], templates[start : start + self.batch_size].to(x.device)

    def sample_losses(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, y, k = batch
        return nn.functional.cross_entropy(model(x, k), y, reduction="none")

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, y, k = batch
        return nn.functional.cross_entropy(model(x, k), y)

    def select(self, batch: tuple[Tensor, Tensor, Tensor], rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, y, k = batch
        return x[rows], y[rows], k[rows]
