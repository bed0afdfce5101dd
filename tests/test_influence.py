"""Influence scores against dense references built from explicit per-example gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import infl_plugin as ip

from models import ImageNet, SeqNet, example_loss, image_data, loader, sequence_data
from reference import dense_fisher, per_example_gradients, spearman

DAMPING = 1e-3


def dense_influence(grads_train: torch.Tensor, grads_query: torch.Tensor, fisher: torch.Tensor, damping: float):
    """``∇f(q)ᵀ (F + λI)⁻¹ ∇L(z)`` for flattened gradients: ``[Q, N]``."""
    eye = torch.eye(fisher.shape[0], dtype=fisher.dtype)
    solved = torch.linalg.solve(fisher + damping * eye, grads_train.flatten(1).T)
    return grads_query.flatten(1) @ solved


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_single_one_token_example_matches_dense_damped_fisher(strategy):
    """One example, one token, empirical Fisher: F = (ā āᵀ) ⊗ (g gᵀ) exactly."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    train = [(torch.randn(5, dtype=torch.float64), torch.tensor(1))]
    queries = [(torch.randn(5, dtype=torch.float64), torch.tensor(i % 3)) for i in range(4)]
    config = ip.InfluenceConfig(strategy=strategy, damping=DAMPING, accumulation_dtype="float64")
    task = ip.ClassificationTask()
    factors = ip.fit_factors(model, task, loader(train, 1), config)
    scores = ip.Attributor(model, task, factors, config).pairwise_scores(loader(queries, 2), loader(train, 1))
    g_train = per_example_gradients([model], lambda i: example_loss(model, train[i]), 1)[0]
    g_query = per_example_gradients([model], lambda i: example_loss(model, queries[i]), 4)[0]
    expected = dense_influence(g_train, g_query, dense_fisher(g_train), DAMPING)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_examples_sharing_one_activation_match_dense_damped_fisher(strategy):
    """All examples share one input: F = ā āᵀ ⊗ E[g gᵀ] exactly, for kfac and ekfac."""
    torch.manual_seed(0)
    model = nn.Linear(4, 5).double()
    x = torch.randn(4, dtype=torch.float64)
    train = [(x, torch.tensor(i % 5)) for i in range(10)]
    queries = [(torch.randn(4, dtype=torch.float64), torch.tensor(i)) for i in range(3)]
    config = ip.InfluenceConfig(strategy=strategy, damping=DAMPING, accumulation_dtype="float64")
    task = ip.ClassificationTask()
    factors = ip.fit_factors(model, task, loader(train, 4), config)
    scores = ip.Attributor(model, task, factors, config).pairwise_scores(loader(queries, 3), loader(train, 4))
    g_train = per_example_gradients([model], lambda i: example_loss(model, train[i]), len(train))[0]
    g_query = per_example_gradients([model], lambda i: example_loss(model, queries[i]), len(queries))[0]
    expected = dense_influence(g_train, g_query, dense_fisher(g_train), DAMPING)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("kind", ["image", "sequence"])
def test_identity_scores_are_gradient_dot_products(kind):
    torch.manual_seed(0)
    model, items = (ImageNet().double(), image_data()) if kind == "image" else (SeqNet().double(), sequence_data())
    config = ip.InfluenceConfig(strategy="identity", accumulation_dtype="float64")
    task = ip.ClassificationTask()
    attributor = ip.Attributor(model, task, ip.fit_factors(model, task, loader(items, 5), config), config)
    scores = attributor.pairwise_scores(loader(items[:3], 2), loader(items, 5))
    modules = [layer.module for layer in ip.select_layers(model)]
    grads = per_example_gradients(modules, lambda i: example_loss(model, items[i]), len(items))
    flat = torch.cat([g.flatten(1) for g in grads], dim=1)
    torch.testing.assert_close(scores, flat[:3] @ flat.T, rtol=1e-10, atol=1e-12)


def test_ekfac_preconditioned_vector_equals_dense_product():
    """(G+λI)⁻¹ V = (Q_S ⊗ Q_A) diag(Λ + λ)⁻¹ (Q_S ⊗ Q_A)ᵀ vec(V) for a random V."""
    torch.manual_seed(0)
    model, items = SeqNet().double(), sequence_data()
    config = ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64")
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 5), config)
    for layer in ip.select_layers(model):
        f = factors.layers[layer.name]
        assert f.damping == pytest.approx(0.1 * f.eigenvalues.mean().item())
        basis = torch.kron(f.q_s, f.q_a)
        v = torch.randn(layer.shape, dtype=torch.float64)
        dense = basis @ torch.diag(1 / (f.eigenvalues.flatten() + f.damping)) @ basis.T @ v.flatten()
        torch.testing.assert_close(f.precondition(v), dense.reshape(layer.shape), rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def digits_mlp():
    """A 64-48-10 MLP briefly trained on sklearn digits (float64), with train/query splits."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x[:300]), y[:300]).backward()
        opt.step()
    train = list(zip(x[:96], y[:96]))
    queries = list(zip(x[1000:1008], y[1000:1008]))
    return model, train, queries


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_scores_do_not_depend_on_batch_size_or_order(digits_mlp, strategy):
    model, train, queries = digits_mlp
    task = ip.ClassificationTask()
    config = ip.InfluenceConfig(strategy=strategy, accumulation_dtype="float64")
    reference = None
    for batch_size in (1, 7, 32):
        factors = ip.fit_factors(model, task, loader(train, batch_size), config)
        scores = ip.Attributor(model, task, factors, config).pairwise_scores(loader(queries, 3), loader(train, batch_size))
        if reference is None:
            reference = scores
        torch.testing.assert_close(scores, reference, rtol=1e-8, atol=1e-10 * reference.abs().max().item())
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    shuffled = [train[i] for i in perm]
    factors = ip.fit_factors(model, task, loader(shuffled, 7), config)
    scores = ip.Attributor(model, task, factors, config).pairwise_scores(loader(queries, 3), loader(shuffled, 7))
    torch.testing.assert_close(scores, reference[:, perm], rtol=1e-8, atol=1e-10 * reference.abs().max().item())


def test_layer_scores_sum_to_total_and_self_scores_are_the_diagonal(digits_mlp):
    model, train, _ = digits_mlp
    task = ip.ClassificationTask()
    config = ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64")
    attributor = ip.Attributor(model, task, ip.fit_factors(model, task, loader(train, 16), config), config)
    per_layer = attributor.pairwise_scores(loader(train[:10], 4), loader(train, 16), per_layer=True)
    total = attributor.pairwise_scores(loader(train[:10], 4), loader(train, 16))
    assert per_layer.shape == (2, 10, len(train))
    torch.testing.assert_close(per_layer.sum(0), total, rtol=1e-12, atol=1e-12)
    self_scores = attributor.self_scores(loader(train[:10], 3))
    torch.testing.assert_close(self_scores, total[:, :10].diagonal(), rtol=1e-9, atol=0)
    assert (self_scores > 0).all()


def test_low_rank_queries(digits_mlp):
    """r ≥ full rank is exact; r = 32 on the 48×65 layer keeps per-query Spearman ≥ 0.9."""
    model, train, queries = digits_mlp
    task = ip.ClassificationTask()
    exact_config = ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64")
    factors = ip.fit_factors(model, task, loader(train, 16), exact_config)
    exact = ip.Attributor(model, task, factors, exact_config).pairwise_scores(loader(queries, 4), loader(train, 16), per_layer=True)
    for rank, check in ((65, "exact"), (32, "spearman")):
        config = ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64", query_rank=rank)
        attributor = ip.Attributor(model, task, factors, config)
        pq = attributor.precondition(loader(queries, 4))
        low = attributor.pairwise_scores(pq, loader(train, 16), per_layer=True)
        if check == "exact":
            torch.testing.assert_close(low, exact, rtol=1e-9, atol=1e-9 * exact.abs().max().item())
        else:
            assert pq.layers["0"].u.shape == (len(queries), 48, 32)  # first layer went low-rank
            for q in range(len(queries)):
                assert spearman(low[0, q], exact[0, q]) >= 0.9


def test_token_scores_sum_to_sequence_scores():
    torch.manual_seed(0)
    model, items = SeqNet().double(), sequence_data()
    task = ip.ClassificationTask()
    for rank in (None, 2):
        config = ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64", query_rank=rank)
        attributor = ip.Attributor(model, task, ip.fit_factors(model, task, loader(items, 4), config), config)
        pq = attributor.precondition(loader(items[:3], 3))
        batch = next(iter(loader(items[:6], 6)))
        tokens = attributor.token_scores(pq, batch)  # name -> [Q, B, T_layer] (the pooled head has T = 1)
        assert [t.shape for t in tokens.values()] == [(3, 6, 6), (3, 6, 6), (3, 6, 1)]
        padding = batch["attention_mask"] == 0
        assert (tokens["inp"][:, padding] == 0).all() and (tokens["mix"][:, padding] == 0).all()
        sequence = attributor.pairwise_scores(pq, loader(items[:6], 6), per_layer=True)
        summed = torch.stack([tokens[name].sum(-1) for name in attributor.layer_names])
        torch.testing.assert_close(summed, sequence, rtol=1e-10, atol=1e-12)


def test_sign_positive_means_helpful():
    """A gradient step up-weighting z changes the query loss by -lr·score (first order)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    train = [(torch.randn(4, dtype=torch.float64), torch.tensor(i % 3)) for i in range(6)]
    query = [(train[0][0] + 0.01 * torch.randn(4, dtype=torch.float64), train[0][1])]
    config = ip.InfluenceConfig(strategy="identity", accumulation_dtype="float64")
    task = ip.ClassificationTask()
    scores = ip.Attributor(model, task, ip.fit_factors(model, task, loader(train, 6), config), config).pairwise_scores(
        loader(query, 1), loader(train, 6))[0]
    assert scores[0] > 0  # an example almost identical to the query helps it
    lr = 1e-6
    for i in range(len(train)):
        before = example_loss(model, query[0]).item()
        stepped = nn.Linear(4, 3).double()
        stepped.load_state_dict(model.state_dict())
        grads = torch.autograd.grad(example_loss(stepped, train[i]), list(stepped.parameters()))
        with torch.no_grad():
            for p, g in zip(stepped.parameters(), grads):
                p -= lr * g
        change = example_loss(stepped, query[0]).item() - before
        assert change == pytest.approx(-lr * scores[i].item(), rel=1e-3, abs=1e-12)


def test_top_k_matches_full_matrix(digits_mlp):
    model, train, queries = digits_mlp
    task = ip.ClassificationTask()
    config = ip.InfluenceConfig(strategy="kfac", accumulation_dtype="float64")
    attributor = ip.Attributor(model, task, ip.fit_factors(model, task, loader(train, 16), config), config)
    pq = attributor.precondition(loader(queries, 4))
    full = attributor.pairwise_scores(pq, loader(train, 10))
    top = attributor.top_k(pq, loader(train, 10), k=5)
    assert top.helpful_indices.shape == (len(queries), 5)
    torch.testing.assert_close(top.helpful_scores, full.topk(5, dim=1).values)
    torch.testing.assert_close(top.harmful_scores, full.topk(5, dim=1, largest=False).values)
    torch.testing.assert_close(full.gather(1, top.helpful_indices), top.helpful_scores)
