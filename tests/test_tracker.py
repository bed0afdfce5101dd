"""InfluenceTracker inside a plain training loop: statistics steps, padding masks, hook handling and
failures (zero learning rate = post-hoc fit, accumulation, exact resume, bad batch, unchanged
training, no hook left: tests/test_contracts.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import infl_plugin as ip

from conftest import plain_items as data, plain_mlp as mlp, plain_train as train
from models import SeqNet, loader, sequence_data


def test_update_every_skips_steps():
    items = data(32)
    config = ip.InfluenceConfig(strategy="kfac", update_every=2, accumulation_dtype="float64")
    model = mlp()
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as tracker:
        train(model, items, tracker, lr=0.0)
        assert tracker.optimizer_steps == 4 and tracker.updates == 2
        every_other = tracker.factors()
    even = [items[i] for i in range(32) if (i // 8) % 2 == 0]
    fitted = ip.fit_factors(model, ip.ClassificationTask(), loader(even, 8), config)
    for name, f in fitted.layers.items():
        torch.testing.assert_close(every_other.layers[name].eigenvalues, f.eigenvalues)


def test_attention_mask_keyword_is_picked_up_for_padding():
    """A model called with attention_mask= gets the same statistics as an explicit fit."""
    torch.manual_seed(0)
    model = SeqNet().double()
    items = sequence_data()
    config = ip.InfluenceConfig(update_every=1, strategy="kfac", accumulation_dtype="float64")
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as tracker:
        for batch in loader(items, 4):
            F.cross_entropy(model(x=batch["x"], attention_mask=batch["attention_mask"]), batch["labels"]).backward()
            tracker.step(batch)
        tracked = tracker.factors()
    fitted = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 4), config)
    for name, f in fitted.layers.items():
        torch.testing.assert_close(tracked.layers[name].eigenvalues, f.eigenvalues)


def test_hooks_are_removed_on_close_and_on_exception():
    model = mlp()
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with pytest.raises(RuntimeError, match="boom"):
        with ip.InfluenceTracker(model, ip.ClassificationTask()):
            assert all(m._forward_hooks for m in layers)
            raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in layers) and not model._forward_pre_hooks
    tracker = ip.InfluenceTracker(model, ip.ClassificationTask()).attach().attach()  # never piles up handles
    assert all(len(m._forward_hooks) == 1 for m in layers)
    tracker.close()
    tracker.close()
    assert not any(m._forward_hooks for m in layers)


def module_hooks(model: nn.Module) -> int:
    """Forward, forward-pre, backward and backward-pre hooks registered on any submodule."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def test_constructing_a_tracker_attaches_no_hooks():
    """Hooks go on only through `attach` or the ``with`` block, and `close` removes all of them."""
    model = mlp()
    items = data(8)
    config = ip.InfluenceConfig(update_every=1, strategy="ekfac")
    tracker = ip.InfluenceTracker(model, ip.ClassificationTask(), config, queries=[next(iter(loader(items, 4)))])
    assert module_hooks(model) == 0 and not tracker.attached
    x, y = next(iter(loader(items, 4)))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="not attached"):  # nothing was captured: said, not skipped
        tracker.step((x, y), indices=[0, 1, 2, 3])
    assert tracker.attach() is tracker and tracker.attached and module_hooks(model) > 0
    F.cross_entropy(model(x), y).backward()
    assert tracker.step((x, y), indices=[0, 1, 2, 3])
    tracker.close()
    assert module_hooks(model) == 0 and not tracker.attached
    tracker.factors(loader=loader(items, 4))  # the bounded eigenvalue pass attaches for itself alone
    assert module_hooks(model) == 0
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as entered:
        assert entered.attached and module_hooks(model) > 0
    assert module_hooks(model) == 0


def test_ekfac_factors_before_refresh_need_a_loader():
    items = data(16)
    model = mlp()
    with ip.InfluenceTracker(model, ip.ClassificationTask(), ip.InfluenceConfig(update_every=1)) as tracker:
        train(model, items, tracker, lr=0.0)
        with pytest.raises(RuntimeError, match="refresh_eigenbasis"):
            tracker.factors()
        factors = tracker.factors(loader=loader(items, 8))
    assert all(torch.isfinite(f.eigenvalues).all() for f in factors.layers.values())


def test_a_failing_capture_never_breaks_training(monkeypatch):
    """An error inside a hook during the training backward skips that step's statistics only."""
    items = data(16)
    model = mlp()
    with ip.InfluenceTracker(model, ip.ClassificationTask(), ip.InfluenceConfig(update_every=1, strategy="kfac")) as tracker:
        original = tracker.statistics.__class__.__call__

        def broken(self, capture):
            raise RuntimeError("capture failed")

        monkeypatch.setattr(tracker.statistics.__class__, "__call__", broken)
        x, y = next(iter(loader(items, 8)))
        F.cross_entropy(model(x), y).backward()  # does not raise
        assert all(p.grad is not None for p in model.parameters())
        with pytest.warns(UserWarning, match="capture failed"):
            assert tracker.step((x, y)) is False
        monkeypatch.setattr(tracker.statistics.__class__, "__call__", original)
        F.cross_entropy(model(x), y).backward()
        assert tracker.step((x, y)) and tracker.skipped_batches == 1
