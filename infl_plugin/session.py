"""`InfluenceSession`: tracking, scheduled attribution, reporting and artifacts, framework-free.

A framework adapter (the Lightning callback, the Hugging Face callback) owns one session and only
translates its framework's events into calls on it::

    session = InfluenceSession(model, task, config, every_n_steps=100, top_k=10)
    session.set_data(query_loader, candidate_loader, query_dataset=..., candidate_dataset=...)
    session.reporter = TensorBoardReporter(writer)          # optional; None = no TensorBoard
    session.artifact_dir = logdir                           # optional; None = no artifacts
    session.attach()                                        # hooks on (setup / train begin)
    for each micro-batch:
        session.before_forward(batch)                       # optional (token masks)
        loss.backward()
        session.after_backward(batch, grad_scale, optimizer_step)
        if optimizer_step: session.maybe_attribute(global_step, "every_n_steps")
    session.maybe_attribute(global_step, "save")            # on checkpoint save
    session.maybe_attribute(global_step, "train_end")
    session.close()                                         # hooks off (teardown / exception)

**Curvature schedule (EK-FAC).** The covariances A and S accumulate from the training backward
over the whole run (every ``update_every``-th optimizer step, empirical Fisher; or one extra
sampled-label pass every ``sample_every``-th statistics step with ``fisher="sampled"``). At each
attribution the factors are the current eigenbasis with the eigenvalues ``E[(Q_Sᵀ DW Q_A)²]``
accumulated over the training steps since the previous attribution; right after scoring, the
eigenbasis is refreshed from the covariances so far and eigenvalue accumulation restarts in it.
The first attribution has no eigenvalues yet: it eigendecomposes the covariances and runs one
bounded pass over the candidates (at most ``config.max_fit_batches`` batches; when ``None``, at most
`EIGENVALUE_EXAMPLES` evenly spaced candidates) for the eigenvalues; so does any attribution whose eigenvalues rest on fewer than
``config.min_statistics_steps`` statistics steps (logged at INFO; the eigenbasis is then kept
until they do). ``kfac``/``diagonal``/``identity`` need no such pass.

**Attribution.** Queries are differentiated and preconditioned once per attribution (kept as
`last_queries`, with `last_attributor`, for token-level views); the candidates are streamed in a
fixed order, keeping all scores ``[Q, N]`` (for histograms and the CCDF), each layer's Σ|score|
(layer shares) and the top-k per query; optionally the self-influence of every candidate. All of
it runs in eval mode, with gradients enabled even inside ``torch.inference_mode``, inside forked
torch / numpy / ``random`` RNG states, with the tracker's own hooks paused, and without touching
any parameter's ``.grad``: training continues bit for bit as without the session.

**Distributed.** Statistics are summed over processes (a collective: call `maybe_attribute` and
`state_dict` on every rank). An attribution reduces first and takes every decision (are there
statistics yet?) from the sums, so all ranks follow the same path; factors, scoring, reporting and
artifacts happen only where ``is_main``, and every rank refreshes its eigenbasis from the same sums.

**Robustness.** A micro-batch whose statistics fail (exception, NaN/inf) is skipped, counted in
`skipped_batches` / `failed_batches` and warned about; an attribution that raises is warned about
and counted in `failed_attributions` unless ``strict=True``.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .artifacts import AttributionResult, write_artifact
from .attributor import Attributor, PreconditionedQueries
from .config import InfluenceConfig
from .factors import Factors
from .reporting import Reporter, layer_shares, tail_exponent
from .statistics import CurvatureStatistics
from .passes import isolated
from .tasks import Task
from .candidates import CANDIDATE_MODES
from .streaming import StreamedScores
from .tracker import InfluenceTracker

logger = logging.getLogger("infl_plugin")

REASONS = ("every_n_steps", "save", "train_end", "evaluate", "manual")
STATE_VERSION = 1


class DatasetSource:
    """`ExampleSource` over two indexable datasets (``None`` = not renderable)."""

    def __init__(self, query_dataset: Any = None, candidate_dataset: Any = None) -> None:
        self.query_dataset = query_dataset
        self.candidate_dataset = candidate_dataset

    def query_example(self, index: int) -> Any:
        return _get(self.query_dataset, index)

    def candidate_example(self, index: int) -> Any:
        return _get(self.candidate_dataset, index)


def _get(dataset: Any, index: int) -> Any:
    if dataset is None or not hasattr(dataset, "__getitem__"):
        return None
    return dataset[index]


def make_loader(dataset: Any, batch_size: int, collate_fn: Optional[Callable] = None,
                indices: Optional[Sequence[int]] = None, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A fixed-order (unshuffled) loader over ``dataset`` (or its ``indices``), for queries or candidates."""
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, list(indices))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                                       num_workers=num_workers, drop_last=False)


EIGENVALUE_EXAMPLES = 1024


def eigenvalue_loader(candidates: Iterable, config: InfluenceConfig) -> Iterable:
    """What an attribution's bounded EK-FAC eigenvalue pass reads: the candidates, or, when
    ``config.max_fit_batches`` is ``None`` and they are a loader over more than
    `EIGENVALUE_EXAMPLES` examples, that many evenly spaced ones (same batch size and collate), so
    that the pass never costs an epoch (which streamed candidates exist to avoid)."""
    if config.max_fit_batches is not None or not isinstance(candidates, torch.utils.data.DataLoader):
        return candidates
    try:
        length = len(candidates.dataset)
    except TypeError:
        return candidates
    if length <= EIGENVALUE_EXAMPLES:
        return candidates
    return make_loader(candidates.dataset, candidates.batch_size or 1, candidates.collate_fn,
                       spaced_indices(length, EIGENVALUE_EXAMPLES), candidates.num_workers)


def spaced_indices(length: int, count: int) -> list[int]:
    """``count`` evenly spaced positions in ``range(length)`` (all of them when count ≥ length)."""
    if count >= length:
        return list(range(length))
    return torch.linspace(0, length - 1, count).round().long().tolist()


class InfluenceSession:
    """Owns an `InfluenceTracker`, the attribution schedule, reporting and artifacts.

    Args:
        model: the module being trained (the unwrapped one: no DDP wrapper).
        task: how to get per-example losses from a batch.
        config: the `InfluenceConfig`.
        every_n_steps: attribute every n optimizer steps (``None``: never on a step count).
        on_save: attribute when a checkpoint is saved; ``None`` (default): only when ``every_n_steps``
            is ``None``, so a step schedule is not multiplied by one attribution per checkpoint.
        at_train_end: attribute when training ends.
        on_evaluate: attribute after an evaluation (adapters whose framework has such an event).
        top_k: helpful/harmful examples kept per query.
        self_influence: also score every candidate's self-influence (forms per-example gradients
            ``[batch, d_out, d_in]`` per layer: keep off for large layers).
        is_main: whether this process scores, reports and writes artifacts (global rank 0).
        progress: show a progress bar over the candidates during attribution.
        log: a function taking one line (default ``logging.getLogger("infl_plugin").info``).
        strict: re-raise attribution and statistics errors instead of warning.
        candidates: what an attribution scores (`infl_plugin.candidates`): ``"stream"`` reads the
            scores streamed from the training backward since the previous attribution (queries
            go to the tracker in `set_data`; the candidate loader is scored while none exist);
            any other mode scores the candidate loader given to `set_data`, chosen by the caller.
    """

    def __init__(self, model: nn.Module, task: Task, config: Optional[InfluenceConfig] = None, *,
                 every_n_steps: Optional[int] = None, on_save: Optional[bool] = None, at_train_end: bool = True,
                 on_evaluate: bool = False, top_k: int = 10, self_influence: bool = False, is_main: bool = True, progress: bool = True,
                 log: Optional[Callable[[str], None]] = None, strict: bool = False, candidates: str = "all") -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be None or an integer >= 1, got {every_n_steps!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if candidates not in CANDIDATE_MODES:
            raise ValueError(f"candidates must be one of {list(CANDIDATE_MODES)}, got {candidates!r}")
        self.model = model
        self.task = task
        self.config = config or InfluenceConfig()
        self.every_n_steps = every_n_steps
        self.on_save = (every_n_steps is None) if on_save is None else bool(on_save)
        self.at_train_end = at_train_end
        self.on_evaluate = on_evaluate
        self.top_k = top_k
        self.self_influence = self_influence
        self.is_main = is_main
        self.progress = progress
        self.log = log or logger.info
        self.strict = strict
        self.candidate_mode = candidates
        self.unindexed_batches = 0  # streaming micro-batches whose dataset indices were unknown
        self.streaming_started = False
        self.tracker = InfluenceTracker(model, task, self.config)  # attaches its hooks
        self.reporter: Optional[Reporter] = None  # e.g. a TensorBoardReporter; None: no report
        self.artifact_dir: Optional[str] = None
        self.queries: Optional[Iterable] = None
        self.candidates: Optional[Iterable] = None
        self.eigenvalue_loader: Optional[Iterable] = None
        self.query_indices: Optional[torch.Tensor] = None
        self.candidate_indices: Optional[torch.Tensor] = None
        self.source = DatasetSource()
        self.last_attribution_step: Optional[int] = None
        self.attributions = 0
        self.failed_attributions = 0
        self.failed_batches = 0
        self.last_result: Optional[AttributionResult] = None
        self.last_factors: Optional[Factors] = None
        self.last_queries: Optional[PreconditionedQueries] = None
        self.last_attributor: Optional[Attributor] = None
        self.loss_reduction: Union[None, str, float] = None  # see `check_training_loss`

    # ----------------------------------------------------------------------------- data
    def set_data(self, queries: Iterable, candidates: Iterable, *, query_dataset: Any = None,
                 candidate_dataset: Any = None, query_indices: Optional[Sequence[int]] = None,
                 candidate_indices: Optional[Sequence[int]] = None, stream: bool = True) -> None:
        """Re-iterable loaders of query and candidate batches (fixed order) and, for rendering,
        the datasets their rows come from: row i of the queries is ``query_dataset[query_indices[i]]``
        (default ``indices = 0, 1, …``), likewise for candidates. ``stream=False`` defers
        `start_streaming` (to when the training batches' dataset indices become known)."""
        self.queries, self.candidates = queries, candidates
        self.query_indices = None if query_indices is None else torch.as_tensor(list(query_indices), dtype=torch.long)
        self.candidate_indices = None if candidate_indices is None else torch.as_tensor(list(candidate_indices), dtype=torch.long)
        self.source = DatasetSource(query_dataset, candidate_dataset)
        self.eigenvalue_loader = eigenvalue_loader(candidates, self.config)
        if self.streaming_started:  # new data (another fit): stream again only from `start_streaming`
            self.tracker.set_queries(None)
            self.streaming_started = False
        if stream:
            self.start_streaming()

    def start_streaming(self) -> None:
        """``candidates="stream"``: give the queries to the tracker, which scores every training
        backward against them from now on (once; reads and preconditions the queries: a collective
        when distributed, isolated from training's RNG)."""
        if self.candidate_mode != "stream" or self.queries is None or self.streaming_started:
            return
        with _forked_rng(), torch.inference_mode(False), torch.enable_grad():  # the tracker pauses its hooks itself
            self.tracker.set_queries(self.queries)
        self.streaming_started = True

    @property
    def has_data(self) -> bool:
        return self.queries is not None and self.candidates is not None

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
        return self.tracker.hooks.attached

    # ----------------------------------------------------------------------------- training events
    def before_forward(self, batch: Any) -> None:
        """Announce the next training micro-batch (its token mask) before its forward."""
        try:
            self.tracker.set_batch(batch)
        except Exception as error:  # never break training
            self._batch_failed(error)

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
            self._batch_failed(error)
            return False

    def _batch_failed(self, error: Exception) -> None:
        self.failed_batches += 1
        if self.strict:
            raise error
        if self.failed_batches <= 5 or self.failed_batches % 100 == 0:
            warnings.warn(f"infl_plugin: skipped a training micro-batch's statistics ({type(error).__name__}: {error}); "
                          f"{self.failed_batches} skipped so far", stacklevel=3)

    @property
    def skipped_batches(self) -> int:
        return self.tracker.skipped_batches + self.failed_batches

    # ----------------------------------------------------------------------------- loss reduction
    def check_training_loss(self, batch: Any, loss: float, factor: float = 1.0) -> None:
        """Measure, once, how the training loss reduces the task's per-example losses.

        ``loss``: the value the training backward differentiates; ``factor``: what the adapter
        knows multiplies it besides the reduction (``1/accumulation`` × the AMP loss scale). The
        batch's ``Σ_n loss_n`` is computed without gradients in eval mode with forked RNGs and the
        hooks paused (training is unchanged), and ``loss / (factor × Σ_n loss_n)`` is compared with
        the task's mean (``task.training_loss_scale``) and a plain sum (1). A sum is warned about
        (an error when ``strict``) and then undone on every batch by `task_loss_scale`; neither
        warns and uses the measured ratio. Undecided while the two hypotheses coincide (one example).
        """
        mean = self.task.training_loss_scale(batch)
        if self.loss_reduction is not None or not (math.isfinite(mean) and mean > 0) or math.isclose(mean, 1.0):
            return
        with self.quiet(), isolated(self.model), torch.no_grad():
            total = float(self.task.loss(self.model, batch).double().sum())
        if not (math.isfinite(total) and total > 0 and math.isfinite(loss) and loss > 0):
            return  # cannot tell from this batch; the next statistics micro-batch tries again
        ratio = loss / (factor * total)
        distance = {name: abs(math.log(ratio / value)) for name, value in (("mean", mean), ("sum", 1.0))}
        nearest = min(distance, key=distance.get)
        if distance[nearest] > math.log(1.5):
            self.loss_reduction = ratio
            message = (f"infl_plugin: the training loss is neither the mean nor the sum of the task's per-example "
                       f"losses (loss / Σ losses = {ratio:.4g}; mean: {mean:.4g}, sum: 1); is the task right? "
                       "Statistics use the measured ratio")
        elif nearest == "sum":
            self.loss_reduction = "sum"
            message = (f"infl_plugin: the training loss is the sum of the per-example losses, not their mean (loss "
                       f"/ Σ losses = {ratio:.4g}, mean would be {mean:.4g}); statistics undo a sum from now on")
        else:
            self.loss_reduction = "mean"
            return
        if self.strict:
            raise ValueError(message + " (strict=True refuses the mismatch: make the loss a batch mean or pass a Task "
                             "whose training_loss_scale matches it)")
        warnings.warn(message, stacklevel=2)

    def task_loss_scale(self, batch: Any) -> float:
        """``training_loss / Σ_n loss_n`` before accumulation and AMP: the task's mean unless
        `check_training_loss` measured a sum (1) or another ratio (that ratio)."""
        if self.loss_reduction == "sum":
            return 1.0
        if isinstance(self.loss_reduction, float):
            return self.loss_reduction
        return self.task.training_loss_scale(batch)

    # ----------------------------------------------------------------------------- schedule
    def should_attribute(self, step: int, reason: str) -> bool:
        """Whether the schedule asks for an attribution at ``step`` for ``reason`` (at most one per step)."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {list(REASONS)}, got {reason!r}")
        if self.last_attribution_step == step:
            return False
        if reason == "every_n_steps":
            return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0
        if reason == "save":
            return self.on_save
        if reason == "train_end":
            return self.at_train_end
        if reason == "evaluate":
            return self.on_evaluate
        return True

    def maybe_attribute(self, step: int, reason: str) -> Optional[AttributionResult]:
        """`attribute` when `should_attribute`; call on every rank (factors are reduced)."""
        if not self.should_attribute(step, reason):
            return None
        return self.attribute(step, reason)

    # ----------------------------------------------------------------------------- attribution
    def attribute(self, step: int, reason: str = "manual") -> Optional[AttributionResult]:
        """Factors → scores → report → artifact, then refresh the EK-FAC eigenbasis.

        Returns the result on the main process (``None`` elsewhere, when no statistics exist yet,
        or when the attribution failed and ``strict`` is off).
        """
        if not self.has_data:
            raise RuntimeError("InfluenceSession.set_data(queries, candidates) must be called before attributing")
        started = time.perf_counter()
        result = None
        with self.quiet(), _forked_rng(), torch.inference_mode(False), torch.enable_grad():
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
                if self.is_main or streaming:  # other ranks need factors only for their streaming queries
                    factors = self.tracker.factors(loader=self.eigenvalue_loader, reduced=reduced)
                if streaming:  # the next interval streams against these factors (identical on every rank)
                    with self.tolerant(f"preconditioning the streaming queries at step {step}"):
                        self.tracker.refresh_queries(factors)
                if self.is_main:
                    self.last_factors = factors
                    result = self._score(factors, step, reason, started, streamed)
            except Exception as error:
                self.failed_attributions += 1
                if self.strict:
                    raise
                warnings.warn(f"infl_plugin: attribution at step {step} ({reason}) failed: "
                              f"{type(error).__name__}: {error}", stacklevel=2)
            finally:
                with self.tolerant(f"refreshing the eigenbasis at step {step}"):
                    self.tracker.refresh_eigenbasis(reduced)
        self.last_attribution_step = step
        self.attributions += 1
        if result is not None:
            self._publish(result)
        return result

    def _streamed(self) -> Optional[StreamedScores]:
        """``candidates="stream"``: the scores streamed since the previous attribution, gathered
        over processes (a collective: every rank), then reset; ``None`` in other modes or when no
        example was streamed (the same on every rank: the result is gathered)."""
        if self.candidate_mode != "stream":
            return None
        streamed = self.tracker.streamed_scores()
        self.tracker.reset_stream()
        return streamed if len(streamed) else None

    def _has_statistics(self, reduced: Optional[CurvatureStatistics]) -> bool:
        """Whether the statistics summed over processes (``None``: none needed) can give factors."""
        if reduced is None:
            return True
        if self.config.strategy == "diagonal":
            return reduced.has_eigenvalues
        return reduced.has_covariances

    def _score(self, factors: Factors, step: int, reason: str, started: float,
               streamed: Optional[StreamedScores] = None) -> AttributionResult:
        attributor = Attributor(self.model, self.task, factors, self.config)
        pq = attributor.precondition(self.queries)
        self.last_attributor, self.last_queries = attributor, pq
        extra: dict[str, Any] = {"candidates_requested": self.candidate_mode}
        if streamed is not None:  # no candidate pass: the scores streamed from the training backward
            scores, candidate_indices = streamed.scores.float().cpu(), streamed.indices.cpu()
            shares, layer_names, self_scores, mode = torch.zeros(scores.shape[0], 0), [], None, "stream"
            extra.update(streamed_visits=int(streamed.visits.sum()), streamed_batches=dict(streamed.batches))
        else:
            scores, abs_sums, self_scores = self._candidate_pass(attributor, pq, step)
            shares, layer_names = layer_shares(abs_sums), attributor.layer_names
            mode = "all" if self.candidate_mode == "stream" else self.candidate_mode
            candidate_indices = self.candidate_indices if self.candidate_indices is not None else torch.arange(scores.shape[1])
            if candidate_indices.numel() != scores.shape[1]:
                raise ValueError(f"candidate_indices has {candidate_indices.numel()} entries but {scores.shape[1]} "
                                 "candidates were scored")
        n = scores.shape[1]
        if n == 0:
            raise ValueError("No candidate was scored")
        query_indices = self.query_indices if self.query_indices is not None else torch.arange(len(pq))
        k = min(self.top_k, n)
        helpful_scores, helpful_pos = scores.nan_to_num(float("-inf")).topk(k, dim=1)
        harmful_scores, harmful_pos = scores.nan_to_num(float("inf")).topk(k, dim=1, largest=False)
        return AttributionResult(
            step=int(step), reason=reason, scores=scores, candidate_indices=candidate_indices.clone(),
            query_indices=query_indices.clone(), measurements=pq.measurements.float().cpu(),
            helpful_indices=candidate_indices[helpful_pos], helpful_scores=helpful_scores,
            harmful_indices=candidate_indices[harmful_pos], harmful_scores=harmful_scores,
            layer_names=layer_names, layer_shares=shares, candidate_mode=mode,
            tail_exponents=torch.tensor([tail_exponent(scores[q]) for q in range(scores.shape[0])], dtype=torch.float32),
            strategy=self.config.strategy, fisher=self.config.fisher, config=self.config.to_dict(),
            duration_s=time.perf_counter() - started, self_scores=self_scores,
            extra={"skipped_batches": self.skipped_batches, "optimizer_steps": self.tracker.optimizer_steps, **extra},
            num_train=_sized(self.source.candidate_dataset),
            measurement_name=str(getattr(self.task, "measurement_name", "loss")),
        )

    def _candidate_pass(self, attributor: Attributor, pq: PreconditionedQueries,
                        step: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Score the candidate loader: scores ``[Q, N]``, per-layer Σ|score| ``[L, Q]`` and, when
        ``self_influence``, self-influence ``[N]``."""
        total = _length(self.candidates, self.candidate_indices)
        bar = self._progress_bar(total, f"influence @ step {step}")
        abs_sums = None
        parts: list[torch.Tensor] = []
        try:
            for _, per_layer in attributor.iter_scores(pq, self.candidates):  # [L, Q, B]
                layer_abs = per_layer.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).sum(-1).double().cpu()
                abs_sums = layer_abs if abs_sums is None else abs_sums + layer_abs
                parts.append(per_layer.sum(0).float().cpu())
                bar.update(per_layer.shape[-1])
            self_scores = None
            if self.self_influence:
                bar.set_description(f"self-influence @ step {step}")
                self_scores = attributor.self_scores(self.candidates).float().cpu()
        finally:
            bar.close()
        if not parts:
            raise ValueError("The candidate loader yielded no batch")
        return torch.cat(parts, dim=1), abs_sums, self_scores

    def _publish(self, result: AttributionResult) -> None:
        """Report and write the artifact (main process); failures warn, never raise (unless strict)."""
        self.last_result = result
        for what, action in (("report", self._report), ("artifact", self._write)):
            with self.tolerant(f"writing the {what} of step {result.step}"), self.quiet(), _forked_rng(), \
                    torch.inference_mode(False), torch.enable_grad():
                action(result)
        self.log(f"infl_plugin: attribution at step {result.step} ({result.reason}) scored {result.num_candidates} "
                 f"candidates ({result.candidate_mode}) against {result.num_queries} queries in {result.duration_s:.2f}s "
                 f"(strategy={result.strategy}, fisher={result.fisher})")

    def _report(self, result: AttributionResult) -> None:
        if self.reporter is not None:
            self.reporter.log(result, self.source, result.step)

    def _write(self, result: AttributionResult) -> None:
        if self.artifact_dir is not None:
            write_artifact(self.artifact_dir, result)

    def _progress_bar(self, total: Optional[int], description: str):
        if not (self.progress and self.is_main):
            return _NoBar()
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return _NoBar()
        return tqdm(total=total, desc=description, unit="ex", leave=False, dynamic_ncols=True)

    @contextmanager
    def tolerant(self, what: str) -> Iterator[None]:
        """Run a side task of training: an error is raised when ``strict``, else warned about."""
        try:
            yield
        except Exception as error:
            if self.strict:
                raise
            warnings.warn(f"infl_plugin: {what} failed: {type(error).__name__}: {error}", stacklevel=3)

    def quiet(self) -> ContextManager[None]:
        """Pause the tracker's training sink so extra passes (attribution, token views in a
        reporter) never feed its statistics or streamed scores; restored on exit."""
        return self.tracker.paused()

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Statistics (summed over processes: call on every rank), counters and the tracker's RNG.

        Tensors are copies: later training does not change a returned state.
        """
        tracker_state = self.tracker.state_dict()
        if self.tracker.statistics is not None:
            tracker_state["statistics"] = _clone(self.tracker.statistics.reduced().state_dict())
        return {
            "version": STATE_VERSION,
            "tracker": tracker_state,
            "last_attribution_step": self.last_attribution_step,
            "attributions": self.attributions,
            "failed_attributions": self.failed_attributions,
            "failed_batches": self.failed_batches,
        }

    def load_state_dict(self, state: dict, rank: int = 0) -> None:
        """Restore `state_dict`. Statistics were summed over processes when saved, so only rank 0
        keeps the sums; other ranks start from zero in the same eigenbasis."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Unsupported InfluenceSession state version {state.get('version')!r}")
        self.tracker.load_state_dict(_clone(state["tracker"]))
        if rank != 0 and self.tracker.statistics is not None:
            self.tracker.statistics.reset(covariances=True, eigenvalues=True)
        self.last_attribution_step = state["last_attribution_step"]
        self.attributions = int(state["attributions"])
        self.failed_attributions = int(state["failed_attributions"])
        self.failed_batches = int(state["failed_batches"])


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _length(loader: Any, indices: Optional[torch.Tensor]) -> Optional[int]:
    if indices is not None:
        return int(indices.numel())
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _sized(dataset: Any) -> Optional[int]:
    """``len(dataset)`` (the N of the mean training loss when it is the training set), else ``None``."""
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


@contextmanager
def _forked_rng() -> Iterator[None]:
    """Fork torch (CPU + current CUDA device), numpy and ``random`` global RNG states."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


__all__ = ["DatasetSource", "InfluenceSession", "REASONS", "make_loader", "spaced_indices"]
