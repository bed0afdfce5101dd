"""`Attributor`: influence scores of training examples on queries, from fitted factors.

Score convention: ``score(q, z) = ∇f(q)ᵀ (G + λI)⁻¹ ∇L(z)`` with f the query's measurement (its
loss by default). Up-weighting z by ε moves the parameters by ``-ε (G + λI)⁻¹ ∇L(z)`` and so f by
``-ε · score``: **positive = helpful** (training on z lowers the query's loss), negative = harmful.

Queries are differentiated and preconditioned once (`precondition`), per layer
``P_q = (G + λI)⁻¹ ∇_W f(q)``: ``[Q, d_out, d_in]``, or at rank r as ``P_q ≈ U_q V_qᵀ`` with
``U: [Q, d_out, r]``, ``V: [Q, d_in, r]``. Training examples are streamed batch by batch: at full
rank a batch's per-example gradients ``DW: [B, d_out, d_in]`` are formed and contracted in one
matrix product; at low rank the score is ``Σ_t Σ_k (u_kᵀ g_t)(v_kᵀ a_t)`` (per-example gradients
never formed) or, when that costs fewer multiply-adds (long sequences), ``U_q V_qᵀ`` is rebuilt
in bounded query chunks and contracted with ``DW``. Scores decompose exactly over layers and over
tokens. Preconditioning runs in the accumulation dtype and, with an eigenbasis, rotates the query
tokens (or gradients, whichever is cheaper) into it; rank-r queries are truncated there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from ..config.influence import InfluenceConfig
from ..errors import ConfigurationError, InputOrderError
from ..curvature.factors import Factors, LayerFactors
from ..curvature.hooks import Capture, LayerHooks
from ..curvature.layers import select_layers
from ..curvature.passes import backward_pass, isolated, model_device
from .refine import query_refiner
from ..tasks import Task, move_to_device


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

    def __init__(self, model: nn.Module, task: Task, factors: Factors, config: Optional[InfluenceConfig] = None,
                 curvature_data: Optional[Iterable] = None) -> None:
        """``config`` defaults to the factors' own (layers, dtype, query rank; another strategy raises
        `ConfigurationError`). ``curvature_data``: training batches for ``config.refine_steps``."""
        self.model, self.task, self.curvature_data = model, task, curvature_data
        self.config = config or _config_of(factors)
        if self.config.strategy != factors.strategy:
            raise ConfigurationError(
                f"InfluenceConfig.strategy is {self.config.strategy!r} but the factors were fitted with "
                f"{factors.strategy!r}; fit factors with this strategy, or pass config=None to use the factors' own"
            )
        self.layers = select_layers(model, self.config.modules, self.config.module_types)
        factors.check_layers(self.layers)
        self.factors = factors
        self.hooks = LayerHooks(model, self.layers)
        self.dtype = getattr(torch, self.config.accumulation_dtype)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    # ----------------------------------------------------------------------------- queries
    def precondition(self, queries: Iterable, curvature_batches: Optional[Iterable] = None, collective: bool = False) -> PreconditionedQueries:
        """Differentiate each query's measurement and apply ``(G + λI)⁻¹`` (rank-r when configured), refined on
        ``curvature_batches`` (or ``curvature_data``) when ``config.refine_steps`` > 0 (`infl_plugin.scoring.refine`)."""
        device = model_device(self.model)
        factors = self._device_factors(device)
        refine = query_refiner(self, curvature_batches, collective)  # None: plain preconditioning
        chunks: dict[str, list[QueryLayer]] = {name: [] for name in self.layer_names}
        # a list of batches tells the query count: preallocate (concatenating briefly doubles the largest object)
        total = sum(self.task.batch_size(b) for b in queries) if isinstance(queries, (list, tuple)) else None
        filled: dict[str, QueryLayer] = {}
        offset, measurements = 0, []
        with self.hooks, isolated(self.model):
            for batch in queries:
                grads: dict[str, torch.Tensor] = {}
                values = backward_pass(
                    self.model, self.task, self.hooks, move_to_device(batch, device),
                    self._summed_gradients(grads, factors if refine is None else None), measurement=True,
                )
                grads = grads if refine is None else refine(grads)
                measurements.append(values.to(self.dtype))
                count = values.shape[0]
                for name in self.layer_names:
                    if name in grads:  # popped: each layer's raw gradients are freed once preconditioned
                        part = self._precondition_layer(factors.layers[name], grads.pop(name))
                    else:
                        part = self._zero_query(name, count, device)
                    if total is None:
                        chunks[name].append(part)
                    else:
                        _write_queries(filled, name, part, offset, total)
                offset += count
        if not measurements:
            raise ValueError("The query loader yielded no batch")
        if total is not None:
            layers = filled
        else:  # concatenated layer by layer, releasing the chunks as it goes (one layer's copy at a time)
            layers = {name: _cat_queries(chunks.pop(name)) for name in list(chunks)}
        return PreconditionedQueries(layers, torch.cat(measurements))

    def _device_factors(self, device: torch.device) -> Factors:
        """The factors on ``device`` in the accumulation dtype (cached: preconditioning in float64
        costs twice the float32 time for no gain once the eigendecomposition is done)."""
        key = (str(device), self.dtype)
        cached = getattr(self, "_factor_cache", None)
        if cached is None or cached[0] != key or cached[1] is not self.factors:
            cast = lambda t: None if t is None else t.to(device=device, dtype=self.dtype)  # noqa: E731
            layers = {
                n: LayerFactors(cast(f.q_a), cast(f.q_s), cast(f.eigenvalues), f.damping)
                for n, f in self.factors.layers.items()
            }
            cached = (key, self.factors, Factors(self.factors.strategy, layers, self.factors.shapes, self.factors.config))
            self._factor_cache = cached
        return cached[2]

    def _low_rank(self, shape: tuple[int, ...]) -> Optional[int]:
        rank = self.config.query_rank
        return None if rank is None or rank >= min(shape[-2:]) else rank

    def _precondition_layer(self, f: LayerFactors, grad: torch.Tensor) -> QueryLayer:
        """``(G + λI)⁻¹`` of one batch of query gradients, compressed to rank r when configured.

        With an eigenbasis, ``grad`` arrives already rotated (``Q_Sᵀ DW Q_A``, see
        `_summed_gradients`); the division happens here, and at rank r the SVD is taken in the
        eigenbasis too (``Q_S``, ``Q_A`` are orthogonal, so ``svd(Q_S W Q_Aᵀ) = (Q_S U) Σ (Q_A V)ᵀ``)
        and only the r kept vectors are rotated back.
        """
        rank = self._low_rank(grad.shape)
        rotated = f.eigenvalues is not None and f.q_s is not None
        w = grad.div_(f.eigenvalues + f.damping) if rotated else f.precondition(grad)
        if rank is None:
            return QueryLayer(full=f.q_s @ w @ f.q_a.T if rotated else w)
        u, v = _truncated_svd(w, rank)
        if rotated:
            u, v = f.q_s @ u, f.q_a @ v
        return QueryLayer(u=u, v=v)

    def _zero_query(self, name: str, count: int, device: torch.device) -> QueryLayer:
        shape = (count,) + tuple(self.factors.shapes[name])
        rank = self._low_rank(shape)
        if rank is None:
            return QueryLayer(full=torch.zeros(shape, dtype=self.dtype, device=device))
        zeros = lambda d: torch.zeros(count, d, rank, dtype=self.dtype, device=device)  # noqa: E731
        return QueryLayer(u=zeros(shape[1]), v=zeros(shape[2]))

    def _summed_gradients(self, into: dict[str, torch.Tensor], factors: Optional[Factors] = None) -> Callable[[Capture], None]:
        """Sink storing per-example gradients ``DW = Σ_t g_t a_tᵀ`` ``[B, d_out, d_in]`` per layer.

        With ``factors`` holding an eigenbasis (kfac/ekfac) it stores ``Q_Sᵀ DW Q_A`` instead,
        rotating the tokens first when that is cheaper (``T (d_out² + d_in²) < d_out d_in (d_out + d_in)``).
        (Preconditioning here, inside the backward, measured a higher peak RSS than after it.)
        """

        def sink(capture: Capture) -> None:
            a, g = capture.a.to(self.dtype), capture.g.to(self.dtype)
            name = capture.layer.name
            f = None if factors is None else factors.layers[name]
            if f is not None and f.eigenvalues is not None and f.q_s is not None:
                d_out, d_in = g.shape[-1], a.shape[-1]
                if a.shape[1] * (d_out * d_out + d_in * d_in) < d_out * d_in * (d_out + d_in):
                    dw = torch.einsum("bto,bti->boi", g @ f.q_s, a @ f.q_a)
                else:
                    dw = f.q_s.T @ torch.einsum("bto,bti->boi", g, a) @ f.q_a
            else:
                dw = torch.einsum("bto,bti->boi", g, a)
            into[name] = into[name] + dw if name in into else dw

        return sink

    def _prepared(self, queries: Queries) -> PreconditionedQueries:
        return queries if isinstance(queries, PreconditionedQueries) else self.precondition(queries)

    # ----------------------------------------------------------------------------- training examples
    def _score_batch(self, pq: PreconditionedQueries, batch: Any, per_token: bool = False) -> dict[str, torch.Tensor]:
        """Per-layer scores ``[Q, B]`` (``[Q, B, T]`` when ``per_token``) of one training batch."""
        out: dict[str, torch.Tensor] = {}

        def sink(capture: Capture) -> None:
            name = capture.layer.name
            value = contract(pq.layers[name], capture.a.to(self.dtype), capture.g.to(self.dtype), per_token)
            out[name] = out[name] + value if name in out else value

        backward_pass(self.model, self.task, self.hooks, batch, sink)
        return out

    def iter_scores(self, queries: Queries, train: Iterable) -> Iterable[tuple[int, torch.Tensor]]:
        """Yield ``(offset, per-layer scores [L, Q, B])`` batch by batch over ``train``.

        ``train`` must yield the examples in a fixed order (score columns are positions in it): a
        shuffling ``DataLoader`` raises `InputOrderError`.
        """
        require_fixed_order(train)
        pq = self._prepared(queries)
        device, offset = model_device(self.model), 0
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
        """``∇L(z)ᵀ (G + λI)⁻¹ ∇L(z)`` per training example, ``[n_train]`` (``train`` in a fixed order)."""
        require_fixed_order(train)
        device = model_device(self.model)
        factors = self._device_factors(device)
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


def _config_of(factors: Factors) -> InfluenceConfig:
    """The configuration saved with ``factors`` (fields this version does not know are ignored)."""
    known = {f.name for f in fields(InfluenceConfig)}
    saved = {k: v for k, v in (factors.config or {}).items() if k in known}
    saved["strategy"] = factors.strategy
    return InfluenceConfig(**saved)


_SHUFFLING_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def require_fixed_order(loader: Iterable) -> None:
    """Raise `InputOrderError` when ``loader`` is a ``DataLoader`` that shuffles (a random sampler,
    or a ``DistributedSampler`` with ``shuffle=True``): scores are reported by position."""
    if not isinstance(loader, DataLoader):
        return
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    for sampler in samplers:
        if isinstance(sampler, _SHUFFLING_SAMPLERS) or (isinstance(sampler, DistributedSampler) and sampler.shuffle):
            raise InputOrderError(
                f"The training loader shuffles ({type(sampler).__name__}): score columns must follow the data set's "
                "order. Pass a loader with shuffle=False (e.g. DataLoader(dataset, batch_size=..., shuffle=False))"
            )


_CHUNK_ELEMENTS = 1 << 24  # bound on a reconstructed chunk of rank-r queries: 16M elements (64 MiB in float32)


def contract(query: QueryLayer, a: torch.Tensor, g: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Scores ``<P_q, DW_b>`` of one layer call: ``[Q, B]`` (``[Q, B, T]`` when ``per_token``).

    ``a: [B, T, d_in]`` and ``g: [B, T, d_out]`` are the call's activations and output gradients
    (in the query's dtype); ``DW_b = Σ_t g_{b,t} a_{b,t}ᵀ``. Full-rank queries contract with the
    formed ``DW`` (one matrix product); rank-r queries take the cheaper of the token path
    ``Σ_t Σ_k (u_kᵀ g_t)(v_kᵀ a_t)`` and rebuilding ``U_q V_qᵀ`` in bounded query chunks. The one
    implementation of the contraction: checkpoint scoring and streaming both call it.
    """
    if query.full is not None and not per_token:
        dw = torch.einsum("bto,bti->boi", g, a)
        return query.full.flatten(1) @ dw.flatten(1).T
    if query.full is not None:
        return torch.einsum("bto,qoi,bti->qbt", g, query.full, a)
    if per_token or not _reconstruct_cheaper(query, a.shape[0], a.shape[1]):
        value = (torch.einsum("bto,qor->qbtr", g, query.u) * torch.einsum("bti,qir->qbtr", a, query.v)).sum(-1)
        return value if per_token else value.sum(-1)
    dw = torch.einsum("bto,bti->boi", g, a).flatten(1).T
    step = max(1, _CHUNK_ELEMENTS // dw.shape[0])
    return torch.cat([
        (query.u[s: s + step] @ query.v[s: s + step].transpose(-1, -2)).flatten(1) @ dw
        for s in range(0, query.u.shape[0], step)
    ])


def _reconstruct_cheaper(q: QueryLayer, batch: int, tokens: int) -> bool:
    """Whether ``⟨U_q V_qᵀ, DW_b⟩`` via rebuilding ``U_q V_qᵀ`` (in bounded query chunks) and forming
    ``DW`` costs fewer multiply-adds than the token path ``Σ_t (U_qᵀ g_t)·(V_qᵀ a_t)``."""
    n, d_out, rank = q.u.shape
    d_in = q.v.shape[1]
    tokens_path = n * batch * tokens * rank * (d_out + d_in)
    rebuild_path = batch * tokens * d_out * d_in + n * d_out * d_in * (rank + batch)
    return rebuild_path < tokens_path


def _truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``w ≈ u vᵀ`` (singular values folded into ``u``) of ``w: [..., m, n]``.

    Through the eigendecomposition of the smaller Gram matrix in float64 (``m·n²`` + ``n³``
    instead of a full SVD, several times faster on CPU); float64 keeps the kept singular
    vectors as accurate as ``torch.linalg.svd``'s.
    """
    transpose = w.shape[-2] < w.shape[-1]
    x = (w.transpose(-1, -2) if transpose else w).double()  # [..., m, n], m >= n
    evals, evecs = torch.linalg.eigh(x.transpose(-1, -2) @ x)  # ascending
    right = evecs[..., -rank:].flip(-1)  # [..., n, r]
    left_scaled = x @ right  # [..., m, r] = U_r Σ_r
    if transpose:  # w = xᵀ = right Σ U_rᵀ
        sigma = evals[..., -rank:].flip(-1).clamp_min(0).sqrt()
        u = right * sigma.unsqueeze(-2)
        v = left_scaled / sigma.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-2)
    else:
        u, v = left_scaled, right
    return u.to(w.dtype), v.to(w.dtype)


def _write_queries(filled: dict[str, QueryLayer], name: str, part: QueryLayer, offset: int, total: int) -> None:
    """Copy one batch's ``part`` into rows ``offset:`` of ``filled[name]`` (allocated on first use)."""
    fields = ("full",) if part.full is not None else ("u", "v")
    if name not in filled:
        filled[name] = QueryLayer(**{
            f: getattr(part, f).new_empty((total,) + tuple(getattr(part, f).shape[1:])) for f in fields
        })
    for f in fields:
        value = getattr(part, f)
        getattr(filled[name], f)[offset: offset + value.shape[0]] = value


def _cat_queries(parts: list[QueryLayer]) -> QueryLayer:
    if parts[0].full is not None:
        return QueryLayer(full=torch.cat([p.full for p in parts]))
    return QueryLayer(u=torch.cat([p.u for p in parts]), v=torch.cat([p.v for p in parts]))


def _merge_top(current, scores: torch.Tensor, index: torch.Tensor, k: int, largest: bool):
    if current is not None:
        scores, index = torch.cat([current[0], scores], dim=1), torch.cat([current[1], index], dim=1)
    values, pos = scores.topk(min(k, scores.shape[1]), dim=1, largest=largest)
    return values, index.gather(1, pos)
