"""The contracts every way of training with influence tracking keeps, on each of them: a plain loop
with `InfluenceTracker`, the Lightning callback and the Hugging Face callback (`conftest.ADAPTERS`)."""

from __future__ import annotations

import pytest
import torch

from conftest import ADAPTERS, hook_count, train_with

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
