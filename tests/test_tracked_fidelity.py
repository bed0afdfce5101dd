"""Statistics options of tracking during training, against brute force (float64).

* ``half_life``: the totals are an exponentially weighted sum of the per-step statistics, with
  weight ``0.5 ** (age in optimizer steps / half_life)``; checked against per-step sums computed
  here from explicit per-example output gradients (softmax − one-hot of a single linear layer).
* ``fisher_samples``: k pseudo-label draws per batch equal k consecutive single-draw passes over
  the repeated batch with the same generator stream.
* ``statistics_fraction``: the statistics are those of the drawn rows only.
* ``min_statistics_steps``: the eigenbasis is kept until enough steps were seen; fewer warn.

Tolerances: rtol 1e-10 in float64 — the only differences are summation orders.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import infl_plugin as ip
from infl_plugin.errors import ConfigurationError
from infl_plugin.curvature.subsample import ExampleSubsample

RTOL, ATOL = 1e-10, 1e-12


class OneLayer(nn.Module):
    """``nn.Linear(4, 3)`` in a container (layers are tracked as child modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def batches(count: int, size: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (size,), generator=g))
            for _ in range(count)]


def per_step_sums(model: OneLayer, batch, rows=None) -> dict[str, torch.Tensor]:
    """Brute force for one step: ``A_sum``, ``S_sum``, ``Σ_n DW_n²`` and counts, from ``ā`` and the
    per-example output gradient ``softmax(z) − onehot(y)`` (optionally on ``rows`` only)."""
    x, y = batch
    if rows is not None:
        x, y = x[rows], y[rows]
    with torch.no_grad():
        a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        g = torch.softmax(model(x), -1) - F.one_hot(y, 3).to(x.dtype)
    dw = g[:, :, None] * a[:, None, :]
    return {"a": a.T @ a, "s": g.T @ g, "lam": dw.pow(2).sum(0), "n": float(len(x))}


def train(model: OneLayer, data, config: ip.InfluenceConfig, lr: float = 0.1) -> ip.InfluenceTracker:
    """SGD on the mean cross-entropy with a tracker; returns the (closed) tracker."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as tracker:
        for batch in data:
            optimizer.zero_grad()
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            tracker.step(batch)
            optimizer.step()
    return tracker


def replay(data, lr: float = 0.1, rows=None) -> list[dict[str, torch.Tensor]]:
    """The same SGD run without a tracker, with the brute-force sums of every step (before its update)."""
    torch.manual_seed(0)
    model = OneLayer().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for i, batch in enumerate(data):
        out.append(per_step_sums(model, batch, None if rows is None else rows[i]))
        optimizer.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()
    return out


def weighted(sums: list[dict], steps: list[int], last: int, half_life: float, key: str, count: str) -> torch.Tensor:
    weights = [0.5 ** ((last - t) / half_life) for t in steps]
    total = sum(w * sums[t][key] for w, t in zip(weights, steps))
    return total / sum(w * sums[t][count] for w, t in zip(weights, steps))


@pytest.mark.parametrize("update_every", [1, 3])
def test_half_life_covariances_are_exponentially_weighted_sums_of_per_step_statistics(update_every):
    data = batches(10)
    torch.manual_seed(0)
    model = OneLayer().double()
    config = ip.InfluenceConfig(strategy="kfac", accumulation_dtype="float64", half_life=2.5, update_every=update_every)
    tracker = train(model, data, config)
    sums = replay(data)
    steps = list(range(0, len(data), update_every))
    a, s = tracker.statistics.covariance("fc")
    # A averages over tokens, S over examples (one token per example here): both weighted the same way
    torch.testing.assert_close(a, weighted(sums, steps, steps[-1], 2.5, "a", "n"), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(s, weighted(sums, steps, steps[-1], 2.5, "s", "n"), rtol=RTOL, atol=ATOL)
    plain = sum(sums[t]["a"] for t in steps) / sum(sums[t]["n"] for t in steps)
    assert not torch.allclose(a, plain, rtol=1e-3)  # the decay matters: the test can fail


@pytest.mark.parametrize("update_every", [1, 2])
def test_half_life_fraction_weighs_steps_by_a_half_life_growing_with_the_run(update_every):
    data = batches(12)
    torch.manual_seed(0)
    model = OneLayer().double()
    config = ip.InfluenceConfig(strategy="kfac", accumulation_dtype="float64", half_life_fraction=0.25,
                                update_every=update_every)
    tracker = train(model, data, config)
    sums = replay(data)
    steps = list(range(0, len(data), update_every))
    # each commit at optimizer step c decays what came before by 0.5 ** (Δ / (0.25 · c))
    weights = [1.0] * len(steps)
    for k in range(1, len(steps)):
        factor = 0.5 ** ((steps[k] - steps[k - 1]) / (0.25 * steps[k]))
        weights[:k] = [w * factor for w in weights[:k]]
    a, _ = tracker.statistics.covariance("fc")
    expected = sum(w * sums[t]["a"] for w, t in zip(weights, steps)) / sum(w * sums[t]["n"] for w, t in zip(weights, steps))
    torch.testing.assert_close(a, expected, rtol=RTOL, atol=ATOL)
    late = sum(w for w, t in zip(weights, steps) if t >= len(data) // 2) / sum(weights)
    assert late > 0.8  # the last half of the run holds most of the weight
    torch.manual_seed(0)
    fixed = train(OneLayer().double(), data, ip.InfluenceConfig(strategy="kfac", accumulation_dtype="float64",
                                                                 half_life=3.0, half_life_fraction=0.25,
                                                                 update_every=update_every))
    torch.testing.assert_close(fixed.statistics.covariance("fc")[0], weighted(sums, steps, steps[-1], 3.0, "a", "n"),
                               rtol=RTOL, atol=ATOL)  # an explicit half_life takes precedence


def test_half_life_decays_eigenvalues_like_covariances():
    data = batches(8)
    torch.manual_seed(0)
    model = OneLayer().double()
    tracker = train(model, data, ip.InfluenceConfig(strategy="diagonal", accumulation_dtype="float64", half_life=1.5,
                                                     update_every=1))
    sums = replay(data)
    expected = weighted(sums, list(range(8)), 7, 1.5, "lam", "n")
    torch.testing.assert_close(tracker.statistics.eigenvalues("fc"), expected, rtol=RTOL, atol=ATOL)


def test_fisher_samples_equal_repeated_single_draws_with_the_same_generator_stream():
    data = batches(3)
    torch.manual_seed(0)
    model = OneLayer().double()
    task = ip.ClassificationTask()
    multi = ip.fit_factors(model, task, data, ip.InfluenceConfig(fisher="sampled", fisher_samples=4,
                                                                  accumulation_dtype="float64"))
    repeated = [batch for batch in data for _ in range(4)]
    single = ip.fit_factors(model, task, repeated, ip.InfluenceConfig(fisher="sampled", accumulation_dtype="float64"))
    one = ip.fit_factors(model, task, data, ip.InfluenceConfig(fisher="sampled", accumulation_dtype="float64"))
    f, ref, first = multi.layers["fc"], single.layers["fc"], one.layers["fc"]
    torch.testing.assert_close(f.eigenvalues, ref.eigenvalues, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(f.q_s, ref.q_s, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(f.eigenvalues, first.eigenvalues, rtol=1e-2)


def test_fisher_samples_need_the_sampled_fisher():
    with pytest.raises(ConfigurationError, match="fisher_samples"):
        ip.InfluenceConfig(fisher_samples=2)


@pytest.mark.parametrize("field,value", [("half_life", 0), ("half_life", float("nan")), ("half_life_fraction", 0),
                                         ("half_life_fraction", "quarter"), ("statistics_fraction", 0),
                                         ("statistics_fraction", 1.5), ("statistics_fraction", "half"),
                                         ("min_statistics_steps", 0), ("fisher_samples", 0)])
def test_invalid_statistics_options_name_the_field(field, value):
    with pytest.raises(ConfigurationError, match=field):
        ip.InfluenceConfig(**{field: value})


def test_statistics_fraction_takes_the_statistics_of_the_drawn_rows_only():
    data = batches(5, size=8)
    torch.manual_seed(0)
    model = OneLayer().double()
    config = ip.InfluenceConfig(strategy="kfac", accumulation_dtype="float64", statistics_fraction=0.3, seed=7,
                                update_every=1)
    tracker = train(model, data, config)
    draws = ExampleSubsample(None, 0.3, seed=7)
    rows = []
    for _ in data:
        rows.append(draws.rows(8))
        draws.next_step()
    assert all(len(r) == 3 for r in rows)  # ceil(0.3 × 8)
    sums = replay(data, rows=rows)
    steps = list(range(len(data)))
    a, s = tracker.statistics.covariance("fc")
    torch.testing.assert_close(a, sum(sums[t]["a"] for t in steps) / sum(sums[t]["n"] for t in steps), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(s, sum(sums[t]["s"] for t in steps) / sum(sums[t]["n"] for t in steps), rtol=RTOL, atol=ATOL)
    assert tracker.statistics.totals["fc"].examples == 15


def test_example_subsample_shares_rows_across_layers_of_a_step():
    seen = []
    sink = ExampleSubsample(seen.append, 0.5, seed=0)
    from infl_plugin.curvature.hooks import Capture

    a, g = torch.randn(6, 1, 4), torch.randn(6, 1, 3)
    for _ in range(2):
        sink(Capture(None, a, g, None))
    sink.next_step()
    sink(Capture(None, a, g, None))
    assert torch.equal(seen[0].a, seen[1].a) and seen[0].a.shape == (3, 1, 4)
    picked = [int((a[:, 0] == row).all(-1).nonzero()) for row in seen[0].a[:, 0]]
    assert torch.equal(seen[0].g, g[picked])
    assert not torch.equal(seen[0].a, seen[2].a)  # a new step draws new rows (fixed seed: not by chance equal)


def test_eigenbasis_refresh_waits_for_min_statistics_steps_and_fewer_warn(caplog):
    data = batches(6)
    torch.manual_seed(0)
    model = OneLayer().double()
    config = ip.InfluenceConfig(accumulation_dtype="float64", min_statistics_steps=3, update_every=1)
    tracker = ip.InfluenceTracker(model, ip.ClassificationTask(), config).attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bases = []
    for batch in data:
        optimizer.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        tracker.step(batch)
        optimizer.step()
        tracker.refresh_eigenbasis()
        bases.append(tracker.statistics.bases)
    # set after step 1, kept while it rests on 1-2 steps, refreshed after the 3rd step in it
    assert bases[0] is not None and bases[1] is bases[0] and bases[2] is bases[0] and bases[3] is not bases[0]
    assert tracker.eigenvalue_steps == 2
    with pytest.warns(UserWarning, match="min_statistics_steps=3"):
        tracked = tracker.factors()
    with caplog.at_level("INFO", logger="infl_plugin.curvature.tracker"):
        refit = tracker.factors(loader=data)
    assert "bounded eigenvalue pass" in caplog.text
    tracker.close()
    assert not torch.allclose(tracked.layers["fc"].eigenvalues, refit.layers["fc"].eigenvalues)


def test_resumed_tracker_continues_the_moving_average_and_the_subsets_exactly():
    """A tracker restored from `state_dict` halfway decays and subsamples as the uninterrupted one."""
    data = batches(6, size=8)
    config = ip.InfluenceConfig(strategy="kfac", accumulation_dtype="float64", update_every=1, half_life=2.0,
                                statistics_fraction=0.5)
    torch.manual_seed(0)
    whole = train(OneLayer().double(), data, config)
    torch.manual_seed(0)
    model = OneLayer().double()
    first = train(model, data[:3], config)
    second = ip.InfluenceTracker(model, ip.ClassificationTask(), config)
    second.load_state_dict(first.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with second.attach():
        for batch in data[3:]:
            optimizer.zero_grad()
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            second.step(batch)
            optimizer.step()
    for got, expected in zip(second.statistics.covariance("fc"), whole.statistics.covariance("fc")):
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
