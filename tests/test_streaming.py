"""Streaming attribution: scores taken from the training backward equal checkpoint scoring.

Exactness is checked at one training step against `Attributor.pairwise_scores` with the very same
`PreconditionedQueries` and parameters, through gradient accumulation, padding, an AMP-style loss
scale, gradient checkpointing, a module called twice per forward, full-rank and rank-r queries,
and DDP (2 processes, gloo); and against explicit per-example parameter gradients (ground truth
that avoids the hooks). Everything is float64: both sides sum the same products in another order,
so they agree to ~1e-13 relative; the tolerance 1e-9 leaves room and still catches any missing
scale (the smallest factor in play is 2). The per-layer sums Σ|score| (the layer shares' input)
are held to the same tolerance.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import infl_plugin as ip
from infl_plugin.scoring.attributor import QueryLayer, contract
from infl_plugin.curvature.hooks import Capture
from infl_plugin.curvature.layers import TrackedLayer
from infl_plugin.tasks import IGNORE_INDEX

from models import loader
from reference import per_example_gradients

VOCAB, WIDTH, TOKENS = 11, 6, 7
RTOL, ATOL = 1e-9, 1e-12
AMP_SCALE = 1024.0


class TinyLM(nn.Module):
    """Embedding → masked causal mean mixing → MLP block (checkpointed while training) → one
    ``shared`` Linear applied twice → head. Padding (``attention_mask == 0``) is excluded from the
    mixing, so pads influence nothing."""

    def __init__(self, checkpointing: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.up = nn.Linear(WIDTH, 8)
        self.down = nn.Linear(8, WIDTH)
        self.shared = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.checkpointing = checkpointing

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(input_ids)
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        m = m[..., None].to(x.dtype)
        x = x + (x * m).cumsum(1) / m.cumsum(1).clamp(min=1)
        if self.checkpointing and self.training:
            x = x + checkpoint(self.block, x, use_reentrant=False)
        else:
            x = x + self.block(x)
        x = x + torch.tanh(self.shared(torch.tanh(self.shared(x))))
        return self.head(x)


def lm_model(checkpointing: bool = True) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(checkpointing).double()


def lm_items(n: int, seed: int = 0) -> list[dict]:
    """Right-padded sequences of 2..TOKENS real tokens."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = 2 + i % (TOKENS - 1)
        mask = torch.zeros(TOKENS, dtype=torch.long)
        mask[:length] = 1
        items.append({"input_ids": torch.randint(0, VOCAB, (TOKENS,), generator=g), "attention_mask": mask})
    return items


def hf_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The Hugging Face causal-LM loss: mean cross-entropy over the non-ignored shifted tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    targets = ip.CausalLMTask().shifted_labels(batch)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def lm_config(rank=None, **overrides) -> ip.InfluenceConfig:
    base = dict(modules=["up", "down", "shared", "head"], accumulation_dtype="float64", damping=1e-3,
                query_rank=rank, update_every=1, stream_refresh_every=None)
    base.update(overrides)
    return ip.InfluenceConfig(**base)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("route", ["full", "rank-r rebuilt", "rank-r factored"])
def test_streamed_scores_equal_pairwise_scores_at_one_step(route):
    """Gradient accumulation (2 micro-batches), padding, ×1024 loss scale, checkpointing, a module
    called twice: the streamed scores of the step's 8 examples equal checkpoint scoring."""
    task = ip.CausalLMTask()
    items = lm_items(8)
    micro = list(loader(items, 4))
    queries = list(loader(lm_items(3, seed=5), 3))
    config = lm_config(rank=None if route == "full" else 2)
    model = lm_model()
    factors = ip.fit_factors(model, task, micro, config)
    with ip.InfluenceTracker(model, task, config, queries=queries) as tracker:
        assert tracker.refresh_queries(factors) == "ekfac"
        if route == "rank-r factored":
            tracker.scorer.rebuild_budget_bytes = 0
        pq = tracker.scorer.queries
        with tracker.paused():
            attributor = ip.Attributor(model, task, factors, config)
            per_layer = attributor.pairwise_scores(pq, micro, per_layer=True)  # [L, Q, 8]
        expected = per_layer.sum(0)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i, batch in enumerate(micro):
            assert tracker.needs_grad_scale
            (AMP_SCALE * hf_loss(model, batch) / 2).backward()
            scale = AMP_SCALE * task.training_loss_scale(batch) / 2
            tracker.step(batch, grad_scale=scale, optimizer_step=i == 1, indices=range(4 * i, 4 * i + 4))
        opt.step()
        result = tracker.streamed_scores()
    assert tracker.scorer.routes["up"] == {"full": "dw", "rank-r rebuilt": "dw (rank-r rebuilt)",
                                           "rank-r factored": "rank-r"}[route]
    assert result.indices.tolist() == list(range(8)) and result.visits.tolist() == [1] * 8
    assert result.batches == {"ekfac": 2} and result.preconditioned
    torch.testing.assert_close(result.scores, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(result.dense(10)[:, :8], expected, rtol=RTOL, atol=ATOL)
    assert not result.dense(10)[:, 8:].any()
    # per layer Σ_n |score|, the shared module's two calls summed before |.|, as the checkpoint pass
    assert result.layer_names == attributor.layer_names == ["up", "down", "shared", "head"]
    assert result.layer_abs.dtype == torch.float64
    torch.testing.assert_close(result.layer_abs, per_layer.abs().sum(-1), rtol=RTOL, atol=ATOL)


def test_per_layer_sums_add_a_module_s_calls_before_the_absolute_value():
    """Two calls of one layer whose scores cancel add 0 to its Σ|score| (scores are linear in
    ``DW_n``: the example's gradient sums both calls); the weight / loss scale multiplies it and an
    example with a non-finite score is left out of it as of the scores."""
    layer = TrackedLayer("lin", nn.Linear(2, 2, bias=False), "linear", tracks_bias=False)
    other = TrackedLayer("other", nn.Linear(2, 2, bias=False), "linear", tracks_bias=False)
    full = torch.arange(8, dtype=torch.float64).reshape(2, 2, 2) - 3  # [Q=2, d_out, d_in]
    pq = ip.PreconditionedQueries({"lin": QueryLayer(full=full), "other": QueryLayer(full=full)},
                                  torch.zeros(2, dtype=torch.float64))
    scorer = ip.StreamingScorer([layer, other], torch.float64)
    scorer.set_queries(pq)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 1, 2, generator=g, dtype=torch.float64)  # [B, T, d_in]
    grad = torch.randn(3, 1, 2, generator=g, dtype=torch.float64)  # [B, T, d_out]
    scorer(Capture(layer, a, grad, None))
    scorer(Capture(layer, -a, grad, None))  # the second call cancels the first
    scorer(Capture(other, a, grad, None))
    assert scorer.commit([0, 1, 2], grad_scale=-4.0, weight=2.0)
    value = contract(QueryLayer(full=full), a, grad)  # [Q, 3]
    result = scorer.result()
    assert result.layer_names == ["lin", "other"]
    torch.testing.assert_close(result.layer_abs, torch.stack([torch.zeros(2, dtype=torch.float64),
                                                              value.abs().sum(1) / 2]))
    torch.testing.assert_close(result.scores, -value / 2)
    bad = grad.clone()
    bad[1] = float("nan")
    scorer(Capture(other, a, bad, None))
    scorer.commit([3, 4, 5])
    result = scorer.result()
    assert result.indices.tolist() == [0, 1, 2, 3, 5]
    expected = value.abs().sum(1) / 2 + value[:, [0, 2]].abs().sum(1)
    torch.testing.assert_close(result.layer_abs[1], expected)
    assert not result.layer_abs[0].any()
    state = scorer.state_dict()
    restored = ip.StreamingScorer([layer, other], torch.float64)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.result().layer_abs, result.layer_abs)
    old = {k: v for k, v in state.items() if k not in ("layer_names", "layer_abs")}  # saved before per-layer sums
    restored.load_state_dict(old)
    assert restored.result().layer_abs is None and restored.result().layer_names == ["lin", "other"]
    torch.testing.assert_close(restored.result().scores, result.scores)
    with pytest.raises(ValueError, match="saved for layers"):
        ip.StreamingScorer([other, layer], torch.float64).load_state_dict(state)
    scorer.reset()
    assert scorer.result().layer_abs is None


def test_streamed_gradient_dot_products_equal_explicit_per_example_gradients():
    """Ground truth without hooks: with ``strategy="identity"`` the score is Σ_layers <∇f(q), ∇L(z)>,
    from one ``torch.autograd.grad`` per example on the parameters (the shared module's gradient
    sums its two calls there by construction)."""
    task = ip.CausalLMTask()
    items, query_items = lm_items(6), lm_items(2, seed=5)
    model = lm_model()
    config = lm_config(strategy="identity")
    with ip.InfluenceTracker(model, task, config, queries=[next(iter(loader(query_items, 2)))]) as tracker:
        model.train()
        for i, batch in enumerate(loader(items, 3)):
            (AMP_SCALE * hf_loss(model, batch)).backward()
            tracker.step(batch, grad_scale=AMP_SCALE * task.training_loss_scale(batch), indices=[3 * i, 3 * i + 1, 3 * i + 2])
            model.zero_grad()  # no optimizer: the parameters stay those of the reference below
        result = tracker.streamed_scores()
    model.eval()
    modules = [model.up, model.down, model.shared, model.head]

    def per_example_loss(batch_items):
        def loss(i):
            item = {k: v[None] for k, v in batch_items[i].items()}
            return task.loss(model, item)[0]
        return loss

    train = per_example_gradients(modules, per_example_loss(items), len(items))
    query = per_example_gradients(modules, per_example_loss(query_items), len(query_items))
    expected = sum(q.flatten(1) @ t.flatten(1).T for q, t in zip(query, train))
    assert result.batches == {"identity": 2} and not result.preconditioned
    torch.testing.assert_close(result.scores, expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- semantics
def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()


def data(n: int = 32, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, generator=g, dtype=torch.float64), torch.randint(0, 3, (), generator=g)) for _ in range(n)]


def train(model, items, tracker=None, lr=0.1, epochs=1, batch_size=8, refresh_after_epoch=False, **step_kwargs):
    """A plain loop with the tracker stepped after the optimizer, indices = positions in ``items``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loader(items, batch_size)):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if tracker is not None:
                tracker.step((x, y), indices=torch.arange(i * batch_size, i * batch_size + len(y)), **step_kwargs)
        if refresh_after_epoch and tracker is not None:
            tracker.refresh_eigenbasis()
    return model


def test_visits_sum_and_stream_every_skips_steps():
    """Two epochs at lr 0 visit every example twice: scores double. With stream_every=2 only the
    even steps' examples are scored, and the loss scale is asked for on those steps only."""
    items = data()
    queries = list(loader(data(4, seed=3), 4))
    config = ip.InfluenceConfig(strategy="identity", accumulation_dtype="float64", stream_refresh_every=None)
    model = mlp()
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config, queries=queries) as tracker:
        train(model, items, tracker, lr=0.0, epochs=1)
        once = tracker.streamed_scores()
        train(model, items, tracker, lr=0.0, epochs=1)
        twice = tracker.streamed_scores()
    assert once.visits.tolist() == [1] * 32 and twice.visits.tolist() == [2] * 32
    torch.testing.assert_close(twice.scores, 2 * once.scores)
    every = ip.InfluenceConfig(strategy="identity", accumulation_dtype="float64", stream_every=2, stream_refresh_every=None)
    with ip.InfluenceTracker(model, ip.ClassificationTask(), every, queries=queries) as tracker:
        asked = []
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        for i, (x, y) in enumerate(loader(items, 8)):
            asked.append(tracker.needs_grad_scale)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            tracker.step((x, y), indices=torch.arange(8 * i, 8 * i + 8))
        sparse = tracker.streamed_scores()
    assert asked == [True, False, True, False]
    assert sparse.indices.tolist() == list(range(8)) + list(range(16, 24))
    torch.testing.assert_close(sparse.scores, once.scores[:, sparse.indices])


def test_weights_scale_each_steps_scores():
    items = data(16)
    queries = list(loader(data(2, seed=3), 2))
    config = ip.InfluenceConfig(strategy="identity", accumulation_dtype="float64", stream_refresh_every=None,
                                stream_weight="lr")
    model = mlp()
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config, queries=queries) as tracker:
        x, y = next(iter(loader(items, 8)))
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(ValueError, match="stream_weight"):
            tracker.step((x, y), indices=range(8))
        F.cross_entropy(model(x), y).backward()
        tracker.step((x, y), indices=range(8), weight=1.0)
        F.cross_entropy(model(x), y).backward()
        tracker.step((x, y), indices=range(8), weight=0.25)
        result = tracker.streamed_scores()
        tracker.reset_stream()
        assert len(tracker.streamed_scores()) == 0
    F.cross_entropy(model(x), y).backward()
    assert result.visits.tolist() == [2] * 8
    att = ip.Attributor(model, ip.ClassificationTask(), ip.fit_factors(model, ip.ClassificationTask(), [(x, y)], config), config)
    torch.testing.assert_close(result.scores, 1.25 * att.pairwise_scores(queries, [(x, y)]))


def test_preconditioning_follows_the_statistics():
    """Gradient dot products before any statistics; after the first statistics step the first due
    refresh sets an eigenbasis and preconditions with K-FAC (no eigenvalues in it yet), the
    queries switch to EK-FAC as soon as eigenvalues accumulated in it (after step 2), each upgrade
    superseding the sums so far; a refresh preconditions with the tracker's current factors."""
    items = data()
    queries = list(loader(data(4, seed=3), 4))
    config = ip.InfluenceConfig(update_every=1, accumulation_dtype="float64", stream_refresh_every=2, damping=1e-3,
                                min_statistics_steps=1)
    model = mlp()
    task = ip.ClassificationTask()
    with ip.InfluenceTracker(model, task, config, queries=queries) as tracker:
        assert tracker.scorer.preconditioning == "identity"
        seen = []
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        for i, (x, y) in enumerate(loader(items, 8)):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            tracker.step((x, y), indices=torch.arange(8 * i, 8 * i + 8))
            seen.append((tracker.statistics.bases is not None, tracker.scorer.preconditioning))
        assert seen == [(True, "kfac"), (True, "ekfac"), (True, "ekfac"), (True, "ekfac")]
        assert tracker.streamed_scores().batches == {"ekfac": 2}
        assert tracker.superseded_batches == {"identity": 1, "kfac": 1}
        assert tracker.refresh_queries() == "ekfac"
        expected = ip.Attributor(model, task, tracker.factors(), config).precondition(queries)
        got = tracker.scorer.queries
    for name, layer in expected.layers.items():
        torch.testing.assert_close(got.layers[name].full, layer.full, rtol=1e-9, atol=1e-12)


def test_training_is_bit_for_bit_unchanged_and_hooks_removed():
    """Dropout draws from the global RNG; streaming with query refreshes every 2 steps, statistics on
    every step and an eigenbasis refresh must leave the parameters exactly as plain training."""
    items = data()
    queries = list(loader(data(4, seed=3), 4))
    plain = mlp(dropout=0.3)
    torch.manual_seed(123)
    train(plain, items, epochs=2)
    model = mlp(dropout=0.3)
    torch.manual_seed(123)
    config = ip.InfluenceConfig(update_every=1, stream_refresh_every=2, min_statistics_steps=1)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config, queries=queries) as tracker:
        train(model, items, tracker, epochs=2, refresh_after_epoch=True)
        assert tracker.streamed_scores().batches == {"ekfac": 6}  # the first 2 steps superseded
        assert all(m._forward_hooks for m in layers)
    for p, q in zip(plain.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert model.training
    assert not any(m._forward_hooks for m in layers) and not model._forward_pre_hooks


def test_bad_batches_are_dropped_counted_and_warned():
    items = data(16)
    queries = list(loader(data(2, seed=3), 2))
    config = ip.InfluenceConfig(strategy="identity", accumulation_dtype="float64", stream_refresh_every=None)
    model = mlp()
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config, queries=queries) as tracker:
        x, y = next(iter(loader(items, 8)))
        bad = x.clone()
        bad[0, 0] = float("nan")
        F.cross_entropy(model(bad), y).backward()
        tracker.step((bad, y), indices=range(8))
        model.zero_grad()
        with pytest.warns(UserWarning, match="NaN"):
            result = tracker.streamed_scores()
        assert result.indices.tolist() == list(range(1, 8)) and result.visits.tolist() == [1] * 7
        assert torch.isfinite(result.scores).all()
        with pytest.raises(ValueError, match="indices"):
            F.cross_entropy(model(x), y).backward()
            tracker.step((x, y))
        with pytest.raises(ValueError, match="4 entries"):
            F.cross_entropy(model(x), y).backward()
            tracker.step((x, y), indices=range(4))


def test_config_fields_are_validated():
    for field, value in (("stream_every", 0), ("stream_refresh_every", 0), ("stream_weight", "sgd")):
        with pytest.raises(ValueError, match=f"InfluenceConfig.{field}"):
            ip.InfluenceConfig(**{field: value})


def test_merge_and_dense():
    a = ip.StreamedScores(torch.tensor([1, 4]), torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([1, 1]),
                          {"kfac": 1})
    b = ip.StreamedScores(torch.tensor([0, 4]), torch.tensor([[3.0, 5.0]], dtype=torch.float64), torch.tensor([1, 2]),
                          {"ekfac": 1})
    m = ip.StreamedScores.merge([a, b])
    assert m.indices.tolist() == [0, 1, 4] and m.visits.tolist() == [1, 1, 3]
    assert m.scores.tolist() == [[3.0, 1.0, 7.0]] and m.batches == {"kfac": 1, "ekfac": 1}
    assert m.dense(6).tolist() == [[3.0, 1.0, 0.0, 0.0, 7.0, 0.0]] and m.dense_visits(6).tolist() == [1, 1, 0, 0, 3, 0]
    with pytest.raises(ValueError, match="beyond"):
        m.dense(4)
    assert m.layer_names == [] and m.layer_abs is None


def test_merge_adds_the_per_layer_sums():
    names = ["a", "b", "c"]
    a = ip.StreamedScores(torch.tensor([1]), torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.tensor([1]),
                          {"ekfac": 1}, names, torch.arange(6, dtype=torch.float64).reshape(3, 2))
    b = ip.StreamedScores(torch.tensor([1]), torch.tensor([[3.0], [4.0]], dtype=torch.float64), torch.tensor([1]),
                          {"ekfac": 1}, names, torch.ones(3, 2, dtype=torch.float64))
    nothing = ip.StreamedScores.empty(2, layer_names=names)
    m = ip.StreamedScores.merge([a, nothing, b])
    assert m.layer_names == names and m.scores.tolist() == [[4.0], [6.0]]
    assert m.layer_abs.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert a.layer_abs.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]  # the parts are left as they were
    assert ip.StreamedScores.merge([nothing, nothing]).layer_abs is None
    assert m.to("cpu").layer_abs.tolist() == m.layer_abs.tolist()
    with pytest.raises(ValueError, match="same layers"):
        ip.StreamedScores.merge([a, ip.StreamedScores.empty(2, layer_names=["a", "c", "b"])])
    with pytest.raises(ValueError, match="layer_abs has shape"):
        ip.StreamedScores(a.indices, a.scores, a.visits, {}, ["a"], a.layer_abs)


# ----------------------------------------------------------------------------- DDP
def _free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for the workers' rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dist.barrier()
        result = _stream_three_steps(rank, world)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()  # no process tears gloo down while the other is still inside a collective
    finally:
        dist.destroy_process_group()


def _stream_three_steps(rank: int, world: int) -> ip.StreamedScores:
    """Three optimizer steps of 8 examples split over ``world`` processes (rank r takes r::world):
    the first with unpreconditioned queries, the second with K-FAC queries from the summed
    covariances (and an eigenbasis set from them), the third with EK-FAC queries from the summed
    statistics, which supersede the first two steps' sums on every rank alike."""
    items = data(24)
    queries = list(loader(data(4, seed=3), 4))
    model = mlp()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    config = ip.InfluenceConfig(update_every=1, accumulation_dtype="float64", stream_refresh_every=1, damping=1e-3,
                                min_statistics_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config, queries=queries) as tracker:
        for i, (x, y) in enumerate(loader(items, 8)):
            index = torch.arange(8 * i, 8 * i + 8)[rank::world]
            xs, ys = x[rank::world], y[rank::world]
            F.cross_entropy(net(xs), ys).backward()
            opt.step()
            opt.zero_grad()
            tracker.step((xs, ys), indices=index)
        return tracker.streamed_scores()


def test_ddp_gathered_scores_equal_single_process(tmp_path):
    """2 processes (gloo): each scores its own half of every batch; the gathered result equals one
    process scoring whole batches (the same global steps: DDP averages the two halves' gradients
    like the full-batch mean). A hang fails after 120 s."""
    single = _stream_three_steps(0, 1)
    out = str(tmp_path / "ddp.pt")
    port = _free_port()
    context = mp.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2-process streaming run did not finish in 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    gathered = torch.load(out, weights_only=False)
    assert single.batches == {"ekfac": 1}
    assert gathered.batches == {"ekfac": 2}  # micro-batches over both processes
    assert gathered.indices.tolist() == single.indices.tolist() == list(range(16, 24))
    assert torch.equal(gathered.visits, single.visits)
    torch.testing.assert_close(gathered.scores, single.scores, rtol=1e-9, atol=1e-12)
    assert gathered.layer_names == single.layer_names == ["0", "3"]
    torch.testing.assert_close(gathered.layer_abs, single.layer_abs, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- with a session
def test_attributions_hand_their_factors_to_the_streaming_queries():
    """``candidates="stream"`` with the defaults (statistics every 32nd step, eigenvalues wanted
    from 32 statistics steps): the tracker's own EK-FAC eigenvalues are far from ready, so the
    first interval streams plain gradient dot products; the first attribution's EK-FAC factors
    (bounded eigenvalue pass) then precondition the queries, and the next interval streams exactly
    the pairwise scores of a checkpoint attributor built on those factors."""
    items = data(64)
    queries = list(loader(data(4, seed=3), 4))
    model = mlp()
    config = ip.InfluenceConfig(accumulation_dtype="float64", stream_refresh_every=None)
    session = ip.InfluenceSession(model, ip.ClassificationTask(), config, candidates="stream", progress=False).attach()
    session.set_data(queries, loader(items, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def epoch(lr: float) -> None:
        for group in opt.param_groups:
            group["lr"] = lr
        for i, (x, y) in enumerate(loader(items, 8)):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            session.after_backward((x, y), indices=torch.arange(i * 8, i * 8 + len(y)))

    try:
        epoch(0.1)
        first = session.attribute(8, "manual")
        assert first.extra["streamed_batches"] == {"identity": 8}
        assert session.tracker.scorer.preconditioning == "ekfac"
        epoch(0.0)  # parameters frozen: streamed scores at the same parameters as the attributor's
        second = session.attribute(16, "manual")
        assert second.extra["streamed_batches"] == {"ekfac": 8}
        attributor = ip.Attributor(model, ip.ClassificationTask(), session.last_factors)
        order = second.candidate_indices.argsort()
        expected = attributor.pairwise_scores(queries, loader(items, 8))
        torch.testing.assert_close(second.scores[:, order].double(), expected, rtol=1e-5, atol=1e-8)  # float32 result
    finally:
        session.close()


def test_the_eigenvalue_pass_of_an_attribution_reads_a_bounded_spaced_subset():
    """Without ``max_fit_batches`` an attribution's eigenvalue pass reads at most
    ``EIGENVALUE_EXAMPLES`` evenly spaced candidates (never an epoch); with it, the candidates."""
    from infl_plugin.run.data import EIGENVALUE_EXAMPLES, eigenvalue_loader, spaced_indices

    items = list(range(3000))
    candidates = torch.utils.data.DataLoader(items, batch_size=100)
    bounded = eigenvalue_loader(candidates, ip.InfluenceConfig())
    seen = torch.cat(list(bounded)).tolist()
    assert seen == spaced_indices(3000, EIGENVALUE_EXAMPLES) and bounded.batch_size == 100
    assert eigenvalue_loader(candidates, ip.InfluenceConfig(max_fit_batches=3)) is candidates
    small = torch.utils.data.DataLoader(items[:EIGENVALUE_EXAMPLES], batch_size=100)
    assert eigenvalue_loader(small, ip.InfluenceConfig()) is small
