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
* `token_views`: the three views for one query's top sequences, computed from an `Attributor`.

Only the standard library, torch and (for figures) matplotlib are used; tokens are plain strings,
so any tokenizer works (`decode_tokens` decodes ids one by one with a Hugging Face tokenizer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


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


def escape_markdown(text: str) -> str:
    """Backslash-escape Markdown syntax so the text renders literally."""
    return _MD_SPECIAL.sub(r"\\\1", text)


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
            token = escape_markdown(_visible(tokens[p])).replace(" ", "␣") or "␣"
            lines.append(f"| {r} | `{token.replace('`', '')}` | {p} | {_format_score(float(scores[p]))} | {share:.1%} |")
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
    if normalize:
        values = values / values.abs().sum(0, keepdim=True).clamp(min=1e-300)
    k = values.shape[1]
    fig = _figure((1.2 + 0.45 * max(k, 4), 1.0 + 0.22 * max(len(names), 4)))
    ax = fig.subplots()
    vmax = _symmetric_limit(values)
    image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
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


def token_heatmap_figure(
    rows: Sequence[Sequence[str]],
    scores: Sequence[torch.Tensor],
    row_labels: Sequence[str],
    title: str = "",
    width: int = 32,
):
    """Coloured token cells: one block per sequence, wrapped every ``width`` tokens.

    ``rows[i]`` are sequence i's tokens and ``scores[i]`` its per-token scores (``[tokens]``).
    Colours are symmetric around 0 (red = helpful, blue = harmful), scaled per sequence.
    """
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    lines: list[tuple[int, list[str], list[float]]] = []
    for i, (tokens, values) in enumerate(zip(rows, scores)):
        values = values.detach().double().cpu().tolist()
        for start in range(0, max(len(tokens), 1), width):
            lines.append((i, list(tokens[start: start + width]), values[start: start + width]))
    fig = _figure((min(0.42 * width + 1.5, 16), 0.6 + 0.28 * (len(lines) + len(rows))))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["RdBu_r"]
    y = 0.0
    previous = None
    limits = [_symmetric_limit(s.detach().double().cpu()) for s in scores]
    for i, tokens, values in lines:
        if i != previous:
            y -= 1.0
            ax.text(0, y + 0.5, row_labels[i], fontsize=7, fontweight="bold", va="center")
            y -= 0.2
            previous = i
        norm = Normalize(vmin=-limits[i], vmax=limits[i])
        for j, (token, value) in enumerate(zip(tokens, values)):
            ax.add_patch(Rectangle((j, y - 0.9), 1, 0.9, color=cmap(norm(value)), linewidth=0))
            ax.text(j + 0.5, y - 0.45, _visible(token)[:6], fontsize=5, ha="center", va="center", family="monospace")
        y -= 1.0
    ax.set_xlim(0, width)
    ax.set_ylim(y - 0.1, 0.1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ views
@dataclass
class TokenViews:
    """One query's token- and layer-level views of its top training sequences.

    ``token_scores[i]``: ``[L, T]`` per-layer per-token scores of the i-th top sequence;
    ``markdown``: one text block with every sequence marked; ``scores``: the sequences' totals
    (equal to ``token_scores[i].sum()``).
    """

    indices: list[int]
    scores: list[float]
    tokens: list[list[str]]
    masks: list[torch.Tensor]
    token_scores: list[torch.Tensor]
    layer_names: list[str]
    markdown: str

    def per_token(self, i: int) -> torch.Tensor:
        """``[T]`` scores of sequence i summed over layers."""
        return self.token_scores[i].sum(0)

    def per_layer(self) -> torch.Tensor:
        """``[L, K]`` scores of the K sequences per layer."""
        return torch.stack([s.sum(-1) for s in self.token_scores], dim=1)

    def token_figure(self, title: str = ""):
        labels = [f"#{r + 1}  train {i}  score {_format_score(s)}" for r, (i, s) in enumerate(zip(self.indices, self.scores))]
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
    heading: Optional[str] = None,
) -> TokenViews:
    """Per-token, per-layer decompositions of query ``query_index`` on training ``examples[indices]``.

    Args:
        attributor: an `infl_plugin.Attributor`.
        queries: its `PreconditionedQueries` (or a query loader; preconditioned once here).
        examples: the training set, indexable; ``collate`` turns a list of its items into a batch
            with ``input_ids`` (and ``attention_mask``).
        indices: the training indices to show (e.g. a query's top helpful ones).
        tokenizer: decodes tokens (``processing_class`` of a Trainer); ``None`` shows ids.
    """
    pq = attributor._prepared(queries) if hasattr(attributor, "_prepared") else queries
    indices = [int(i) for i in indices]
    token_scores: list[torch.Tensor] = []
    tokens: list[list[str]] = []
    masks: list[torch.Tensor] = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start: start + batch_size]
        batch = collate([examples[i] for i in chunk])
        raw = attributor.token_scores(pq, batch)
        if isinstance(raw, Mapping):  # layer name -> [Q, B, T]
            raw = torch.stack([raw[name] for name in attributor.layer_names])
        scores = raw[:, query_index]  # [L, B, T]
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        for b in range(len(chunk)):
            token_scores.append(scores[:, b].detach().double().cpu())
            tokens.append(decode_tokens(tokenizer, ids[b].tolist()))
            masks.append(mask[b].cpu())
    totals = [float(s.sum()) for s in token_scores]
    blocks = [] if heading is None else [heading, ""]
    for rank, (i, s, toks, mask, ts) in enumerate(zip(indices, totals, tokens, masks, token_scores), 1):
        blocks.append(
            mark_tokens_markdown(toks, ts.sum(0), top=top_tokens, mask=mask,
                                 heading=f"**#{rank}** training sequence {i}, score {_format_score(s)}")
        )
        blocks.append("")
    return TokenViews(indices, totals, tokens, masks, token_scores, list(attributor.layer_names), "\n".join(blocks))


__all__ = [
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
]
