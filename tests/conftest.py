"""Helpers shared by the test files; importing this module needs neither transformers nor lightning.

`ADAPTERS` names the three ways to train with influence tracking (a plain loop with
`InfluenceTracker`, the Lightning callback, the Hugging Face callback); `tests/test_contracts.py`
runs each contract on all three through `train_with`, whose framework runs import their framework
only when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

import infl_plugin as ip

ADAPTERS = ("plain", "lightning", "huggingface")


def hook_count(module: nn.Module) -> int:
    """Forward, forward-pre and backward hooks on ``module`` and its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


def parameters(module: nn.Module) -> list[torch.Tensor]:
    """Copies of the module's parameters."""
    return [p.detach().clone() for p in module.parameters()]


@dataclass
class Run:
    """What a training run left: the model, its parameters, the losses it logged (when the framework
    logs them), the session or tracker, and the model's hook count before training."""

    model: nn.Module
    parameters: list[torch.Tensor]
    hooks_before: int
    losses: Optional[list] = None
    influence: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def train_with(adapter: str, tmp_path, tracked: bool, fisher: str = "empirical", accumulate: int = 1) -> Run:
    """Two epochs (Hugging Face: 4 optimizer steps) with dropout drawing from the global RNG, the
    influence tracking of ``adapter`` on (``tracked``) or off; attributions mid-run for the callbacks."""
    return {"plain": _plain, "lightning": _lightning, "huggingface": _huggingface}[adapter](
        tmp_path, tracked, fisher, accumulate)


def _plain(tmp_path, tracked: bool, fisher: str, accumulate: int) -> Run:
    g = torch.Generator().manual_seed(1)
    items = [(torch.randn(6, generator=g, dtype=torch.float64), torch.randint(0, 3, (), generator=g)) for _ in range(40)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    before = hook_count(model)
    torch.manual_seed(123)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = ip.InfluenceConfig(update_every=1, strategy="ekfac", fisher=fisher)
    tracker = ip.InfluenceTracker(model, ip.ClassificationTask(), config) if tracked else None
    if tracker is not None:
        tracker.attach()
    try:
        for epoch in range(2):
            for i in range(0, len(items), 8):
                x = torch.stack([it[0] for it in items[i: i + 8]])
                y = torch.stack([it[1] for it in items[i: i + 8]])
                (F.cross_entropy(model(x), y) / accumulate).backward()
                last = (i // 8 + 1) % accumulate == 0
                if last:
                    opt.step()
                    opt.zero_grad()
                if tracker is not None:
                    tracker.step((x, y), grad_scale=1.0 / (len(y) * accumulate), optimizer_step=last)
            if tracker is not None and epoch == 0:
                tracker.refresh_eigenbasis()
        if tracker is not None:
            tracker.factors()
    finally:
        if tracker is not None:
            tracker.close()
    return Run(model, parameters(model), before, influence=tracker, extra={"training": model.training})


def _lightning(tmp_path, tracked: bool, fisher: str, accumulate: int) -> Run:
    import lightning.pytorch as pl
    from test_lightning_callback import Net, _callback, _trainer

    pl.seed_everything(0)
    module = Net(dropout=0.3, shuffle=True)
    before = hook_count(module)
    config = ip.InfluenceConfig(fisher=fisher, update_every=1)
    callbacks = [_callback(every_n_steps=1, self_influence=True, config=config)] if tracked else []
    _trainer(tmp_path / f"lightning-{tracked}", callbacks, epochs=2, accumulate_grad_batches=accumulate).fit(module)
    session = callbacks[0].session if tracked else None
    return Run(module, parameters(module), before, influence=session, extra={"training": module.training})


def _huggingface(tmp_path, tracked: bool, fisher: str, accumulate: int) -> Run:
    from test_huggingface_callback import InfluenceTrainerCallback, config, gpt2, lm_examples, make_trainer

    callback = InfluenceTrainerCallback(queries=lm_examples(2, offset=90),
                                        config=config("gpt2", strategy="ekfac", fisher=fisher), top_k=3,
                                        token_sequences=1) if tracked else None
    model = gpt2(dropout=0.1)
    before = hook_count(model)
    trainer = make_trainer(model, lm_examples(16), tmp_path / f"hf-{tracked}", callback, learning_rate=1e-2,
                           max_steps=4, gradient_accumulation_steps=accumulate, per_device_train_batch_size=2,
                           save_strategy="steps", save_steps=2, logging_strategy="steps", logging_steps=1)
    trainer.train()
    losses = [h.get("loss") for h in trainer.state.log_history]
    return Run(model, parameters(model), before, losses=losses, influence=None if callback is None else callback.session)
