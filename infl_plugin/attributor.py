"""`Attributor`: influence scores of training examples on queries, from fitted factors.

Score convention: ``score(q, z) = ∇f(q)ᵀ (G + λI)⁻¹ ∇L(z)`` with f the query's measurement (its
loss by default). Up-weighting z by ε moves the parameters by ``-ε (G + λI)⁻¹ ∇L(z)`` and so f by
``-ε · score``: **positive = helpful** (training on z lowers the query's loss), negative = harmful.

Queries are differentiated and preconditioned once (`precondition`), per layer
``P_q = (G + λI)⁻¹ ∇_W f(q)``: ``[Q, d_out, d_in]``, or at rank r as ``P_q ≈ U_q V_qᵀ`` with
``U: [Q, d_out, r]``, ``V: [Q, d_in, r]``. Training examples are streamed batch by batch: at full
rank a batch's per-example gradients ``DW: [B, d_out, d_in]`` are formed and contracted in one
matrix product; at low rank the score is ``Σ_t Σ_k (u_kᵀ g_t)(v_kᵀ a_t)`` and per-example
gradients are never formed. Scores decompose exactly over layers and over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from .config import InfluenceConfig
from .factors import Factors
from .hooks import Capture, LayerHooks
from .layers import select_layers
from .passes import backward_pass, isolated, model_device
from .tasks import Task, move_to_device


@dataclass
class QueryLayer:
    """One layer's preconditioned query gradients: ``full [Q, d_out, d_in]`` or ``u``/``v`` factors."""

    full: Optional[torch.Tensor] = None
    u: Optional[torch.Tensor] = None  # [Q, d_out, r], singular values folded in
    v: Optional[torch.Tensor] = None  # [Q, d_in, r]


@dataclass
class PreconditionedQueries:
    """Preconditioned query gradients per layer and the queries' measurements ``[Q]``."""

    layers: dict[str, QueryLayer]
    measurements: torch.Tensor

    def __len__(self) -> int:
        return int(self.measurements.shape[0])


@dataclass
class TopK:
    """Per query the k most helpful (largest) and most harmful (smallest) training examples.

    All four tensors are ``[Q, k]``; indices are positions in the training loader's order.
    """

    helpful_scores: torch.Tensor
    helpful_indices: torch.Tensor
    harmful_scores: torch.Tensor
    harmful_indices: torch.Tensor


Queries = Union[Iterable, PreconditionedQueries]


class Attributor:
    """Scores training examples against queries with `Factors` fitted on the same layers."""

    def __init__(self, model: nn.Module, task: Task, factors: Factors, config: Optional[InfluenceConfig] = None) -> None:
        self.model = model
        self.task = task
        self.config = config or InfluenceConfig(strategy=factors.strategy)
        self.layers = select_layers(model, self.config.modules, self.config.module_types)
        factors.check_layers(self.layers)
        self.factors = factors
        self.hooks = LayerHooks(model, self.layers)
        self.dtype = getattr(torch, self.config.accumulation_dtype)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    # ----------------------------------------------------------------------------- queries
    def precondition(self, queries: Iterable) -> PreconditionedQueries:
        """Differentiate each query's measurement and apply ``(G + λI)⁻¹`` (rank-r when configured)."""
        device = model_device(self.model)
        factors = self.factors.to(device)
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}
        measurements = []
        with self.hooks, isolated(self.model):
            for batch in queries:
                grads: dict[str, torch.Tensor] = {}
                values = backward_pass(
                    self.model, self.task, self.hooks, move_to_device(batch, device), self._summed_gradients(grads),
                    measurement=True,
                )
                measurements.append(values.to(self.dtype))
                for name in self.layer_names:
                    if name in grads:
                        chunks[name].append(factors.precondition(name, grads[name]))
                    else:
                        shape = (values.shape[0],) + tuple(self.factors.shapes[name])
                        chunks[name].append(torch.zeros(shape, dtype=self.dtype, device=device))
        if not measurements:
            raise ValueError("The query loader yielded no batch")
        layers = {name: self._compress(torch.cat(parts)) for name, parts in chunks.items()}
        return PreconditionedQueries(layers, torch.cat(measurements))

    def _compress(self, full: torch.Tensor) -> QueryLayer:
        rank = self.config.query_rank
        if rank is None or rank >= min(full.shape[-2:]):
            return QueryLayer(full=full)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        return QueryLayer(u=u[..., :rank] * s[..., None, :rank], v=vh[..., :rank, :].transpose(-1, -2))

    def _summed_gradients(self, into: dict[str, torch.Tensor]) -> Callable[[Capture], None]:
        """Sink storing per-example gradients ``DW = Σ_t g_t a_tᵀ`` ``[B, d_out, d_in]`` per layer."""

        def sink(capture: Capture) -> None:
            dw = torch.einsum("bto,bti->boi", capture.g.to(self.dtype), capture.a.to(self.dtype))
            name = capture.layer.name
            into[name] = into[name] + dw if name in into else dw

        return sink

    def _prepared(self, queries: Queries) -> PreconditionedQueries:
        return queries if isinstance(queries, PreconditionedQueries) else self.precondition(queries)

    # ----------------------------------------------------------------------------- training examples
    def _score_batch(self, pq: PreconditionedQueries, batch: Any, per_token: bool = False) -> dict[str, torch.Tensor]:
        """Per-layer scores ``[Q, B]`` (``[Q, B, T]`` when ``per_token``) of one training batch."""
        out: dict[str, torch.Tensor] = {}

        def sink(capture: Capture) -> None:
            q = pq.layers[capture.layer.name]
            a, g = capture.a.to(self.dtype), capture.g.to(self.dtype)
            if q.full is not None and not per_token:
                dw = torch.einsum("bto,bti->boi", g, a)
                value = q.full.flatten(1) @ dw.flatten(1).T
            elif q.full is not None:
                value = torch.einsum("bto,qoi,bti->qbt", g, q.full, a)
            else:
                value = (torch.einsum("bto,qor->qbtr", g, q.u) * torch.einsum("bti,qir->qbtr", a, q.v)).sum(-1)
                value = value if per_token else value.sum(-1)
            name = capture.layer.name
            out[name] = out[name] + value if name in out else value

        backward_pass(self.model, self.task, self.hooks, batch, sink)
        return out

    def iter_scores(self, queries: Queries, train: Iterable) -> Iterable[tuple[int, torch.Tensor]]:
        """Yield ``(offset, per-layer scores [L, Q, B])`` batch by batch over ``train``."""
        pq = self._prepared(queries)
        device = model_device(self.model)
        offset = 0
        with self.hooks, isolated(self.model):
            for batch in train:
                batch = move_to_device(batch, device)
                size = self.task.batch_size(batch)
                per_layer = self._score_batch(pq, batch)
                zeros = torch.zeros(len(pq), size, dtype=self.dtype, device=device)
                yield offset, torch.stack([per_layer.get(name, zeros) for name in self.layer_names])
                offset += size

    def pairwise_scores(self, queries: Queries, train: Iterable, per_layer: bool = False) -> torch.Tensor:
        """Scores ``[n_query, n_train]`` (``[n_layers, n_query, n_train]`` with ``per_layer``)."""
        parts = [scores for _, scores in self.iter_scores(queries, train)]
        if not parts:
            raise ValueError("The training loader yielded no batch")
        scores = torch.cat(parts, dim=-1)
        return scores if per_layer else scores.sum(0)

    def token_scores(self, queries: Queries, batch: Any) -> dict[str, torch.Tensor]:
        """Per-token scores of one training batch: layer name → ``[n_query, batch, tokens]``.

        ``tokens`` is the layer's own token count (a pooled classification head has 1). Summing
        over tokens gives the sequences' scores and over layers the totals, exactly. Padding
        tokens score 0.
        """
        pq = self._prepared(queries)
        device = model_device(self.model)
        with self.hooks, isolated(self.model):
            per_layer = self._score_batch(pq, move_to_device(batch, device), per_token=True)
        return {name: per_layer[name] for name in self.layer_names if name in per_layer}

    def top_k(self, queries: Queries, train: Iterable, k: int = 10) -> TopK:
        """The k most helpful and most harmful training examples per query, streamed (no full matrix)."""
        best = worst = None
        for offset, scores in self.iter_scores(queries, train):
            total = scores.sum(0)
            index = torch.arange(offset, offset + total.shape[1], device=total.device).expand_as(total)
            best = _merge_top(best, total.nan_to_num(float("-inf")), index, k, largest=True)
            worst = _merge_top(worst, total.nan_to_num(float("inf")), index, k, largest=False)
        if best is None:
            raise ValueError("The training loader yielded no batch")
        return TopK(best[0], best[1], worst[0], worst[1])

    def self_scores(self, train: Iterable) -> torch.Tensor:
        """``∇L(z)ᵀ (G + λI)⁻¹ ∇L(z)`` per training example, ``[n_train]``."""
        device = model_device(self.model)
        factors = self.factors.to(device)
        parts = []
        with self.hooks, isolated(self.model):
            for batch in train:
                grads: dict[str, torch.Tensor] = {}
                batch = move_to_device(batch, device)
                backward_pass(self.model, self.task, self.hooks, batch, self._summed_gradients(grads))
                score = torch.zeros(self.task.batch_size(batch), dtype=self.dtype, device=device)
                for name, dw in grads.items():
                    score += (dw * factors.precondition(name, dw)).flatten(1).sum(1)
                parts.append(score)
        if not parts:
            raise ValueError("The training loader yielded no batch")
        return torch.cat(parts)


def _merge_top(current, scores: torch.Tensor, index: torch.Tensor, k: int, largest: bool):
    if current is not None:
        scores = torch.cat([current[0], scores], dim=1)
        index = torch.cat([current[1], index], dim=1)
    values, pos = scores.topk(min(k, scores.shape[1]), dim=1, largest=largest)
    return values, index.gather(1, pos)
