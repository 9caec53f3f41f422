"""Graph node classification: the WordNet 3.0 verb graph and a contextual stochastic block model,
both learnt semi-supervised (few labelled nodes, full batch) by a 2-layer GCN in plain PyTorch.

Two tasks (no PyTorch Geometric, no download):

* ``"wordnet-verbs-gcn"`` (:class:`WordNetVerbsTask`): the verb synsets of WordNet 3.0 read from
  ``data.verb`` of the Debian package ``wordnet-base`` (version 1:3.0-37; 6.5 MB download, 28.5 MB
  installed; ``apt-get install wordnet-base``; found with ``dpkg -L wordnet-base``, falling back to
  ``/usr/share/wordnet``). WordNet 3.0 licence (Princeton University): free to use, copy, modify and
  distribute, with the copyright notice kept. Graph: 13 767 nodes (synsets), 15 653 undirected edges
  (every pointer from a verb synset to another verb synset: hypernym, hyponym, entailment, cause,
  verb group, also-see, ...), 100 isolated nodes, edge homophily 0.86; label = the synset's
  lexicographer file (its supersense: 15 classes, ``verb.weather`` 81 nodes ... ``verb.change``
  2 383); features = binary bag of words of the synset's definition (its gloss with the quoted
  usage examples removed): the 2 000 words of two letters or more with the highest document
  frequency over *all* glosses (transductive like Cora's vocabulary, and label-free: no label, no
  lexicographer file number, no synset word is a feature). Stored as sparse CSR (4.6 words per
  node on average).
* ``"csbm-gcn"`` (:class:`CSBMTask`): a contextual stochastic block model (Deshpande et al. 2018)
  generated from ``data_seed`` by :func:`make_csbm`: ``k`` equal-sized classes, an edge between
  two nodes of the same class with probability ``p_in`` and of different classes with ``p_out``
  (independently for every pair), and Gaussian features ``x_i = mu_{y_i} + N(0, I)`` around
  random class means of norm about ``signal``. ``size="full"`` has Cora's shape (2 708 nodes, 7
  classes, 1 433 features, mean degree 3.9), with edge homophily 0.65 and ``signal`` (4.0) set so
  that a GCN beats a feature-only model by a Cora-like margin (Adam 0.01, 150 epochs, seeds 0/1:
  GCN 83 %, the same network without propagation 58 %; Cora: ~81.5 / ~59); ``"quick"`` and
  ``"tiny"`` are smaller.

Both tasks are *transductive*: the whole graph (features and normalized adjacency) lives on the
task and in the model; a split is a set of node ids (:func:`planetoid_split`): a fixed number of
labelled training nodes per class (20, as in Planetoid / Kipf & Welling; ``labels_per_class=``
changes it, e.g. 50), then a test set and a validation set drawn at random from the other nodes.
Label noise (:func:`~flatminima.bench.tasks.digits.add_label_noise`) is applied to the training
labels only.

Batch and model conventions (:class:`GraphTask`):

* Training is full batch: :meth:`GraphTask.train_batches` yields **one** :class:`NodeBatch` per
  epoch, the training node ids (in an order drawn from the generator) and their labels as
  trained on; :meth:`GraphTask.select` keeps some of its rows (ESAM's data selection);
* :meth:`GraphTask.make_model` returns a :class:`GCN` that holds the graph tensors (features,
  their transpose when sparse, the normalized adjacency) as **non-persistent buffers** (moved by
  ``.to()``, absent from ``state_dict``, shared, not copied, by ``copy.deepcopy``).
  ``model()`` returns the logits of every node; ``model(batch)`` (a :class:`NodeBatch` or a
  tensor of node ids) those of the batch's nodes, in its order;
* ``loss`` / ``sample_losses`` are the (mean / per-node) cross-entropy over the batch's nodes;
  ``evaluate`` the accuracy and mean loss on ``"val"``, ``"test"`` or ``"train"`` (clean labels).

The GCN (Kipf & Welling 2017): ``logits = Â · dropout(relu(Â X W1 + b1)) W2 + b2`` with
``Â = D^-1/2 (A + I) D^-1/2`` (:func:`normalized_adjacency`), hidden 64, dropout 0.5, Glorot
weights. Sparse products go through a small autograd function that multiplies by the stored
transpose in the backward pass (differentiable again, so Hessian-vector products work).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import subprocess
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task, TaskHParams, TaskUnavailable, register_task
from .digits import add_label_noise

__all__ = [
    "GCN",
    "LEXNAMES",
    "WORDNET_PACKAGE",
    "CSBMTask",
    "GraphConvolution",
    "GraphData",
    "GraphTask",
    "NodeBatch",
    "WordNetPointer",
    "WordNetSynset",
    "WordNetVerbsTask",
    "build_wordnet_graph",
    "csbm_edge_probabilities",
    "find_wordnet_file",
    "gloss_definition",
    "gloss_tokens",
    "make_csbm",
    "normalized_adjacency",
    "parse_wordnet_data",
    "parse_wordnet_line",
    "planetoid_split",
    "sparse_matmul",
]

# ============================================================================ WordNet data files
#: The Debian package holding the WordNet 3.0 database files.
WORDNET_PACKAGE = "wordnet-base"
#: Where Debian installs them (used when ``dpkg`` is missing or does not list the package).
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
_INSTALL_HINT = f"apt-get install {WORDNET_PACKAGE}"

#: WordNet's lexicographer files by number (``lexnames(5WN)``): the supersense labels.
LEXNAMES: dict[int, str] = dict(enumerate((
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)))

_POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class WordNetPointer:
    """One pointer of a synset: ``symbol`` (``@`` hypernym, ``~`` hyponym, ``*`` entailment, ``>``
    cause, ``$`` verb group, ``+`` derivation, ...), the target synset's byte ``offset`` and part of
    speech ``pos`` (``n v a s r``), and the source / target word numbers (0 / 0: the whole synset)."""

    symbol: str
    offset: int
    pos: str
    source: int
    target: int


@dataclass(frozen=True)
class WordNetSynset:
    """One line of a ``data.<pos>`` file (``wndb(5WN)``)."""

    offset: int  #: byte offset of the line in its file: the synset's id within its part of speech
    lex_filenum: int  #: lexicographer file number (:data:`LEXNAMES`)
    ss_type: str  #: ``n``, ``v``, ``a``, ``s`` (adjective satellite) or ``r``
    words: tuple[str, ...]  #: the synset's lemmas (underscores for spaces, adjective markers removed)
    pointers: tuple[WordNetPointer, ...]
    gloss: str  #: definition and quoted examples, as in the file

    @property
    def lexname(self) -> str:
        return LEXNAMES.get(self.lex_filenum, str(self.lex_filenum))


def parse_wordnet_line(line: str) -> WordNetSynset:
    """Parse one synset line of a WordNet ``data.<pos>`` file
    (``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt ptr... [frames] | gloss``; ``w_cnt``
    and ``lex_id`` are hexadecimal, ``p_cnt`` decimal; verb frames are skipped). ``ValueError``
    on a malformed line."""
    head, sep, gloss = line.rstrip("\r\n").partition("|")
    fields = head.split()
    try:
        offset, lex_filenum, ss_type = int(fields[0]), int(fields[1]), fields[2]
        w_cnt = int(fields[3], 16)
        pos = 4
        words = []
        for _ in range(w_cnt):
            words.append(_ADJ_MARKER.sub("", fields[pos]))
            int(fields[pos + 1], 16)  # lex_id, validated only
            pos += 2
        p_cnt = int(fields[pos])
        pos += 1
        pointers = []
        for _ in range(p_cnt):
            symbol, target, tpos, st = fields[pos : pos + 4]
            if len(st) != 4 or tpos not in "nvasr" or len(tpos) != 1:
                raise ValueError(f"bad pointer {fields[pos:pos + 4]}")
            pointers.append(WordNetPointer(symbol, int(target), tpos, int(st[:2], 16), int(st[2:], 16)))
            pos += 4
    except (IndexError, ValueError) as exc:
        raise ValueError(f"malformed WordNet data line: {line[:80]!r} ({exc})") from None
    if not sep or w_cnt == 0:
        raise ValueError(f"malformed WordNet data line (no words or no gloss): {line[:80]!r}")
    return WordNetSynset(offset, lex_filenum, ss_type, tuple(words), tuple(pointers), gloss.strip())


def _file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    p = Path(path).resolve()
    st = p.stat()  # FileNotFoundError for a missing file
    return str(p), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _parse_cached(key: tuple[str, int, int]) -> tuple[WordNetSynset, ...]:
    synsets = []
    with open(key[0], encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if line.startswith("  ") or not line.strip():  # licence header / blank line
                continue
            try:
                synsets.append(parse_wordnet_line(line))
            except ValueError as exc:
                raise ValueError(f"{key[0]}:{number}: {exc}") from None
    return tuple(synsets)


def parse_wordnet_data(path: str | os.PathLike[str]) -> tuple[WordNetSynset, ...]:
    """All synsets of a WordNet ``data.<pos>`` file, in file order. The licence header (lines
    starting with two spaces) and blank lines are skipped. Cached per file (path, modification time
    and size), so repeated calls are free."""
    return _parse_cached(_file_key(path))


@functools.lru_cache(maxsize=1)
def _dpkg_wordnet_dir() -> Path | None:
    try:
        out = subprocess.run(
            ["dpkg", "-L", WORDNET_PACKAGE], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        if line.endswith("/data.verb") or line.endswith("/data.noun"):
            return Path(line).parent
    return None


def find_wordnet_file(pos: str = "verb") -> Path | None:
    """``data.<pos>`` (``noun``, ``verb``, ``adj``, ``adv``) of the installed ``wordnet-base``:
    where ``dpkg -L wordnet-base`` lists it, else in :data:`DEFAULT_WORDNET_DIR`; ``None`` when
    neither exists. Never touches the network."""
    if pos not in _POS_FILES:
        raise ValueError(f"invalid pos: {pos!r} (must be one of {sorted(_POS_FILES)})")
    for folder in (_dpkg_wordnet_dir(), DEFAULT_WORDNET_DIR):
        if folder is not None and (folder / f"data.{pos}").is_file():
            return folder / f"data.{pos}"
    return None


_QUOTED = re.compile(r'"[^"]*"?')
_WORD = re.compile(r"[a-z]+")


def gloss_definition(gloss: str) -> str:
    """The definition part of a gloss: the quoted usage examples (and a dangling unmatched quote)
    removed, the ``;`` separated pieces joined with ``"; "``."""
    parts = (p.strip() for p in _QUOTED.sub(" ", gloss).split(";"))
    return "; ".join(p for p in parts if p)


def gloss_tokens(gloss: str) -> list[str]:
    """Lower-case words (ASCII letters, two or more) of :func:`gloss_definition`, in order."""
    return [w for w in _WORD.findall(gloss_definition(gloss).lower()) if len(w) > 1]


# ============================================================================ graphs
@dataclass(frozen=True)
class GraphData:
    """A node-classification graph (all tensors on the CPU; treat them as read-only: they are
    cached and shared between tasks)."""

    features: Tensor  #: ``(n, d)`` float32, dense or sparse CSR
    labels: Tensor  #: ``(n,)`` int64 in ``0 .. num_classes - 1``
    edge_index: Tensor  #: ``(2, E)`` int64, every undirected edge once as ``i < j``, no self loop
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...] | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.labels.numel())

    @property
    def num_edges(self) -> int:
        """Number of undirected edges."""
        return int(self.edge_index.shape[1])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def homophily(self) -> float:
        """Edge homophily: the fraction of edges joining two nodes of the same class."""
        if self.num_edges == 0:
            return float("nan")
        src, dst = self.edge_index
        return float((self.labels[src] == self.labels[dst]).float().mean())

    def degrees(self) -> Tensor:
        """Number of neighbours of every node (int64)."""
        return torch.bincount(self.edge_index.reshape(-1), minlength=self.num_nodes)


def _undirected(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Every edge once as ``(min, max)``, self loops and duplicates dropped, sorted."""
    src, dst = torch.as_tensor(edge_index, dtype=torch.int64).reshape(2, -1)
    lo, hi = torch.minimum(src, dst), torch.maximum(src, dst)
    if lo.numel() and (int(lo.min()) < 0 or int(hi.max()) >= num_nodes):
        raise ValueError(f"edge_index has node ids outside 0..{num_nodes - 1}")
    keep = lo != hi
    key = torch.unique(lo[keep] * num_nodes + hi[keep])  # sorted
    return torch.stack([key // num_nodes, key % num_nodes])


def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A sparse CSR tensor from coordinates (duplicates are not allowed)."""
    order = torch.argsort(rows * shape[1] + cols)
    rows, cols, values = rows[order], cols[order], values[order]
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=True)


def _csr_transpose(matrix: Tensor) -> Tensor:
    """The transpose of a sparse CSR matrix, as sparse CSR."""
    crow, cols, values = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    rows = torch.repeat_interleave(torch.arange(matrix.shape[0]), torch.diff(crow))
    return _csr(cols, rows, values, (matrix.shape[1], matrix.shape[0]))


def normalized_adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """The GCN propagation matrix ``Â = D^-1/2 (A + I) D^-1/2`` as a float32 sparse CSR tensor
    ``(num_nodes, num_nodes)``.

    ``A`` is the symmetric 0/1 adjacency of the undirected graph ``edge_index`` (``(2, E)``, either
    direction or both; duplicates and self loops in it are ignored), ``I`` adds one self loop per
    node and ``D`` is the degree matrix of ``A + I`` (so isolated nodes keep their own features).
    ``Â`` is symmetric, with ``Â_ij = 1 / sqrt((d_i + 1)(d_j + 1))`` on edges and the diagonal."""
    und = _undirected(edge_index, num_nodes)
    loops = torch.arange(num_nodes)
    rows = torch.cat([und[0], und[1], loops])
    cols = torch.cat([und[1], und[0], loops])
    deg = torch.bincount(rows, minlength=num_nodes).to(torch.float32)
    inv_sqrt = deg.rsqrt()
    return _csr(rows, cols, inv_sqrt[rows] * inv_sqrt[cols], (num_nodes, num_nodes))


_DEFAULT_VOCAB = 2000


@functools.lru_cache(maxsize=4)
def _wordnet_graph_cached(key: tuple[str, int, int], vocab_size: int) -> GraphData:
    synsets = _parse_cached(key)
    if not synsets:
        raise ValueError(f"{key[0]}: no synsets")
    index = {s.offset: i for i, s in enumerate(synsets)}
    pos = "a" if synsets[0].ss_type in "as" else synsets[0].ss_type
    same_pos = {"a", "s"} if pos == "a" else {pos}
    src, dst = [], []
    for i, s in enumerate(synsets):
        for p in s.pointers:
            j = index.get(p.offset)
            if p.pos in same_pos and j is not None and j != i:
                src.append(i)
                dst.append(j)
    edge_index = _undirected(torch.tensor([src, dst], dtype=torch.int64).reshape(2, -1), len(synsets))
    lex = sorted({s.lex_filenum for s in synsets})
    label_of = {f: c for c, f in enumerate(lex)}
    labels = torch.tensor([label_of[s.lex_filenum] for s in synsets], dtype=torch.int64)
    # Binary bag of words over the definitions; vocabulary by document frequency over all glosses
    # (ties alphabetical). Labels are never looked at.
    docs = [sorted(set(gloss_tokens(s.gloss))) for s in synsets]
    df = Counter(w for d in docs for w in d)
    vocab = sorted(df, key=lambda w: (-df[w], w))[:vocab_size]
    column = {w: c for c, w in enumerate(vocab)}
    rows, cols = [], []
    for i, d in enumerate(docs):
        for w in d:
            c = column.get(w)
            if c is not None:
                rows.append(i)
                cols.append(c)
    r, c = torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)
    features = _csr(r, c, torch.ones(r.numel()), (len(synsets), len(vocab)))
    return GraphData(
        features=features, labels=labels, edge_index=edge_index,
        class_names=tuple(LEXNAMES.get(f, str(f)) for f in lex), feature_names=tuple(vocab),
    )


def build_wordnet_graph(path: str | os.PathLike[str], *, vocab_size: int = _DEFAULT_VOCAB) -> GraphData:
    """The synset graph of one WordNet ``data.<pos>`` file (cached per file and ``vocab_size``).

    Nodes are the synsets in file order; an undirected edge joins two synsets when either has a
    pointer of any kind to the other and both have the file's part of speech (adjective satellites
    count as adjectives); labels are the lexicographer files present, numbered in increasing file
    number (``class_names`` are their :data:`LEXNAMES`); features are the binary bag of the
    ``vocab_size`` words with the highest document frequency over all definitions
    (:func:`gloss_tokens`), as a sparse CSR float32 matrix (``feature_names`` the words)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return _wordnet_graph_cached(_file_key(path), int(vocab_size))


# ============================================================================ CSBM generator
def csbm_edge_probabilities(
    num_nodes: int, num_classes: int, avg_degree: float, homophily: float
) -> tuple[float, float]:
    """``(p_in, p_out)`` for :func:`make_csbm` giving, in expectation, mean degree ``avg_degree``
    and edge homophily ``homophily`` (the fraction of edges inside a class) with equal classes."""
    if not 0.0 <= homophily <= 1.0 or avg_degree <= 0:
        raise ValueError(f"need avg_degree > 0 and homophily in [0, 1], got {avg_degree}, {homophily}")
    sizes = [num_nodes // num_classes + (c < num_nodes % num_classes) for c in range(num_classes)]
    intra = sum(s * (s - 1) // 2 for s in sizes)
    inter = num_nodes * (num_nodes - 1) // 2 - intra
    edges = num_nodes * avg_degree / 2
    p_in = homophily * edges / intra if intra else 0.0
    p_out = (1 - homophily) * edges / inter if inter else 0.0
    if p_in > 1 or p_out > 1:
        raise ValueError(f"avg_degree {avg_degree} is too large for {num_nodes} nodes")
    return p_in, p_out


def make_csbm(
    num_nodes: int,
    num_classes: int,
    *,
    p_in: float,
    p_out: float,
    num_features: int,
    signal: float,
    seed: int = 0,
) -> GraphData:
    """A contextual stochastic block model, deterministic given ``seed``.

    * labels: ``num_classes`` classes of equal size (within one node), in random node order;
    * edges: every unordered pair of distinct nodes independently, with probability ``p_in``
      inside a class and ``p_out`` across classes;
    * features: ``x_i = mu_{y_i} + eps_i`` with ``eps_i ~ N(0, I_d)`` and class means
      ``mu_c ~ N(0, signal^2 / d · I_d)`` (norm about ``signal``, nearly orthogonal for large ``d``).

    Generation is ``O(num_nodes^2)`` (row blocks of Bernoulli draws), fine up to ~20 000 nodes."""
    if num_nodes < num_classes or num_classes < 2 or num_features < 1:
        raise ValueError(f"need num_nodes >= num_classes >= 2 and num_features >= 1, got "
                         f"{num_nodes}, {num_classes}, {num_features}")
    if not (0.0 <= p_in <= 1.0 and 0.0 <= p_out <= 1.0):
        raise ValueError(f"edge probabilities must be in [0, 1], got p_in={p_in}, p_out={p_out}")
    gen = torch.Generator().manual_seed(int(seed))
    labels = (torch.arange(num_nodes) % num_classes)[torch.randperm(num_nodes, generator=gen)]
    src, dst = [], []
    block = max(1, 2**22 // num_nodes)
    cols = torch.arange(num_nodes)
    for start in range(0, num_nodes, block):
        rows = torch.arange(start, min(start + block, num_nodes))
        draw = torch.rand(rows.numel(), num_nodes, generator=gen)
        prob = torch.where(labels[rows, None] == labels[None, :], p_in, p_out)
        hit = (draw < prob) & (cols[None, :] > rows[:, None])
        r, c = torch.nonzero(hit, as_tuple=True)
        src.append(rows[r])
        dst.append(c)
    edge_index = torch.stack([torch.cat(src), torch.cat(dst)])
    means = torch.randn(num_classes, num_features, generator=gen) * (signal / math.sqrt(num_features))
    features = means[labels] + torch.randn(num_nodes, num_features, generator=gen)
    return GraphData(
        features=features, labels=labels, edge_index=edge_index,
        class_names=tuple(f"class{c}" for c in range(num_classes)),
    )


# ============================================================================ splits
def planetoid_split(
    labels: Tensor, per_class: int, num_val: int, num_test: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Planetoid-style semi-supervised split of the nodes: ``per_class`` random training nodes of
    every class, then ``num_test`` random test nodes and ``num_val`` random validation nodes from
    the others (``torch.Generator`` seeded with ``seed``). Returns sorted, disjoint int64 id
    tensors ``(train, val, test)``; ``ValueError`` when a class or the graph is too small."""
    labels = torch.as_tensor(labels)
    n = labels.numel()
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=gen)
    train = []
    for c in torch.unique(labels).tolist():
        members = order[labels[order] == c]
        if members.numel() < per_class:
            raise ValueError(f"class {c} has {members.numel()} nodes, fewer than per_class={per_class}")
        train.append(members[:per_class])
    train_i = torch.cat(train)
    rest = torch.ones(n, dtype=torch.bool)
    rest[train_i] = False
    rest_i = torch.nonzero(rest).flatten()
    if num_val + num_test > rest_i.numel():
        raise ValueError(f"{rest_i.numel()} unlabelled nodes, fewer than num_val + num_test = "
                         f"{num_val + num_test}")
    rest_i = rest_i[torch.randperm(rest_i.numel(), generator=gen)]
    test_i, val_i = rest_i[:num_test], rest_i[num_test : num_test + num_val]
    return tuple(torch.sort(t).values for t in (train_i, val_i, test_i))  # type: ignore[return-value]


# ============================================================================ GCN
class _SparseMatmul(torch.autograd.Function):
    """``matrix @ dense`` for a constant sparse ``matrix``; the backward multiplies by the given
    ``matrix_t`` (its transpose, precomputed: fast in CSR) and is itself differentiable."""

    @staticmethod
    def forward(ctx: Any, matrix: Tensor, matrix_t: Tensor, dense: Tensor) -> Tensor:
        ctx.matrix, ctx.matrix_t = matrix, matrix_t
        return matrix @ dense

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, Tensor | None]:
        if not ctx.needs_input_grad[2]:
            return None, None, None
        return None, None, _SparseMatmul.apply(ctx.matrix_t, ctx.matrix, grad)


def sparse_matmul(matrix: Tensor, dense: Tensor, matrix_t: Tensor | None = None) -> Tensor:
    """``matrix @ dense`` with gradients (of any order) for ``dense``; ``matrix`` is a constant
    sparse (CSR or COO) matrix and ``matrix_t`` its transpose (default: ``matrix``, i.e. it is
    symmetric)."""
    return _SparseMatmul.apply(matrix, matrix if matrix_t is None else matrix_t, dense)


def _dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout (keep with probability ``1 - p``, scale by ``1 / (1 - p)``) through a
    uniform mask: the same distribution as ``F.dropout``, 2.5x faster on the CPU (whose
    ``bernoulli_`` dominated a WordNet training step)."""
    return x * ((torch.rand_like(x) >= p).to(x.dtype) * (1.0 / (1.0 - p)))


class GraphConvolution(nn.Module):
    """One GCN layer ``Â (X W) + b`` (``Â`` symmetric; ``None``: no propagation, a linear layer).
    ``X`` dense or sparse; for a sparse ``X`` pass its transpose ``x_t`` for the backward pass."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)  # Glorot, as Kipf & Welling
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, adjacency: Tensor | None = None, x_t: Tensor | None = None) -> Tensor:
        if x.layout == torch.strided:
            support = x @ self.weight
        else:
            if x_t is None:
                raise ValueError("a sparse input needs its transpose x_t")
            support = sparse_matmul(x, self.weight, x_t)
        if adjacency is not None:
            support = sparse_matmul(adjacency, support)
        return support + self.bias


class GCN(nn.Module):
    """Two-layer GCN ``Â · dropout(relu(Â · dropout_in(X) W1 + b1)) W2 + b2`` over one fixed graph.

    The graph lives in the model as non-persistent buffers (``features``; ``features_t``, the
    transpose of sparse features, else ``None``; ``adjacency``, the symmetric ``Â`` of
    :func:`normalized_adjacency`, or ``None`` for the feature-only MLP baseline with the same
    layers). ``.to()`` moves them; ``state_dict`` leaves them out; ``copy.deepcopy`` shares them
    (they are constants) and copies everything else.

    ``forward()`` returns the logits of all nodes ``(n, classes)``; ``forward(batch)`` with a
    :class:`NodeBatch` or a tensor of node ids returns the rows of those nodes, in order.
    ``input_dropout`` (dense features only) drops input features in training mode."""

    _GRAPH = ("features", "features_t", "adjacency")

    def __init__(
        self,
        features: Tensor,
        adjacency: Tensor | None,
        num_classes: int,
        *,
        hidden: int = 64,
        dropout: float = 0.5,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not (0.0 <= dropout < 1.0 and 0.0 <= input_dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout}, {input_dropout}")
        sparse = features.layout != torch.strided
        if sparse and input_dropout:
            raise ValueError("input_dropout needs dense features")
        if sparse and features.layout != torch.sparse_csr:
            features = features.to_sparse_csr()
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("features_t", _csr_transpose(features) if sparse else None, persistent=False)
        self.register_buffer("adjacency", adjacency, persistent=False)
        self.dropout = float(dropout)
        self.input_dropout = float(input_dropout)
        self.conv1 = GraphConvolution(int(features.shape[1]), hidden)
        self.conv2 = GraphConvolution(hidden, num_classes)

    def forward(self, batch: NodeBatch | Tensor | None = None) -> Tensor:
        x = self.features
        if self.input_dropout and self.training and x.layout == torch.strided:
            x = _dropout(x, self.input_dropout)
        h = F.relu(self.conv1(x, self.adjacency, self.features_t))
        if self.dropout and self.training:
            h = _dropout(h, self.dropout)
        out = self.conv2(h, self.adjacency)
        if batch is None:
            return out
        index = batch.index if isinstance(batch, NodeBatch) else batch
        return out[index.to(out.device)]

    def __deepcopy__(self, memo: dict[int, Any]) -> GCN:
        for name in self._GRAPH:  # constants: share (a sparse CSR tensor cannot be deep-copied)
            t = self._buffers.get(name)
            if t is not None:
                memo[id(t)] = t
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new


# ============================================================================ tasks
@dataclass(frozen=True)
class NodeBatch:
    """The training nodes of one full-batch step: node ids and their labels as trained on."""

    index: Tensor  #: int64 node ids
    y: Tensor  #: int64 labels (noisy where the task's label noise flipped them)

    def __len__(self) -> int:
        return int(self.index.numel())

    def to(self, device: torch.device | str) -> NodeBatch:
        return NodeBatch(self.index.to(device), self.y.to(device))


class GraphTask(Task):
    """Semi-supervised, full-batch node classification on one graph with a :class:`GCN`.

    Subclasses implement :meth:`load_graph` and set ``splits`` (``size -> (labels per class,
    validation nodes, test nodes)``). Attributes: ``graph`` (:class:`GraphData`), ``num_classes``,
    ``train_index`` / ``val_index`` / ``test_index`` (node ids, :func:`planetoid_split` seeded with
    ``data_seed``), ``y_train`` (training labels as trained on), ``y_train_clean`` and ``flipped``
    (label noise, seeded with ``data_seed + 2``, on the training nodes only)."""

    domain = "graph"
    metric = "accuracy"
    per_sample = True
    splits: ClassVar[dict[str, tuple[int, int, int]]] = {}
    #: Keyword arguments of :class:`GCN` (hidden width, dropout, ...).
    model_kwargs: ClassVar[dict[str, Any]] = {"hidden": 64, "dropout": 0.5}

    def __init__(
        self,
        *,
        size: str = "quick",
        data_seed: int = 0,
        label_noise: float = 0.0,
        labels_per_class: int | None = None,
    ) -> None:
        super().__init__(size=size, data_seed=data_seed, label_noise=label_noise)
        per_class, num_val, num_test = self.splits[self.size]
        if labels_per_class is not None:
            if int(labels_per_class) < 1:
                raise ValueError(f"labels_per_class must be >= 1, got {labels_per_class}")
            per_class = int(labels_per_class)
        self.labels_per_class = per_class
        self.graph = self.load_graph()
        self.num_classes = self.graph.num_classes
        self.adjacency = normalized_adjacency(self.graph.edge_index, self.graph.num_nodes)
        self.train_index, self.val_index, self.test_index = planetoid_split(
            self.graph.labels, per_class, num_val, num_test, seed=self.data_seed + 1
        )
        self.y_train_clean = self.graph.labels[self.train_index]
        self.y_train, self.flipped = add_label_noise(
            self.y_train_clean, self.label_noise, self.num_classes, seed=self.data_seed + 2
        )

    def load_graph(self) -> GraphData:
        """The graph for ``self.size`` and ``self.data_seed``."""
        raise NotImplementedError

    def make_model(self, *, arch: str = "gcn", **kwargs: Any) -> GCN:
        """A fresh :class:`GCN` over this task's graph (seed torch first); ``arch="mlp"`` gives the
        feature-only baseline (same layers, no propagation); ``kwargs`` override
        :attr:`model_kwargs`."""
        if arch not in ("gcn", "mlp"):
            raise ValueError(f"invalid arch: {arch!r} (must be 'gcn' or 'mlp')")
        adjacency = self.adjacency if arch == "gcn" else None
        return GCN(self.graph.features, adjacency, self.num_classes, **{**self.model_kwargs, **kwargs})

    def train_batches(self, generator: torch.Generator) -> Iterator[NodeBatch]:
        order = torch.randperm(self.train_index.numel(), generator=generator)
        yield NodeBatch(self.train_index[order], self.y_train[order])

    def val_batches(self, generator: torch.Generator) -> Iterator[NodeBatch]:
        order = torch.randperm(self.val_index.numel(), generator=generator)
        index = self.val_index[order]
        yield NodeBatch(index, self.graph.labels[index])

    def steps_per_epoch(self) -> int:
        return 1

    def sample_losses(self, model: nn.Module, batch: NodeBatch) -> Tensor:
        logits = model(batch)
        return F.cross_entropy(logits, batch.y.to(logits.device), reduction="none")

    def loss(self, model: nn.Module, batch: NodeBatch) -> Tensor:
        logits = model(batch)
        return F.cross_entropy(logits, batch.y.to(logits.device))

    def select(self, batch: NodeBatch, rows: Tensor) -> NodeBatch:
        rows = rows.to(batch.index.device)
        return NodeBatch(batch.index[rows], batch.y[rows])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        index = {"val": self.val_index, "test": self.test_index, "train": self.train_index}.get(split)
        if index is None:
            raise ValueError(f"invalid split: {split!r} (must be 'val', 'test' or 'train')")
        labels = self.graph.labels[index]  # clean labels, also for "train"
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            logits = model(index)
        finally:
            for m, flag in flags:
                m.training = flag
        labels = labels.to(logits.device)
        return {
            "accuracy": float((logits.argmax(dim=1) == labels).float().mean()),
            "loss": float(F.cross_entropy(logits, labels)),
        }


@register_task
class WordNetVerbsTask(GraphTask):
    """WordNet 3.0 verb synsets (13 767 nodes, 15 653 edges, 15 supersense classes, 2 000 binary
    gloss-word features) from the Debian package ``wordnet-base``; GCN hidden 64.

    Splits (``size``: labels per class / validation / test nodes): ``tiny`` 20 / 500 / 1 000,
    ``quick`` and ``full`` 20 / 1 000 / 5 000 (Planetoid's protocol); ``labels_per_class=50`` for
    the easier variant. ``data_path`` reads another ``data.verb`` (else the installed one);
    :class:`TaskUnavailable` when the file is missing.

    Measured (``quick``, 100 full-batch epochs, final weights, seeds 0-2, 1 thread): SGD momentum
    0.9, lr 0.5, wd 5e-4: test accuracy 44.6 ± 0.8 %; Adam lr 0.01: 46.2 ± 0.3 %; the same network
    without propagation 21.1 % (chance 6.7 %); about 10 ms per training step, 4 ms per
    evaluation; the graph is built once per process in about 0.6 s."""

    name = "wordnet-verbs-gcn"
    splits = {"tiny": (20, 500, 1000), "quick": (20, 1000, 5000), "full": (20, 1000, 5000)}
    hparams = TaskHParams(
        lr=0.5, lr_adam=0.01, weight_decay=5e-4, batch_size=300, epochs_quick=60, epochs_full=200,
        extra={"full_batch": True, "hidden": 64, "dropout": 0.5},
    )

    def __init__(
        self,
        *,
        size: str = "quick",
        data_seed: int = 0,
        label_noise: float = 0.0,
        labels_per_class: int | None = None,
        data_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.data_path = None if data_path is None else Path(data_path)
        super().__init__(
            size=size, data_seed=data_seed, label_noise=label_noise, labels_per_class=labels_per_class
        )

    @classmethod
    def availability(cls) -> str | None:
        if find_wordnet_file("verb") is None:
            return f"WordNet 3.0 data.verb not found (Debian package {WORDNET_PACKAGE}): {_INSTALL_HINT}"
        return None

    def load_graph(self) -> GraphData:
        path = self.data_path if self.data_path is not None else find_wordnet_file("verb")
        if path is None or not Path(path).is_file():
            where = "" if self.data_path is None else f" at {self.data_path}"
            raise TaskUnavailable(
                f"WordNet 3.0 data.verb not found{where} (Debian package {WORDNET_PACKAGE}): "
                f"{_INSTALL_HINT}"
            )
        return build_wordnet_graph(path)


#: CSBM shapes by size: nodes, classes, features, mean degree, edge homophily, signal.
_CSBM_SIZES: dict[str, tuple[int, int, int, float, float, float]] = {
    "tiny": (700, 7, 64, 3.9, 0.65, 2.2),
    "quick": (1400, 7, 512, 3.9, 0.65, 3.25),
    "full": (2708, 7, 1433, 3.9, 0.65, 4.0),
}


@register_task
class CSBMTask(GraphTask):
    """A contextual stochastic block model (:func:`make_csbm`) generated from ``data_seed``.

    ``size`` (nodes / classes / features / ``signal``, mean degree 3.9, edge homophily 0.65;
    labels per class / validation / test nodes): ``full`` 2 708 / 7 / 1 433 / 4.0, Cora's shape,
    20 / 500 / 1 000; ``quick`` 1 400 / 7 / 512 / 3.25, 20 / 300 / 700; ``tiny`` 700 / 7 / 64 /
    2.2, 20 / 200 / 300. ``signal`` is set per size so that the feature-only model reaches about
    55 % and the GCN about 82 % (chance 14 %)."""

    name = "csbm-gcn"
    splits = {"tiny": (20, 200, 300), "quick": (20, 300, 700), "full": (20, 500, 1000)}
    hparams = TaskHParams(
        lr=0.2, lr_adam=0.01, weight_decay=5e-4, batch_size=140, epochs_quick=100, epochs_full=200,
        extra={"full_batch": True, "hidden": 64, "dropout": 0.5},
    )

    def load_graph(self) -> GraphData:
        n, k, d, degree, homophily, signal = _CSBM_SIZES[self.size]
        p_in, p_out = csbm_edge_probabilities(n, k, degree, homophily)
        return make_csbm(n, k, p_in=p_in, p_out=p_out, num_features=d, signal=signal, seed=self.data_seed)
