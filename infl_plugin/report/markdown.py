"""Markdown that renders literally in TensorBoard (Python-Markdown) and on GitHub: escaping, table cells,
and token views with their most influential tokens marked."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional, Sequence

import torch

if TYPE_CHECKING:
    from ..results.views import TokenViews

_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters, the last one an ellipsis when cut."""
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
    return escape_markdown(truncate(text, max_chars) if max_chars else text)



# ------------------------------------------------------------------------------------ token views
def visible_token(piece: str) -> str:
    """Newlines and tabs as visible glyphs, other control characters dropped."""
    piece = piece.replace("\r\n", "\n").replace("\n", "↵").replace("\t", "⇥")
    return "".join(ch for ch in piece if ch.isprintable() or ch == " ")


def format_score(value: float) -> str:
    return f"{value:+.3g}"


def _marked(piece: str, rank: int, positive: bool) -> str:
    visible = visible_token(piece)
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
        pieces.append(_marked(piece, rank_of[t], scores[t] > 0) if t in rank_of else escape_markdown(visible_token(piece)))
    total = float(scores[keep].sum())
    lines = []
    if heading:
        lines += [heading, ""]
    lines += ["> " + "".join(pieces), ""]
    if positions:
        lines += ["| rank | token | position | score | share of sequence score |", "|---|---|---|---|---|"]
        for r, p in enumerate(positions, 1):
            share = float(scores[p]) / total if total != 0 else float("nan")
            token = escape_markdown(visible_token(tokens[p]).replace(" ", "␣")) or "␣"
            score = format_score(float(scores[p]))
            lines.append(f"| {r} | {token} | {p} | {score} | {share:.1%} |")
    return "\n".join(lines)


def views_markdown(views: TokenViews) -> str:
    """Every sequence of ``views`` under its heading (label, dataset index, score), its
    ``views.top_tokens`` most influential tokens marked (`mark_tokens_markdown`)."""
    blocks = []
    rows = zip(views.labels, views.indices, views.scores, views.tokens, views.masks, views.token_scores,
               views.sequence_scores)
    for label, i, total, toks, mask, ts, ss in rows:
        heading = f"**{label}** training example {i}, score {format_score(total)}"
        if float(ss.abs().sum()) > 0:
            heading += (f" ({format_score(float(ss.sum()))} of it from layers that see the whole sequence at once, "
                        "e.g. a classification head, not split over tokens)")
        blocks += [mark_tokens_markdown(toks, ts.sum(0), top=views.top_tokens, mask=mask, heading=heading), ""]
    return "\n".join(blocks)


__all__ = ["escape_markdown", "format_score", "mark_tokens_markdown", "markdown_cell", "top_token_positions", "truncate",
           "views_markdown", "visible_token"]
