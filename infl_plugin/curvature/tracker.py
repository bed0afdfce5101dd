"""`CurvatureTracker`: curvature statistics accumulated during the user's own training loop
(the public `InfluenceTracker` of `infl_plugin.scoring.streaming` adds the streaming scorer).

Constructing a tracker only builds its state; its hooks go on the model explicitly and come off
on `close` (or at the end of the ``with`` block)::

    with CurvatureTracker(model, task, config) as tracker:  # or: tracker = CurvatureTracker(...).attach()
        for epoch in range(epochs):
            for batch in loader:
                loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
                tracker.step(batch)
            tracker.refresh_eigenbasis()
    factors = tracker.factors(loader)  # a bounded pass (hooks on for it alone) only if still needed

With ``fisher="empirical"`` the statistics come from the training backward itself: hooks capture
``(a, g)`` while ``loss.backward()`` runs and `CurvatureTracker.step` commits them, undoing the
loss scaling (mean over the batch, gradient accumulation, AMP loss scale) so they are per-example.
With ``fisher="sampled"`` the training backward is ignored and `step` runs one extra pass with
labels drawn from the model (every ``sample_every`` statistics steps).

EK-FAC needs an eigenbasis before it can accumulate corrected eigenvalues: `refresh_eigenbasis`
eigendecomposes the covariances seen so far and starts accumulating eigenvalues in that basis on
the steps that follow. `factors` returns the current eigenbasis with those eigenvalues, or, when
none have been accumulated yet, runs a bounded pass over a loader you give it.

What the statistics weigh (`InfluenceConfig`): ``half_life`` turns the sums into exponential
moving averages over optimizer steps (old parameters forgotten); ``statistics_fraction`` takes
each statistics step's statistics on a random subset of its examples (`ExampleSubsample`);
``min_statistics_steps`` keeps an eigenbasis until its eigenvalues rest on that many statistics
steps, and `factors` warns about (or, given a loader, replaces) eigenvalues resting on fewer.
With ``fisher="sampled"`` each visit draws new pseudo-labels (``fisher_samples``: post-hoc draws).

Riders: other consumers of the same training backward register with `add_rider` (the streaming
scorer does, through `InfluenceTracker`); the tracker routes the captures to each rider on the
steps it is due and tells it when a micro-batch and an optimizer step end.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence, Union

import torch
from torch import nn

from ..config.groups import statistics_changes
from ..config.influence import InfluenceConfig
from ..distributed import broadcast_generator
from .factors import Factors, compute_factors, eigenbases
from .fitting import accumulate, new_statistics
from .hooks import LayerHooks, Sink, fan_out
from .layers import select_layers
from .passes import backward_pass, isolated
from .statistics import CurvatureStatistics
from .subsample import ExampleSubsample
from ..tasks import Task

logger = logging.getLogger(__name__)


class Rider(Protocol):
    """A consumer of the training backward's captures beside the statistics (the streaming scorer).

    ``due``: whether the backward in flight feeds it; ``sink``: what the hooks hand the captures
    to on those steps; `after_backward` commits or discards what the micro-batch left in the sink
    (``hook_error``: why its capture failed, or ``None``); `after_optimizer_step` follows the
    optimizer step's counters; ``state_dict`` entries join the tracker's.
    """

    @property
    def due(self) -> bool: ...

    @property
    def sink(self) -> Sink: ...

    def after_backward(self, batch: Any, grad_scale: Any, indices: Any, weight: Any, stream: bool,
                       hook_error: Optional[str]) -> None: ...

    def after_optimizer_step(self) -> None: ...

    def close(self) -> None: ...

    def state_dict(self, gathered: bool = False) -> dict: ...

    def load_state_dict(self, state: dict, sums: bool = True) -> None: ...


class CurvatureTracker:
    """Accumulates curvature statistics from the training loop; a context manager.

    No hooks go on in the constructor: `attach` adds them (idempotent; returns the tracker), as
    does ``with CurvatureTracker(...) as tracker:``; `close` (or leaving the block) removes them all.
    Call `step` once after each micro-batch's ``backward()`` (and after ``optimizer.step()``, so
    that streaming queries refreshed there are at the parameters of the next backward);
    ``optimizer_step=False`` marks micro-batches that do not end an optimizer step (gradient
    accumulation), so that ``update_every`` and the riders' intervals count optimizer steps.
    """

    def __init__(self, model: nn.Module, task: Task, config: Optional[InfluenceConfig] = None) -> None:
        self.model = model
        self.task = task
        self.config = config or InfluenceConfig()
        self.layers = select_layers(model, self.config.modules, self.config.module_types)
        self.hooks = LayerHooks(model, self.layers)
        self.hooks.on_error = self._on_hook_error
        self._hook_error: Optional[str] = None
        self.statistics = None if self.config.strategy == "identity" else new_statistics(self.layers, self.config)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.subsample = None
        if self.statistics is not None and self.config.statistics_fraction < 1:
            self.subsample = ExampleSubsample(self.statistics, self.config.statistics_fraction, self.config.seed)
        self.optimizer_steps = 0
        self.micro_batches = 0
        self.updates = 0
        self._last_commit_step: Optional[int] = None  # optimizer step of the last committed statistics
        self._basis_updates: Optional[int] = None  # `updates` when the current eigenbasis was set
        self.riders: list[Rider] = []

    def add_rider(self, rider: Rider) -> None:
        """Feed ``rider`` from the training backward too (after the statistics, in the order added)."""
        self.riders.append(rider)
        self.rearm()

    # ----------------------------------------------------------------------------- lifecycle
    def attach(self) -> "CurvatureTracker":
        """Register the hooks on the model (idempotent); returns the tracker."""
        self.hooks.attach()
        self.rearm()
        return self

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the model (between `attach` and `close`)."""
        return self.hooks.attached

    def close(self) -> None:
        """Remove every hook (also safe after an exception or a second call)."""
        self.hooks.close()
        for rider in self.riders:
            rider.close()
        if self.statistics is not None:
            self.statistics.discard()

    def __enter__(self) -> "CurvatureTracker":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _hooked(self) -> Iterator[None]:
        """Hooks on for an explicit pass inside the block; removed after it unless attached before."""
        attached = self.hooks.attached
        self.hooks.attach()
        try:
            yield
        finally:
            if not attached:
                self.hooks.close()

    @property
    def skipped_batches(self) -> int:
        return 0 if self.statistics is None else self.statistics.skipped_batches

    # ----------------------------------------------------------------------------- training steps
    def set_batch(self, batch: Any) -> None:
        """Announce the next training batch before its forward, so its token mask is applied.

        Optional: an ``attention_mask=`` keyword of the model call is picked up automatically.
        """
        self.hooks.explicit_mask = self.task.token_mask(batch)

    def step(self, batch: Any, grad_scale: Optional[Union[float, torch.Tensor]] = None, optimizer_step: bool = True,
             indices: Optional[Union[torch.Tensor, Sequence[int]]] = None,
             weight: Optional[Union[float, torch.Tensor]] = None, stream: bool = True) -> bool:
        """Commit what the last backward captured; returns whether statistics were updated.

        Args:
            batch: the micro-batch just backpropagated.
            grad_scale: the training loss divided by ``Σ_n loss_n`` (task losses). Default
                ``task.training_loss_scale(batch)``; multiply it by ``1/accumulation_steps`` and by
                the AMP loss scale when those apply. Read only when `needs_grad_scale` was true.
            optimizer_step: whether this micro-batch ends an optimizer step.
            indices: dataset indices ``[B]`` of the micro-batch's examples, for the riders (required
                on streaming steps).
            weight: this step's weight of the streamed scores (the learning rate with
                ``stream_weight="lr"``, where it is required); default 1.
            stream: ``False`` leaves this micro-batch out of the riders' scores (its dataset
                indices are unknown); its statistics are committed as usual.

        Raises ``RuntimeError`` when the hooks are not attached (nothing was captured).
        """
        if not self.hooks.attached:
            raise RuntimeError("InfluenceTracker.step: the hooks are not attached, so the backward was not "
                               "captured; call tracker.attach() or use `with InfluenceTracker(...) as tracker:`")
        for rider in self.riders:
            rider.after_backward(batch, grad_scale, indices, weight, stream, self._hook_error)
        updated = False
        if self._hook_error is not None and self.statistics is not None:
            self.statistics.discard()
            self.statistics.skipped_batches += 1
            warnings.warn(f"infl_plugin: skipped the statistics of micro-batch {self.micro_batches}: "
                          f"{self._hook_error}", stacklevel=2)
            self._hook_error = None
        elif self.statistics is not None and self._due():
            if self.config.fisher == "empirical":
                scale = self.task.training_loss_scale(batch) if grad_scale is None else grad_scale
                updated = self._commit(lambda: self.statistics.commit(scale, self._decay()))
            elif self.updates % self.config.sample_every == 0:
                self.statistics.discard()
                updated = self._commit(lambda: self._sampled_update(batch))
            else:
                self.statistics.discard()
        elif self.statistics is not None:
            self.statistics.discard()
        self._hook_error = None
        self.micro_batches += 1
        if optimizer_step:
            self.updates += int(self._due() and self.statistics is not None)
            self.optimizer_steps += 1
            for rider in self.riders:
                rider.after_optimizer_step()
        self.hooks.explicit_mask = None
        if self.subsample is not None:
            self.subsample.next_step()
        self.rearm()
        return updated

    def _on_hook_error(self, layer, error: Exception) -> None:
        """A capture failed during the training backward: remember it, never interrupt training."""
        self._hook_error = f"{type(error).__name__} in layer {layer.name!r}: {error}"

    def _due(self) -> bool:
        return self.optimizer_steps % self.config.update_every == 0

    @property
    def capturing(self) -> bool:
        """Whether the training backward in flight feeds the statistics (empirical Fisher, a due
        step): the only micro-batches whose ``grad_scale`` `step` uses, so callers can skip
        working it out (a device sync, for token counts or the AMP scale) on all others."""
        return self.statistics is not None and self.config.fisher == "empirical" and self._due()

    @property
    def needs_grad_scale(self) -> bool:
        """Whether `step` reads ``grad_scale`` for the micro-batch in flight (statistics or a
        rider): callers compute the scale (a device sync) only when this is true."""
        return self.capturing or any(rider.due for rider in self.riders)

    def rearm(self) -> None:
        """Route the next training backward's captures to the statistics and/or the riders, each
        only on the steps it is due (no hook work at all on other steps)."""
        statistics = self.subsample or self.statistics
        due = [(statistics, self.capturing), *((rider.sink, rider.due) for rider in self.riders)]
        self.hooks.sink = fan_out(*[s for s, on in due if on])

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Keep the training sink (statistics and riders) out of the forwards and backwards run
        inside the block (extra passes: query refreshes, checkpoint scoring); restored on exit."""
        hooks = self.hooks
        sink, mask = hooks.sink, hooks.explicit_mask
        hooks.sink, hooks.explicit_mask = None, None
        try:
            yield
        finally:
            hooks.sink, hooks.explicit_mask = sink, mask

    def _sampled_update(self, batch: Any) -> bool:
        with isolated(self.model):
            backward_pass(self.model, self.task, self.hooks, batch, self.subsample or self.statistics, sample=True,
                          generator=self.generator)
        return self.statistics.commit(1.0, self._decay())

    def _decay(self) -> float:
        """``0.5 ** (optimizer steps since the last commit / half-life)``, the half-life being
        ``half_life`` or ``half_life_fraction`` × the optimizer steps so far (1 without either)."""
        half_life = self.config.half_life
        if half_life is None and self.config.half_life_fraction is not None:
            half_life = self.config.half_life_fraction * max(1, self.optimizer_steps)
        if half_life is None or self._last_commit_step is None:
            return 1.0
        return 0.5 ** ((self.optimizer_steps - self._last_commit_step) / half_life)

    @property
    def eigenvalue_steps(self) -> int:
        """Statistics steps since the eigenbasis was last set (0 without one); the same on every
        process, so decisions taken on it before a collective agree."""
        if self._basis_updates is None:
            return 0
        steps = self.updates - self._basis_updates
        return steps if self.config.fisher == "empirical" else -(-steps // self.config.sample_every)

    def _commit(self, commit) -> bool:
        skipped = self.statistics.skipped_batches
        ok = bool(commit())
        if ok:
            self._last_commit_step = self.optimizer_steps
        if self.statistics.skipped_batches > skipped:
            warnings.warn(
                f"infl_plugin: skipped the statistics of micro-batch {self.micro_batches} (NaN/inf gradients or no "
                f"real tokens); {self.statistics.skipped_batches} skipped so far",
                stacklevel=3,
            )
        return ok

    # ----------------------------------------------------------------------------- factors
    def refresh_eigenbasis(self, reduced: Optional[CurvatureStatistics] = None) -> None:
        """EK-FAC: eigendecompose the covariances so far; eigenvalues accumulate in the new basis.

        ``reduced``: the statistics already summed over processes (`CurvatureStatistics.reduced`)
        when the caller holds them; otherwise they are reduced here (a collective: every rank).
        While the current eigenvalues rest on fewer than ``config.min_statistics_steps`` statistics
        steps, the basis is kept and they go on accumulating in it.
        """
        if self.config.strategy != "ekfac":
            return
        if self._basis_updates is not None and self.eigenvalue_steps < self.config.min_statistics_steps:
            return
        self.statistics.set_basis(eigenbases(reduced if reduced is not None else self.statistics.reduced()))
        self._basis_updates = self.updates

    def factors(self, loader: Optional[Iterable] = None, reduced: Optional[CurvatureStatistics] = None) -> Factors:
        """Factors from the statistics so far (summed over processes when distributed).

        EK-FAC uses the eigenvalues accumulated since the last `refresh_eigenbasis`; when there are
        none, ``loader`` is read (at most ``config.max_fit_batches`` batches) in a fresh eigenbasis.
        Eigenvalues resting on fewer than ``config.min_statistics_steps`` statistics steps are
        replaced by that bounded pass given a ``loader`` (logged), and warned about without one.
        ``reduced``: statistics already summed over processes, used (and, for that pass, updated)
        in place of a new reduction, so a caller can take every decision after one collective.
        """
        if self.statistics is None:
            return compute_factors(None, self.layers, self.config)
        statistics = reduced if reduced is not None else self.statistics.reduced()
        tracked = statistics.bases is not None and statistics.has_eigenvalues
        few = tracked and self.eigenvalue_steps < self.config.min_statistics_steps
        if self.config.strategy == "ekfac" and few:
            note = (f"infl_plugin: the EK-FAC eigenvalues rest on {self.eigenvalue_steps} statistics step(s), fewer than "
                    f"InfluenceConfig.min_statistics_steps={self.config.min_statistics_steps}; ")
            if loader is not None:  # the default path of short attribution intervals: said, not warned
                logger.info(note + "reading them in the bounded eigenvalue pass over the candidates instead")
            else:
                warnings.warn(note + "attribute less often or lower update_every for better factors", stacklevel=2)
        if self.config.strategy == "ekfac" and (not tracked or (few and loader is not None)):
            if loader is None:
                raise RuntimeError(
                    "EK-FAC eigenvalues have not been accumulated yet: call refresh_eigenbasis() and keep "
                    "training, or pass loader=... for a bounded eigenvalue pass"
                )
            statistics.set_basis(eigenbases(statistics))
            statistics.covariances = False
            broadcast_generator(self.generator)  # the same sampled labels on every rank: the same factors
            with self._hooked(), isolated(self.model):
                accumulate(self.model, self.task, self.hooks, statistics, loader, self.config, self.generator)
        return compute_factors(statistics, self.layers, self.config)

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self, gathered: bool = False) -> dict:
        """Statistics, counters, RNG and the riders' states (``gathered``: their sums over every process)."""
        state = {
            "statistics": None if self.statistics is None else self.statistics.state_dict(),
            "optimizer_steps": self.optimizer_steps,
            "micro_batches": self.micro_batches,
            "updates": self.updates,
            "generator": self.generator.get_state(),
            "config": self.config.to_dict(),
            "last_commit_step": self._last_commit_step,
            "basis_updates": self._basis_updates,
            "subsample": None if self.subsample is None else self.subsample.state_dict(),
        }
        for rider in self.riders:
            state.update(rider.state_dict(gathered))
        return state

    def load_state_dict(self, state: dict, sums: bool = True) -> None:
        """Restore `state_dict`; ``sums=False`` zeroes the sums (ranks other than the main one)."""
        changed = statistics_changes(state["config"], self.config.to_dict())
        if changed:
            saved = ", ".join(f"{name}={state['config'][name]!r} (now {getattr(self.config, name)!r})"
                              for name in changed)
            raise ValueError(f"Tracker state was saved with another InfluenceConfig: {saved} shape the saved "
                             "statistics; resume with the saved values (fields that do not shape them, such as "
                             "damping, query_rank or the streaming ones, may change)")
        if self.statistics is not None:
            self.statistics.load_state_dict(state["statistics"])
        if self.statistics is not None and not sums:
            self.statistics.reset(covariances=True, eigenvalues=True)
        self.optimizer_steps = int(state["optimizer_steps"])
        self.micro_batches = int(state["micro_batches"])
        self.updates = int(state["updates"])
        self.generator.set_state(state["generator"])
        self._last_commit_step = state.get("last_commit_step")
        self._basis_updates = state.get("basis_updates")
        if self.subsample is not None and state.get("subsample") is not None:
            self.subsample.load_state_dict(state["subsample"])
        for rider in self.riders:
            rider.load_state_dict(state, sums)
        self.rearm()
