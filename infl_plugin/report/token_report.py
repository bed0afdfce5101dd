"""Rendering of token-level and layer-level views of influence on sequences.

The views themselves (`TokenViews`: per-token and per-layer scores of a query's chosen training
sequences) are computed at attribution time by `infl_plugin.results.token_views` and travel in
``AttributionResult.token_views``. This module only draws them, without touching
the model:

* `token_heatmap_figure`: one row of coloured token cells per top sequence (`token_figure` for a
  `TokenViews`);
* `layer_heatmap_figure`: layers × top sequences, each column a sequence's score split over the
  tracked layers (the paper's layer-wise figure; `layer_figure` for a `TokenViews`);
* `TokenReporter`: a `TensorBoardReporter` that logs a result's token views (their Markdown,
  `views_markdown`, and both figures) next to the base reporter's tables and plots (used by the
  Hugging Face callback).

Figures are pyplot-free matplotlib figures.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch

from ..results.artifacts import AttributionResult
from ..results.views import TokenViews
from .markdown import format_score, views_markdown, visible_token
from .protocol import ExampleSource
from .renderers import TextRenderer
from .tensorboard import TensorBoardReporter


# ------------------------------------------------------------------------------------ layers
def layer_groups(layer_names: Sequence[str]) -> list[str]:
    """A display label per layer: the first block index in its name (``"h.3"`` → ``"block 3"``), else the name."""
    labels = []
    for name in layer_names:
        match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        labels.append(f"block {match.group(1)}" if match else name)
    return labels


def group_layers(per_layer: torch.Tensor, layer_names: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """Sum rows of ``per_layer [L, ...]`` that share a block label; returns ``([G, ...], labels)``."""
    labels = layer_groups(layer_names)
    unique = list(dict.fromkeys(labels))
    index = torch.tensor([unique.index(label) for label in labels], device=per_layer.device)
    out = torch.zeros((len(unique),) + tuple(per_layer.shape[1:]), dtype=per_layer.dtype, device=per_layer.device)
    out.index_add_(0, index, per_layer)
    return out, unique


def strip_common_prefix(names: Sequence[str]) -> list[str]:
    """Names without the dotted prefix they all share, up to a block index's name
    (``transformer.h.0.mlp``, ``transformer.h.1.attn`` → ``h.0.mlp``, ``h.1.attn``)."""
    parts = [name.split(".") for name in names]
    common = 0
    while len(names) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    if common and parts[0][common].isdigit():  # keep the name a block index belongs to ("h.0", not "0")
        common -= 1
    return [".".join(p[common:]) for p in parts]


def _figure(size: tuple[float, float]):
    """A pyplot-free matplotlib figure (Agg canvas; the user's backend is left alone)."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=100)


def _symmetric_limit(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    vmax = float(finite.abs().max()) if finite.numel() else 1.0
    return vmax if vmax > 0 else 1.0


def layer_heatmap_figure(
    per_layer: torch.Tensor,
    layer_names: Sequence[str],
    column_labels: Sequence[str],
    title: str = "",
    normalize: bool = True,
    max_rows: int = 48,
):
    """Heatmap of layers (rows, bottom layer at the bottom) × top sequences (columns).

    ``per_layer: [L, K]`` per-layer scores of K sequences. With ``normalize`` each column is
    divided by the sum of its absolute values, so a column shows how a sequence's influence is
    spread over layers. More than ``max_rows`` layers are summed per block first.
    """
    values = per_layer.detach().double().cpu()
    names = list(layer_names)
    if values.shape[0] > max_rows:
        values, names = group_layers(values, names)
    names = strip_common_prefix(names)
    if normalize:
        values = values / values.abs().sum(0, keepdim=True).clamp(min=1e-300)
    k = values.shape[1]
    fig = _figure((1.2 + 0.45 * max(k, 4), 1.0 + 0.22 * max(len(names), 4)))
    ax = fig.subplots()
    vmax = _symmetric_limit(values)
    image = ax.imshow(values.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.set_xticks(range(k))
    ax.set_xticklabels(list(column_labels), fontsize=6, rotation=90)
    ax.set_xlabel("top training sequences")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="share of |score|" if normalize else "score")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def clip_token(token: str, max_chars: int) -> str:
    """A token for a heatmap cell: visible glyphs without surrounding spaces (``␣`` for a space),
    cut to ``max_chars`` with an ellipsis when longer."""
    visible = visible_token(token).strip(" ") or "␣"
    return visible if len(visible) <= max_chars else visible[: max_chars - 1] + "…"


def token_heatmap_figure(
    rows: Sequence[Sequence[str]],
    scores: Sequence[torch.Tensor],
    row_labels: Sequence[str],
    title: str = "",
    width: int = 10,
    max_chars: int = 6,
):
    """Coloured token cells: one block per sequence, wrapped every ``width`` tokens, with a colour bar.

    ``rows[i]`` are sequence i's tokens and ``scores[i]`` its per-token scores (``[tokens]``).
    Colours are symmetric around 0 and scaled per sequence (token score ÷ the sequence's largest
    |token score|): red = helpful, blue = harmful. Tokens longer than ``max_chars`` end in "…".
    Ten tokens per line keep the text legible at TensorBoard's default image width (~3.4 in).
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    lines: list[tuple[int, list[str], list[float]]] = []
    for i, (tokens, values) in enumerate(zip(rows, scores)):
        values = values.detach().double().cpu().tolist()
        for start in range(0, max(len(tokens), 1), width):
            lines.append((i, list(tokens[start: start + width]), values[start: start + width]))
    cell_w, line_h, label_h, bar_h = 0.31, 0.2, 0.24, 0.75
    content_h = line_h * len(lines) + label_h * len(rows) + (0.3 if title else 0.1)
    fig_w, fig_h = cell_w * width + 0.2, content_h + bar_h
    fig = _figure((fig_w, fig_h))
    ax = fig.add_axes((0.1 / fig_w, bar_h / fig_h, cell_w * width / fig_w, (content_h - (0.3 if title else 0.1)) / fig_h))
    cmap = matplotlib.colormaps["RdBu_r"]
    y = 0.0
    previous = None
    limits = [_symmetric_limit(s.detach().double().cpu()) for s in scores]
    for i, tokens, values in lines:
        if i != previous:
            ax.text(0, y - label_h / line_h / 2, row_labels[i], fontsize=7, fontweight="bold", va="center")
            y -= label_h / line_h
            previous = i
        norm = Normalize(vmin=-limits[i], vmax=limits[i])
        for j, (token, value) in enumerate(zip(tokens, values)):
            shade = float(norm(value))
            ax.add_patch(Rectangle((j, y - 0.95), 1, 0.9, color=cmap(shade), linewidth=0))
            ax.text(j + 0.5, y - 0.5, clip_token(token, max_chars), fontsize=6, ha="center", va="center",
                    family="monospace", color="white" if abs(shade - 0.5) > 0.35 else "black")
        y -= 1.0
    ax.set_xlim(0, width)
    ax.set_ylim(y, 0)
    ax.axis("off")
    if title:
        fig.text(0.1 / fig_w, 1 - 0.15 / fig_h, title, fontsize=7.5, va="center")
    bar = fig.add_axes((0.15, 0.5 / fig_h, 0.7, 0.1 / fig_h))
    colorbar = fig.colorbar(ScalarMappable(Normalize(-1, 1), cmap), cax=bar, orientation="horizontal")
    colorbar.set_ticks([-1, 0, 1])
    colorbar.ax.tick_params(labelsize=6)
    colorbar.set_label("token score ÷ largest |token score| of its sequence\nblue = harmful · red = helpful",
                       fontsize=6.5)
    return fig


def token_figure(views: TokenViews, title: str = ""):
    """`token_heatmap_figure` of ``views``' sequences (real tokens only), labelled by rank, index and score."""
    labels = [f"#{r}  train {i}  score {format_score(s)}"
              for r, (i, s) in enumerate(zip(views.indices, views.scores), 1)]
    rows = [[t for t, m in zip(tokens, mask.tolist()) if m] for tokens, mask in zip(views.tokens, views.masks)]
    values = [views.per_token(i)[views.masks[i].bool()] for i in range(len(views.indices))]
    return token_heatmap_figure(rows, values, labels, title=title)


def layer_figure(views: TokenViews, title: str = ""):
    """`layer_heatmap_figure` of ``views``' sequences (columns labelled by index and score)."""
    labels = [f"{i} ({format_score(s)})" for i, s in zip(views.indices, views.scores)]
    return layer_heatmap_figure(views.per_layer(), views.layer_names, labels, title=title)


# ------------------------------------------------------------------------------------ reporter
class TokenReporter(TensorBoardReporter):
    """`TensorBoardReporter` that also logs the token- and layer-level views a result carries.

    A pure sink: it draws ``result.token_views`` (query position → `TokenViews` of that query's
    top helpful then top harmful sequences, filled at attribution time by
    `infl_plugin.results.token_views.result_token_views`) and runs nothing through the model. Besides
    everything the base reporter logs, per query with views (at most ``max_queries``):

    * Text ``influence_tokens/query_{q:03d}``: its most helpful and most harmful training
      sequences with their most influential tokens marked;
    * Image ``influence_token_heatmaps/query_{q:03d}``: the token heatmap of the helpful ones;
    * Image ``influence_layers/query_{q:03d}``: layers × top helpful sequences (share of each
      sequence's Σ|score| per layer).

    Args:
        writer: a ``SummaryWriter`` (``None`` = no-op).
        tokenizer: renders examples as text in the base reporter's tables (a Hugging Face tokenizer).
        **kwargs: passed to `TensorBoardReporter` (``renderer`` defaults to a `TextRenderer`).
    """

    def __init__(self, writer: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("renderer", TextRenderer(tokenizer))
        super().__init__(writer, **kwargs)
        self.tokenizer = tokenizer

    def log_extra(self, result: AttributionResult, source: Optional[ExampleSource], step: int) -> None:
        for q in sorted(result.token_views):
            if q >= min(result.num_queries, self.max_queries):
                continue
            views = result.token_views[q]
            helpful = [i for i, label in enumerate(views.labels) if label.startswith("helpful")]
            head = (f"**Query {q}** (dataset index {int(result.query_indices[q])}): the {len(helpful)} most helpful "
                    f"and most harmful training sequences, their {views.top_tokens} most influential tokens marked "
                    "(**bold** = helpful, *italic* = harmful, superscript = rank).")
            if result.candidate_mode == "stream":
                head += (" Token scores are computed at this checkpoint; the tables' scores were streamed while "
                         "training on each sequence, so the two can differ.")
            head += "\n\n"
            self.add_markdown(self.tag("influence_tokens", f"query_{q:03d}"), head + views_markdown(views), step)
            if not helpful:
                continue
            helpful_views = views.subset(helpful)
            self.add_figure(self.tag("influence_token_heatmaps", f"query_{q:03d}"),
                            token_figure(helpful_views, f"query {q}: per-token influence, step {step}"), step)
            self.add_figure(self.tag("influence_layers", f"query_{q:03d}"),
                            layer_figure(helpful_views, f"query {q}: per-layer share, step {step}"), step)


__all__ = [
    "TokenReporter",
    "group_layers",
    "layer_figure",
    "layer_groups",
    "layer_heatmap_figure",
    "token_figure",
    "token_heatmap_figure",
    "clip_token",
    "strip_common_prefix",
]
