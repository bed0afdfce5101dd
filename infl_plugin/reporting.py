"""TensorBoard reporting of one attribution: tables, image grids, histograms, CCDF, layer shares.

Framework-free: `TensorBoardReporter` takes a ``torch.utils.tensorboard.SummaryWriter`` (or
``None``: every call is a no-op, e.g. on non-zero ranks) and logs an `AttributionResult` at a
global step. The Lightning and Hugging Face callbacks both use it as is.

Where things land in TensorBoard (the part of a tag before the first ``/`` is its section):

* **Text** — ``influence/query_{q:03d}``: the query (rendered, its dataset index and loss) and two
  markdown tables, its ``top_k`` most helpful and most harmful training examples (rank, dataset
  index, score, share of the query's Σ|score|, rendered example); ``influence/self_influence``:
  the most self-influential training examples (mislabeled or atypical examples rank high);
  ``influence/summary``: step, reason, strategy, Fisher, candidates scored, duration.
* **Images** — ``influence_examples/query_{q:03d}``: a grid with the query and its top-k helpful
  (top row) and harmful (bottom row) examples with their scores, when the renderer gives images;
  ``influence_plots/score_ccdf``: P(|score| > s) against s on log-log axes per query with the
  fitted power-law tail exponent α (CCDF ∝ s^-α; Hill estimator on the top 10 %);
  ``influence_plots/layer_shares``: bar chart of each layer's share of Σ|score| (mean over
  queries, with each query as a dot).
* **Histograms / Distributions** — ``influence_scores/query_{q:03d}``: all scores of that query.
* **Scalars** — ``influence_top/query_{q:03d}/helpful_{r}`` and ``.../harmful_{r}`` (r ≤
  ``scalar_ranks``): the scores of the current top examples; ``influence_top/self_influence_{r}``;
  ``influence_stats/tail_exponent/query_{q:03d}``, ``influence_stats/duration_s``,
  ``influence_stats/num_candidates``.

Sign: positive score = helpful (training on the example lowers the query's loss), negative =
harmful. Raw scores have arbitrary scale (1e-3 … 1e7 depending on model and damping); the
"share" column (score / Σ_n |score_n| of that query, in %) is comparable across queries.

Extension points (for token-level views, custom plots):

* pass ``extra_texts={"tag": markdown}`` / ``extra_figures={"tag": matplotlib_figure}`` to
  `TensorBoardReporter.log`;
* or subclass and override `TensorBoardReporter.log_extra` (called last by `log` with the result,
  the example source and the step); use ``self.writer``, `add_figure`, `add_markdown`, `tag`.
  A session takes any reporter with a ``log(result, source, step)`` method.

Renderers turn a dataset example into a `Rendered` (text and/or an image): `AutoRenderer` (the
default), `ImageRenderer`, `TextRenderer` (optionally with a tokenizer), `ReprRenderer`; or any
callable ``example -> Rendered | str | array``. `make_renderer` resolves names (``"auto"``,
``"image"``, ``"text"``, ``"repr"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from .artifacts import AttributionResult

RENDERERS = ("auto", "image", "text", "repr")


# --------------------------------------------------------------------------------------- renderers
@dataclass
class Rendered:
    """A displayable example: ``text`` (markdown-safe after `markdown_cell`) and an optional image
    ``[H, W]`` or ``[H, W, 3]`` with values in [0, 1]."""

    text: str
    image: Optional[np.ndarray] = None


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
        return Rendered(text if label is None else f"{text} (label {label})")


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
            return Rendered(short_repr(example) if label is None else f"{short_repr(content, 60)} (label {label})")
        return Rendered(text, image)


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
        return Rendered(text if label is None else f"{text} (label {label})")


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


def markdown_cell(text: str) -> str:
    """Escape a string for one markdown table cell (pipes, newlines)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


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


# --------------------------------------------------------------------------------------- reporter
class ExampleSource(Protocol):
    """Gives the reporter the examples behind dataset indices (``None`` when unavailable)."""

    def query_example(self, index: int) -> Any: ...

    def candidate_example(self, index: int) -> Any: ...


class TensorBoardReporter:
    """Logs an `AttributionResult` to a ``SummaryWriter`` (``None`` = no-op). See the module docstring.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (Lightning: ``TensorBoardLogger.experiment``).
        renderer: name, `Renderer` or callable (see `make_renderer`).
        image_shape: reshape flat examples to this image shape (``[8, 8]`` for sklearn digits).
        scalar_ranks: how many top ranks get a scalar per query and direction.
        max_grid: at most this many examples per row of an image grid.
        max_queries: log per-query views (tables, grids, histograms, scalars) for at most this
            many queries; the CCDF and layer-share figures always use every query.
    """

    def __init__(self, writer: Any = None, renderer: Union[str, Renderer, Callable, None] = "auto",
                 image_shape: Optional[Sequence[int]] = None, scalar_ranks: int = 3, max_grid: int = 8,
                 max_queries: int = 32) -> None:
        self.writer = writer
        self.renderer = make_renderer(renderer, image_shape)
        self.scalar_ranks = scalar_ranks
        self.max_grid = max_grid
        self.max_queries = max_queries

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    # ----------------------------------------------------------------------------- entry point
    def log(self, result: AttributionResult, source: Optional[ExampleSource] = None, step: Optional[int] = None,
            extra_texts: Optional[Mapping[str, str]] = None,
            extra_figures: Optional[Mapping[str, Any]] = None) -> None:
        """Log every view of ``result`` at ``step`` (default ``result.step``), then flush."""
        if self.writer is None:
            return
        step = result.step if step is None else int(step)
        queries = range(min(result.num_queries, self.max_queries))
        rendered_queries = {q: self.render(source, "query", int(result.query_indices[q])) for q in queries}
        self.log_summary(result, step)
        self.log_tables(result, source, step, rendered_queries)
        self.log_images(result, source, step, rendered_queries)
        self.log_histograms(result, step)
        self.log_ccdf(result, step)
        self.log_layer_shares(result, step)
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

    # ----------------------------------------------------------------------------- views
    def log_summary(self, result: AttributionResult, step: int) -> None:
        rows = [("step", result.step), ("reason", result.reason), ("strategy", result.strategy),
                ("Fisher", result.fisher), ("queries", result.num_queries), ("candidates scored", result.num_candidates),
                ("top_k", result.top_k), ("duration (s)", f"{result.duration_s:.2f}")]
        text = "| field | value |\n|---|---|\n" + "\n".join(f"| {k} | {markdown_cell(str(v))} |" for k, v in rows)
        text += "\n\nScore sign: positive = helpful (training on the example lowers the query's loss), negative = harmful."
        self.add_markdown(self.tag("influence", "summary"), text, step)

    def top_table(self, result: AttributionResult, source: Optional[ExampleSource], q: int, direction: str) -> str:
        """Markdown table of query ``q``'s top-k ``"helpful"`` or ``"harmful"`` examples."""
        indices = result.helpful_indices[q] if direction == "helpful" else result.harmful_indices[q]
        scores = result.helpful_scores[q] if direction == "helpful" else result.harmful_scores[q]
        total = float(result.scores[q].abs().nan_to_num(0.0).sum()) or 1.0
        lines = ["| rank | index | score | share | example |", "|---:|---:|---:|---:|---|"]
        for rank, (index, score) in enumerate(zip(indices.tolist(), scores.tolist()), start=1):
            example = markdown_cell(self.render(source, "candidate", int(index)).text)
            lines.append(f"| {rank} | {index} | {score:.4g} | {100 * score / total:+.2f}% | {example} |")
        return "\n".join(lines)

    def log_tables(self, result: AttributionResult, source: Optional[ExampleSource], step: int,
                   rendered_queries: Optional[dict[int, Rendered]] = None) -> None:
        for q in range(min(result.num_queries, self.max_queries)):
            query = (rendered_queries or {}).get(q) or self.render(source, "query", int(result.query_indices[q]))
            head = (f"**Query {q}** (dataset index {int(result.query_indices[q])}, measurement "
                    f"{float(result.measurements[q]):.4g}): {markdown_cell(query.text)}")
            text = (f"{head}\n\n**Most helpful** (top {result.top_k})\n\n{self.top_table(result, source, q, 'helpful')}"
                    f"\n\n**Most harmful** (top {result.top_k})\n\n{self.top_table(result, source, q, 'harmful')}")
            self.add_markdown(self.tag("influence", f"query_{q:03d}"), text, step)
        if result.self_scores is not None:
            values, indices = result.self_top()
            lines = ["| rank | index | self-influence | example |", "|---:|---:|---:|---|"]
            for rank, (index, score) in enumerate(zip(indices.tolist(), values.tolist()), start=1):
                example = markdown_cell(self.render(source, "candidate", int(index)).text)
                lines.append(f"| {rank} | {index} | {score:.4g} | {example} |")
            text = ("Most self-influential training examples (∇L(z)ᵀ(G+λI)⁻¹∇L(z)); mislabeled or atypical "
                    "examples rank high.\n\n" + "\n".join(lines))
            self.add_markdown(self.tag("influence", "self_influence"), text, step)

    def log_images(self, result: AttributionResult, source: Optional[ExampleSource], step: int,
                   rendered_queries: Optional[dict[int, Rendered]] = None) -> None:
        """One grid per query whose rendering is an image: query, then top-k helpful / harmful rows."""
        if source is None:
            return
        for q in range(min(result.num_queries, self.max_queries)):
            query = (rendered_queries or {}).get(q) or self.render(source, "query", int(result.query_indices[q]))
            if query.image is None:
                continue
            k = min(result.top_k, self.max_grid)
            tiles = [[(query.image, f"query {q}\n{query.text}")], [(None, "row 1: helpful\nrow 2: harmful")]]
            for row, direction in enumerate(("helpful", "harmful")):
                indices = result.helpful_indices[q] if direction == "helpful" else result.harmful_indices[q]
                scores = result.helpful_scores[q] if direction == "helpful" else result.harmful_scores[q]
                for j in range(k):
                    shown = self.render(source, "candidate", int(indices[j]))
                    tiles[row].append((shown.image, f"#{int(indices[j])} {shown.text}\n{float(scores[j]):.3g}"))
            fig = _grid_figure(tiles)
            self.add_figure(self.tag("influence_examples", f"query_{q:03d}"), fig, step)

    def log_histograms(self, result: AttributionResult, step: int) -> None:
        for q in range(min(result.num_queries, self.max_queries)):
            values = result.scores[q].detach().cpu().double()
            values = values[torch.isfinite(values)]
            if values.numel():
                self.writer.add_histogram(self.tag("influence_scores", f"query_{q:03d}"), values.numpy(), global_step=step)

    def log_ccdf(self, result: AttributionResult, step: int) -> None:
        import matplotlib

        fig = _figure((5.5, 4.0))
        ax = fig.subplots()
        plotted = False
        colors = matplotlib.colormaps["tab10"]
        for q in range(result.num_queries):
            x, p = ccdf(result.scores[q])
            if x.size < 2:
                continue
            alpha = float(result.tail_exponents[q]) if result.tail_exponents is not None else float("nan")
            color = colors(q % 10)
            label = f"q{q} α={alpha:.2f}" if math.isfinite(alpha) else f"q{q}"
            ax.loglog(x, p, ".", ms=2, color=color, label=label if q < 10 else None)
            if math.isfinite(alpha):
                k = max(10, int(0.1 * x.size))
                x0, p0 = x[-k], p[-k]
                xs = np.array([x0, x[-1]])
                ax.loglog(xs, p0 * (xs / x0) ** (-alpha), "-", lw=1, color=color)
            plotted = True
        if not plotted:
            return
        ax.set_xlabel("|influence score| s")
        ax.set_ylabel("P(|score| ≥ s)")
        finite = result.tail_exponents[torch.isfinite(result.tail_exponents)]
        median = f"median α = {float(finite.median()):.2f}" if finite.numel() else "α not fitted"
        ax.set_title(f"Score CCDF, step {result.step} ({median})", fontsize=9)
        ax.legend(fontsize=6, loc="lower left")
        fig.tight_layout()
        self.add_figure(self.tag("influence_plots", "score_ccdf"), fig, step)

    def log_layer_shares(self, result: AttributionResult, step: int) -> None:
        if not result.layer_names:
            return
        shares = result.layer_shares.detach().cpu().double().numpy()  # [Q, L]
        n = len(result.layer_names)
        fig = _figure((max(4.0, 0.5 * n + 2), 3.5))
        ax = fig.subplots()
        positions = np.arange(n)
        ax.bar(positions, shares.mean(0), color="tab:blue", alpha=0.7, label="mean over queries")
        for q in range(shares.shape[0]):
            ax.plot(positions, shares[q], ".", color="black", ms=3, alpha=0.5, label="queries" if q == 0 else None)
        ax.set_xticks(positions)
        ax.set_xticklabels(result.layer_names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=7)
        ax.set_ylabel("share of Σ|score|")
        ax.set_title(f"Per-layer influence shares, step {result.step}", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        self.add_figure(self.tag("influence_plots", "layer_shares"), fig, step)

    def log_scalars(self, result: AttributionResult, step: int) -> None:
        ranks = min(self.scalar_ranks, result.top_k)
        for q in range(min(result.num_queries, self.max_queries)):
            for r in range(ranks):
                self.writer.add_scalar(self.tag("influence_top", f"query_{q:03d}/helpful_{r + 1}"),
                                       float(result.helpful_scores[q, r]), global_step=step)
                self.writer.add_scalar(self.tag("influence_top", f"query_{q:03d}/harmful_{r + 1}"),
                                       float(result.harmful_scores[q, r]), global_step=step)
            alpha = float(result.tail_exponents[q])
            if math.isfinite(alpha):
                self.writer.add_scalar(self.tag("influence_stats", f"tail_exponent/query_{q:03d}"), alpha, global_step=step)
        if result.self_scores is not None:
            values, _ = result.self_top(ranks)
            for r, value in enumerate(values.tolist()):
                self.writer.add_scalar(self.tag("influence_top", f"self_influence_{r + 1}"), value, global_step=step)
        self.writer.add_scalar(self.tag("influence_stats", "duration_s"), float(result.duration_s), global_step=step)
        self.writer.add_scalar(self.tag("influence_stats", "num_candidates"), float(result.num_candidates), global_step=step)


def _figure(size: tuple[float, float]) -> Any:
    """A pyplot-free figure (rendered with the Agg canvas; the user's backend is left alone)."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=100)


def _grid_figure(rows: list[list[tuple[Optional[np.ndarray], str]]]) -> Any:
    """One image axes holding a mosaic of tiles (``(image | None, caption)``), captions above tiles.

    A single axes renders ~20x faster than one axes per tile.
    """
    shapes = [img.shape[:2] for row in rows for img, _ in row if img is not None]
    h = max(s[0] for s in shapes)
    w = max(s[1] for s in shapes)
    cols = max(len(row) for row in rows)
    pad_w, pad_h = max(2, w // 8), max(2, h // 2)
    mosaic = np.ones(((h + pad_h) * len(rows), (w + pad_w) * cols, 3))
    for r, row in enumerate(rows):
        for c, (img, _) in enumerate(row):
            if img is None:
                continue
            tile = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img
            top, left = r * (h + pad_h) + pad_h, c * (w + pad_w)
            mosaic[top: top + tile.shape[0], left: left + tile.shape[1]] = tile
    fig = _figure((1.25 * cols, 1.6 * len(rows)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest", aspect="equal")
    for r, row in enumerate(rows):
        for c, (_, caption) in enumerate(row):
            x = c * (w + pad_w) + w / 2
            y = r * (h + pad_h) + pad_h * 0.95 if row[c][0] is not None else r * (h + pad_h) + pad_h + h / 2
            ax.text(x, y, caption, ha="center", va="bottom" if row[c][0] is not None else "center", fontsize=5.5)
    ax.axis("off")
    return fig


__all__ = [
    "AutoRenderer", "ExampleSource", "ImageRenderer", "RENDERERS", "Rendered", "Renderer", "ReprRenderer",
    "TensorBoardReporter", "TextRenderer", "ccdf", "layer_shares", "make_renderer", "markdown_cell", "short_repr",
    "tail_exponent", "to_image",
]
