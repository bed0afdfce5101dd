"""`StreamingQueries`: the streaming scorer riding on a tracker's training backward.

A rider of `CurvatureTracker` (see `infl_plugin.curvature.tracker`): it owns the queries, keeps
their preconditioned gradients current with the tracker's factors, and commits each micro-batch's
scores (`StreamingScorer`) from the captures of the same backward that feeds the statistics.

The queries are re-preconditioned at the current parameters with the best factors available: at
optimizer steps 1, 2, 4, 8, … (each interval as long as the run before it, so a short run follows
its curvature from the start), then every ``stream_refresh_every`` steps, and at once when better
factors become available. With EK-FAC the queries are K-FAC-preconditioned (the covariances
alone, available from the first statistics step) until ``min_statistics_steps`` statistics steps
have accumulated eigenvalues in an eigenbasis (the first due refresh sets one,
`refresh_eigenbasis`), then EK-FAC. Sums never mix preconditionings: when better-preconditioned
queries arrive the scorer drops the sums so far (`StreamingScorer.superseded_batches`), since
early visits scored with worse queries dominated mixed sums (digits MLP: 0.47 LDS mixed against
0.65 superseded; a 100-step LM fine-tune streams with K-FAC at 0.91× checkpoint EK-FAC:
benchmarks/streaming.py, benchmarks/short_finetune.py).

The state (`state_dict`) holds the sums, the preconditioned queries and the factors last given to
`refresh`, so that a resumed run streams exactly as the uninterrupted one.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch

from ...curvature.factors import Factors, compute_factors
from ...curvature.passes import model_device
from ..attributor import Attributor
from .scorer import RANK, StreamedScores, StreamingScorer

if TYPE_CHECKING:
    from ...curvature.tracker import CurvatureTracker


class StreamingQueries:
    """Scores every example of a streaming micro-batch against the queries; a tracker rider.

    Args:
        tracker: the tracker whose backward it reads and whose factors precondition the queries.
    """

    def __init__(self, tracker: CurvatureTracker) -> None:
        self.tracker = tracker
        self.scorer = StreamingScorer(tracker.layers, getattr(torch, tracker.config.accumulation_dtype))
        self.failed_query_refreshes = 0
        self.queries: Optional[list] = None
        self._given_factors: Optional[Factors] = None  # the last factors handed to `refresh`
        self._resumed: Optional[dict] = None  # a loaded stream state waiting for `set_queries`
        self._last_query_refresh = 0
        self._dropped_warned = 0

    # ----------------------------------------------------------------------------- rider protocol
    @property
    def due(self) -> bool:
        """Whether the training backward in flight is scored against the queries."""
        return self.queries is not None and self.tracker.optimizer_steps % self.tracker.config.stream_every == 0

    @property
    def sink(self) -> StreamingScorer:
        return self.scorer

    def after_backward(self, batch: Any, grad_scale: Any, indices: Any, weight: Any, stream: bool,
                       hook_error: Optional[str]) -> None:
        """Commit the micro-batch's streamed scores (or skip them after a failed capture)."""
        if not (self.due and stream):
            self.scorer.discard()
            return
        if hook_error is not None:
            self.scorer.discard()
            self.scorer.skipped_batches += 1
            warnings.warn(f"infl_plugin: skipped the streamed scores of micro-batch {self.tracker.micro_batches}: "
                          f"{hook_error}", stacklevel=3)
            return
        if indices is None:
            self.scorer.discard()
            raise ValueError("InfluenceTracker.step(indices=...) is required while streaming: the dataset indices "
                             "of the micro-batch's examples")
        if weight is None:
            if self.tracker.config.stream_weight == "lr":
                self.scorer.discard()
                raise ValueError('InfluenceConfig.stream_weight="lr": pass the learning rate as step(weight=...)')
            weight = 1.0
        scale = self.tracker.task.training_loss_scale(batch) if grad_scale is None else grad_scale
        self.scorer.commit(indices, scale, weight)

    def after_optimizer_step(self) -> None:
        """When the next step streams: refresh the queries when the interval since the last
        refresh reaches the step of that refresh (steps 1, 2, 4, 8, …) capped at
        ``stream_refresh_every``, and at once when better factors than the queries' became
        available (never downgrading, e.g. to K-FAC while the eigenvalues of a new eigenbasis
        accumulate). With EK-FAC and no eigenbasis yet, the first due refresh eigendecomposes the
        covariances so far (`refresh_eigenbasis`) so that EK-FAC eigenvalues start accumulating
        without waiting for an attribution."""
        tracker = self.tracker
        every = tracker.config.stream_refresh_every
        if self.queries is None or every is None or not self.due:
            return
        since = tracker.optimizer_steps - self._last_query_refresh
        interval = since >= min(every, max(1, self._last_query_refresh))
        try:
            if interval and tracker.config.strategy == "ekfac" and tracker.statistics.bases is None and tracker.updates > 0:
                tracker.refresh_eigenbasis()
            ready, current = self.ready(), self.scorer.preconditioning or "identity"
            if RANK[ready] < RANK[current]:
                return
            if interval or RANK[ready] > RANK[current]:
                self.refresh()
        except Exception as error:  # noqa: BLE001 - a side task must never break training
            self.failed_query_refreshes += 1
            self._last_query_refresh = tracker.optimizer_steps
            warnings.warn(f"infl_plugin: refreshing the streaming queries at optimizer step {tracker.optimizer_steps} "
                          f"failed ({type(error).__name__}: {error}); scoring against the previous ones", stacklevel=3)

    def close(self) -> None:
        self.scorer.discard()

    def state_dict(self, gathered: bool = False) -> dict:
        """The streamed sums (this process's; ``gathered``: every process's, a collective), the
        preconditioned queries and the factors last given to `refresh` (CPU copies)."""
        streamed = self.scorer.result().gather() if gathered else None
        return {"stream": self.scorer.state_dict(streamed), "last_query_refresh": self._last_query_refresh,
                "given_factors": None if self._given_factors is None else self._given_factors.state_dict()}

    def load_state_dict(self, state: dict, sums: bool = True) -> None:
        """Restore `state_dict` (``sums=False``: the sums start from zero). The saved queries and
        sums are taken at once when queries are set, else by the next `set_queries`."""
        if state.get("given_factors") is not None:
            self._given_factors = Factors.from_state_dict(state["given_factors"], model_device(self.tracker.model))
        if state.get("stream") is None:
            return
        self._last_query_refresh = int(state["last_query_refresh"])
        self._resumed = state["stream"]
        if not sums:
            self._resumed = dict(self._resumed, indices=torch.zeros(0, dtype=torch.long), batches={}, layer_abs=None,
                                 skipped_batches=0, superseded_batches={})
        if self.queries is not None:
            self._resume(len(self.scorer.queries or ()))

    def _resume(self, num_queries: int) -> bool:
        """Continue the loaded stream: its preconditioned queries (when saved for ``num_queries``
        queries) and sums. Returns whether the saved queries were taken."""
        state, self._resumed = self._resumed, None
        saved = state.get("queries")
        if saved is not None and int(saved["measurements"].shape[0]) != num_queries:
            warnings.warn(f"infl_plugin: the saved streaming state is for {int(saved['measurements'].shape[0])} "
                          f"queries, this run streams {num_queries}; streamed scores restart from zero", stacklevel=4)
            return False
        self.scorer.load_state_dict(state, model_device(self.tracker.model))
        return saved is not None

    # ----------------------------------------------------------------------------- queries
    def set_queries(self, queries: Optional[Iterable]) -> None:
        """Stream the influence of training examples on ``queries`` (``None`` stops streaming); see
        `InfluenceTracker.set_queries`."""
        self.scorer.reset()
        if queries is None:
            self.queries = None
            self.scorer.set_queries(None)
        else:
            batches = list(queries)
            if not batches:
                raise ValueError("The query loader yielded no batch")
            self.queries = batches
            resumed = self._resumed is not None and self._resume(
                sum(self.tracker.task.batch_size(batch) for batch in batches))
            if not resumed:
                self.refresh()
        self.tracker.rearm()

    def refresh(self, factors: Optional[Factors] = None) -> str:
        """Re-differentiate and precondition the queries; see `InfluenceTracker.refresh_queries`."""
        if self.queries is None:
            raise RuntimeError("No streaming queries: call set_queries(...) first")
        if factors is not None:
            self._given_factors, used = factors, factors.strategy
        else:
            factors, used = self._factors()
        tracker = self.tracker
        with warnings.catch_warnings():  # layer selection warnings were given by the tracker already
            warnings.simplefilter("ignore")
            attributor = Attributor(tracker.model, tracker.task, factors, replace(tracker.config, strategy=used))
        with tracker.paused(), torch.inference_mode(False), torch.enable_grad():
            queries = attributor.precondition(self.queries, collective=True)
        self.scorer.set_queries(queries, used)
        self._last_query_refresh = tracker.optimizer_steps
        return used

    def ready(self) -> str:
        """The best preconditioning available now: the tracker's own (`_own_ready`) or that of
        the factors given to `refresh` (an attribution's), whichever ranks higher in identity <
        diagonal < K-FAC < EK-FAC. Read from counters equal on every process, so the collectives
        it leads to are entered by all of them."""
        own = self._own_ready()
        given = None if self._given_factors is None else self._given_factors.strategy
        return given if given is not None and RANK[given] > RANK[own] else own

    def _own_ready(self) -> str:
        """The configured strategy once its factors exist; EK-FAC needs an eigenbasis with
        eigenvalues from ``max(1, min_statistics_steps)`` statistics steps and until then falls
        back to K-FAC (the covariances alone: available from the first statistics step);
        ``"identity"`` before any statistics."""
        tracker = self.tracker
        strategy = tracker.config.strategy
        if tracker.statistics is None or strategy == "identity" or tracker.updates == 0:
            return "identity"
        if strategy == "ekfac":
            enough = tracker.eigenvalue_steps >= max(1, tracker.config.min_statistics_steps)
            return "ekfac" if tracker.statistics.bases is not None and enough else "kfac"
        return strategy

    def _factors(self) -> tuple[Factors, str]:
        """Factors for `ready`'s preconditioning: the given ones, or the tracker's own from the
        statistics summed over processes (identity when the sums lack them, e.g. every batch so
        far was skipped)."""
        tracker = self.tracker
        used = self.ready()
        if self._given_factors is not None and used == self._given_factors.strategy != self._own_ready():
            return self._given_factors, used
        if used != "identity":
            reduced = tracker.statistics.reduced()
            complete = reduced.has_covariances if used == "kfac" else reduced.has_eigenvalues
            if complete:
                return compute_factors(reduced, tracker.layers, replace(tracker.config, strategy=used)), used
            used = "identity"
        return compute_factors(None, tracker.layers, replace(tracker.config, strategy=used)), used

    # ----------------------------------------------------------------------------- scores
    def streamed_scores(self) -> StreamedScores:
        """Scores streamed since the last `reset` (a collective when distributed)."""
        dropped = self.scorer.dropped_examples
        if dropped > self._dropped_warned:
            warnings.warn(f"infl_plugin: {dropped - self._dropped_warned} streamed example scores were NaN/inf and "
                          "were dropped", stacklevel=3)
            self._dropped_warned = dropped
        return self.scorer.result().gather()

    def reset(self) -> None:
        """Forget the streamed scores (the queries stay)."""
        self.scorer.reset()
        self._dropped_warned = 0


__all__ = ["StreamingQueries"]
