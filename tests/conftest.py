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


def plain_items(n: int = 40) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` float64 examples of 6 features with a class in 0..2 (the plain-loop runs)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, generator=g, dtype=torch.float64), torch.randint(0, 3, (), generator=g)) for _ in range(n)]


def plain_mlp(dropout: float = 0.0) -> nn.Module:
    """The plain-loop runs' float64 MLP, initialised from seed 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()


def plain_train(model: nn.Module, items: list, tracker: Optional[ip.InfluenceTracker] = None, lr: float = 0.1,
                epochs: int = 1, batch_size: int = 8, accumulate: int = 1,
                refresh_after_epoch: bool = False) -> nn.Module:
    """The user's own loop (SGD with momentum 0.9): ``tracker.step`` after each micro-batch, scaled
    for accumulation; with ``refresh_after_epoch`` an eigenbasis refresh after the first epoch."""
    from models import loader

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loader(items, batch_size)):
            (F.cross_entropy(model(x), y) / accumulate).backward()
            last = (i + 1) % accumulate == 0
            if last:
                opt.step()
                opt.zero_grad()
            if tracker is not None:
                tracker.step((x, y), grad_scale=1.0 / (len(y) * accumulate), optimizer_step=last)
        if refresh_after_epoch and tracker is not None and epoch == 0:
            tracker.refresh_eigenbasis()
    return model


def _plain(tmp_path, tracked: bool, fisher: str, accumulate: int) -> Run:
    items = plain_items(40)
    model = plain_mlp(dropout=0.3)
    before = hook_count(model)
    torch.manual_seed(123)
    config = ip.InfluenceConfig(update_every=1, strategy="ekfac", fisher=fisher)
    tracker = ip.InfluenceTracker(model, ip.ClassificationTask(), config) if tracked else None
    if tracker is not None:
        tracker.attach()
    try:
        plain_train(model, items, tracker, epochs=2, accumulate=accumulate, refresh_after_epoch=True)
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


BAD_STEP = 1  # the micro-batch with a NaN: mid-run, so that the steps after it show training goes on


def train_with_bad_batch(adapter: str, tmp_path) -> Run:
    """Learning rate 0, statistics on every step, one micro-batch (``BAD_STEP``) poisoned with a NaN
    in its activations; that step's parameter gradients are zeroed before the optimizer step so θ
    stays finite (the NaN must reach the statistics only). ``extra``: ``steps`` (optimizer steps
    run), ``batch`` (examples per step) and, for the plain loop, ``committed`` (each `tracker.step`
    result), ``good`` (the examples of the other batches) and ``config``."""
    return {"plain": _plain_bad, "lightning": _lightning_bad, "huggingface": _huggingface_bad}[adapter](tmp_path)


def _plain_bad(tmp_path) -> Run:
    from models import loader

    items = plain_items(24)
    model = plain_mlp()
    before = hook_count(model)
    config = ip.InfluenceConfig(update_every=1, strategy="kfac", accumulation_dtype="float64")
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    committed = []
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as tracker:
        for i, (x, y) in enumerate(loader(items, 8)):
            if i == BAD_STEP:
                x = x.clone()
                x[0, 0] = float("nan")
            F.cross_entropy(model(x), y).backward()
            if i == BAD_STEP:
                opt.zero_grad()
            opt.step()
            opt.zero_grad()
            committed.append(tracker.step((x, y)))
        tracker.factors()
    good = [it for n, it in enumerate(items) if n // 8 != BAD_STEP]
    return Run(model, parameters(model), before, influence=tracker,
               extra={"steps": tracker.optimizer_steps, "batch": 8, "committed": committed, "good": good,
                      "config": config})


def _lightning_bad(tmp_path) -> Run:
    from test_lightning_callback import Net, _callback, _trainer

    class NaNOnce(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            self.bad = batch_idx == BAD_STEP
            if self.bad:
                x = x.clone()
                x[0, 0] = float("nan")
            return F.cross_entropy(self(x), y)

        def on_before_optimizer_step(self, optimizer) -> None:
            if self.bad:
                optimizer.zero_grad()

    module = NaNOnce(lr=0.0)
    before = hook_count(module)
    callback = _callback(attribute_at_train_end=False)
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(module)
    return Run(module, parameters(module), before, influence=callback.session,
               extra={"steps": trainer.global_step, "batch": module.batch_size})


def _huggingface_bad(tmp_path) -> Run:
    from transformers import TrainerCallback

    from test_huggingface_callback import InfluenceTrainerCallback, config, gpt2, lm_examples, make_trainer

    class NaNOnce(TrainerCallback):
        """NaN embeddings on optimizer step ``BAD_STEP`` (a forward hook), its gradients zeroed."""

        bad = False

        def on_step_begin(self, args, state, control, **kwargs):
            self.bad = state.global_step == BAD_STEP

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.bad:
                model.zero_grad()

    model = gpt2()
    before = hook_count(model)
    poison = NaNOnce()
    handle = model.transformer.wte.register_forward_hook(
        lambda module, args, out: out * float("nan") if poison.bad and module.training else None)
    callback = InfluenceTrainerCallback(config=config("gpt2"))
    trainer = make_trainer(model, lm_examples(16), tmp_path, callback)
    trainer.add_callback(poison)
    try:
        trainer.train()
    finally:
        handle.remove()
    return Run(model, parameters(model), before, influence=callback.session,
               extra={"steps": trainer.state.global_step, "batch": trainer.args.per_device_train_batch_size})


def assert_same_operator(a: ip.Factors, b: ip.Factors, rtol: float) -> None:
    """Both factors apply the same (G + λI)⁻¹ (compared on random matrices: eigenvectors are only
    defined up to sign/rotation within repeated eigenvalues, the operator is not)."""
    g = torch.Generator().manual_seed(0)
    for name, shape in a.shapes.items():
        v = torch.randn(5, *shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(a.precondition(name, v), b.precondition(name, v), rtol=rtol, atol=0.0)


def train_at_zero_lr(adapter: str, tmp_path, **case: Any) -> Run:
    """Training at learning rate 0 (θ fixed, so the training backward sees what a post-hoc pass
    sees) and the post-hoc ground truth on the same examples at the same θ: ``extra["tracked"]``
    and ``extra["fitted"]`` (factors, or for Hugging Face K-FAC the statistics totals).

    ``case``: plain ``strategy``, ``fisher``; Lightning ``epochs``; Hugging Face ``kind``, ``strategy``."""
    return {"plain": _plain_zero_lr, "lightning": _lightning_zero_lr, "huggingface": _huggingface_zero_lr}[adapter](
        tmp_path, **case)


def _plain_zero_lr(tmp_path, strategy: str, fisher: str) -> Run:
    """EK-FAC: one epoch of covariances, refresh, one epoch of eigenvalues = fit_factors' two passes."""
    from models import loader

    items = plain_items(40)
    config = ip.InfluenceConfig(update_every=1, strategy=strategy, fisher=fisher, accumulation_dtype="float64",
                                damping=1e-3)
    model = plain_mlp()
    before = hook_count(model)
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as tracker:
        plain_train(model, items, tracker, lr=0.0, epochs=2 if strategy == "ekfac" else 1, refresh_after_epoch=True)
        tracked = tracker.factors()
    fitted = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 8), config)
    return Run(model, parameters(model), before, influence=tracker, extra={"tracked": tracked, "fitted": fitted})


def _lightning_zero_lr(tmp_path, epochs: int) -> Run:
    """1 epoch: the first attribution's bounded eigenvalue pass. 2 epochs: eigenvalues accumulated
    from the second epoch's training backward in the basis refreshed at the end of the first."""
    from torch.utils.data import DataLoader

    from test_lightning_callback import BATCH, EVERY_STEP, N_TRAIN, Net, _callback, _trainer

    module = Net(lr=0.0)
    before = hook_count(module)
    callback = _callback(every_n_steps=N_TRAIN // BATCH)
    _trainer(tmp_path, [callback], epochs=epochs).fit(module)
    loader = DataLoader(module.train_set, batch_size=BATCH, shuffle=False)
    fitted = ip.fit_factors(module, ip.ClassificationTask(), loader, EVERY_STEP)
    return Run(module, parameters(module), before, influence=callback.session,
               extra={"tracked": callback.session.last_factors, "fitted": fitted,
                      "steps": epochs * N_TRAIN // BATCH})


def _huggingface_zero_lr(tmp_path, kind: str, strategy: str) -> Run:
    """K-FAC: the statistics totals against an explicit pass; EK-FAC: the first attribution's
    factors against `fit_factors` on the training set."""
    import warnings

    from infl_plugin.run.data import make_loader
    from test_huggingface_callback import (MODELS, Collate, InfluenceTrainerCallback, config, examples_for,
                                           fitted_statistics, lm_examples, make_trainer, statistics_of, task_for)

    items = examples_for(kind)
    cfg = config(kind, strategy=strategy)
    if strategy == "ekfac":
        callback = InfluenceTrainerCallback(queries=lm_examples(2, offset=90), config=cfg, top_k=3, token_sequences=0)
    else:
        callback = InfluenceTrainerCallback(config=cfg)
    model = MODELS[kind]()
    before = hook_count(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(model, items, tmp_path, callback).train()
    if strategy == "ekfac":
        tracked = callback.session.last_factors
        fitted = ip.fit_factors(model, task_for(kind), make_loader(items, 8, Collate()), cfg)
    else:
        tracked, fitted = statistics_of(callback), fitted_statistics(model, task_for(kind), items, cfg)
    return Run(model, parameters(model), before, influence=callback.session,
               extra={"tracked": tracked, "fitted": fitted, "steps": 4})


def train_accumulating(adapter: str, tmp_path, accumulate: int, **case: Any) -> Run:
    """Learning rate 0, optimizer steps of 16 examples (Hugging Face: 8) taken as ``accumulate``
    micro-batches; ``extra["tracked"]``: factors (plain: K-FAC after one epoch; Lightning: the last
    attribution's after two epochs) or, for Hugging Face (``case["kind"]``), the statistics totals;
    ``extra["steps"]``: the optimizer steps the run must have counted."""
    return {"plain": _plain_accumulating, "lightning": _lightning_accumulating,
            "huggingface": _huggingface_accumulating}[adapter](tmp_path, accumulate, **case)


def _plain_accumulating(tmp_path, accumulate: int) -> Run:
    items = plain_items(32)
    config = ip.InfluenceConfig(update_every=1, strategy="kfac", accumulation_dtype="float64")
    model = plain_mlp()
    before = hook_count(model)
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as tracker:
        plain_train(model, items, tracker, lr=0.0, batch_size=16 // accumulate, accumulate=accumulate)
        tracked = tracker.factors()
    return Run(model, parameters(model), before, influence=tracker, extra={"tracked": tracked, "steps": 2})


def _lightning_accumulating(tmp_path, accumulate: int) -> Run:
    import lightning.pytorch as pl

    from test_lightning_callback import BATCH, N_TRAIN, Net, _callback, _trainer

    pl.seed_everything(0)
    module = Net(lr=0.0, batch_size=2 * BATCH // accumulate)
    before = hook_count(module)
    callback = _callback(every_n_steps=N_TRAIN // (2 * BATCH))
    _trainer(tmp_path, [callback], epochs=2, accumulate_grad_batches=accumulate).fit(module)
    return Run(module, parameters(module), before, influence=callback.session,
               extra={"tracked": callback.session.last_factors, "steps": 2 * N_TRAIN // (2 * BATCH)})


def _huggingface_accumulating(tmp_path, accumulate: int, kind: str) -> Run:
    import warnings

    from test_huggingface_callback import (MODELS, InfluenceTrainerCallback, config, examples_for, make_trainer,
                                           statistics_of)

    callback = InfluenceTrainerCallback(config=config(kind))
    model = MODELS[kind]()
    before = hook_count(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(model, examples_for(kind), tmp_path, callback, per_device_train_batch_size=8 // accumulate,
                     gradient_accumulation_steps=accumulate).train()
    return Run(model, parameters(model), before, influence=callback.session,
               extra={"tracked": statistics_of(callback), "steps": 2})


def train_resuming(adapter: str, tmp_path, resume: bool) -> Run:
    """Two epochs (Hugging Face: 4 steps at lr 1e-2, a checkpoint every 2; plain loop and Lightning
    with the sampled Fisher: the label generator's state must come back too) under
    ``tmp_path / "whole"``, or under ``tmp_path / "resumed"`` resumed from the state after the first
    half (Hugging Face: the whole run's ``checkpoint-2``, so that run comes first). ``extra``: plain
    ``factors`` (EK-FAC, lr 0, refreshed after epoch 1); Lightning the callback's ``state`` and
    ``factors``; Hugging Face ``state`` (``checkpoint-4``'s) and ``scores``."""
    return {"plain": _plain_resuming, "lightning": _lightning_resuming, "huggingface": _huggingface_resuming}[adapter](
        tmp_path, resume)


def _plain_resuming(tmp_path, resume: bool) -> Run:
    items = plain_items(40)
    config = ip.InfluenceConfig(update_every=1, strategy="ekfac", fisher="sampled", accumulation_dtype="float64")
    model = plain_mlp()
    before = hook_count(model)
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as tracker:
        if resume:
            with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as first:
                plain_train(model, items, first, lr=0.0, epochs=1, refresh_after_epoch=True)
                state = first.state_dict()
            tracker.load_state_dict(state)
            plain_train(model, items, tracker, lr=0.0, epochs=1)
        else:
            plain_train(model, items, tracker, lr=0.0, epochs=2, refresh_after_epoch=True)
        factors = tracker.factors()
    return Run(model, parameters(model), before, influence=tracker, extra={"factors": factors})


def _lightning_resuming(tmp_path, resume: bool) -> Run:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from test_lightning_callback import BATCH, N_TRAIN, Net, _callback, _trainer

    config = ip.InfluenceConfig(fisher="sampled", update_every=1)

    def run(epochs: int, root, ckpt_path: Optional[str] = None) -> tuple[Net, Any, int]:
        pl.seed_everything(0)
        module = Net()
        before = hook_count(module)
        callback = _callback(every_n_steps=N_TRAIN // BATCH, config=config)
        trainer = _trainer(root, [callback, ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True)],
                           epochs=epochs, enable_checkpointing=True)
        trainer.fit(module, ckpt_path=ckpt_path)
        return module, callback, before

    if resume:
        run(1, tmp_path / "first")
        module, callback, before = run(2, tmp_path / "resumed",
                                       ckpt_path=str(tmp_path / "first" / "ckpt" / "last.ckpt"))
    else:
        module, callback, before = run(2, tmp_path / "whole")
    return Run(module, parameters(module), before, influence=callback.session,
               extra={"state": callback.state_dict(), "factors": callback.session.last_factors,
                      "updates": 2 * N_TRAIN // BATCH})


def _huggingface_resuming(tmp_path, resume: bool) -> Run:
    import shutil

    from infl_plugin.integrations.huggingface import load_state
    from test_huggingface_callback import InfluenceTrainerCallback, config, gpt2, lm_examples, make_trainer

    out = tmp_path / ("resumed" if resume else "whole")
    if resume:
        shutil.copytree(tmp_path / "whole" / "checkpoint-2", out / "checkpoint-2")
    callback = InfluenceTrainerCallback(queries=lm_examples(2, offset=90), config=config("gpt2", strategy="ekfac"),
                                        top_k=3, token_sequences=0, candidates="all")
    model = gpt2()
    before = hook_count(model)
    trainer = make_trainer(model, lm_examples(16), out, callback, learning_rate=1e-2, max_steps=4,
                           per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)
    state, _ = load_state(str(out / "checkpoint-4"))
    return Run(model, parameters(model), before, influence=callback.session,
               extra={"state": state, "scores": callback.session.last_result.scores})
