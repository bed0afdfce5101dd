"""`InfluenceTracker`: curvature statistics accumulated during the user's own training loop.

Constructing a tracker only builds its state; its hooks go on the model explicitly and come off
on `close` (or at the end of the ``with`` block)::

    with InfluenceTracker(model, task, config) as tracker:  # or: tracker = InfluenceTracker(...).attach()
        for epoch in range(epochs):
            for batch in loader:
                loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
                tracker.step(batch)
            tracker.refresh_eigenbasis()
    factors = tracker.factors(loader)  # a bounded pass (hooks on for it alone) only if still needed

With ``fisher="empirical"`` the statistics come from the training backward itself: hooks capture
``(a, g)`` while ``loss.backward()`` runs and `InfluenceTracker.step` commits them, undoing the
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
With ``fisher="sampled"`` each visit of an example draws new pseudo-labels, so the draws per
example grow with the epochs (``fisher_samples`` sets them for the post-hoc passes).

Streaming attribution (``queries=`` or `set_queries`): the same training backward also scores
every example of the micro-batch against the queries' preconditioned gradients (see
`streaming`); `step` takes the examples' dataset indices, and `streamed_scores` returns each
example's influence at the times it was trained on, summed over its visits. The queries are
re-preconditioned at the current parameters with the best factors available: at optimizer steps
1, 2, 4, 8, … (each interval as long as the run before it, so a short run follows its curvature
from the start), then every ``stream_refresh_every`` steps, and at once when better factors
become available. With EK-FAC the queries are K-FAC-preconditioned (the covariances alone,
available from the first statistics step) until ``min_statistics_steps`` statistics steps have
accumulated eigenvalues in an eigenbasis (the first due refresh sets one, `refresh_eigenbasis`),
then EK-FAC. Sums never mix preconditionings: when better-preconditioned queries arrive the
scorer drops the sums so far (`superseded_batches` counts them), since early visits scored with
worse queries dominated the sums (digits MLP: 0.47 LDS mixed against 0.65 superseded; a 100-step
LM fine-tune streams with K-FAC at 0.9× checkpoint EK-FAC: benchmarks/streaming.py and
benchmarks/short_finetune.py).
`StreamedScores.batches` says which preconditioning scored how many micro-batches.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..scoring.attributor import Attributor
from ..config.influence import InfluenceConfig
from .factors import Factors, compute_factors, eigenbases
from .fitting import accumulate, new_statistics
from .hooks import LayerHooks, fan_out
from .layers import select_layers
from .passes import backward_pass, isolated, model_device
from .statistics import CurvatureStatistics
from ..scoring.streaming.scorer import RANK, StreamedScores, StreamingScorer
from .subsample import ExampleSubsample
from ..tasks import Task

logger = logging.getLogger(__name__)


class InfluenceTracker:
    """Accumulates curvature statistics from the training loop; a context manager.

    The constructor registers no hooks on ``model``: `attach` does (idempotent; returns the
    tracker, so ``tracker = InfluenceTracker(...).attach()``), and so does entering
    ``with InfluenceTracker(...) as tracker:``; `close` (or leaving the block) removes them all.
    Call `step` once after each micro-batch's ``backward()`` (and after ``optimizer.step()``, so
    that streaming queries refreshed there are at the parameters of the next backward);
    ``optimizer_step=False`` marks micro-batches that do not end an optimizer step (gradient
    accumulation), so that ``update_every`` and the ``stream_*`` intervals count optimizer steps.

    Args:
        queries: batches (a list, or a loader read once into a list) whose influence is streamed;
            ``None`` (default) disables streaming (see `set_queries`).
    """

    def __init__(self, model: nn.Module, task: Task, config: Optional[InfluenceConfig] = None,
                 queries: Optional[Iterable] = None) -> None:
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
        self.scorer = StreamingScorer(self.layers, getattr(torch, self.config.accumulation_dtype))
        self.failed_query_refreshes = 0
        self._queries: Optional[list] = None
        self._given_factors: Optional[Factors] = None  # the last factors handed to `refresh_queries`
        self._resumed_stream: Optional[dict] = None  # a loaded stream state waiting for `set_queries`
        self._last_query_refresh = 0
        self._dropped_warned = 0
        if queries is not None:
            self.set_queries(queries)

    # ----------------------------------------------------------------------------- lifecycle
    def attach(self) -> "InfluenceTracker":
        """Register the hooks on the model (idempotent); returns the tracker."""
        self.hooks.attach()
        self._arm()
        return self

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the model (between `attach` and `close`)."""
        return self.hooks.attached

    def close(self) -> None:
        """Remove every hook (also safe after an exception or a second call)."""
        self.hooks.close()
        self.scorer.discard()
        if self.statistics is not None:
            self.statistics.discard()

    def __enter__(self) -> "InfluenceTracker":
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
            indices: dataset indices ``[B]`` of the micro-batch's examples; required on streaming
                steps (`streaming`).
            weight: this step's weight of the streamed scores (the learning rate with
                ``stream_weight="lr"``, where it is required); default 1.
            stream: ``False`` leaves this micro-batch out of the streamed scores (its dataset
                indices are unknown); its statistics are committed as usual.

        Raises ``RuntimeError`` when the hooks are not attached (nothing was captured).
        """
        if not self.hooks.attached:
            raise RuntimeError("InfluenceTracker.step: the hooks are not attached, so the backward was not "
                               "captured; call tracker.attach() or use `with InfluenceTracker(...) as tracker:`")
        if self.streaming and stream:
            self._stream(batch, grad_scale, indices, weight)
        else:
            self.scorer.discard()
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
            self._maybe_refresh_queries()
        self.hooks.explicit_mask = None
        if self.subsample is not None:
            self.subsample.next_step()
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

    @property
    def streaming(self) -> bool:
        """Whether the training backward in flight is scored against the streaming queries."""
        return self._queries is not None and self.optimizer_steps % self.config.stream_every == 0

    @property
    def needs_grad_scale(self) -> bool:
        """Whether `step` reads ``grad_scale`` for the micro-batch in flight (statistics or
        streaming): callers compute the scale (a device sync) only when this is true."""
        return self.capturing or self.streaming

    def _arm(self) -> None:
        """Route the next training backward's captures to the statistics and/or the streaming
        scorer, each only on the steps it is due (no hook work at all on other steps)."""
        statistics = self.subsample or self.statistics
        self.hooks.sink = fan_out(*[s for s, due in ((statistics, self.capturing), (self.scorer, self.streaming)) if due])

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Keep the training sink (statistics and streaming) out of the forwards and backwards run
        inside the block (extra passes: query refreshes, checkpoint scoring); restored on exit."""
        hooks = self.hooks
        sink, mask = hooks.sink, hooks.explicit_mask
        hooks.sink, hooks.explicit_mask = None, None
        try:
            yield
        finally:
            hooks.sink, hooks.explicit_mask = sink, mask

    # ----------------------------------------------------------------------------- streaming
    def set_queries(self, queries: Optional[Iterable]) -> None:
        """Stream the influence of training examples on ``queries`` (``None`` stops streaming).

        ``queries`` is read once into a list (a shuffling loader would otherwise reorder the
        queries between refreshes) and preconditioned now with the current factors (a collective
        when distributed). Streamed scores so far are reset.
        """
        self.scorer.reset()
        if queries is None:
            self._queries = None
            self.scorer.set_queries(None)
        else:
            batches = list(queries)
            if not batches:
                raise ValueError("The query loader yielded no batch")
            self._queries = batches
            resumed = self._resumed_stream is not None and self._resume_stream(
                sum(self.task.batch_size(batch) for batch in batches))
            if not resumed:
                self.refresh_queries()
        self._arm()

    def refresh_queries(self, factors: Optional[Factors] = None) -> str:
        """Re-differentiate and precondition the streaming queries at the current parameters.

        ``factors`` default to the tracker's own (see the module docstring; a collective when
        distributed: every rank calls this at the same step). The query pass is isolated: eval
        mode, forked RNG, training sink paused, no parameter ``.grad`` touched. Returns the
        preconditioning used (``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"identity"``).
        """
        if self._queries is None:
            raise RuntimeError("No streaming queries: call set_queries(...) first")
        if factors is not None:
            self._given_factors, used = factors, factors.strategy
        else:
            factors, used = self._streaming_factors()
        with warnings.catch_warnings():  # layer selection warnings were given by the tracker already
            warnings.simplefilter("ignore")
            attributor = Attributor(self.model, self.task, factors, replace(self.config, strategy=used))
        with self.paused(), torch.inference_mode(False), torch.enable_grad():
            queries = attributor.precondition(self._queries, collective=True)
        self.scorer.set_queries(queries, used)
        self._last_query_refresh = self.optimizer_steps
        return used

    @property
    def has_queries(self) -> bool:
        """Whether streaming queries are set (`set_queries`)."""
        return self._queries is not None

    def _ready(self) -> str:
        """The best preconditioning available now: the tracker's own (`_own_ready`) or that of
        the factors given to `refresh_queries` (an attribution's), whichever ranks higher in
        identity < diagonal < K-FAC < EK-FAC. Read from counters equal on every process, so the
        collectives it leads to are entered by all of them."""
        own = self._own_ready()
        given = None if self._given_factors is None else self._given_factors.strategy
        return given if given is not None and RANK[given] > RANK[own] else own

    def _own_ready(self) -> str:
        """The configured strategy once its factors exist; EK-FAC needs an eigenbasis with
        eigenvalues from ``max(1, min_statistics_steps)`` statistics steps and until then falls
        back to K-FAC (the covariances alone: available from the first statistics step, so a short
        run streams with curvature almost from its start); ``"identity"`` before any statistics."""
        strategy = self.config.strategy
        if self.statistics is None or strategy == "identity" or self.updates == 0:
            return "identity"
        if strategy == "ekfac":
            enough = self.eigenvalue_steps >= max(1, self.config.min_statistics_steps)
            return "ekfac" if self.statistics.bases is not None and enough else "kfac"
        return strategy

    def _streaming_factors(self) -> tuple[Factors, str]:
        """Factors for `_ready`'s preconditioning: the given ones, or the tracker's own from the
        statistics summed over processes (identity when the sums lack them, e.g. every batch so
        far was skipped)."""
        used = self._ready()
        if self._given_factors is not None and used == self._given_factors.strategy != self._own_ready():
            return self._given_factors, used
        if used != "identity":
            reduced = self.statistics.reduced()
            complete = reduced.has_covariances if used == "kfac" else reduced.has_eigenvalues
            if complete:
                return compute_factors(reduced, self.layers, replace(self.config, strategy=used)), used
            used = "identity"
        return compute_factors(None, self.layers, replace(self.config, strategy=used)), used

    def _maybe_refresh_queries(self) -> None:
        """After an optimizer step, when the next step streams: refresh the queries when the
        interval since the last refresh reaches the step of that refresh (the intervals double
        from one step: steps 1, 2, 4, 8, …, so a short run's queries follow its parameters and
        curvature from the start) capped at ``stream_refresh_every``, and at once when better
        factors than the queries' became available (never downgrading, e.g. to K-FAC while the
        eigenvalues of a new eigenbasis accumulate). With EK-FAC and no eigenbasis yet, the first
        due refresh eigendecomposes the covariances so far (`refresh_eigenbasis`) so that EK-FAC
        eigenvalues start accumulating without waiting for an attribution."""
        every = self.config.stream_refresh_every
        if self._queries is None or every is None or not self.streaming:
            return
        interval = self.optimizer_steps - self._last_query_refresh >= min(every, max(1, self._last_query_refresh))
        try:
            if interval and self.config.strategy == "ekfac" and self.statistics.bases is None and self.updates > 0:
                self.refresh_eigenbasis()
            ready, current = self._ready(), self.scorer.preconditioning or "identity"
            if RANK[ready] < RANK[current]:
                return
            if interval or RANK[ready] > RANK[current]:
                self.refresh_queries()
        except Exception as error:  # noqa: BLE001 - a side task must never break training
            self.failed_query_refreshes += 1
            self._last_query_refresh = self.optimizer_steps
            warnings.warn(f"infl_plugin: refreshing the streaming queries at optimizer step {self.optimizer_steps} "
                          f"failed ({type(error).__name__}: {error}); scoring against the previous ones", stacklevel=3)

    def _stream(self, batch: Any, grad_scale, indices, weight) -> None:
        """Commit the micro-batch's streamed scores (or skip them after a failed capture)."""
        if self._hook_error is not None:
            self.scorer.discard()
            self.scorer.skipped_batches += 1
            warnings.warn(f"infl_plugin: skipped the streamed scores of micro-batch {self.micro_batches}: "
                          f"{self._hook_error}", stacklevel=3)
            return
        if indices is None:
            self.scorer.discard()
            raise ValueError("InfluenceTracker.step(indices=...) is required while streaming: the dataset indices "
                             "of the micro-batch's examples")
        if weight is None:
            if self.config.stream_weight == "lr":
                self.scorer.discard()
                raise ValueError('InfluenceConfig.stream_weight="lr": pass the learning rate as step(weight=...)')
            weight = 1.0
        scale = self.task.training_loss_scale(batch) if grad_scale is None else grad_scale
        self.scorer.commit(indices, scale, weight)

    def streamed_scores(self) -> StreamedScores:
        """Scores streamed since the last `reset_stream` (or `set_queries`).

        When distributed this is a collective (call it on every rank): each process scored its
        own examples, and every rank receives the merge of all of them.
        """
        dropped = self.scorer.dropped_examples
        if dropped > self._dropped_warned:
            warnings.warn(f"infl_plugin: {dropped - self._dropped_warned} streamed example scores were NaN/inf and "
                          "were dropped", stacklevel=2)
            self._dropped_warned = dropped
        return self.scorer.result().gather()

    @property
    def superseded_batches(self) -> dict[str, int]:
        """Streamed micro-batches of this process dropped since `reset_stream`, by their queries'
        preconditioning, because better-preconditioned queries replaced those (see
        `StreamingScorer.set_queries`)."""
        return dict(self.scorer.superseded_batches)

    def reset_stream(self) -> None:
        """Forget the streamed scores (the queries stay)."""
        self.scorer.reset()
        self._dropped_warned = 0

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
            with self._hooked(), isolated(self.model):
                accumulate(self.model, self.task, self.hooks, statistics, loader, self.config, self.generator)
        return compute_factors(statistics, self.layers, self.config)

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self, gathered: bool = False) -> dict:
        """Statistics, counters, RNG and the streaming state: the streamed sums (this process's;
        ``gathered``: every process's, a collective), the preconditioned queries and the factors
        last given to `refresh_queries` (CPU copies), so that a resumed run streams exactly as
        this one would."""
        streamed = self.scorer.result().gather() if gathered else None
        return {
            "statistics": None if self.statistics is None else self.statistics.state_dict(),
            "optimizer_steps": self.optimizer_steps,
            "micro_batches": self.micro_batches,
            "updates": self.updates,
            "generator": self.generator.get_state(),
            "config": self.config.to_dict(),
            "last_commit_step": self._last_commit_step,
            "basis_updates": self._basis_updates,
            "subsample": None if self.subsample is None else self.subsample.state_dict(),
            "stream": self.scorer.state_dict(streamed),
            "last_query_refresh": self._last_query_refresh,
            "given_factors": None if self._given_factors is None else self._given_factors.state_dict(),
        }

    def load_state_dict(self, state: dict, sums: bool = True) -> None:
        """Restore `state_dict`. ``sums=False`` starts the statistics and streamed sums from zero
        (in the same eigenbasis, with the same queries): the other processes of a run whose main
        process holds the saved totals."""
        if state["config"] != self.config.to_dict():
            raise ValueError(f"Tracker state was saved with another InfluenceConfig: {state['config']}")
        if self.statistics is not None:
            self.statistics.load_state_dict(state["statistics"])
            if not sums:
                self.statistics.reset(covariances=True, eigenvalues=True)
        if not sums and state.get("stream") is not None:
            state = dict(state, stream=dict(state["stream"], indices=torch.zeros(0, dtype=torch.long), batches={},
                                            layer_abs=None, skipped_batches=0, superseded_batches={}))
        self.optimizer_steps = int(state["optimizer_steps"])
        self.micro_batches = int(state["micro_batches"])
        self.updates = int(state["updates"])
        self.generator.set_state(state["generator"])
        self._last_commit_step = state.get("last_commit_step")
        self._basis_updates = state.get("basis_updates")
        if self.subsample is not None and state.get("subsample") is not None:
            self.subsample.load_state_dict(state["subsample"])
        device = model_device(self.model)
        if state.get("given_factors") is not None:
            self._given_factors = Factors.from_state_dict(state["given_factors"], device)
        if state.get("stream") is not None:
            self._last_query_refresh = int(state["last_query_refresh"])
            self._resumed_stream = state["stream"]
            if self._queries is not None:
                self._resume_stream(len(self.scorer.queries or ()))
        self._arm()

    def _resume_stream(self, num_queries: int) -> bool:
        """Continue a loaded state's stream: its preconditioned queries (when saved for
        ``num_queries`` queries) and sums. Returns whether the saved queries were taken."""
        state, self._resumed_stream = self._resumed_stream, None
        saved = state.get("queries")
        if saved is not None and int(saved["measurements"].shape[0]) != num_queries:
            warnings.warn(f"infl_plugin: the saved streaming state is for {int(saved['measurements'].shape[0])} "
                          f"queries, this run streams {num_queries}; streamed scores restart from zero", stacklevel=3)
            return False
        self.scorer.load_state_dict(state, model_device(self.model))
        return saved is not None
