"""`AttributionJob`: the scoring of one attribution, from factors to an `AttributionResult`.

The queries are differentiated and preconditioned once (or taken from the streaming refresh); then either the candidate loader is
scored in a fixed order (all scores ``[Q, N]``, each layer's Σ|score| for the layer shares,
optionally every candidate's self-influence) or the scores streamed from the training backward
are taken as they are (with their per-layer Σ|score| for the layer shares). The result also
carries the views a reporter shows: top-k per query, tail exponents and, for token inputs
(`add_token_views`), the per-token and per-layer scores of each query's top sequences, so that
reporters only render what they are given.

Distributed, every process runs the job in step (sharded models need every rank in each forward):
the candidate pass is shared out by batch (`RankShare`) and gathered, so every process returns the
same result. The caller runs a job inside `SideTaskPolicy.isolated` (training hooks paused, forked RNG,
gradients enabled); the job itself never touches a parameter's ``.grad``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch
from torch import nn

from ..results.artifacts import AttributionResult
from ..scoring.analysis import layer_shares, tail_exponent
from ..distributed import all_reduce_sum, is_distributed
from ..scoring.attributor import Attributor, PreconditionedQueries, require_fixed_order
from ..config.influence import InfluenceConfig
from .data import AttributionData
from ..curvature.factors import Factors
from ..config.options import AttributionOptions
from ..scoring.streaming.scorer import StreamedScores
from ..tasks import Task
from ..results.token_views import result_token_views
from .shares import RankShare


class AttributionJob:
    """Scores queries against candidates with given factors.

    Args:
        model, task, config: what the tracker tracks.
        options: top-k, self-influence, token views, progress bar.
        show_progress: whether this process may show a progress bar (the main one).
    """

    def __init__(self, model: nn.Module, task: Task, config: InfluenceConfig, options: AttributionOptions,
                 show_progress: bool = True) -> None:
        self.model, self.task, self.config, self.options = model, task, config, options
        self.show_progress = show_progress and options.progress
        self.attributor: Optional[Attributor] = None
        self.queries: Optional[PreconditionedQueries] = None

    def run(self, factors: Factors, data: AttributionData, step: int, reason: str,
            streamed: Optional[StreamedScores] = None, extra: Optional[dict[str, Any]] = None,
            queries: Optional[PreconditionedQueries] = None) -> AttributionResult:
        """The `AttributionResult` of ``data``'s queries at ``step``: against ``streamed`` scores
        when given (no candidate pass), else against ``data``'s candidate loader. ``queries``:
        ``data.queries`` already preconditioned with ``factors`` (the streaming refresh's), so that
        an attribution preconditions them once.

        ``extra["durations"]`` (seconds of the passes before this job, e.g. ``"factors"``: the
        eigendecompositions and eigenvalue pass) is completed with ``"queries"`` and
        ``"candidates"``; ``duration_s`` is the whole attribution, those included."""
        started = time.perf_counter()
        durations = {k: float(v) for k, v in ((extra or {}).get("durations") or {}).items()}
        # the candidates are the training batches of refine_steps' Gauss-Newton products (unused at 0)
        self.attributor = attributor = Attributor(self.model, self.task, factors, self.config, data.candidates)
        # distributed, every process runs this job: refinement's Gauss-Newton products are shared out
        self.queries = pq = queries if queries is not None else attributor.precondition(
            data.queries, collective=is_distributed())
        durations["queries"] = time.perf_counter() - started
        extra = {"candidates_requested": self.options.candidate_mode, **(extra or {}), "durations": durations}
        if streamed is not None:
            scores, candidate_indices = streamed.scores.float().cpu(), streamed.indices.cpu()
            shares, layer_names, self_scores, mode = torch.zeros(scores.shape[0], 0), [], None, "stream"
            if streamed.layer_abs is not None and streamed.layer_names:
                shares, layer_names = layer_shares(streamed.layer_abs.cpu()), list(streamed.layer_names)
            extra.update(streamed_visits=int(streamed.visits.sum()), streamed_batches=dict(streamed.batches))
        else:
            candidates_started = time.perf_counter()
            scores, abs_sums, self_scores = self._candidate_pass(attributor, pq, data, step)
            durations["candidates"] = time.perf_counter() - candidates_started
            shares, layer_names = layer_shares(abs_sums), attributor.layer_names
            mode = "all" if self.options.candidate_mode == "stream" else self.options.candidate_mode
            candidate_indices = data.candidate_indices if data.candidate_indices is not None else torch.arange(
                scores.shape[1])
            if candidate_indices.numel() != scores.shape[1]:
                raise ValueError(f"candidate_indices has {candidate_indices.numel()} entries but {scores.shape[1]} "
                                 "candidates were scored")
        n = scores.shape[1]
        if n == 0:
            raise ValueError("No candidate was scored")
        query_indices = data.query_indices if data.query_indices is not None else torch.arange(len(pq))
        k = min(self.options.top_k, n)
        helpful_scores, helpful_pos = scores.nan_to_num(float("-inf")).topk(k, dim=1)
        harmful_scores, harmful_pos = scores.nan_to_num(float("inf")).topk(k, dim=1, largest=False)
        result = AttributionResult(
            step=int(step), reason=str(reason), scores=scores, candidate_indices=candidate_indices.clone(),
            query_indices=query_indices.clone(), measurements=pq.measurements.float().cpu(),
            helpful_indices=candidate_indices[helpful_pos], helpful_scores=helpful_scores,
            harmful_indices=candidate_indices[harmful_pos], harmful_scores=harmful_scores,
            layer_names=layer_names, layer_shares=shares, candidate_mode=mode,
            tail_exponents=torch.tensor([tail_exponent(scores[q]) for q in range(scores.shape[0])], dtype=torch.float32),
            strategy=self.config.strategy, fisher=self.config.fisher, config=self.config.to_dict(),
            duration_s=0.0, self_scores=self_scores, extra=extra, num_train=data.source.candidate_dataset_size,
            measurement_name=str(getattr(self.task, "measurement_name", "loss")),
        )
        before = sum(v for k, v in durations.items() if k not in ("queries", "candidates"))
        result.duration_s = before + time.perf_counter() - started
        return result

    def add_token_views(self, result: AttributionResult, data: AttributionData) -> None:
        """Per-token and per-layer scores of each query's top sequences into ``result.token_views``
        (token inputs with ``token_sequences > 0`` only; backward passes at the parameters of `run`)."""
        if self.options.token_sequences < 1 or not data.tokenized or data.collate_fn is None or self.queries is None:
            return
        started = time.perf_counter()
        result.token_views = result_token_views(
            self.attributor, self.queries, result, data.source.candidate_example, data.collate_fn, data.tokenizer,
            sequences=self.options.token_sequences, top_tokens=self.options.top_tokens)
        elapsed = time.perf_counter() - started
        result.duration_s += elapsed
        result.extra.setdefault("durations", {})["token_views"] = elapsed

    def _candidate_pass(self, attributor: Attributor, pq: PreconditionedQueries, data: AttributionData,
                        step: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Score the candidate loader: scores ``[Q, N]``, per-layer Σ|score| ``[L, Q]`` and, with
        ``self_influence``, self-influence ``[N]``. Distributed, each process scores its `RankShare`
        and every process ends with all the results (collectives: call on every rank)."""
        require_fixed_order(data.candidates)
        share = RankShare.current(data.candidates, self.task.batch_size)
        total = data.num_candidates
        bar = self._progress_bar(None if total is None else math.ceil(total / share.world), f"influence @ step {step}")
        parts: list[torch.Tensor] = []
        abs_sums = torch.zeros(len(attributor.layer_names), len(pq), dtype=torch.float64)
        try:
            for index, (_, per_layer) in enumerate(attributor.iter_scores(pq, share)):  # [L, Q, B]
                if index >= len(share.sizes):  # a repeated batch that keeps the ranks in step
                    continue
                abs_sums += per_layer.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).sum(-1).double().cpu()
                parts.append(per_layer.sum(0).float().cpu())
                bar.update(per_layer.shape[-1])
            abs_sums = all_reduce_sum(abs_sums)
            scores = share.gather(torch.cat(parts, dim=1) if parts else torch.zeros(len(pq), 0))
            self_scores = None
            if self.options.self_influence:
                bar.set_description(f"self-influence @ step {step}")
                values = attributor.self_scores(share).double().cpu()[: sum(share.sizes)]
                self_scores = share.gather(values.reshape(1, -1))[0].float()
        finally:
            bar.close()
        if scores.shape[1] == 0:
            raise ValueError("The candidate loader yielded no batch")
        return scores, abs_sums, self_scores

    def _progress_bar(self, total: Optional[int], description: str) -> Any:
        if not self.show_progress:
            return _NoBar()
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with transformers and lightning
            return _NoBar()
        return tqdm(total=total, desc=description, unit="ex", leave=False, dynamic_ncols=True)


class _NoBar:
    """Stands in for a progress bar that is not shown."""

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["AttributionJob"]
