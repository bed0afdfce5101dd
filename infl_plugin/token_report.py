"""Token-level and layer-level views of influence on sequences.

`Attributor.token_scores` decomposes each score exactly: ``scores[l, q, n, t]`` is the part of
training sequence n's influence on query q that flows through tracked layer l at token t
(``Σ_t Σ_l scores[l, q, n, t]`` = the sequence's score). This module turns those tensors into
things people can read:

* `mark_tokens_markdown`: a sequence rendered as text with its most influential tokens marked
  (**bold** = helpful, *italic* = harmful, superscript = rank) and a table of those tokens;
* `token_heatmap_figure`: one row of coloured token cells per top sequence;
* `layer_heatmap_figure`: layers × top sequences, each column a sequence's score split over the
  tracked layers (the paper's layer-wise figure);
* `token_views`: the per-token / per-layer scores of one query's chosen sequences, from an
  `Attributor`, with the markdown and both figures;
* `TokenReporter`: a `TensorBoardReporter` that logs these views for each query's top sequences
  next to the base reporter's tables and plots (used by the Hugging Face callback).

Tokens are plain strings, so any tokenizer works (`decode_tokens` decodes ids one by one with a
Hugging Face tokenizer). Figures are pyplot-free matplotlib figures.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .artifacts import AttributionResult
from .reporting import TensorBoardReporter, TextRenderer, escape_markdown

_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


# ------------------------------------------------------------------------------------ tokens
def decode_tokens(tokenizer: Any, input_ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own (so the pieces concatenate to the text), or ``"⟨id⟩"`` without a tokenizer."""
    ids = [int(i) for i in input_ids]
    if tokenizer is None:
        return [f"⟨{i}⟩" for i in ids]
    out = []
    for i in ids:
        try:
            out.append(tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        except Exception:  # noqa: BLE001 - a display helper never fails on an odd tokenizer
            out.append(f"⟨{i}⟩")
    return out


def _visible(piece: str) -> str:
    """Newlines and tabs as visible glyphs, other control characters dropped."""
    piece = piece.replace("\r\n", "\n").replace("\n", "↵").replace("\t", "⇥")
    return "".join(ch for ch in piece if ch.isprintable() or ch == " ")


def _format_score(value: float) -> str:
    return f"{value:+.3g}"


def _marked(piece: str, rank: int, positive: bool) -> str:
    visible = _visible(piece)
    core = visible.strip(" ")
    lead = visible[: len(visible) - len(visible.lstrip(" "))]
    trail = visible[len(visible.rstrip(" ")):]
    core = escape_markdown(core) if core else "␣"
    mark = "**" if positive else "*"
    return f"{lead}{mark}{core}{mark}{str(rank).translate(_SUPERSCRIPT)}{trail}"


def top_token_positions(scores: torch.Tensor, top: int, mask: Optional[torch.Tensor] = None) -> list[int]:
    """Positions of the ``top`` largest ``|scores|`` among real tokens, by decreasing magnitude."""
    values = scores.detach().double().abs().cpu()
    if mask is not None:
        values = values.masked_fill(~mask.bool().cpu(), -1.0)
    order = torch.argsort(values, descending=True, stable=True).tolist()
    return [p for p in order[:top] if values[p] > 0]


def mark_tokens_markdown(
    tokens: Sequence[str],
    scores: torch.Tensor,
    top: int = 8,
    mask: Optional[torch.Tensor] = None,
    heading: Optional[str] = None,
) -> str:
    """Markdown for one sequence with its ``top`` most influential tokens marked.

    Args:
        tokens: the sequence's tokens as strings (concatenated they read as the text).
        scores: ``[tokens]`` per-token influence (summing to the sequence's score).
        top: how many tokens to mark (largest ``|score|``).
        mask: ``[tokens]`` real-token mask; padding is not shown.
        heading: optional first line (e.g. ``"#3 train 1207 score +2.1e+03"``).

    Helpful tokens (score > 0) are **bold**, harmful ones *italic*; the superscript is the rank.
    A table below lists the marked tokens with their position, score and share of the total.
    """
    scores = scores.detach().double().cpu()
    if len(tokens) != scores.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but {scores.shape[0]} scores")
    keep = torch.ones(len(tokens), dtype=torch.bool) if mask is None else mask.bool().cpu()
    positions = top_token_positions(scores, top, keep)
    rank_of = {p: r + 1 for r, p in enumerate(positions)}
    pieces = []
    for t, piece in enumerate(tokens):
        if not keep[t]:
            continue
        pieces.append(_marked(piece, rank_of[t], scores[t] > 0) if t in rank_of else escape_markdown(_visible(piece)))
    total = float(scores[keep].sum())
    lines = []
    if heading:
        lines += [heading, ""]
    lines += ["> " + "".join(pieces), ""]
    if positions:
        lines += ["| rank | token | position | score | share of sequence score |", "|---|---|---|---|---|"]
        for r, p in enumerate(positions, 1):
            share = float(scores[p]) / total if total != 0 else float("nan")
            token = escape_markdown(_visible(tokens[p]).replace(" ", "␣")) or "␣"
            score = _format_score(float(scores[p]))
            lines.append(f"| {r} | {token} | {p} | {score} | {share:.1%} |")
    return "\n".join(lines)


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
    visible = _visible(token).strip(" ") or "␣"
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


# ------------------------------------------------------------------------------------ views
@dataclass
class TokenViews:
    """One query's token- and layer-level views of chosen training sequences.

    ``token_scores[i]``: ``[L, T]`` per-layer per-token scores of sequence i; layers that see one
    vector per sequence (a pooled classification head) have no per-token split: their score is in
    ``sequence_scores[i]: [L]`` (zero rows in ``token_scores``). ``scores[i]`` is the total,
    ``token_scores[i].sum() + sequence_scores[i].sum()``; ``markdown``: every sequence marked.
    """

    indices: list[int]
    scores: list[float]
    tokens: list[list[str]]
    masks: list[torch.Tensor]
    token_scores: list[torch.Tensor]
    sequence_scores: list[torch.Tensor]
    layer_names: list[str]
    markdown: str

    def subset(self, positions: Sequence[int]) -> "TokenViews":
        """The views of the sequences at ``positions`` (markdown is not recomputed)."""
        pick = lambda values: [values[p] for p in positions]  # noqa: E731
        return TokenViews(pick(self.indices), pick(self.scores), pick(self.tokens), pick(self.masks),
                          pick(self.token_scores), pick(self.sequence_scores), self.layer_names, self.markdown)

    def per_token(self, i: int) -> torch.Tensor:
        """``[T]`` scores of sequence i summed over the token-level layers."""
        return self.token_scores[i].sum(0)

    def per_layer(self) -> torch.Tensor:
        """``[L, K]`` scores of the K sequences per layer (sums to ``scores``)."""
        return torch.stack([t.sum(-1) + s for t, s in zip(self.token_scores, self.sequence_scores)], dim=1)

    def token_figure(self, title: str = ""):
        labels = [f"#{r}  train {i}  score {_format_score(s)}"
                  for r, (i, s) in enumerate(zip(self.indices, self.scores), 1)]
        rows = [[t for t, m in zip(tokens, mask.tolist()) if m] for tokens, mask in zip(self.tokens, self.masks)]
        values = [self.per_token(i)[self.masks[i].bool()] for i in range(len(self.indices))]
        return token_heatmap_figure(rows, values, labels, title=title)

    def layer_figure(self, title: str = ""):
        labels = [f"{i} ({_format_score(s)})" for i, s in zip(self.indices, self.scores)]
        return layer_heatmap_figure(self.per_layer(), self.layer_names, labels, title=title)


def token_views(
    attributor: Any,
    queries: Any,
    query_index: int,
    examples: Sequence[Any],
    indices: Sequence[int],
    collate: Callable[[list], Any],
    tokenizer: Any = None,
    top_tokens: int = 8,
    batch_size: int = 8,
    labels: Optional[Sequence[str]] = None,
) -> TokenViews:
    """Per-token, per-layer decompositions of query ``query_index``'s score on ``examples``.

    Args:
        attributor: an `infl_plugin.Attributor`.
        queries: its `PreconditionedQueries` (or a query loader, preconditioned here).
        examples: the training examples to show (e.g. a query's top helpful ones); ``collate``
            turns a list of them into a batch with ``input_ids`` (and ``attention_mask``).
        indices: their dataset positions (shown in headings).
        tokenizer: decodes tokens (a Trainer's ``processing_class``); ``None`` shows ids.
        labels: a heading prefix per example (default ``"#rank"``).
    """
    pq = queries if hasattr(queries, "layers") else attributor.precondition(queries)
    examples, indices = list(examples), [int(i) for i in indices]
    if len(examples) != len(indices):
        raise ValueError(f"{len(examples)} examples but {len(indices)} indices")
    names = list(attributor.layer_names)
    token_scores: list[torch.Tensor] = []
    sequence_scores: list[torch.Tensor] = []
    tokens: list[list[str]] = []
    masks: list[torch.Tensor] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start: start + batch_size])
        ids = batch["input_ids"]
        per_token, per_sequence = _split_layers(attributor.token_scores(pq, batch), names, query_index, ids.shape)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        for b in range(ids.shape[0]):
            token_scores.append(per_token[:, b])
            sequence_scores.append(per_sequence[:, b])
            tokens.append(decode_tokens(tokenizer, ids[b].tolist()))
            masks.append(mask[b].cpu())
    totals = [float(t.sum() + s.sum()) for t, s in zip(token_scores, sequence_scores)]
    labels = list(labels) if labels is not None else [f"#{r}" for r in range(1, len(indices) + 1)]
    blocks = []
    rows = zip(labels, indices, totals, tokens, masks, token_scores, sequence_scores)
    for label, i, total, toks, mask, ts, ss in rows:
        heading = f"**{label}** training example {i}, score {_format_score(total)}"
        if float(ss.abs().sum()) > 0:
            heading += (f" ({_format_score(float(ss.sum()))} of it from layers that see the whole sequence at once, "
                        "e.g. a classification head, not split over tokens)")
        blocks += [mark_tokens_markdown(toks, ts.sum(0), top=top_tokens, mask=mask, heading=heading), ""]
    return TokenViews(indices, totals, tokens, masks, token_scores, sequence_scores, names, "\n".join(blocks))


def _split_layers(raw: Any, names: Sequence[str], query: int, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Attributor token scores → ``([L, B, T], [L, B])``: per-token layers and one-vector-per-sequence layers."""
    if not isinstance(raw, Mapping):  # a stacked [L, Q, B, T] tensor
        raw = dict(zip(names, raw))
    batch, length = shape
    per_token = torch.zeros(len(names), batch, length, dtype=torch.float64)
    per_sequence = torch.zeros(len(names), batch, dtype=torch.float64)
    for l, name in enumerate(names):
        value = raw.get(name)
        if value is None:  # the layer took no part in this batch's forward
            continue
        value = value[query].detach().double().cpu()  # [B, T_layer]
        if value.shape[-1] == length:
            per_token[l] = value
        else:
            per_sequence[l] = value.sum(-1)
    return per_token, per_sequence


# ------------------------------------------------------------------------------------ reporter
class TokenReporter(TensorBoardReporter):
    """`TensorBoardReporter` that adds token- and layer-level views of each query's top sequences.

    Besides everything the base reporter logs, per query (at most ``token_queries``):

    * Text ``influence_tokens/query_{q:03d}``: its ``sequences`` most helpful and most harmful
      training sequences with their ``top_tokens`` most influential tokens marked;
    * Image ``influence_token_heatmaps/query_{q:03d}``: the token heatmap of the helpful ones;
    * Image ``influence_layers/query_{q:03d}``: layers × top helpful sequences (share of each
      sequence's Σ|score| per layer).

    Args:
        writer: a ``SummaryWriter`` (``None`` = no-op).
        tokenizer: decodes token ids (a Hugging Face tokenizer); also renders examples as text.
        collate_fn: turns a list of dataset examples into a model batch.
        sequences, top_tokens, token_queries: sizes of the views (see above).
        **kwargs: passed to `TensorBoardReporter` (``renderer`` defaults to a `TextRenderer`).

    ``session`` (an `InfluenceSession`) must be set before the first ``log``: the views reuse its
    last attributor and preconditioned queries, and run inside its ``quiet()`` (training hooks
    paused) with gradients enabled.
    """

    def __init__(self, writer: Any = None, tokenizer: Any = None, collate_fn: Optional[Callable[[list], Any]] = None,
                 sequences: int = 3, top_tokens: int = 8, token_queries: int = 8, **kwargs: Any) -> None:
        kwargs.setdefault("renderer", TextRenderer(tokenizer))
        super().__init__(writer, **kwargs)
        self.tokenizer = tokenizer
        self.collate_fn = collate_fn
        self.sequences = sequences
        self.top_tokens = top_tokens
        self.token_queries = token_queries
        self.session: Any = None

    def log_extra(self, result: AttributionResult, source: Any, step: int) -> None:
        session = self.session
        if session is None or self.collate_fn is None or source is None or self.sequences < 1:
            return
        attributor, pq = session.last_attributor, session.last_queries
        if attributor is None or pq is None:
            return
        n = min(self.sequences, result.top_k)
        with session.quiet(), torch.inference_mode(False), torch.enable_grad():
            for q in range(min(result.num_queries, self.max_queries, self.token_queries)):
                helpful = [int(i) for i in result.helpful_indices[q, :n]]
                harmful = [int(i) for i in result.harmful_indices[q, :n]]
                indices = helpful + harmful
                examples = [source.candidate_example(i) for i in indices]
                labels = [f"helpful #{r}" for r in range(1, n + 1)] + [f"harmful #{r}" for r in range(1, n + 1)]
                views = token_views(attributor, pq, q, examples, indices, self.collate_fn, self.tokenizer,
                                    top_tokens=self.top_tokens, labels=labels)
                head = (f"**Query {q}** (dataset index {int(result.query_indices[q])}): the {n} most helpful and "
                        f"most harmful training sequences, their {self.top_tokens} most influential tokens marked "
                        "(**bold** = helpful, *italic* = harmful, superscript = rank).")
                if result.candidate_mode == "stream":
                    head += (" Token scores are computed at this checkpoint; the tables' scores were streamed while "
                             "training on each sequence, so the two can differ.")
                head += "\n\n"
                self.add_markdown(self.tag("influence_tokens", f"query_{q:03d}"), head + views.markdown, step)
                helpful_views = views.subset(range(n))
                self.add_figure(self.tag("influence_token_heatmaps", f"query_{q:03d}"),
                                helpful_views.token_figure(f"query {q}: per-token influence, step {step}"), step)
                self.add_figure(self.tag("influence_layers", f"query_{q:03d}"),
                                helpful_views.layer_figure(f"query {q}: per-layer share, step {step}"), step)


__all__ = [
    "TokenReporter",
    "TokenViews",
    "decode_tokens",
    "escape_markdown",
    "group_layers",
    "layer_groups",
    "layer_heatmap_figure",
    "mark_tokens_markdown",
    "token_heatmap_figure",
    "token_views",
    "top_token_positions",
    "clip_token",
    "strip_common_prefix",
]
