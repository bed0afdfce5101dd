"""Token- and layer-level decompositions of influence on sequences, computed at attribution time.

`Attributor.token_scores` decomposes each score exactly: ``scores[l, q, n, t]`` is the part of
training sequence n's influence on query q that flows through tracked layer l at token t
(``Σ_t Σ_l scores[l, q, n, t]`` = the sequence's score). This module turns those tensors into
`TokenViews`, plain data (CPU tensors, token strings) that a reporter renders without touching
the model (its Markdown, marking each sequence's most influential tokens, is
`infl_plugin.report.markdown.views_markdown`):

* `token_views`: one query's per-token / per-layer scores on chosen sequences;
* `result_token_views`: those views for each query's top helpful and harmful sequences of an
  `AttributionResult` (what goes into ``AttributionResult.token_views``).

Both run backward passes through the model (`Attributor.token_scores`): call them with gradients
enabled, outside inference mode and with the training hooks paused (the attribution step's
context). The figures and the TensorBoard reporter are in `infl_plugin.report.token_report`.

Tokens are plain strings, so any tokenizer works (`decode_tokens` decodes ids one by one with a
Hugging Face tokenizer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from .views import TokenViews

if TYPE_CHECKING:
    from .artifacts import AttributionResult
    from ..scoring.attributor import Attributor, PreconditionedQueries

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


# ------------------------------------------------------------------------------------ views
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
    return TokenViews(indices, totals, tokens, masks, token_scores, sequence_scores, names, labels, top_tokens)


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
    each view marking its ``top_tokens`` most influential tokens. Empty when ``sequences < 1``.

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
    "result_token_views",
    "token_views",
]
