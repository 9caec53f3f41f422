"""Graph tasks: the WordNet data-file parser, the GCN propagation matrix and layers, the CSBM
generator, Planetoid splits with label noise, and both tasks behind the Task interface."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.nn.functional as F

from flatminima.bench.tasks import TASKS, TaskUnavailable, graph
from flatminima.bench.tasks.graph import (
    GCN,
    CSBMTask,
    NodeBatch,
    WordNetVerbsTask,
    build_wordnet_graph,
    csbm_edge_probabilities,
    gloss_definition,
    make_csbm,
    normalized_adjacency,
    parse_wordnet_data,
    planetoid_split,
    sparse_matmul,
)

# A data.verb-like file: licence header (two leading spaces), then synset lines, each ending in two
# spaces as in the real file. Pointers: a same-POS pair in both directions (one edge), a noun pointer
# (no edge), a self pointer (no edge); "a" is a hexadecimal lex_id.
DATA_VERB = "".join(line + "  \n" for line in [
    "  1 This software and database is being provided to you, the LICENSEE, by",
    "  2 Princeton University under the following license.  By obtaining, using",
    "  3 ",
    "00000010 29 v 02 breathe 0 respire 1 003 @ 00000100 v 0000 + 00000999 n 0102 ~ 00000200 v 0000"
    ' 01 + 02 00 | draw air into the lungs; "I breathe"',
    '00000100 29 v 01 live 0 001 ~ 00000010 v 0000 01 + 01 00 | be alive in the world; "she lives"; exist',
    '00000200 43 v 01 rain 0 002 @ 00000010 v 0000 $ 00000200 v 0000 01 + 01 00 | fall as rain "it rains',
    '00000300 30 v 01 change a 000 01 + 08 00 | cause to change; "change it"',
])


def _train(task, model, epochs, opt="adam", lr=0.01, seed=0):
    o = (torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4) if opt == "adam"
         else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        batches = list(task.train_batches(gen))
        assert len(batches) == 1
        o.zero_grad()
        task.loss(model, batches[0]).backward()
        o.step()
    return model


# ----------------------------------------------------------------------------- WordNet files
def test_parser_skips_the_licence_and_reads_words_pointers_gloss_and_lex_file(tmp_path):
    path = tmp_path / "data.verb"
    path.write_text(DATA_VERB)
    synsets = parse_wordnet_data(path)
    assert [s.offset for s in synsets] == [10, 100, 200, 300]
    first = synsets[0]
    assert first.lex_filenum == 29 and first.lexname == "verb.body" and first.ss_type == "v"
    assert first.words == ("breathe", "respire")
    assert [(p.symbol, p.offset, p.pos, p.source, p.target) for p in first.pointers] == [
        ("@", 100, "v", 0, 0), ("+", 999, "n", 1, 2), ("~", 200, "v", 0, 0)]
    assert first.gloss == 'draw air into the lungs; "I breathe"'
    assert synsets[3].pointers == () and synsets[3].lex_filenum == 30
    assert gloss_definition(synsets[1].gloss) == "be alive in the world; exist"
    assert gloss_definition(synsets[2].gloss) == "fall as rain"  # unterminated example dropped too
    assert parse_wordnet_data(path) is synsets  # cached

    g = build_wordnet_graph(path, vocab_size=3)
    assert g.num_nodes == 4 and g.edge_index.tolist() == [[0, 0], [1, 2]]  # undirected, once each
    assert g.labels.tolist() == [0, 0, 2, 1]
    assert g.class_names == ("verb.body", "verb.change", "verb.weather")
    assert g.feature_names == ("the", "air", "alive")  # document frequency, then alphabetical
    assert g.features.to_dense().tolist() == [[1, 1, 0], [1, 0, 1], [0, 0, 0], [0, 0, 0]]
    words = build_wordnet_graph(path, vocab_size=100).feature_names
    assert "breathe" not in words and "rains" not in words and "exist" in words  # examples dropped
    assert not any("verb" in w or w.isdigit() for w in words)  # no label information

    bad = tmp_path / "bad.verb"
    bad.write_text(DATA_VERB.replace("003 @ 00000100 v 0000", "003 @ 00000100 v"))
    with pytest.raises(ValueError, match="bad.verb:4"):
        parse_wordnet_data(bad)


def test_missing_wordnet_data_raises_task_unavailable_with_the_install_hint(tmp_path, monkeypatch):
    with pytest.raises(TaskUnavailable, match="apt-get install wordnet-base"):
        WordNetVerbsTask(size="tiny", data_path=tmp_path / "nowhere" / "data.verb")
    monkeypatch.setattr(graph, "find_wordnet_file", lambda pos="verb": None)
    message = WordNetVerbsTask.availability()
    assert message is not None and "\n" not in message and message.endswith("apt-get install wordnet-base")
    with pytest.raises(TaskUnavailable, match="apt-get install wordnet-base"):
        WordNetVerbsTask(size="tiny")
    assert CSBMTask.availability() is None


@pytest.fixture(scope="module")
def wordnet_task():
    message = WordNetVerbsTask.availability()
    if message is not None:
        pytest.skip(message)
    # Build from scratch with every socket refused: no network is touched.
    graph._parse_cached.cache_clear()
    graph._wordnet_graph_cached.cache_clear()
    graph._dpkg_wordnet_dir.cache_clear()

    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "socket", no_network)
        return WordNetVerbsTask(size="tiny", data_seed=0, label_noise=0.1)


def test_wordnet_verbs_task_loads_offline_and_the_gcn_learns(wordnet_task):
    task = wordnet_task
    g = task.graph
    assert (g.num_nodes, g.num_edges, g.num_classes, g.num_features) == (13767, 15653, 15, 2000)
    assert int((g.degrees() == 0).sum()) == 100 and g.homophily() == pytest.approx(0.858, abs=0.001)
    assert g.class_names[0] == "verb.body" and g.class_names[-1] == "verb.weather"
    assert torch.bincount(g.labels).tolist()[-1] == 81 and g.features.layout == torch.sparse_csr
    assert (task.train_index.numel(), task.val_index.numel(), task.test_index.numel()) == (300, 500, 1000)
    assert int(task.flipped.sum()) == 30
    torch.manual_seed(0)
    model = _train(task, task.make_model(), 40, opt="sgd", lr=0.5)
    acc = task.evaluate(model, "test")["accuracy"]
    assert model.training and acc > 0.3  # chance 1/15; ~0.40 after 40 SGD epochs


# ----------------------------------------------------------------------------- GCN
def test_normalized_adjacency_matches_a_dense_hand_computation():
    # 5 nodes; the edge 0-1 given twice and reversed, a self loop (ignored), node 4 isolated.
    edges = torch.tensor([[0, 1, 1, 2, 3, 2], [1, 0, 2, 3, 1, 2]])
    a_hat = normalized_adjacency(edges, 5)
    assert a_hat.layout == torch.sparse_csr and a_hat.shape == (5, 5)
    a = torch.zeros(5, 5)
    for i, j in [(0, 1), (1, 2), (2, 3), (1, 3)]:
        a[i, j] = a[j, i] = 1.0
    a_loop = a + torch.eye(5)
    d = a_loop.sum(1)
    expected = a_loop / torch.sqrt(d[:, None] * d[None, :])
    dense = a_hat.to_dense()
    torch.testing.assert_close(dense, expected)
    torch.testing.assert_close(dense, dense.T)
    assert dense[4, 4] == 1.0 and dense[0, 1] == pytest.approx(1 / (2 * 4) ** 0.5)


@pytest.mark.parametrize("sparse_features", [False, True])
def test_gcn_forward_and_gradients_equal_the_dense_formula(sparse_features):
    gen = torch.Generator().manual_seed(0)
    edges = torch.tensor([[0, 1, 2, 3, 0], [1, 2, 3, 4, 4]])
    a_hat = normalized_adjacency(edges, 6)
    x = (torch.rand(6, 8, generator=gen) < 0.4).float()
    features = x.to_sparse_csr() if sparse_features else x
    torch.manual_seed(0)
    model = GCN(features, a_hat, 3, hidden=5, dropout=0.5).eval()
    a = a_hat.to_dense()
    w1, b1 = model.conv1.weight, model.conv1.bias
    w2, b2 = model.conv2.weight, model.conv2.bias
    with torch.no_grad():
        b1.normal_()
        b2.normal_()
    expected = a @ torch.relu(a @ x @ w1 + b1) @ w2 + b2
    out = model()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(model(torch.tensor([4, 0])), expected[[4, 0]])
    torch.testing.assert_close(model(NodeBatch(torch.tensor([2]), torch.tensor([1]))), expected[[2]])
    grads = torch.autograd.grad(out.square().sum(), [w1, b1, w2, b2])
    ref = torch.autograd.grad(expected.square().sum(), [w1, b1, w2, b2])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
    mlp = GCN(features, None, 3, hidden=5).eval()  # the feature-only baseline: no propagation
    torch.testing.assert_close(
        mlp(), torch.relu(x @ mlp.conv1.weight + mlp.conv1.bias) @ mlp.conv2.weight + mlp.conv2.bias)


def test_sparse_matmul_is_twice_differentiable():
    gen = torch.Generator().manual_seed(1)
    m = torch.rand(5, 4, generator=gen, dtype=torch.float64) * (torch.rand(5, 4, generator=gen) < 0.5)
    dense = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    s, s_t = m.to_sparse_csr(), m.T.contiguous().to_sparse_csr()
    assert torch.autograd.gradcheck(lambda d: sparse_matmul(s, d, s_t), (dense,))
    assert torch.autograd.gradgradcheck(lambda d: sparse_matmul(s, d, s_t).square(), (dense,))


def test_graph_buffers_are_non_persistent_moved_and_shared_by_deepcopy():
    task = CSBMTask(size="tiny")
    model = task.make_model()
    assert set(model.state_dict()) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    assert {n for n, _ in model.named_buffers()} == {"features", "adjacency"}
    twin = copy.deepcopy(model)
    assert twin.adjacency is model.adjacency and twin.features is model.features
    assert twin.conv1.weight is not model.conv1.weight
    with torch.no_grad():
        twin.conv1.weight.add_(1.0)
    assert not torch.equal(twin.conv1.weight, model.conv1.weight)
    double = copy.deepcopy(model).to(torch.float64)
    assert double.adjacency.dtype == torch.float64 and double().dtype == torch.float64
    sparse_model = GCN(task.graph.features.to_sparse_csr(), task.adjacency, 7).eval()
    torch.testing.assert_close(copy.deepcopy(sparse_model)(), sparse_model())  # CSR shared, not copied


# ----------------------------------------------------------------------------- CSBM and splits
def test_csbm_sizes_balance_edge_probabilities_and_determinism():
    n, k, p_in, p_out = 600, 4, 0.05, 0.005
    g = make_csbm(n, k, p_in=p_in, p_out=p_out, num_features=16, signal=3.0, seed=3)
    assert g.features.shape == (n, 16) and g.labels.shape == (n,) and g.num_classes == k
    assert torch.bincount(g.labels).tolist() == [150] * 4
    src, dst = g.edge_index
    assert bool((src < dst).all())
    assert torch.unique(src * n + dst).numel() == g.num_edges  # no duplicates
    same = g.labels[src] == g.labels[dst]
    intra_pairs, inter_pairs = k * 150 * 149 // 2, n * (n - 1) // 2 - k * 150 * 149 // 2
    for count, pairs, p in [(int(same.sum()), intra_pairs, p_in), (int((~same).sum()), inter_pairs, p_out)]:
        sd = (pairs * p * (1 - p)) ** 0.5
        assert abs(count - pairs * p) < 5 * sd, (count, pairs * p, sd)
    means = torch.stack([g.features[g.labels == c].mean(0) for c in range(k)])
    assert float(means.norm(dim=1).mean()) == pytest.approx(3.0, rel=0.3)  # class means of norm ~3
    again = make_csbm(n, k, p_in=p_in, p_out=p_out, num_features=16, signal=3.0, seed=3)
    assert torch.equal(again.edge_index, g.edge_index) and torch.equal(again.features, g.features)
    other = make_csbm(n, k, p_in=p_in, p_out=p_out, num_features=16, signal=3.0, seed=4)
    assert not torch.equal(other.labels, g.labels)

    p_in, p_out = csbm_edge_probabilities(2708, 7, 3.9, 0.65)
    full = CSBMTask(size="full").graph
    assert (full.num_nodes, full.num_classes, full.num_features) == (2708, 7, 1433)
    assert 2 * full.num_edges / full.num_nodes == pytest.approx(3.9, rel=0.06)
    assert full.homophily() == pytest.approx(0.65, abs=0.03)


def test_splits_are_disjoint_and_label_noise_touches_training_nodes_only():
    labels = torch.arange(100) % 4
    tr, va, te = planetoid_split(labels, 5, 20, 30, seed=0)
    assert (tr.numel(), va.numel(), te.numel()) == (20, 20, 30)
    assert torch.bincount(labels[tr]).tolist() == [5] * 4
    assert torch.unique(torch.cat([tr, va, te])).numel() == 70
    with pytest.raises(ValueError, match="fewer than per_class"):
        planetoid_split(labels, 26, 0, 0)
    with pytest.raises(ValueError, match="fewer than num_val"):
        planetoid_split(labels, 5, 50, 31)

    clean = CSBMTask(size="tiny", data_seed=1)
    noisy = CSBMTask(size="tiny", data_seed=1, label_noise=0.3)
    assert torch.equal(clean.graph.labels, noisy.graph.labels)
    for t in (clean, noisy):
        assert torch.bincount(t.graph.labels[t.train_index]).tolist() == [20] * 7
        assert (t.val_index.numel(), t.test_index.numel()) == (200, 300)
        ids = torch.cat([t.train_index, t.val_index, t.test_index])
        assert torch.unique(ids).numel() == ids.numel()  # disjoint
    assert torch.equal(noisy.train_index, clean.train_index)
    assert torch.equal(noisy.test_index, clean.test_index)
    assert int(noisy.flipped.sum()) == round(0.3 * 140) and not noisy.flipped.equal(clean.flipped)
    assert torch.equal(noisy.y_train_clean, clean.y_train)
    assert torch.equal(noisy.y_train[~noisy.flipped], clean.y_train[~noisy.flipped])
    assert bool((noisy.y_train[noisy.flipped] != clean.y_train[noisy.flipped]).all())
    batch = next(noisy.train_batches(torch.Generator().manual_seed(0)))
    order = torch.argsort(batch.index)
    assert torch.equal(batch.index[order], noisy.train_index) and torch.equal(batch.y[order], noisy.y_train)
    assert CSBMTask(size="tiny", labels_per_class=5).train_index.numel() == 35


# ----------------------------------------------------------------------------- the Task interface
def test_registry_per_sample_losses_select_and_evaluate():
    assert TASKS["csbm-gcn"] is CSBMTask and TASKS["wordnet-verbs-gcn"] is WordNetVerbsTask
    assert CSBMTask.domain == "graph" and CSBMTask.per_sample
    task = CSBMTask(size="tiny", label_noise=0.2)
    assert task.steps_per_epoch() == 1
    torch.manual_seed(0)
    model = task.make_model()
    batch = next(task.train_batches(torch.Generator().manual_seed(5)))
    model.eval()
    with torch.no_grad():
        per = task.sample_losses(model, batch)
        assert per.shape == (140,)
        assert float(per.mean()) == pytest.approx(float(task.loss(model, batch)), rel=1e-6)
        rows = torch.tensor([3, 7, 11, 100])
        sub = task.select(batch, rows)
        assert len(sub) == 4 and torch.equal(sub.index, batch.index[rows])
        torch.testing.assert_close(task.sample_losses(model, sub), per[rows])
        logits = model()
        torch.testing.assert_close(per, F.cross_entropy(logits[batch.index], batch.y, reduction="none"))
    model.train()
    result = task.evaluate(model, "test")
    assert model.training and set(result) == {"accuracy", "loss"}
    with torch.no_grad():
        model.eval()
        hits = model()[task.test_index].argmax(1) == task.graph.labels[task.test_index]
        expected = float(hits.float().mean())
    assert result["accuracy"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="invalid split"):
        task.evaluate(model, "holdout")
    with pytest.raises(ValueError, match="invalid arch"):
        task.make_model(arch="gat")


@pytest.mark.parametrize("opt, lr", [("sgd", 0.5), ("adam", 0.01)])
def test_csbm_gcn_trains_above_chance_and_beats_the_feature_only_mlp(opt, lr):
    task = CSBMTask(size="tiny", data_seed=0)
    torch.manual_seed(0)
    gcn = _train(task, task.make_model(), 60, opt=opt, lr=lr)
    torch.manual_seed(0)
    mlp = _train(task, task.make_model(arch="mlp"), 60, opt=opt, lr=lr)
    acc_gcn = task.evaluate(gcn, "test")["accuracy"]
    acc_mlp = task.evaluate(mlp, "test")["accuracy"]
    assert acc_gcn > 0.7 and acc_gcn > acc_mlp + 0.15, (acc_gcn, acc_mlp)  # chance 1/7
    assert task.evaluate(gcn, "train")["accuracy"] > 0.9


def test_esam_selection_swa_averaging_and_hessian_work_on_the_gcn():
    from flatminima.optim import create
    from flatminima.sharpness import hessian_eigenvalues

    task = CSBMTask(size="tiny")
    torch.manual_seed(0)
    model = task.make_model()
    esam = create("esam_sgd", model.parameters(), lr=0.5, momentum=0.9, rho=0.05, beta=1.0, gamma=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = next(task.train_batches(gen))

        def closure(select=None, batch=batch):
            return task.sample_losses(model, batch if select is None else task.select(batch, select))

        esam.step(closure)
    swa = create("sgd+swa", model.parameters(), model=model, lr=0.5, momentum=0.9, start=0, every=1,
                 total_steps=4)
    for _ in range(4):
        batch = next(task.train_batches(gen))
        swa.zero_grad()
        task.loss(model, batch).backward()
        swa.step()
    with swa.swapped():
        acc = task.evaluate(model, "val")["accuracy"]
    assert 0.0 <= acc <= 1.0
    top = hessian_eigenvalues(model, task.loss, [batch], k=1, max_iter=20)
    assert float(torch.as_tensor(top).reshape(-1)[0]) > 0
