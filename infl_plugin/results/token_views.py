"""Token- and layer-level decompositions of influence on sequences, computed at attribution time.

`Attributor.token_scores` decomposes each score exactly: ``scores[l, q, n, t]`` is the part of
training sequence n's influence on query q that flows through tracked layer l at token t
(``Σ_t Σ_l scores[l, q, n, t]`` = the sequence's score). This module turns those tensors into
`TokenViews`, plain data (CPU tensors, token strings, markdown) that a reporter renders without
touching the model:

* `token_views`: one query's per-token / per-layer scores on chosen sequences, with markdown that
  marks each sequence's most influential tokens (`mark_tokens_markdown`);
* `result_token_views`: those views for each query's top helpful and harmful sequences of an
  `AttributionResult` (what goes into ``AttributionResult.token_views``).

Both run backward passes through the model (`Attributor.token_scores`): call them with gradients
enabled, outside inference mode and with the training hooks paused (the attribution step's
context). The figures and the TensorBoard reporter are in `infl_plugin.token_report`.

Tokens are plain strings, so any tokenizer works (`decode_tokens` decodes ids one by one with a
Hugging Face tokenizer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from ..report.tensorboard import escape_markdown

if TYPE_CHECKING:
    from .artifacts import AttributionResult
    from ..scoring.attributor import Attributor, PreconditionedQueries

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


# ------------------------------------------------------------------------------------ views
@dataclass
class TokenViews:
    """One query's token- and layer-level views of chosen training sequences.

    ``token_scores[i]``: ``[L, T]`` per-layer per-token scores of sequence i; layers that see one
    vector per sequence (a pooled classification head) have no per-token split: their score is in
    ``sequence_scores[i]: [L]`` (zero rows in ``token_scores``). ``scores[i]`` is the total,
    ``token_scores[i].sum() + sequence_scores[i].sum()``; ``markdown``: every sequence under its
    heading (``labels[i]``, e.g. ``"helpful #1"``) with its ``top_tokens`` most influential tokens
    marked. Tensors are on the CPU.
    """

    indices: list[int]
    scores: list[float]
    tokens: list[list[str]]
    masks: list[torch.Tensor]
    token_scores: list[torch.Tensor]
    sequence_scores: list[torch.Tensor]
    layer_names: list[str]
    markdown: str
    labels: list[str]
    top_tokens: int

    def subset(self, positions: Sequence[int]) -> "TokenViews":
        """The views of the sequences at ``positions`` (markdown is not recomputed)."""
        pick = lambda values: [values[p] for p in positions]  # noqa: E731
        return TokenViews(pick(self.indices), pick(self.scores), pick(self.tokens), pick(self.masks),
                          pick(self.token_scores), pick(self.sequence_scores), self.layer_names, self.markdown,
                          pick(self.labels), self.top_tokens)

    def per_token(self, i: int) -> torch.Tensor:
        """``[T]`` scores of sequence i summed over the token-level layers."""
        return self.token_scores[i].sum(0)

    def per_layer(self) -> torch.Tensor:
        """``[L, K]`` scores of the K sequences per layer (sums to ``scores``)."""
        return torch.stack([t.sum(-1) + s for t, s in zip(self.token_scores, self.sequence_scores)], dim=1)


def token_views(
    attributor: Attributor,
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

    Runs backward passes: call it with gradients enabled, outside inference mode and with the
    training hooks paused (see the module docstring).
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
        heading = f"**{label}** training example {i}, score {format_score(total)}"
        if float(ss.abs().sum()) > 0:
            heading += (f" ({format_score(float(ss.sum()))} of it from layers that see the whole sequence at once, "
                        "e.g. a classification head, not split over tokens)")
        blocks += [mark_tokens_markdown(toks, ts.sum(0), top=top_tokens, mask=mask, heading=heading), ""]
    return TokenViews(indices, totals, tokens, masks, token_scores, sequence_scores, names, "\n".join(blocks),
                      labels, top_tokens)


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


def result_token_views(
    attributor: Attributor,
    queries: PreconditionedQueries,
    result: AttributionResult,
    candidate_example: Callable[[int], Any],
    collate_fn: Callable[[list], Any],
    tokenizer: Any = None,
    sequences: int = 3,
    top_tokens: int = 8,
    token_queries: int = 8,
    batch_size: int = 8,
) -> dict[int, TokenViews]:
    """Token views of each query's top sequences in ``result``: query position → `TokenViews`.

    For each of the first ``token_queries`` queries, its ``min(sequences, result.top_k)`` most
    helpful then as many most harmful candidates (labels ``"helpful #r"`` / ``"harmful #r"``),
    each with its ``top_tokens`` most influential tokens marked. Empty when ``sequences < 1``.

    Args:
        attributor: the `Attributor` that scored ``result`` (same factors, same model state).
        queries: its `PreconditionedQueries` (query position q = row q of ``result.scores``).
        result: the attribution; its ``helpful_indices`` / ``harmful_indices`` are dataset positions.
        candidate_example: dataset position → training example (`ExampleSource.candidate_example`).
        collate_fn: a list of examples → a batch with ``input_ids`` (and ``attention_mask``).
        tokenizer: decodes tokens; ``None`` shows ids.

    Runs ``2 · min(sequences, top_k)`` sequences' backward passes per query through the model:
    call it where the attribution runs, with gradients enabled, outside inference mode, with the
    training hooks paused and the RNG forked, before the result reaches a reporter.
    """
    if sequences < 1:
        return {}
    n = min(sequences, result.top_k)
    labels = [f"helpful #{r}" for r in range(1, n + 1)] + [f"harmful #{r}" for r in range(1, n + 1)]
    views: dict[int, TokenViews] = {}
    for q in range(min(result.num_queries, token_queries)):
        indices = [int(i) for i in result.helpful_indices[q, :n]] + [int(i) for i in result.harmful_indices[q, :n]]
        examples = [candidate_example(i) for i in indices]
        views[q] = token_views(attributor, queries, q, examples, indices, collate_fn, tokenizer,
                               top_tokens=top_tokens, batch_size=batch_size, labels=labels)
    return views


__all__ = [
    "TokenViews",
    "decode_tokens",
    "format_score",
    "mark_tokens_markdown",
    "result_token_views",
    "token_views",
    "top_token_positions",
    "visible_token",
]
