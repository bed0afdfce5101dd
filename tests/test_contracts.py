"""The contracts every way of training with influence tracking keeps, on each of them: a plain loop
with `InfluenceTracker`, the Lightning callback and the Hugging Face callback (`conftest.ADAPTERS`)."""

from __future__ import annotations

import pytest
import torch

import infl_plugin as ip
from conftest import (ADAPTERS, BAD_STEP, assert_same_operator, hook_count, train_accumulating, train_at_zero_lr,
                      train_resuming, train_with, train_with_bad_batch)
from models import loader

pytestmark = [pytest.mark.filterwarnings("ignore:infl_plugin. not tracking requested modules"),
              pytest.mark.filterwarnings("ignore:infl_plugin. InfluenceTrainerCallback got no queries"),
              pytest.mark.filterwarnings("ignore:.*TensorBoardLogger"),
              pytest.mark.filterwarnings("ignore:.*does not have many workers")]

# (fisher, gradient accumulation): the sampled Fisher's extra passes and the empirical Fisher's one-time
# check of the loss's reduction (an extra forward) must not draw from the RNG or change any mode
TRAINING = [("empirical", 1), ("sampled", 1), ("sampled", 2), ("empirical", 2)]


@pytest.mark.parametrize("fisher, accumulate", TRAINING)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_training_is_bit_for_bit_unchanged(adapter, fisher, accumulate, tmp_path):
    """Dropout (and, in Lightning, a globally-seeded shuffle) makes any stray RNG draw or mode change
    visible; the callbacks attribute during the run (every step in Lightning, at each checkpoint save
    in Hugging Face, with token views), the plain loop refreshes an eigenbasis and computes factors."""
    plain = train_with(adapter, tmp_path, tracked=False, fisher=fisher, accumulate=accumulate)
    tracked = train_with(adapter, tmp_path, tracked=True, fisher=fisher, accumulate=accumulate)
    for (name, p), q in zip(plain.model.named_parameters(), tracked.parameters):
        assert torch.equal(p.detach(), q), name
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters, tracked.parameters))
    assert plain.losses == tracked.losses
    if adapter == "plain":
        assert tracked.extra["training"]
    elif adapter == "lightning":
        assert tracked.influence.attributions >= 3
    else:
        assert tracked.influence.attributions == 2 and tracked.influence.failed_attributions == 0


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_no_hook_remains_after_training(adapter, tmp_path):
    run = train_with(adapter, tmp_path, tracked=True)
    assert hook_count(run.model) == run.hooks_before
    assert not run.influence.attached
    assert not [name for name, m in run.model.named_modules()
                if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_bad_batch_is_skipped_counted_and_warned(adapter, tmp_path):
    """A NaN in one micro-batch mid-run: training runs to its end, that batch's statistics are
    dropped with a "skipped" warning and counted once, every other step still feeds the statistics
    and they stay finite. Plain loop (float64): the tracker's K-FAC eigenvalues equal `fit_factors`
    on the other batches (``assert_close``'s float64 defaults)."""
    with pytest.warns(UserWarning, match="skipped the statistics of micro-batch"):
        run = train_with_bad_batch(adapter, tmp_path)
    tracker = run.influence if adapter == "plain" else run.influence.tracker
    steps = run.extra["steps"]
    assert steps == tracker.optimizer_steps and steps > BAD_STEP + 1
    assert run.influence.skipped_batches == tracker.skipped_batches == 1 and tracker.updates == steps
    assert all(torch.isfinite(p).all() for p in run.parameters)
    for totals in tracker.statistics.totals.values():
        assert totals.examples == (steps - 1) * run.extra["batch"]
        assert torch.isfinite(totals.a_sum).all() and torch.isfinite(totals.s_sum).all()
    if adapter == "plain":
        assert run.extra["committed"] == [i != BAD_STEP for i in range(steps)]
        config = run.extra["config"]
        tracked = tracker.factors()
        fitted = ip.fit_factors(run.model, ip.ClassificationTask(), loader(run.extra["good"], 8), config)
        for name, f in fitted.layers.items():
            torch.testing.assert_close(tracked.layers[name].eigenvalues, f.eigenvalues)


ZERO_LR = ([pytest.param("plain", dict(strategy=s, fisher=f), id=f"plain-{s}-{f}")
            for s in ("diagonal", "kfac", "ekfac") for f in ("empirical", "sampled")]
           + [pytest.param("lightning", dict(epochs=e), id=f"lightning-{e}-epochs") for e in (1, 2)]
           + [pytest.param("huggingface", dict(kind=k, strategy=s), id=f"huggingface-{k}-{s}")
              for k, s in (("gpt2", "kfac"), ("llama", "kfac"), ("bert", "kfac"), ("gpt2", "ekfac"),
                           ("llama", "ekfac"))])


@pytest.mark.parametrize("adapter, case", ZERO_LR)
def test_zero_learning_rate_equals_a_post_hoc_fit(adapter, case, tmp_path):
    """lr = 0 keeps θ fixed, so what training tracks equals a post-hoc fit on the same examples.

    Plain loop (float64, same sums): eigenvalues rtol 1e-7 / atol 1e-12, eigenvectors up to sign
    (|Qᵀ Q'| = I, atol 1e-6). Lightning (float32 model): the same (G + λI)⁻¹ to rtol 1e-4 (the
    training path rescales mean-loss gradients back to per-example ones). Hugging Face (float32,
    other batch shapes and padding): statistics totals rtol 1e-4 with an absolute floor of 1e-6 ×
    the largest entry; EK-FAC preconditioning rtol 1e-3, floor 1e-5 × the largest entry."""
    run = train_at_zero_lr(adapter, tmp_path, **case)
    tracked, fitted = run.extra["tracked"], run.extra["fitted"]
    if adapter == "plain":
        for name, f in fitted.layers.items():
            t = tracked.layers[name]
            torch.testing.assert_close(t.eigenvalues, f.eigenvalues, rtol=1e-7, atol=1e-12)
            if f.q_a is not None:
                torch.testing.assert_close((t.q_a.T @ f.q_a).abs(), torch.eye(len(f.q_a), dtype=torch.float64),
                                           atol=1e-6, rtol=0)
    elif adapter == "lightning":
        assert run.influence.last_attribution_step == run.extra["steps"]
        assert_same_operator(tracked, fitted, rtol=1e-4)
    else:
        from test_huggingface_callback import assert_statistics_close

        if case["strategy"] == "kfac":
            assert run.influence.tracker.optimizer_steps == run.extra["steps"]
            assert_statistics_close(tracked, fitted)
        else:
            generator = torch.Generator().manual_seed(0)
            for name, layer in fitted.layers.items():
                v = torch.randn(fitted.shapes[name], generator=generator, dtype=torch.float64)
                expected = layer.precondition(v)
                torch.testing.assert_close(tracked.layers[name].precondition(v), expected, rtol=1e-3,
                                           atol=1e-5 * float(expected.abs().max()), msg=name)


ACCUMULATION = [pytest.param("plain", {}, id="plain"), pytest.param("lightning", {}, id="lightning")] + [
    pytest.param("huggingface", dict(kind=k), id=f"huggingface-{k}") for k in ("gpt2", "llama", "bert")]


@pytest.mark.parametrize("adapter, case", ACCUMULATION)
def test_gradient_accumulation_equals_a_larger_batch(adapter, case, tmp_path):
    """k = 2 micro-batches of b = one batch of 2b at lr = 0 (Hugging Face BERT: the Trainer does
    not divide its loss by k). Plain loop (float64): K-FAC eigenvalues, ``assert_close``'s float64
    defaults; Lightning: the same (G + λI)⁻¹ to rtol 1e-4; Hugging Face: statistics totals rtol 1e-4
    with an absolute floor of 1e-6 × the largest entry (float32, other batch shapes and padding)."""
    accumulated, larger = (train_accumulating(adapter, tmp_path / str(k), k, **case) for k in (2, 1))
    for run in (accumulated, larger):
        tracker = run.influence if adapter == "plain" else run.influence.tracker
        assert tracker.optimizer_steps == run.extra["steps"]
    a, b = accumulated.extra["tracked"], larger.extra["tracked"]
    if adapter == "plain":
        for name in a.layers:
            torch.testing.assert_close(a.layers[name].eigenvalues, b.layers[name].eigenvalues)
    elif adapter == "lightning":
        assert_same_operator(a, b, rtol=1e-4)
    else:
        from test_huggingface_callback import assert_statistics_close

        assert_statistics_close(a, b)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_resume_continues_exactly(adapter, tmp_path):
    """Resuming from the state after the first half gives the uninterrupted run's statistics: bit
    for bit where the same operations run in the same order (plain loop: EK-FAC eigenvalues;
    Lightning: parameters, update count, label generator, statistics, the factors' operator at
    rtol 0); Hugging Face (the state re-read from safetensors, a fresh Trainer): the saved state to
    rtol 1e-6 / atol 1e-9 × the largest entry, the last scores to rtol 1e-5."""
    whole = train_resuming(adapter, tmp_path, resume=False)
    resumed = train_resuming(adapter, tmp_path, resume=True)
    if adapter == "plain":
        expected, got = whole.extra["factors"], resumed.extra["factors"]
        for name in expected.layers:
            assert torch.equal(got.layers[name].eigenvalues, expected.layers[name].eigenvalues)
    elif adapter == "lightning":
        assert all(torch.equal(a, c) for a, c in zip(whole.parameters, resumed.parameters))
        state_a, state_c = whole.extra["state"]["tracker"], resumed.extra["state"]["tracker"]
        assert state_a["updates"] == state_c["updates"] == whole.extra["updates"]
        assert torch.equal(state_a["generator"], state_c["generator"])
        for name, layer in state_a["statistics"]["layers"].items():
            for key, value in layer.items():
                other = state_c["statistics"]["layers"][name][key]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (name, key)
        assert_same_operator(whole.extra["factors"], resumed.extra["factors"], rtol=0.0)
    else:
        from test_huggingface_callback import _assert_trees_equal

        assert resumed.influence.attributions == whole.influence.attributions == 2
        _assert_trees_equal(resumed.extra["state"], whole.extra["state"])
        torch.testing.assert_close(resumed.extra["scores"], whole.extra["scores"], rtol=1e-5, atol=0)
