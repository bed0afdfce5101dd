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

Renderers turn a dataset example into a `Rendered` (text and/or an image, and a label):
`AutoRenderer` (the default), `ImageRenderer`, `TextRenderer` (optionally with a tokenizer),
`ReprRenderer`; or any callable ``example -> Rendered | str | array``. `make_renderer` resolves
names (``"auto"``, ``"image"``, ``"text"``, ``"repr"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch

from ..results.artifacts import AttributionResult
from .figures import (HARMFUL_COLOR, HELPFUL_COLOR, Section, Tile, ccdf_figure, grid_figure, history_figure,
                      layer_depth_figure, layer_shares_figure)
from .history import InfluenceHistory

RENDERERS = ("auto", "image", "text", "repr")


# --------------------------------------------------------------------------------------- renderers
@dataclass
class Rendered:
    """A displayable example: ``text`` (plain; escaped by `markdown_cell` when shown), an optional
    image ``[H, W]`` or ``[H, W, 3]`` with values in [0, 1], and its label when it has one."""

    text: str
    image: Optional[np.ndarray] = None
    label: Any = None


class Renderer:
    """Base renderer: ``renderer(example) -> Rendered``. Subclass and override ``__call__``."""

    def __call__(self, example: Any) -> Rendered:
        return Rendered(short_repr(example))


class ReprRenderer(Renderer):
    """A short ``repr`` of the example (tensors as shape and first values)."""

    def __init__(self, max_chars: int = 120) -> None:
        self.max_chars = max_chars

    def __call__(self, example: Any) -> Rendered:
        return Rendered(short_repr(example, self.max_chars))


class TextRenderer(Renderer):
    """Text examples: a string, or token ids decoded with ``tokenizer.decode`` when given.

    Mappings are read at ``text_key`` (``"text"``) or ``input_ids``; ``(input, label)`` pairs show
    the label after the text.
    """

    def __init__(self, tokenizer: Any = None, max_chars: int = 300, text_key: str = "text") -> None:
        self.tokenizer = tokenizer
        self.max_chars = max_chars
        self.text_key = text_key

    def __call__(self, example: Any) -> Rendered:
        content, label = _split_label(example)
        if isinstance(content, Mapping):
            if isinstance(content.get(self.text_key), str):
                content = content[self.text_key]
            elif content.get("input_ids") is not None:
                content = content["input_ids"]
        if isinstance(content, str):
            text = content
        elif self.tokenizer is not None and isinstance(content, (torch.Tensor, np.ndarray, list)):
            ids = content.tolist() if hasattr(content, "tolist") else list(content)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        else:
            text = short_repr(content, self.max_chars)
        text = _truncate(text, self.max_chars)
        return Rendered(text if label is None else f"{text} (label {label})", label=label)


class ImageRenderer(Renderer):
    """Image examples: ``[H, W]``, ``[C, H, W]`` (C ∈ {1, 3}) or flat vectors reshaped to ``shape``.

    ``(image, label)`` pairs put the label (mapped through ``label_names`` when given) in the text.
    Values are min-max scaled to [0, 1] per image.
    """

    def __init__(self, shape: Optional[Sequence[int]] = None, label_names: Optional[Sequence[str]] = None) -> None:
        self.shape = tuple(shape) if shape is not None else None
        self.label_names = list(label_names) if label_names is not None else None

    def __call__(self, example: Any) -> Rendered:
        content, label = _split_label(example)
        image = to_image(content, self.shape)
        if label is not None and self.label_names is not None and isinstance(label, int) and 0 <= label < len(self.label_names):
            label = self.label_names[label]
        text = "image" if label is None else f"label {label}"
        if image is None:
            text = short_repr(example) if label is None else f"{short_repr(content, 60)} (label {label})"
            return Rendered(text, label=label)
        return Rendered(text, image, label)


class AutoRenderer(Renderer):
    """Default: strings as text, image-shaped tensors (2-D, or 3-D with 1/3 channels, or flat with
    a square length ≥ 16) as images, anything else as a short repr; labels of pairs are shown."""

    def __init__(self, image_shape: Optional[Sequence[int]] = None, max_chars: int = 120) -> None:
        self.image = ImageRenderer(image_shape)
        self.text = TextRenderer(max_chars=max_chars)
        self.max_chars = max_chars

    def __call__(self, example: Any) -> Rendered:
        content, label = _split_label(example)
        if isinstance(content, str) or (isinstance(content, Mapping) and isinstance(content.get("text"), str)):
            return self.text(example)
        if to_image(content, self.image.shape) is not None:
            return self.image(example)
        text = short_repr(content, self.max_chars)
        return Rendered(text if label is None else f"{text} (label {label})", label=label)


def make_renderer(spec: Union[str, Renderer, Callable[[Any], Any], None] = "auto",
                  image_shape: Optional[Sequence[int]] = None) -> Callable[[Any], Rendered]:
    """A renderer from a name in ``RENDERERS``, a `Renderer`, or any callable (wrapped to return `Rendered`)."""
    if spec is None or spec == "auto":
        return AutoRenderer(image_shape)
    if isinstance(spec, str):
        if spec == "image":
            return ImageRenderer(image_shape)
        if spec == "text":
            return TextRenderer()
        if spec == "repr":
            return ReprRenderer()
        raise ValueError(f"renderer must be one of {list(RENDERERS)}, a Renderer or a callable, got {spec!r}")
    if not callable(spec):
        raise ValueError(f"renderer must be one of {list(RENDERERS)}, a Renderer or a callable, got {spec!r}")
    if isinstance(spec, Renderer):
        return spec

    def wrapped(example: Any) -> Rendered:
        out = spec(example)
        if isinstance(out, Rendered):
            return out
        if isinstance(out, str):
            return Rendered(out)
        image = to_image(out, image_shape)
        return Rendered("image", image) if image is not None else Rendered(short_repr(out))

    return wrapped


def to_image(value: Any, shape: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
    """``[H, W]`` or ``[H, W, 3]`` float array in [0, 1], or ``None`` when ``value`` is not image-like."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    elif isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        value = value.astype(np.float32)
    else:
        return None
    if shape is not None:
        if value.size != int(np.prod(shape)):
            return None
        value = value.reshape(shape)
    elif value.ndim == 1:
        side = int(round(math.sqrt(value.size)))
        if value.size < 16 or side * side != value.size:
            return None
        value = value.reshape(side, side)
    if value.ndim == 3 and value.shape[0] in (1, 3) and value.shape[-1] not in (1, 3):
        value = np.moveaxis(value, 0, -1)
    if value.ndim == 3 and value.shape[-1] == 1:
        value = value[..., 0]
    if value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[-1] != 3) or min(value.shape[:2]) < 2:
        return None
    lo, hi = float(np.nanmin(value)), float(np.nanmax(value))
    return np.clip((value - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(value)


def short_repr(value: Any, max_chars: int = 120) -> str:
    """A one-line description: tensors/arrays as ``tensor[shape] [v0, v1, …]``, else ``repr``."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        head = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in arr.reshape(-1)[:6].tolist())
        more = ", …" if arr.size > 6 else ""
        text = f"{type(value).__name__}{list(arr.shape)} [{head}{more}]"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}: {short_repr(v, 40)}" for k, v in list(value.items())[:4]) + "}"
    elif isinstance(value, (tuple, list)):
        text = "(" + ", ".join(short_repr(v, 60) for v in value[:4]) + ")"
    else:
        text = repr(value)
    return _truncate(text.replace("\n", " "), max_chars)


def _split_label(example: Any) -> tuple[Any, Any]:
    """``(content, label)`` for ``(x, y)`` pairs and mappings with ``labels``/``label``; else ``(example, None)``."""
    if isinstance(example, (tuple, list)) and len(example) == 2 and _is_scalar(example[1]):
        return example[0], _scalar(example[1])
    if isinstance(example, Mapping):
        for key in ("label", "labels"):
            if key in example and _is_scalar(example[key]):
                return {k: v for k, v in example.items() if k != key}, _scalar(example[key])
    return example, None


def _is_scalar(value: Any) -> bool:
    if isinstance(value, (int, float, np.integer, np.floating, str)):
        return True
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.size == 1 if isinstance(value, np.ndarray) else (
        isinstance(value, torch.Tensor) and value.numel() == 1)


def _scalar(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.item()
    return value


def _truncate(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|])")
_WHITESPACE = re.compile(r"\s+")
_SYMBOL_RUN = re.compile(r"([^\w\s])\1{3,}")  # "*****" rulers shortened to "***" in table previews


def escape_markdown(text: str) -> str:
    """``text`` as Markdown that renders literally (TensorBoard's Python-Markdown, GitHub).

    HTML specials become entities (``<`` would open a tag, a backslash does not escape it) and
    Markdown syntax characters are backslash-escaped, pipes included (table cells).
    """
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def markdown_cell(text: str, max_chars: Optional[int] = None) -> str:
    """One table cell: whitespace runs (newlines included) as one space, cut at ``max_chars`` with an
    ellipsis (before escaping, so an escape is never cut), then `escape_markdown`."""
    text = _WHITESPACE.sub(" ", text).strip()
    return escape_markdown(_truncate(text, max_chars) if max_chars else text)


# --------------------------------------------------------------------------------------- analysis
def ccdf(values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(s, P(|X| >= s))`` of the finite, non-zero ``|values|``, s ascending."""
    x = np.abs(np.asarray(torch.as_tensor(values).detach().cpu().double().reshape(-1)))
    x = np.sort(x[np.isfinite(x) & (x > 0)])
    if x.size == 0:
        return x, x
    return x, (x.size - np.searchsorted(x, x, side="left")) / x.size


def tail_exponent(values: torch.Tensor, tail_fraction: float = 0.1, min_tail: int = 10) -> float:
    """Hill estimate of α in ``P(|X| > s) ∝ s^-α`` on the largest ``tail_fraction`` of ``|values|``.

    ``α = k / Σ_{i<k} log(x_(i) / x_(k))`` over the k largest values (k = max(min_tail,
    tail_fraction·n)). Returns ``nan`` with fewer than ``min_tail + 1`` usable values. Smaller α =
    heavier tail (more of the influence held by few examples).
    """
    x = np.abs(np.asarray(torch.as_tensor(values).detach().cpu().double().reshape(-1)))
    x = np.sort(x[np.isfinite(x) & (x > 0)])[::-1]
    if x.size < min_tail + 1:
        return float("nan")
    k = min(max(min_tail, int(tail_fraction * x.size)), x.size - 1)
    logs = np.log(x[:k] / x[k])
    total = float(logs.sum())
    return float(k / total) if total > 0 else float("nan")


def layer_shares(abs_sums: torch.Tensor) -> torch.Tensor:
    """``[L, Q]`` sums of |score| per layer → ``[Q, L]`` shares (rows sum to 1; zeros stay zero)."""
    shares = abs_sums.T.double()
    total = shares.sum(1, keepdim=True)
    return torch.where(total > 0, shares / total.clamp(min=1e-300), torch.zeros_like(shares)).float()


def depth_bins(shares: torch.Tensor, bins: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``[Q, L]`` per-layer shares (layers in network order) → ``[Q, B]`` sums over B = min(bins, L)
    contiguous depth bins of near-equal size, and each bin's layer range ``[start, stop)``."""
    count = shares.shape[1]
    edges = np.linspace(0, count, min(bins, count) + 1).round().astype(int)
    ranges = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    return torch.stack([shares[:, a:b].sum(1) for a, b in ranges], dim=1), ranges


def signed_log_scores(values: torch.Tensor) -> np.ndarray:
    """``sign(s) · log10(1 + |s| / m)`` of the finite scores, m = median of the non-zero ``|s|``.

    Scale-free and readable despite heavy tails: 0 = no influence, ±1 = 9× the median example's
    magnitude, ±2 = 99×; the sign is kept (positive = helpful).
    """
    x = np.asarray(torch.as_tensor(values).detach().cpu().double().reshape(-1))
    x = x[np.isfinite(x)]
    magnitude = np.abs(x)
    nonzero = magnitude[magnitude > 0]
    median = float(np.median(nonzero)) if nonzero.size else 1.0
    return np.sign(x) * np.log10(1.0 + magnitude / median)


# --------------------------------------------------------------------------------------- reporter
class ExampleSource(Protocol):
    """Gives the reporter the examples behind dataset indices (``None`` when unavailable)."""

    def query_example(self, index: int) -> Any: ...

    def candidate_example(self, index: int) -> Any: ...


@runtime_checkable
class Reporter(Protocol):
    """What ``InfluenceSession.reporter`` must implement: log one attribution (called on the main
    process after each attribution, inside the session's tolerant guard: an exception warns).

    A reporter with state across attributions may also define ``state_dict()`` (plain containers
    and tensors) and ``load_state_dict(state)``: the session saves it with its own state, so a
    resumed run continues it.
    """

    def log(self, result: AttributionResult, source: Optional[ExampleSource] = None,
            step: Optional[int] = None) -> None: ...


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


__all__ = [
    "AutoRenderer", "ExampleSource", "ImageRenderer", "RENDERERS", "Rendered", "Renderer", "Reporter", "ReprRenderer",
    "TensorBoardReporter", "TextRenderer", "ccdf", "depth_bins", "escape_markdown", "layer_shares", "make_renderer",
    "markdown_cell", "short_repr", "signed_log_scores", "tail_exponent", "to_image",
]
