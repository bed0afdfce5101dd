"""`InfluenceSession`: tracking and scheduled attribution inside one training run, framework-free.

A framework adapter (the Lightning callback, the Hugging Face callback) owns one session and only
translates its framework's events into calls on it::

    session = InfluenceSession(model, task, config, AttributionOptions(every_n_steps=100))
    session.set_data(build_attribution_data(session.options, queries, train_set, batch_size=32))
    session.reporter = TensorBoardReporter(writer)          # optional; None = no TensorBoard
    session.artifact_dir = logdir                           # optional; None = no artifacts
    session.attach()                                        # hooks on (setup / train begin)
    for each micro-batch:
        session.before_forward(batch)                       # optional (token masks)
        loss.backward()
        session.after_backward(batch, grad_scale, optimizer_step)
        if optimizer_step: session.maybe_attribute(global_step, Reason.EVERY_N_STEPS)
    session.maybe_attribute(global_step, Reason.SAVE)       # on checkpoint save
    session.maybe_attribute(global_step, Reason.TRAIN_END)
    session.close()                                         # hooks off (teardown / exception)

The pieces it wires together, each in its own module: `InfluenceTracker` (hooks and statistics),
`AttributionSchedule` (when), `AttributionJob` (scoring, into an `AttributionResult` that holds
every view a reporter shows), `SideTaskPolicy` (isolation from training, tolerance, failure
counts), a `Publisher` (where results go: a `Reporter`, the artifact files, the log).

**Curvature schedule (EK-FAC).** The covariances A and S accumulate from the training backward
over the whole run (every ``update_every``-th optimizer step, empirical Fisher; or one extra
sampled-label pass every ``sample_every``-th statistics step with ``fisher="sampled"``). At each
attribution the factors are the current eigenbasis with the eigenvalues ``E[(Q_Sᵀ DW Q_A)²]``
accumulated over the training steps since the previous attribution; right after scoring, the
eigenbasis is refreshed from the covariances so far and eigenvalue accumulation restarts in it.
The first attribution has no eigenvalues yet: it eigendecomposes the covariances and runs one
bounded pass over the candidates (at most ``config.max_fit_batches`` batches; when ``None``, at
most `EIGENVALUE_EXAMPLES` evenly spaced candidates) for the eigenvalues; so does any
attribution whose eigenvalues rest on fewer than ``config.min_statistics_steps`` statistics steps
(logged at INFO; the eigenbasis is then kept until they do). ``kfac``/``diagonal``/``identity``
need no such pass.

**Distributed.** Statistics are summed over processes (a collective: call `maybe_attribute` and
`state_dict` on every rank). An attribution reduces first and takes every decision (are there
statistics yet?) from the sums, so all ranks follow the same path: every rank computes the same
factors and queries, scores its share of the candidates and gathers the rest (a sharded model's
forward needs every rank), reporting and artifacts happen only where ``is_main``, and every rank
refreshes its eigenbasis from the same sums.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..results.artifacts import AttributionResult
from ..scoring.attributor import Attributor, PreconditionedQueries
from ..config.influence import InfluenceConfig
from .data import AttributionData, DatasetSource, eigenvalue_loader
from ..curvature.factors import Factors
from ..distributed import sharded_parameters
from ..errors import ConfigurationError
from .job import AttributionJob
from ..curvature.loss_reduction import LossReduction
from ..config.options import AttributionOptions, resolve_options
from ..scoring.refine import register_curvature_data
from ..report.protocol import Reporter
from .schedule import AttributionSchedule, Reason
from .session_state import STATE_VERSION, restore_session, session_state
from .side_tasks import SideTaskPolicy
from ..curvature.statistics import CurvatureStatistics
from ..scoring.streaming.scorer import StreamedScores
from ..tasks import Task
from ..scoring.streaming.tracker import InfluenceTracker
from .publisher import Publisher

logger = logging.getLogger("infl_plugin")


class InfluenceSession:
    """Owns an `InfluenceTracker`, the attribution schedule, reporting and artifacts.

    Args:
        model: the module being trained (the unwrapped one: no DDP wrapper).
        task: how to get per-example losses from a batch.
        config: the `InfluenceConfig`.
        options: the `AttributionOptions` (schedule, candidates, top-k, views, strictness), or a
            mapping of its fields; ``**overrides`` set single fields (``every_n_steps=10``).
        is_main: whether this process reports and writes artifacts (global rank 0).
        log: a function taking one line (default ``logging.getLogger("infl_plugin").info``).

    With ``candidates="stream"`` an attribution reads the scores streamed from the training
    backward since the previous one (the queries go to the tracker in `start_streaming`); the
    candidate loader is scored while none exist. Hooks go on with `attach`, never in the constructor.
    """

    def __init__(self, model: nn.Module, task: Task, config: Optional[InfluenceConfig] = None,
                 options: Union[AttributionOptions, dict, None] = None, *, is_main: bool = True,
                 log: Optional[Callable[[str], None]] = None, **overrides: Any) -> None:
        self.model = model
        self.task = task
        self.config = config or InfluenceConfig()
        self.options = resolve_options("InfluenceSession", options, **overrides)
        self.schedule = AttributionSchedule.from_options(self.options)
        self.is_main = is_main
        self.log = log or logger.info
        self.candidate_mode = self.options.candidate_mode
        self.tracker = InfluenceTracker(model, task, self.config)
        self.policy = SideTaskPolicy(self.tracker, self.options.strict)
        self.job = AttributionJob(model, task, self.config, self.options, show_progress=is_main)
        self.publisher = Publisher(self.policy, self.log)
        self.data: Optional[AttributionData] = None
        self.eigenvalue_loader: Optional[Iterable] = None
        self.streaming_started = False
        self._superseded: dict[str, int] = {}  # streamed micro-batches superseded before the last gather
        self.unindexed_batches = 0  # streaming micro-batches whose dataset indices were unknown
        self.attributions = 0
        self.last_factors: Optional[Factors] = None
        self.reduction = LossReduction(task, self.options.strict)

    @property
    def reporter(self) -> Optional[Reporter]:
        """Where results are logged (e.g. a `TensorBoardReporter`; ``None``: no report, the default).
        A reporter state restored before the reporter was set is handed to it when it is."""
        return self.publisher.reporter

    @reporter.setter
    def reporter(self, reporter: Optional[Reporter]) -> None:
        self.publisher.reporter = reporter

    @property
    def artifact_dir(self) -> Optional[str]:
        """Where each result is written as an artifact file (``None``: nowhere, the default)."""
        return self.publisher.artifact_dir

    @artifact_dir.setter
    def artifact_dir(self, path: Optional[str]) -> None:
        self.publisher.artifact_dir = path

    @property
    def last_result(self) -> Optional[AttributionResult]:
        """The latest attribution's result (every process holds it; the main one published it)."""
        return self.publisher.last_result

    # ----------------------------------------------------------------------------- data
    def set_data(self, data: Union[AttributionData, Iterable], candidates: Optional[Iterable] = None, *,
                 query_dataset: Any = None, candidate_dataset: Any = None,
                 query_indices: Optional[Sequence[int]] = None, candidate_indices: Optional[Sequence[int]] = None,
                 stream: bool = True) -> None:
        """What attributions read: an `AttributionData` (see `build_attribution_data`), or
        re-iterable query and candidate loaders (fixed order) with, for rendering, the datasets
        their rows come from (row i of the queries is ``query_dataset[query_indices[i]]``).
        ``stream=False`` defers `start_streaming` (to when the training batches' dataset indices
        become known)."""
        if self.config.refine_steps and sharded_parameters(self.model):
            raise ConfigurationError(
                f"InfluenceConfig.refine_steps={self.config.refine_steps} needs unsharded parameters (its Gauss-Newton "
                "products swap them); under FSDP use refine_steps=0, or DDP for refinement")
        if not isinstance(data, AttributionData):
            if candidates is None:
                raise ValueError("InfluenceSession.set_data needs an AttributionData or query and candidate loaders")
            data = AttributionData(data, candidates, DatasetSource(query_dataset, candidate_dataset), query_indices,
                                   candidate_indices)
        self.data = data
        self.eigenvalue_loader = eigenvalue_loader(data.candidates, self.config)
        register_curvature_data(self.model, data.candidates if self.config.refine_steps else None)  # streaming refreshes
        if self.streaming_started:  # new data (another fit): stream again only from `start_streaming`
            self.tracker.set_queries(None)
            self.streaming_started = False
        if stream:
            self.start_streaming()

    def start_streaming(self) -> None:
        """``candidates="stream"``: give the queries to the tracker, which scores every training
        backward against them from now on (once; reads and preconditions the queries: a collective
        when distributed, isolated from training's RNG)."""
        if self.candidate_mode != "stream" or self.data is None or self.streaming_started:
            return
        with self.policy.isolated(pause=False):  # installs the streaming sink
            self.tracker.set_queries(self.data.queries)
        self.streaming_started = True

    def stop_streaming(self) -> None:
        """Score candidate loaders instead of streaming (the training batches' indices are unknown)."""
        self.candidate_mode = "all"
        self.tracker.set_queries(None)
        self.streaming_started = False

    @property
    def has_data(self) -> bool:
        return self.data is not None

    @property
    def source(self) -> DatasetSource:
        """The datasets the query and candidate rows come from (for rendering)."""
        return self.data.source if self.data is not None else DatasetSource()

    # ----------------------------------------------------------------------------- lifecycle
    def attach(self) -> "InfluenceSession":
        """Hooks on (idempotent)."""
        self.tracker.attach()
        return self

    def close(self) -> None:
        """Hooks off; safe after an exception and when called twice."""
        self.tracker.close()

    @property
    def attached(self) -> bool:
        return self.tracker.attached

    # ----------------------------------------------------------------------------- training events
    def before_forward(self, batch: Any) -> None:
        """Announce the next training micro-batch (its token mask) before its forward."""
        try:
            self.tracker.set_batch(batch)
        except Exception as error:  # never break training
            self.policy.batch_failed(error)

    @property
    def capturing(self) -> bool:
        """Whether the micro-batch in flight feeds the statistics (see `InfluenceTracker.capturing`)."""
        return self.tracker.capturing

    @property
    def needs_grad_scale(self) -> bool:
        """Whether `after_backward` reads ``grad_scale`` for the micro-batch in flight (statistics
        or streaming): adapters skip working it out (device syncs) otherwise."""
        return self.tracker.needs_grad_scale

    def after_backward(self, batch: Any, grad_scale: Optional[float] = None, optimizer_step: bool = True,
                       indices: Optional[torch.Tensor] = None, weight: Optional[float] = None) -> bool:
        """Commit the statistics of the micro-batch just backpropagated; never raises (unless strict).

        ``grad_scale``: ``training_loss / Σ_n loss_n`` including ``1/accumulation`` and the AMP loss
        scale (default ``task.training_loss_scale(batch)``); only read when `needs_grad_scale` was
        true for this micro-batch. ``indices``: dataset indices ``[B]`` of its examples (streaming;
        ``None``: unknown, left out of the streamed scores and counted in `unindexed_batches`);
        ``weight``: the step's streaming weight (the learning rate with ``stream_weight="lr"``).
        Returns whether statistics were updated.
        """
        if indices is None and self.tracker.streaming:
            self.unindexed_batches += 1
        try:
            return self.tracker.step(batch, grad_scale=grad_scale, optimizer_step=optimizer_step, indices=indices,
                                     weight=weight, stream=indices is not None)
        except Exception as error:
            if self.tracker.statistics is not None:
                self.tracker.statistics.discard()
            self.tracker.hooks.explicit_mask = None
            self.policy.batch_failed(error)
            return False

    @property
    def skipped_batches(self) -> int:
        return self.tracker.skipped_batches + self.policy.failed_batches

    @property
    def failed_batches(self) -> int:
        return self.policy.failed_batches

    @property
    def failed_attributions(self) -> int:
        return self.policy.failed_attributions

    # ----------------------------------------------------------------------------- loss reduction
    @property
    def loss_reduction(self) -> Union[None, str, float]:
        """How the training loss reduces the task's losses (see `LossReduction`); ``None``: not measured."""
        return self.reduction.mode

    def check_training_loss(self, batch: Any, loss: float, factor: float = 1.0) -> None:
        """Measure, once, whether the training loss is the task's mean or a sum (`LossReduction.check`),
        with the tracker's hooks paused so the extra forward feeds nothing."""
        with self.tracker.paused():
            self.reduction.check(self.model, batch, loss, factor)

    def task_loss_scale(self, batch: Any) -> float:
        """``training_loss / Σ_n loss_n`` before accumulation and AMP (`LossReduction.scale`)."""
        return self.reduction.scale(batch)

    # ----------------------------------------------------------------------------- schedule
    def should_attribute(self, step: int, reason: Union[str, Reason]) -> bool:
        """Whether the schedule asks for an attribution at ``step`` for ``reason`` (at most one per step)."""
        return self.schedule.due(step, reason)

    def maybe_attribute(self, step: int, reason: Union[str, Reason]) -> Optional[AttributionResult]:
        """`attribute` when `should_attribute`; call on every rank (factors are reduced)."""
        if not self.schedule.due(step, reason):
            return None
        return self.attribute(step, reason)

    # ----------------------------------------------------------------------------- attribution
    def attribute(self, step: int, reason: Union[str, Reason] = Reason.MANUAL) -> Optional[AttributionResult]:
        """Factors → `AttributionJob` → report and artifact, then refresh the EK-FAC eigenbasis.

        Distributed, every pass runs on every process in step (each scores its share of the
        candidates) and every process returns the same result; only the main one publishes it.
        Returns ``None`` when no statistics exist yet, or when the attribution failed and ``strict`` is off.
        """
        if self.data is None:
            raise RuntimeError("InfluenceSession.set_data(...) must be called before attributing")
        reason = Reason.parse(reason).value
        result = None
        with self.policy.isolated():
            # the statistics' reduction, on every rank before any branch: all decisions below read
            # the sums, so every process takes the same path (to the gather of streamed scores too)
            reduced = None if self.tracker.statistics is None else self.tracker.statistics.reduced()
            if not self._has_statistics(reduced):
                warnings.warn(f"infl_plugin: no curvature statistics yet at step {step}; skipping the attribution",
                              stacklevel=2)
                return None
            try:
                streamed = self._streamed()  # a collective too: every rank
                streaming = self.tracker.has_queries
                factors_started = time.perf_counter()
                factors = self.tracker.factors(loader=self.eigenvalue_loader, reduced=reduced)
                durations = {"factors": time.perf_counter() - factors_started}
                queries = None  # the streaming queries just preconditioned, when the job may score with them
                if streaming:  # the next interval streams against these factors (identical on every rank)
                    with self.policy.tolerant(f"preconditioning the streaming queries at step {step}"):
                        refresh_started = time.perf_counter()
                        self.tracker.refresh_queries(factors)
                        durations["streaming_queries"] = time.perf_counter() - refresh_started
                        queries = self.tracker.scorer.queries  # same queries, parameters, factors, config
                self.last_factors = factors
                result = self.job.run(factors, self.data, step, reason, streamed, queries=queries, extra={
                    "skipped_batches": self.skipped_batches, "optimizer_steps": self.tracker.optimizer_steps,
                    "streamed_superseded_batches": self._superseded, "durations": durations})
                with self.policy.tolerant(f"computing the token views of step {step}"):
                    self.job.add_token_views(result, self.data)
            except Exception as error:
                self.policy.attribution_failed(error, f"attribution at step {step} ({reason})")
            finally:
                refresh_started = time.perf_counter()
                with self.policy.tolerant(f"refreshing the eigenbasis at step {step}"):
                    self.tracker.refresh_eigenbasis(reduced)
                if result is not None:  # part of the attribution's cost too
                    elapsed = time.perf_counter() - refresh_started
                    result.extra.setdefault("durations", {})["eigenbasis_refresh"] = elapsed
                    result.duration_s += elapsed
        self.schedule.last_step = step
        self.attributions += 1
        if result is not None and self.is_main:
            self.publisher.publish(result, self.source)
        elif result is not None:  # the same result, held for the caller but not published
            self.publisher.last_result = result
        return result

    @property
    def last_attributor(self) -> Optional[Attributor]:
        """The attributor of the latest attribution (main process), for further views."""
        return self.job.attributor

    @property
    def last_queries(self) -> Optional[PreconditionedQueries]:
        """The latest attribution's preconditioned queries (main process)."""
        return self.job.queries

    @property
    def last_attribution_step(self) -> Optional[int]:
        return self.schedule.last_step

    def _streamed(self) -> Optional[StreamedScores]:
        """``candidates="stream"``: the scores streamed since the previous attribution, gathered
        over processes (a collective: every rank), then reset; ``None`` in other modes or when no
        example was streamed (the same on every rank: the result is gathered)."""
        if self.candidate_mode != "stream":
            return None
        streamed = self.tracker.streamed_scores()
        self._superseded = self.tracker.superseded_batches
        self.tracker.reset_stream()
        return streamed if len(streamed) else None

    def _has_statistics(self, reduced: Optional[CurvatureStatistics]) -> bool:
        """Whether the statistics summed over processes (``None``: none needed) can give factors."""
        if reduced is None:
            return True
        if self.config.strategy == "diagonal":
            return reduced.has_eigenvalues
        return reduced.has_covariances

    def tolerant(self, what: str) -> ContextManager[None]:
        """Run a side task of training: an error is raised when ``strict``, else warned about."""
        return self.policy.tolerant(what)

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Statistics (summed over processes: call on every rank), counters, the tracker's RNG and,
        on the main process, the reporter's state (`session_state`; tensors are copies)."""
        return session_state(self)

    def load_state_dict(self, state: dict, rank: int = 0) -> None:
        """Restore `state_dict` (`restore_session`)."""
        restore_session(self, state, rank)


__all__ = ["InfluenceSession", "STATE_VERSION"]
