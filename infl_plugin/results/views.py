"""`TokenViews`: one query's token- and layer-level scores of chosen training sequences, as plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class TokenViews:
    """One query's token- and layer-level views of chosen training sequences.

    ``token_scores[i]``: ``[L, T]`` per-layer per-token scores of sequence i; layers that see one
    vector per sequence (a pooled classification head) have no per-token split: their score is in
    ``sequence_scores[i]: [L]`` (zero rows in ``token_scores``). ``scores[i]`` is the total,
    ``token_scores[i].sum() + sequence_scores[i].sum()``; ``labels[i]``: its heading (e.g.
    ``"helpful #1"``); ``top_tokens``: how many of its tokens a view marks. Tensors are on the CPU.
    """

    indices: list[int]
    scores: list[float]
    tokens: list[list[str]]
    masks: list[torch.Tensor]
    token_scores: list[torch.Tensor]
    sequence_scores: list[torch.Tensor]
    layer_names: list[str]
    labels: list[str]
    top_tokens: int

    def subset(self, positions: Sequence[int]) -> "TokenViews":
        """The views of the sequences at ``positions``."""
        pick = lambda values: [values[p] for p in positions]  # noqa: E731
        return TokenViews(pick(self.indices), pick(self.scores), pick(self.tokens), pick(self.masks),
                          pick(self.token_scores), pick(self.sequence_scores), self.layer_names, pick(self.labels),
                          self.top_tokens)

    def per_token(self, i: int) -> torch.Tensor:
        """``[T]`` scores of sequence i summed over the token-level layers."""
        return self.token_scores[i].sum(0)

    def per_layer(self) -> torch.Tensor:
        """``[L, K]`` scores of the K sequences per layer (sums to ``scores``)."""
        return torch.stack([t.sum(-1) + s for t, s in zip(self.token_scores, self.sequence_scores)], dim=1)


__all__ = ["TokenViews"]
