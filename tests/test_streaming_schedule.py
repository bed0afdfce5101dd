"""When streaming queries are refreshed, which preconditioning they get, and which visits the
streamed sums keep (the short-run defect: a 100-step fine-tune streamed with plain gradients).

Ground truth is the schedule itself (steps counted by hand) and `Attributor.pairwise_scores` at
the same parameters, queries and factors for what a superseding refresh keeps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import infl_plugin as ip
from infl_plugin.scoring.streaming.scorer import StreamingScorer


def _data(n: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3:].sum(1) > 0).long()


def _run(config: ip.InfluenceConfig, steps: int, batch: int = 8):
    """SGD on a tiny MLP with a streaming tracker; returns the tracker (closed), the optimizer
    steps at which the queries were refreshed and the preconditioning each refresh chose."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = _data()
    queries = [(x[:4], y[:4])]
    tracker = ip.InfluenceTracker(model, ip.ClassificationTask(), config)
    refreshes: list[tuple[int, str]] = []
    refresh = tracker.stream.refresh  # the streaming rider's refresh, whoever calls it

    def recorded(factors=None):
        used = refresh(factors)
        refreshes.append((tracker.optimizer_steps, used))
        return used

    tracker.stream.refresh = recorded
    tracker.set_queries(queries)
    tracker.attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        rows = torch.arange(step * batch, (step + 1) * batch) % x.shape[0]
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        tracker.step((x[rows], y[rows]), indices=rows)
        optimizer.step()
        optimizer.zero_grad()
    tracker.close()
    return tracker, refreshes


def test_refresh_intervals_double_up_to_the_cap_and_ekfac_falls_back_to_kfac():
    config = ip.InfluenceConfig(strategy="ekfac", update_every=1, min_statistics_steps=6, stream_refresh_every=8,
                                accumulation_dtype="float64")
    tracker, refreshes = _run(config, 30)
    # set at 0; each interval as long as the run before the last refresh (1, 2, 4); at 7 EK-FAC is
    # ready (eigenbasis set at step 1, 6 eigenvalue steps): refreshed at once; then 7 more steps
    # to 14, and the cap of 8 from there
    assert refreshes == [(0, "identity"), (1, "kfac"), (2, "kfac"), (4, "kfac"), (7, "ekfac"), (14, "ekfac"),
                         (22, "ekfac"), (30, "ekfac")]
    streamed = tracker.streamed_scores()
    # the sums hold the EK-FAC visits only: steps 7-29 (23 batches); earlier ones were superseded
    assert streamed.batches == {"ekfac": 23}
    assert tracker.superseded_batches == {"identity": 1, "kfac": 6}


def test_a_short_run_at_the_defaults_streams_with_curvature_from_its_second_step():
    """The defect: at the defaults (statistics every 32 steps, eigenvalues after 32 statistics
    steps, refresh every 200) a 20-step run streamed every batch with plain gradients."""
    tracker, refreshes = _run(ip.InfluenceConfig(accumulation_dtype="float64"), 20)
    assert [s for s, _ in refreshes] == [0, 1, 2, 4, 8, 16]
    assert tracker.streamed_scores().batches == {"kfac": 19} and tracker.superseded_batches == {"identity": 1}


def test_better_queries_supersede_the_sums_and_equal_queries_keep_them():
    layer = ip.InfluenceTracker(nn.Sequential(nn.Linear(3, 2)), ip.ClassificationTask()).layers
    scorer = StreamingScorer(layer, torch.float64)
    queries = ip.scoring.attributor.PreconditionedQueries(
        {layer[0].name: ip.scoring.attributor.QueryLayer(full=torch.ones(2, 2, 4, dtype=torch.float64))},
        torch.zeros(2, dtype=torch.float64))

    def visit(indices):
        scorer._pending = torch.ones(2, len(indices), dtype=torch.float64)
        scorer.commit(indices)

    scorer.set_queries(queries, "identity")
    visit([0, 1])
    scorer.set_queries(queries, "identity")  # the same preconditioning: the sums stay
    visit([2])
    assert scorer.result().batches == {"identity": 2} and len(scorer.result()) == 3
    scorer.set_queries(queries, "kfac")  # better: the identity sums are dropped and counted
    assert len(scorer.result()) == 0 and scorer.superseded_batches == {"identity": 2}
    visit([1])
    scorer.set_queries(queries, "identity")  # worse queries (a caller's choice) never drop sums
    assert scorer.result().batches == {"kfac": 1}
    scorer.reset()
    assert scorer.superseded_batches == {}
