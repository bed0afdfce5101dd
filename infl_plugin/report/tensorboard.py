"""TensorBoard reporting of one attribution, and of influence over the attributions of a run.

Framework-free: `TensorBoardReporter` takes a ``torch.utils.tensorboard.SummaryWriter`` (or
``None``: every call is a no-op, e.g. on non-zero ranks) and logs an `AttributionResult` at a
global step. The Lightning and Hugging Face callbacks both use it as is; anything implementing
`Reporter` (one ``log(result, source, step)`` method) can replace it.

Where things land in TensorBoard (the part of a tag before the first ``/`` is its section):

* **Text** — ``influence/query_{q:03d}``: the query (dataset index, label or text, its loss) and
  two tables, its ``top_k`` most helpful and most harmful training examples: rank, dataset index,
  raw score, share of the query's Σ|score|, ``Δ loss if ×2`` (the first-order change of the
  query's loss if the example counted twice in the mean training loss, ``-score / N``), and the
  label (image examples) or the text (cut at ``table_chars``); ``influence/self_influence``: the
  training examples ranked by self-influence, a data-cleaning list; ``influence/summary``.
* **Images** — ``influence_examples/query_{q:03d}``: the query, then its top helpful (red) and
  harmful (blue) examples, four per row with index, label and share; ``influence_examples/
  self_influence``: the highest self-influence examples; ``influence_over_training/query_{q:03d}``:
  each tracked example's share of Σ|score| at every attribution so far; ``influence_plots/
  score_ccdf`` (log-log P(|score| ≥ s) with the tail exponent α), ``influence_plots/layer_shares``
  (per layer) and ``influence_plots/layer_depth`` (layers in depth bins, bottom to top).
* **Histograms / Distributions** — ``influence_score_log10/query_{q:03d}``: every score of the
  query as ``sign(s) · log10(1 + |s| / median|s|)``, readable despite heavy tails.
* **Scalars** — ``influence_tracked/query_{q:03d}/example_{i:05d}``: training example i's share of
  the query's Σ|score| (signed, %) at each attribution, for every example that was in the query's
  top ``scalar_ranks`` helpful or harmful at some attribution (one line = one example; shares
  compare across steps while raw scores swing in scale); ``influence_tracked/
  self_influence/example_{i:05d}``: share of Σ self-influence, likewise; ``influence_stats/topk_jaccard/query_{q:03d}``:
  overlap of the query's top-k (helpful ∪ harmful) with the previous attribution's;
  ``influence_stats/tail_exponent/query_{q:03d}``, ``duration_s``, ``num_candidates``.

Sign: positive score = helpful (training on the example lowers the query's loss), negative =
harmful. Raw scores have an arbitrary scale (1e-3 … 1e7 depending on model and damping); the share
(score / Σ_n |score_n| of that query, in %) compares across queries and steps, and ``Δ loss if ×2``
is in the loss's own units (nats for cross-entropy). The measurement is named by
``result.measurement_name`` (a task's ``measurement_name`` attribute, default ``"loss"``).

Extension points: pass ``extra_texts={"tag": markdown}`` / ``extra_figures={"tag": figure}`` to
`TensorBoardReporter.log`, or subclass and override `TensorBoardReporter.log_extra` (called last
with the result, the example source and the step; use `add_figure`, `add_markdown`, `tag`).

Examples are shown through a renderer (`infl_plugin.report.renderers`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..results.artifacts import AttributionResult
from ..scoring.analysis import ccdf, depth_bins, signed_log_scores
from .figures import (HARMFUL_COLOR, HELPFUL_COLOR, Section, Tile, ccdf_figure, grid_figure, history_figure,
                      layer_depth_figure, layer_shares_figure)
from .history import InfluenceHistory
from .markdown import markdown_cell
from .protocol import ExampleSource
from .renderers import Rendered, Renderer, make_renderer

_SYMBOL_RUN = re.compile(r"([^\w\s])\1{3,}")  # "*****" rulers shortened to "***" in table previews


class TensorBoardReporter:
    """Logs an `AttributionResult` to a ``SummaryWriter`` (``None`` = no-op). See the module docstring.

    The reporter keeps state across attributions (the tracked examples of each query and the
    previous top-k sets, see `InfluenceHistory`); it restarts when the query set changes, and it is
    saved in the session's checkpoint state (`state_dict`), so a resumed run continues its series.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (Lightning: ``TensorBoardLogger.experiment``).
        renderer: name, `Renderer` or callable (see `make_renderer`).
        image_shape: reshape flat examples to this image shape (``[8, 8]`` for sklearn digits).
        scalar_ranks: the top this-many helpful and harmful examples of each attribution join the
            query's tracked examples (and the top self-influence ones the self-influence set).
        max_grid: at most this many examples per direction in an image grid.
        max_queries: log per-query views (tables, grids, histograms, scalars) for at most this
            many queries; the CCDF and layer figures always use every query.
        table_chars: example text in tables is cut to this many characters (a preview: longer ones
            squeeze the numeric columns until they wrap at TensorBoard's usual widths).
        max_tracked: at most this many tracked examples per query.
        layer_bins: depth bins of the ``layer_depth`` figure.
    """

    def __init__(self, writer: Any = None, renderer: Union[str, Renderer, Callable, None] = "auto",
                 image_shape: Optional[Sequence[int]] = None, scalar_ranks: int = 3, max_grid: int = 8,
                 max_queries: int = 32, table_chars: int = 40, max_tracked: int = 24, layer_bins: int = 8) -> None:
        for name, value in (("scalar_ranks", scalar_ranks), ("max_grid", max_grid), ("max_queries", max_queries),
                            ("table_chars", table_chars), ("max_tracked", max_tracked), ("layer_bins", layer_bins)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TensorBoardReporter.{name} must be an integer >= 1, got {value!r}")
        self.writer = writer
        self.renderer = make_renderer(renderer, image_shape)
        self.scalar_ranks = scalar_ranks
        self.max_grid = max_grid
        self.max_queries = max_queries
        self.table_chars = table_chars
        self.layer_bins = layer_bins
        self.history = InfluenceHistory(max_tracked)
        self._query_ids: Optional[list[int]] = None

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def state_dict(self) -> dict[str, Any]:
        """The influence-over-training history and the query set it belongs to."""
        return {"history": self.history.state_dict(), "query_ids": self._query_ids}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state["history"])
        self._query_ids = None if state["query_ids"] is None else [int(i) for i in state["query_ids"]]

    # ----------------------------------------------------------------------------- entry point
    def log(self, result: AttributionResult, source: Optional[ExampleSource] = None, step: Optional[int] = None,
            extra_texts: Optional[Mapping[str, str]] = None,
            extra_figures: Optional[Mapping[str, Any]] = None) -> None:
        """Log every view of ``result`` at ``step`` (default ``result.step``), then flush."""
        if self.writer is None:
            return
        step = result.step if step is None else int(step)
        if result.query_indices.tolist() != self._query_ids:
            self.history.reset()
            self._query_ids = result.query_indices.tolist()
        queries = range(min(result.num_queries, self.max_queries))
        rendered_queries = {q: self.render(source, "query", int(result.query_indices[q])) for q in queries}
        self.log_summary(result, step)
        self.log_tables(result, source, step, rendered_queries)
        self.log_images(result, source, step, rendered_queries)
        self.log_histograms(result, step)
        self.log_ccdf(result, step)
        self.log_layer_shares(result, step)
        self.log_history(result, step)
        self.log_scalars(result, step)
        for tag, text in (extra_texts or {}).items():
            self.add_markdown(tag, text, step)
        for tag, figure in (extra_figures or {}).items():
            self.add_figure(tag, figure, step)
        self.log_extra(result, source, step)
        self.writer.flush()

    def log_extra(self, result: AttributionResult, source: Optional[ExampleSource], step: int) -> None:
        """Override in a subclass to log more (token heatmaps, …); called last by `log`."""

    # ----------------------------------------------------------------------------- helpers
    def tag(self, section: str, name: str) -> str:
        return f"{section}/{name}"

    def render(self, source: Optional[ExampleSource], kind: str, index: int) -> Rendered:
        """Render dataset item ``index`` of the queries or candidates; never raises."""
        if source is None:
            return Rendered(f"#{index}")
        try:
            example = source.query_example(index) if kind == "query" else source.candidate_example(index)
            if example is None:
                return Rendered(f"#{index}")
            out = self.renderer(example)
            return out if isinstance(out, Rendered) else Rendered(str(out))
        except Exception as error:  # a renderer must never break training
            return Rendered(f"#{index} (render failed: {type(error).__name__})")

    def add_markdown(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, global_step=step)

    def add_figure(self, tag: str, figure: Any, step: int) -> None:
        """Log a matplotlib figure (closed afterwards)."""
        if self.writer is not None:
            self.writer.add_figure(tag, figure, global_step=step, close=True)

    # ----------------------------------------------------------------------------- text
    def log_summary(self, result: AttributionResult, step: int) -> None:
        rows = [("step", result.step), ("reason", result.reason), ("strategy", result.strategy),
                ("Fisher", result.fisher), ("queries", result.num_queries), ("candidates scored", f"{result.num_candidates} ({result.candidate_mode})"),
                ("training examples N", result.training_set_size), ("top_k", result.top_k),
                ("duration (s)", f"{result.duration_s:.2f}")]
        text = "| field | value |\n|---|---|\n" + "\n".join(f"| {k} | {markdown_cell(str(v))} |" for k, v in rows)
        text += (f"\n\nScore sign: positive = helpful (training on the example lowers the query's "
                 f"{markdown_cell(result.measurement_name)}), negative = harmful.")
        self.add_markdown(self.tag("influence", "summary"), text, step)

    def top_table(self, result: AttributionResult, source: Optional[ExampleSource], q: int, direction: str) -> str:
        """Markdown table of query ``q``'s top-k ``"helpful"`` or ``"harmful"`` examples.

        Columns: rank, dataset index, raw score, share of Σ|score| (%), predicted change of the
        measurement if the example's weight were doubled, then the label (image examples) or the
        example's text cut at ``table_chars``.
        """
        indices = result.helpful_indices[q] if direction == "helpful" else result.harmful_indices[q]
        scores = result.helpful_scores[q] if direction == "helpful" else result.harmful_scores[q]
        total = float(result.scores[q].abs().nan_to_num(0.0).sum()) or 1.0
        changes = result.predicted_change(scores.double())
        shown = [self.render(source, "candidate", int(index)) for index in indices.tolist()]
        images = any(r.image is not None for r in shown)
        name = markdown_cell(result.measurement_name)
        lines = [f"| rank | index | score | share | Δ {name} if ×2 | {'label' if images else 'example'} |",
                 "|---:|---:|---:|---:|---:|:---|"]
        for rank, (index, score, change, rendered) in enumerate(
                zip(indices.tolist(), scores.tolist(), changes.tolist(), shown), start=1):
            cell = self.example_cell(rendered, images)
            lines.append(f"| {rank} | {index} | {score:.3g} | {100 * score / total:+.2f}% | {change:+.3g} | {cell} |")
        return "\n".join(lines)

    def example_cell(self, rendered: Rendered, images: bool) -> str:
        """The last cell of a table row: the label when the table shows images, else a text preview."""
        if images:
            return "–" if rendered.label is None else markdown_cell(str(rendered.label))
        return markdown_cell(_SYMBOL_RUN.sub(r"\1\1\1", rendered.text), self.table_chars)

    def query_heading(self, result: AttributionResult, q: int, query: Rendered) -> str:
        """``**Query q** · dataset index · label · loss``, then the query's text when it is not an image."""
        parts = [f"**Query {q}**", f"dataset index {int(result.query_indices[q])}"]
        if query.image is not None and query.label is not None:
            parts.append(f"label {markdown_cell(str(query.label))}")
        parts.append(f"{markdown_cell(result.measurement_name)} {float(result.measurements[q]):.4g}")
        head = " · ".join(parts)
        if query.image is None:
            head += "\n\n> " + markdown_cell(query.text, 400)
        return head

    def log_tables(self, result: AttributionResult, source: Optional[ExampleSource], step: int,
                   rendered_queries: Optional[dict[int, Rendered]] = None) -> None:
        name = markdown_cell(result.measurement_name)
        n = result.training_set_size
        legend = (f"*share*: score ÷ Σ|score| over the {result.num_candidates} scored examples. "
                  f"*Δ {name} if ×2*: −score ÷ N (N = {n} training examples), the predicted change of this "
                  f"query's {name}, in its own units (nats for cross-entropy), if the example counted twice in "
                  "the mean training loss (first order: a linear extrapolation).")
        for q in range(min(result.num_queries, self.max_queries)):
            query = (rendered_queries or {}).get(q) or self.render(source, "query", int(result.query_indices[q]))
            text = (f"{self.query_heading(result, q, query)}\n\n"
                    f"**Most helpful** (training on them lowered this {name})\n\n"
                    f"{self.top_table(result, source, q, 'helpful')}\n\n"
                    f"**Most harmful** (training on them raised this {name})\n\n"
                    f"{self.top_table(result, source, q, 'harmful')}\n\n{legend}")
            self.add_markdown(self.tag("influence", f"query_{q:03d}"), text, step)
        if result.self_scores is not None:
            self.add_markdown(self.tag("influence", "self_influence"), self.self_influence_table(result, source), step)

    def self_rows(self, result: AttributionResult) -> int:
        """Rows of the self-influence list: the top 1 % of the candidates, at least top_k, at most 50."""
        return min(max(result.top_k, math.ceil(0.01 * result.num_candidates)), 50, result.num_candidates)

    def self_influence_table(self, result: AttributionResult, source: Optional[ExampleSource]) -> str:
        """The data-cleaning list: candidates by decreasing self-influence, with their rank as a top percentage."""
        values, indices = result.self_top(self.self_rows(result))
        shown = [self.render(source, "candidate", int(index)) for index in indices.tolist()]
        images = any(r.image is not None for r in shown)
        n = result.num_candidates
        lines = [f"| rank | index | self-influence | top % | {'label' if images else 'example'} |",
                 "|---:|---:|---:|---:|:---|"]
        for rank, (index, value, rendered) in enumerate(zip(indices.tolist(), values.tolist(), shown), start=1):
            cell = self.example_cell(rendered, images)
            lines.append(f"| {rank} | {index} | {value:.4g} | {100 * rank / n:.2g}% | {cell} |")
        return (f"**Training examples ranked by self-influence** ∇L(z)ᵀ(G+λI)⁻¹∇L(z), {n} scored. Mislabeled "
                f"or atypical examples rank high: inspect the top 1 % ({math.ceil(0.01 * n)} examples) first, then "
                f"the top 5 % ({math.ceil(0.05 * n)}). Every score is in the run's artifacts "
                "(`read_artifacts(logdir)`, column `self_scores`).\n\n" + "\n".join(lines))

    # ----------------------------------------------------------------------------- images
    def log_images(self, result: AttributionResult, source: Optional[ExampleSource], step: int,
                   rendered_queries: Optional[dict[int, Rendered]] = None) -> None:
        """Per query whose rendering is an image: the query, then its top helpful and harmful examples;
        and the highest self-influence examples."""
        if source is None:
            return
        k = min(result.top_k, self.max_grid)
        name = result.measurement_name
        for q in range(min(result.num_queries, self.max_queries)):
            query = (rendered_queries or {}).get(q) or self.render(source, "query", int(result.query_indices[q]))
            if query.image is None:
                continue
            total = float(result.scores[q].abs().nan_to_num(0.0).sum()) or 1.0
            caption = _caption(int(result.query_indices[q]), query)
            note = (f"{name} {float(result.measurements[q]):.3g}\nred: most helpful\nblue: most harmful\n"
                    "caption: #index, label,\nshare of Σ|score|")
            sections = [Section(f"query {q}", [Tile(query.image, caption)], note=note)]
            for direction, color in (("helpful", HELPFUL_COLOR), ("harmful", HARMFUL_COLOR)):
                indices = result.helpful_indices[q] if direction == "helpful" else result.harmful_indices[q]
                scores = result.helpful_scores[q] if direction == "helpful" else result.harmful_scores[q]
                tiles = []
                for j in range(k):
                    shown = self.render(source, "candidate", int(indices[j]))
                    share = 100 * float(scores[j]) / total
                    tiles.append(Tile(shown.image, f"{_caption(int(indices[j]), shown)}\n{share:+.1f}%"))
                sections.append(Section(f"most {direction}", tiles, color))
            self.add_figure(self.tag("influence_examples", f"query_{q:03d}"), grid_figure(sections), step)
        if result.self_scores is not None:
            values, indices = result.self_top(k)
            shown = [self.render(source, "candidate", int(i)) for i in indices.tolist()]
            if any(r.image is not None for r in shown):
                tiles = [Tile(r.image, f"{_caption(int(i), r)}\nrank {rank}")
                         for rank, (i, r) in enumerate(zip(indices.tolist(), shown), start=1)]
                section = Section("highest self-influence (often mislabeled)", tiles, "black")
                self.add_figure(self.tag("influence_examples", "self_influence"), grid_figure([section]), step)

    def log_histograms(self, result: AttributionResult, step: int) -> None:
        for q in range(min(result.num_queries, self.max_queries)):
            values = signed_log_scores(result.scores[q])
            if values.size:
                self.writer.add_histogram(self.tag("influence_score_log10", f"query_{q:03d}"), values, global_step=step)

    def log_ccdf(self, result: AttributionResult, step: int) -> None:
        curves = []
        for q in range(result.num_queries):
            x, p = ccdf(result.scores[q])
            if x.size < 2:
                continue
            alpha = float(result.tail_exponents[q]) if result.tail_exponents is not None else float("nan")
            curves.append((f"q{q} α={alpha:.2f}" if math.isfinite(alpha) else f"q{q}", x, p, alpha))
        if not curves:
            return
        finite = result.tail_exponents[torch.isfinite(result.tail_exponents)]
        median = f"median α = {float(finite.median()):.2f}" if finite.numel() else "α not fitted"
        self.add_figure(self.tag("influence_plots", "score_ccdf"),
                        ccdf_figure(curves, f"Score tails, step {result.step} ({median})"), step)

    def log_layer_shares(self, result: AttributionResult, step: int) -> None:
        """Per-layer shares, and the same summed into depth bins (bottom → top of the network)."""
        if not result.layer_names:
            return
        shares = result.layer_shares.detach().cpu().double()  # [Q, L]
        self.add_figure(self.tag("influence_plots", "layer_shares"),
                        layer_shares_figure(shares.numpy(), result.layer_names,
                                            f"Influence per layer, step {result.step}"), step)
        if len(result.layer_names) < 2:
            return
        binned, ranges = depth_bins(shares, self.layer_bins)
        labels = [f"{a + 1}" if b - a == 1 else f"{a + 1}–{b}" for a, b in ranges]
        title = f"Influence by depth ({len(result.layer_names)} layers), step {result.step}"
        self.add_figure(self.tag("influence_plots", "layer_depth"), layer_depth_figure(binned.numpy(), labels, title),
                        step)

    # ----------------------------------------------------------------------------- over training
    def log_history(self, result: AttributionResult, step: int) -> None:
        """Shares of each query's tracked examples (one scalar series per example: its score as % of
        the query's Σ|score|, comparable across steps whatever the raw scale), the top-k overlap with
        the previous attribution, and a figure per query of those series."""
        position = {int(index): n for n, index in enumerate(result.candidate_indices.tolist())}
        ranks = min(self.scalar_ranks, result.top_k)
        for q in range(min(result.num_queries, self.max_queries)):
            row = result.scores[q].double()
            total = float(row.abs().nan_to_num(0.0).sum()) or 1.0
            entering = {int(i): "harmful" for i in result.harmful_indices[q, :ranks].tolist()}
            entering.update({int(i): "helpful" for i in result.helpful_indices[q, :ranks].tolist()})

            def value(index: int, row: torch.Tensor = row, total: float = total) -> Optional[tuple[float, float]]:
                n = position.get(index)  # None: not scored this time (e.g. streamed candidates)
                return None if n is None or not math.isfinite(row[n]) else (float(row[n]), 100 * float(row[n]) / total)

            tracked = self.history.update(f"query_{q:03d}", step, entering, value)
            for example in tracked.values():
                if example.steps and example.steps[-1] == step:
                    self.writer.add_scalar(self.tag("influence_tracked", f"query_{q:03d}/example_{example.index:05d}"),
                                           example.shares[-1], global_step=step)
            top = result.helpful_indices[q].tolist() + result.harmful_indices[q].tolist()
            overlap = self.history.overlap(f"query_{q:03d}", top)
            if overlap is not None:
                self.writer.add_scalar(self.tag("influence_stats", f"topk_jaccard/query_{q:03d}"), overlap,
                                       global_step=step)
            series = [(f"#{e.index}", e.direction, e.steps, e.shares) for e in tracked.values() if e.steps]
            title = f"query {q}: its top examples over training\n(red: entered as helpful, blue: as harmful)"
            self.add_figure(self.tag("influence_over_training", f"query_{q:03d}"), history_figure(series, title), step)
        if result.self_scores is not None:
            self_scores = result.self_scores.double()
            total = float(self_scores.abs().nan_to_num(0.0).sum()) or 1.0
            _, top = result.self_top(ranks)

            def self_value(index: int) -> Optional[tuple[float, float]]:
                n = position.get(index)
                if n is None or not math.isfinite(self_scores[n]):
                    return None
                return float(self_scores[n]), 100 * float(self_scores[n]) / total

            tracked = self.history.update("self_influence", step, {int(i): "helpful" for i in top.tolist()}, self_value)
            for example in tracked.values():
                if example.steps and example.steps[-1] == step:
                    self.writer.add_scalar(self.tag("influence_tracked", f"self_influence/example_{example.index:05d}"),
                                           example.shares[-1], global_step=step)

    def log_scalars(self, result: AttributionResult, step: int) -> None:
        for q in range(min(result.num_queries, self.max_queries)):
            alpha = float(result.tail_exponents[q])
            if math.isfinite(alpha):
                self.writer.add_scalar(self.tag("influence_stats", f"tail_exponent/query_{q:03d}"), alpha, global_step=step)
        self.writer.add_scalar(self.tag("influence_stats", "duration_s"), float(result.duration_s), global_step=step)
        self.writer.add_scalar(self.tag("influence_stats", "num_candidates"), float(result.num_candidates), global_step=step)


def _caption(index: int, rendered: Rendered) -> str:
    """``#index label y`` for a grid tile."""
    return f"#{index}" if rendered.label is None else f"#{index} label {rendered.label}"


__all__ = ["TensorBoardReporter"]
