"""`InfluenceTracker`: curvature statistics accumulated during the user's own training loop.

With ``fisher="empirical"`` the statistics come from the training backward itself: hooks capture
``(a, g)`` while ``loss.backward()`` runs and `InfluenceTracker.step` commits them, undoing the
loss scaling (mean over the batch, gradient accumulation, AMP loss scale) so they are per-example.
With ``fisher="sampled"`` the training backward is ignored and `step` runs one extra pass with
labels drawn from the model (every ``sample_every`` statistics steps).

EK-FAC needs an eigenbasis before it can accumulate corrected eigenvalues: `refresh_eigenbasis`
eigendecomposes the covariances seen so far and starts accumulating eigenvalues in that basis on
the steps that follow. `factors` returns the current eigenbasis with those eigenvalues, or, when
none have been accumulated yet, runs a bounded pass over a loader you give it.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .config import InfluenceConfig
from .factors import Factors, compute_factors, eigenbases
from .fitting import accumulate, new_statistics
from .hooks import LayerHooks
from .layers import select_layers
from .passes import backward_pass, isolated
from .tasks import Task


class InfluenceTracker:
    """Accumulates curvature statistics from the training loop; a context manager.

    Call `step` once after each micro-batch's ``backward()``; ``optimizer_step=False`` marks
    micro-batches that do not end an optimizer step (gradient accumulation), so that
    ``update_every`` counts optimizer steps.
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
        self.optimizer_steps = 0
        self.micro_batches = 0
        self.updates = 0
        self.attach()

    # ----------------------------------------------------------------------------- lifecycle
    def attach(self) -> "InfluenceTracker":
        self.hooks.attach()
        self._arm()
        return self

    def close(self) -> None:
        """Remove every hook (also safe after an exception or a second call)."""
        self.hooks.close()
        if self.statistics is not None:
            self.statistics.discard()

    def __enter__(self) -> "InfluenceTracker":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def skipped_batches(self) -> int:
        return 0 if self.statistics is None else self.statistics.skipped_batches

    # ----------------------------------------------------------------------------- training steps
    def set_batch(self, batch: Any) -> None:
        """Announce the next training batch before its forward, so its token mask is applied.

        Optional: an ``attention_mask=`` keyword of the model call is picked up automatically.
        """
        self.hooks.explicit_mask = self.task.token_mask(batch)

    def step(self, batch: Any, grad_scale: Optional[float] = None, optimizer_step: bool = True) -> bool:
        """Commit what the last backward captured; returns whether statistics were updated.

        Args:
            batch: the micro-batch just backpropagated.
            grad_scale: the training loss divided by ``Σ_n loss_n`` (task losses). Default
                ``task.training_loss_scale(batch)``; multiply it by ``1/accumulation_steps`` and by
                the AMP loss scale when those apply.
            optimizer_step: whether this micro-batch ends an optimizer step.
        """
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
                updated = self._commit(lambda: self.statistics.commit(scale))
            elif self.updates % self.config.sample_every == 0:
                self.statistics.discard()
                updated = self._commit(lambda: self._sampled_update(batch))
            else:
                self.statistics.discard()
        elif self.statistics is not None:
            self.statistics.discard()
        self.micro_batches += 1
        if optimizer_step:
            self.updates += int(self._due() and self.statistics is not None)
            self.optimizer_steps += 1
        self.hooks.explicit_mask = None
        self._arm()
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

    def _arm(self) -> None:
        """Let hooks feed the statistics during the next training backward only when it is used."""
        self.hooks.sink = self.statistics if self.capturing else None

    def _sampled_update(self, batch: Any) -> bool:
        with isolated(self.model):
            backward_pass(self.model, self.task, self.hooks, batch, self.statistics, sample=True, generator=self.generator)
        return self.statistics.commit(1.0)

    def _commit(self, commit) -> bool:
        skipped = self.statistics.skipped_batches
        ok = bool(commit())
        if self.statistics.skipped_batches > skipped:
            warnings.warn(
                f"infl_plugin: skipped the statistics of micro-batch {self.micro_batches} (NaN/inf gradients or no "
                f"real tokens); {self.statistics.skipped_batches} skipped so far",
                stacklevel=3,
            )
        return ok

    # ----------------------------------------------------------------------------- factors
    def refresh_eigenbasis(self) -> None:
        """EK-FAC: eigendecompose the covariances so far; eigenvalues accumulate in the new basis."""
        if self.config.strategy != "ekfac":
            return
        self.statistics.set_basis(eigenbases(self.statistics.reduced()))

    def factors(self, loader: Optional[Iterable] = None) -> Factors:
        """Factors from the statistics so far (summed over processes when distributed).

        EK-FAC uses the eigenvalues accumulated since the last `refresh_eigenbasis`; when there are
        none, ``loader`` is read (at most ``config.max_fit_batches`` batches) in a fresh eigenbasis.
        """
        if self.statistics is None:
            return compute_factors(None, self.layers, self.config)
        statistics = self.statistics.reduced()
        if self.config.strategy == "ekfac" and not (statistics.bases is not None and statistics.has_eigenvalues):
            if loader is None:
                raise RuntimeError(
                    "EK-FAC eigenvalues have not been accumulated yet: call refresh_eigenbasis() and keep "
                    "training, or pass loader=... for a bounded eigenvalue pass"
                )
            statistics.set_basis(eigenbases(statistics))
            statistics.covariances = False
            with isolated(self.model):
                accumulate(self.model, self.task, self.hooks, statistics, loader, self.config, self.generator)
        return compute_factors(statistics, self.layers, self.config)

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {
            "statistics": None if self.statistics is None else self.statistics.state_dict(),
            "optimizer_steps": self.optimizer_steps,
            "micro_batches": self.micro_batches,
            "updates": self.updates,
            "generator": self.generator.get_state(),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config.to_dict():
            raise ValueError(f"Tracker state was saved with another InfluenceConfig: {state['config']}")
        if self.statistics is not None:
            self.statistics.load_state_dict(state["statistics"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.micro_batches = int(state["micro_batches"])
        self.updates = int(state["updates"])
        self.generator.set_state(state["generator"])
        self._arm()
