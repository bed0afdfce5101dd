"""`InfluenceTracker`: curvature statistics from the training loop, with streamed scores riding on it.

`CurvatureTracker` (`infl_plugin.curvature.tracker`) does the statistics; this subclass registers
a `StreamingQueries` rider on it, so that with ``queries=`` (or `set_queries`) the same training
backward also scores every example of the micro-batch against the queries' preconditioned
gradients: `step` takes the examples' dataset indices, and `streamed_scores` returns each
example's influence at the times it was trained on, summed over its visits.
`StreamedScores.batches` says which preconditioning scored how many micro-batches.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from ...config.influence import InfluenceConfig
from ...curvature.factors import Factors
from ...curvature.tracker import CurvatureTracker
from ...tasks import Task
from .queries import StreamingQueries
from .scorer import StreamedScores, StreamingScorer


class InfluenceTracker(CurvatureTracker):
    """Accumulates curvature statistics from the training loop and streams scores; a context manager.

    See `CurvatureTracker` for the statistics (`attach`, `step`, `refresh_eigenbasis`, `factors`).

    Args:
        queries: batches (a list, or a loader read once into a list) whose influence is streamed;
            ``None`` (default) disables streaming (see `set_queries`).
    """

    def __init__(self, model: nn.Module, task: Task, config: Optional[InfluenceConfig] = None,
                 queries: Optional[Iterable] = None) -> None:
        super().__init__(model, task, config)
        self.stream = StreamingQueries(self)
        self.add_rider(self.stream)
        if queries is not None:
            self.set_queries(queries)

    @property
    def scorer(self) -> StreamingScorer:
        """The hook sink that scores the streaming micro-batches."""
        return self.stream.scorer

    @property
    def failed_query_refreshes(self) -> int:
        return self.stream.failed_query_refreshes

    @property
    def streaming(self) -> bool:
        """Whether the training backward in flight is scored against the streaming queries."""
        return self.stream.due

    @property
    def has_queries(self) -> bool:
        """Whether streaming queries are set (`set_queries`)."""
        return self.stream.queries is not None

    def set_queries(self, queries: Optional[Iterable]) -> None:
        """Stream the influence of training examples on ``queries`` (``None`` stops streaming).

        ``queries`` is read once into a list (a shuffling loader would otherwise reorder the
        queries between refreshes) and preconditioned now with the current factors (a collective
        when distributed). Streamed scores so far are reset.
        """
        self.stream.set_queries(queries)

    def refresh_queries(self, factors: Optional[Factors] = None) -> str:
        """Re-differentiate and precondition the streaming queries at the current parameters.

        ``factors`` default to the tracker's own (see `StreamingQueries`; a collective when
        distributed: every rank calls this at the same step). The query pass is isolated: eval
        mode, forked RNG, training sink paused, no parameter ``.grad`` touched. Returns the
        preconditioning used (``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"identity"``).
        """
        return self.stream.refresh(factors)

    def streamed_scores(self) -> StreamedScores:
        """Scores streamed since the last `reset_stream` (or `set_queries`).

        When distributed this is a collective (call it on every rank): each process scored its
        own examples, and every rank receives the merge of all of them.
        """
        return self.stream.streamed_scores()

    @property
    def superseded_batches(self) -> dict[str, int]:
        """Streamed micro-batches of this process dropped since `reset_stream`, by their queries'
        preconditioning, because better-preconditioned queries replaced those (see
        `StreamingScorer.set_queries`)."""
        return dict(self.scorer.superseded_batches)

    def reset_stream(self) -> None:
        """Forget the streamed scores (the queries stay)."""
        self.stream.reset()


__all__ = ["InfluenceTracker"]
