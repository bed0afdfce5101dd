"""Streaming attribution: per-example scores from the training backward itself.

The training backward already produces, for every example n of a micro-batch and every tracked
layer, the activations ``a_n: [T, d_in]`` and output gradients ``g_n: [T, d_out]`` whose product
``DW_n = Σ_t g_{n,t} a_{n,t}ᵀ`` is the example's gradient. With the queries' preconditioned
gradients ``P_q`` held fixed (`PreconditionedQueries`), the score of n on q is
``Σ_layers <P_q, DW_n>``: a contraction per layer, no extra forward or backward.

`StreamingScorer` is the hook sink doing that contraction (`attributor.contract`, the same code
checkpoint scoring runs) and the accumulator of the results; `StreamedScores` is what it hands
out: per dataset index the scores summed over the example's visits, and per layer the Σ|score|
over the scored example visits (the per-layer view checkpoint scoring reports as layer shares).

Per layer the scorer picks the cheaper route for the layer's shape, token count T, batch B and Q
queries: full-rank queries always contract with the formed ``DW_n`` (``B·T·d_out·d_in`` to form
them, what the weight gradient costs, plus ``B·Q·d_out·d_in``); rank-r queries either stay
factored (``B·T·Q·r·(d_out + d_in)``, per-example gradients never formed) or, when forming
``DW_n`` is cheaper for that layer, are rebuilt once per query refresh into ``[Q, d_out, d_in]``
(within a memory budget) and take the full-rank route.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from ...distributed import collective_device
from ..attributor import PreconditionedQueries, QueryLayer, contract
from ...curvature.hooks import Capture
from ...curvature.layers import TrackedLayer

Scalar = Union[float, torch.Tensor]
PRECONDITIONINGS = ("identity", "diagonal", "kfac", "ekfac")
RANK = {name: rank for rank, name in enumerate(PRECONDITIONINGS)}  # how well each preconditions


@dataclass
class StreamedScores:
    """Streamed scores of the examples seen since the last reset.

    ``indices: LongTensor[M]`` (sorted, unique dataset indices), ``scores: [Q, M]`` (float64,
    summed over the visits of each example, times the per-step weights when used),
    ``visits: LongTensor[M]`` (how many scored training steps each example took part in) and
    ``batches``: the number of scored micro-batches per query preconditioning (``"ekfac"``,
    ``"kfac"``, ``"diagonal"`` or ``"identity"``: plain gradient dot products, used before any
    curvature statistics exist). ``layer_abs: [L, Q]`` (float64, ``None`` when nothing was
    scored): per layer of ``layer_names`` (network order), Σ over the scored example visits of
    |the layer's score| (each visit's score summed over the layer's calls first, times the
    step's weight) — what `reporting.layer_shares` turns into per-layer shares.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    visits: torch.Tensor
    batches: dict[str, int] = field(default_factory=dict)
    layer_names: list[str] = field(default_factory=list)
    layer_abs: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        expected = (len(self.layer_names), self.num_queries)
        if self.layer_abs is not None and tuple(self.layer_abs.shape) != expected:
            raise ValueError(f"layer_abs has shape {tuple(self.layer_abs.shape)}, expected [layers, queries] = "
                             f"{list(expected)}")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def num_queries(self) -> int:
        return int(self.scores.shape[0])

    @property
    def preconditioned(self) -> bool:
        """Whether every scored batch used curvature (no gradient-dot-product fallback)."""
        return bool(self.batches) and "identity" not in self.batches

    def dense(self, n: int) -> torch.Tensor:
        """Scores as ``[Q, n]`` with zeros for examples never scored (indices must be < n)."""
        if len(self) and int(self.indices.max()) >= n:
            raise ValueError(f"StreamedScores hold index {int(self.indices.max())}, beyond n={n}")
        out = torch.zeros(self.num_queries, n, dtype=self.scores.dtype, device=self.scores.device)
        out[:, self.indices] = self.scores
        return out

    def dense_visits(self, n: int) -> torch.Tensor:
        """Visit counts as ``LongTensor[n]`` (zeros for examples never scored)."""
        out = torch.zeros(n, dtype=torch.long, device=self.visits.device)
        out[self.indices] = self.visits
        return out

    def to(self, device: Union[str, torch.device]) -> "StreamedScores":
        layer_abs = None if self.layer_abs is None else self.layer_abs.to(device)
        return StreamedScores(self.indices.to(device), self.scores.to(device), self.visits.to(device),
                              dict(self.batches), list(self.layer_names), layer_abs)

    @staticmethod
    def empty(num_queries: int, device: Union[str, torch.device] = "cpu",
              layer_names: Sequence[str] = ()) -> "StreamedScores":
        return StreamedScores(torch.zeros(0, dtype=torch.long, device=device),
                              torch.zeros(num_queries, 0, dtype=torch.float64, device=device),
                              torch.zeros(0, dtype=torch.long, device=device), layer_names=list(layer_names))

    @staticmethod
    def merge(parts: Sequence["StreamedScores"]) -> "StreamedScores":
        """One result from several (processes, intervals): scores and visits of equal indices add,
        and so do the per-layer sums (the parts naming layers must name the same ones)."""
        if not parts:
            raise ValueError("StreamedScores.merge needs at least one part")
        named = [p.layer_names for p in parts if p.layer_names]
        if any(names != named[0] for names in named):
            raise ValueError(f"StreamedScores.merge needs the same layers in every part, got {named}")
        sums = [p.layer_abs for p in parts if p.layer_abs is not None]
        layer_abs = None
        if sums:
            layer_abs = sums[0].clone()
            for extra in sums[1:]:
                layer_abs += extra.to(layer_abs.device)
        batches: dict[str, int] = {}
        for part in parts:
            for name, count in part.batches.items():
                batches[name] = batches.get(name, 0) + count
        indices = torch.cat([p.indices for p in parts])
        scores = torch.cat([p.scores for p in parts], dim=1)
        visits = torch.cat([p.visits for p in parts])
        merged = _combine(indices, scores, visits)
        return StreamedScores(*merged, batches, list(named[0]) if named else [], layer_abs)

    def gather(self) -> "StreamedScores":
        """The merge of every process's scores; a collective (call it on every rank).

        Each process scores the examples of its own micro-batches; this pads the per-process
        results to a common length and exchanges them with ``all_gather``; the per-layer sums
        ``[L, Q]`` travel as ``L`` extra columns of the scores (every rank tracks the same layers:
        the same collectives, in the same order, on every rank). Alone, returns itself.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = collective_device()
        world = dist.get_world_size()
        layers, q = len(self.layer_names), self.num_queries
        counts = torch.tensor([len(self)] + [self.batches.get(p, 0) for p in PRECONDITIONINGS]
                              + [layers, int(self.layer_abs is not None)], device=device)
        all_counts = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts)
        if any(int(c[-2]) != layers for c in all_counts):  # every rank sees every count: all raise alike
            raise ValueError(f"StreamedScores.gather: the processes track different numbers of layers "
                             f"{[int(c[-2]) for c in all_counts]}")
        longest = max(int(c[0]) for c in all_counts)
        pad = longest - len(self)
        layer_abs = self.layer_abs if self.layer_abs is not None else torch.zeros(layers, q, dtype=torch.float64)
        indices = torch.cat([self.indices.to(device), torch.zeros(pad, dtype=torch.long, device=device)])
        scores = torch.cat([self.scores.to(device), torch.zeros(q, pad, dtype=torch.float64, device=device),
                            layer_abs.to(device, torch.float64).T], dim=1)
        visits = torch.cat([self.visits.to(device), torch.zeros(pad, dtype=torch.long, device=device)])
        parts = []
        for tensor in (indices, scores, visits):
            gathered = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(gathered, tensor.contiguous())
            parts.append(gathered)
        results = []
        for rank in range(world):
            m = int(all_counts[rank][0])
            batches = {p: int(c) for p, c in zip(PRECONDITIONINGS, all_counts[rank][1:-2].tolist()) if c}
            rank_abs = parts[1][rank][:, longest:].T if int(all_counts[rank][-1]) else None
            results.append(StreamedScores(parts[0][rank][:m], parts[1][rank][:, :m], parts[2][rank][:m], batches,
                                          list(self.layer_names), rank_abs))
        return StreamedScores.merge(results).to(self.scores.device)


class StreamingScorer:
    """Hook sink scoring each training capture against fixed preconditioned queries.

    Call protocol (what `InfluenceTracker` does): `set_queries`; route the training backward's
    captures here (``hooks.sink``); after the backward, `commit` the micro-batch with its dataset
    indices and the loss scale (or `discard` it); read `result`; `reset`.

    Args:
        layers: the tracked layers (the queries must hold every one of them).
        dtype: dtype of the contraction (the queries' dtype); sums are kept in float64.
        rebuild_budget_bytes: memory allowed for rank-r queries rebuilt to full matrices on the
            layers where the ``DW_n`` route is cheaper.
    """

    def __init__(self, layers: Sequence[TrackedLayer], dtype: torch.dtype = torch.float32,
                 rebuild_budget_bytes: int = 1 << 30) -> None:
        self.layers = {layer.name: layer for layer in layers}
        self.dtype = dtype
        self.rebuild_budget_bytes = rebuild_budget_bytes
        self.queries: Optional[PreconditionedQueries] = None
        self.preconditioning: Optional[str] = None
        self.routes: dict[str, str] = {}  # layer → "dw" | "dw (rank-r rebuilt)" | "rank-r"
        self._layer_queries: dict[str, QueryLayer] = {}
        self._rebuilt_bytes = 0
        self._pending: Optional[torch.Tensor] = None  # [Q, B] float64, this micro-batch, unscaled
        self._pending_layers: dict[str, torch.Tensor] = {}  # layer → [Q, B], the same per layer
        self._layer_abs: Optional[torch.Tensor] = None  # [L, Q] float64: Σ |per-layer score| committed
        self._chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._columns = 0
        self._total: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._batches: dict[str, int] = {}
        self.superseded_batches: dict[str, int] = {}  # scored micro-batches dropped for better queries
        self._dropped: Optional[torch.Tensor] = None  # examples with non-finite scores (device counter)
        self.skipped_batches = 0

    # ----------------------------------------------------------------------------- queries
    def set_queries(self, queries: Optional[PreconditionedQueries], preconditioning: str = "ekfac") -> None:
        """Score later captures against ``queries`` (``None`` stops), preconditioned as
        ``preconditioning`` names (see `StreamedScores`). Sums so far are kept unless the new
        queries rank higher (`RANK`): then they are dropped and counted in `superseded_batches`,
        so that sums never mix preconditionings (early, worse-preconditioned visits dominate)."""
        if queries is not None and any(RANK[preconditioning] > RANK[kind] for kind in self._batches):
            for kind, count in self._batches.items():
                self.superseded_batches[kind] = self.superseded_batches.get(kind, 0) + count
            self.reset(superseded=False)
        if queries is not None:
            missing = sorted(set(self.layers) - set(queries.layers))
            if missing:
                raise ValueError(f"The preconditioned queries lack tracked layers {missing}")
            if self._total is not None and self._total[1].shape[0] != len(queries):
                raise ValueError(f"Streamed scores so far are for {self._total[1].shape[0]} queries, the new queries "
                                 f"are {len(queries)}: call reset() first")
        self.queries, self.preconditioning = queries, preconditioning
        self._layer_queries, self.routes, self._rebuilt_bytes = {}, {}, 0
        self._pending, self._pending_layers = None, {}

    def _query(self, name: str, batch: int, tokens: int) -> QueryLayer:
        """The layer's query in the representation chosen by cost on its first capture."""
        chosen = self._layer_queries.get(name)
        if chosen is not None:
            return chosen
        q = self.queries.layers[name]
        chosen, route = q, "dw" if q.full is not None else "rank-r"
        if q.full is None:
            n, d_out, rank = q.u.shape
            d_in = q.v.shape[1]
            dw_route = batch * tokens * d_out * d_in + batch * n * d_out * d_in
            rank_route = batch * tokens * n * rank * (d_out + d_in)
            size = n * d_out * d_in * q.u.element_size()
            if dw_route < rank_route and self._rebuilt_bytes + size <= self.rebuild_budget_bytes:
                chosen, route = QueryLayer(full=q.u @ q.v.transpose(-1, -2)), "dw (rank-r rebuilt)"
                self._rebuilt_bytes += size
        self._layer_queries[name], self.routes[name] = chosen, route
        return chosen

    # ----------------------------------------------------------------------------- sink
    def __call__(self, capture: Capture) -> None:
        """Add one layer call's scores ``[Q, B]`` to the micro-batch's pending sums, in total and
        per layer (calls of a module used twice add up: scores are linear in ``DW_n``)."""
        if self.queries is None:
            return
        name = capture.layer.name
        a, g = capture.a.to(self.dtype), capture.g.to(self.dtype)
        value = contract(self._query(name, a.shape[0], a.shape[1]), a, g).to(torch.float64)
        if self._pending is None:
            self._pending = value
        elif self._pending.shape != value.shape:
            raise RuntimeError(f"Layer {name!r} saw a batch of {value.shape[1]} examples, other layers "
                               f"{self._pending.shape[1]}: per-example scores need the batch in dimension 0")
        else:
            self._pending = self._pending + value
        previous = self._pending_layers.get(name)
        self._pending_layers[name] = value if previous is None else previous + value

    # ----------------------------------------------------------------------------- commit
    def commit(self, indices: Union[torch.Tensor, Sequence[int]], grad_scale: Scalar = 1.0, weight: Scalar = 1.0) -> bool:
        """Add the pending micro-batch: scores ``× weight / grad_scale`` for dataset ``indices [B]``.

        ``grad_scale`` is the training loss over the sum of per-example losses (scores are linear
        in the gradients: dividing once undoes the mean, the accumulation and the AMP scale).
        Examples whose scores are not finite are dropped (counted, no device sync here). The
        kept examples' per-layer ``|score|`` add to the per-layer sums. Returns ``False`` when
        nothing was captured or the scale is unusable (counted in `skipped_batches`).
        """
        pending, self._pending = self._pending, None
        pending_layers, self._pending_layers = self._pending_layers, {}
        if pending is None:
            return False
        batch = pending.shape[1]
        indices = torch.as_tensor(indices, dtype=torch.long).to(pending.device).reshape(-1)
        if indices.shape[0] != batch:
            raise ValueError(f"indices has {indices.shape[0]} entries for a micro-batch of {batch} examples")
        if not isinstance(grad_scale, torch.Tensor) and (grad_scale == 0 or not torch.isfinite(torch.tensor(float(grad_scale)))):
            self.skipped_batches += 1
            return False
        scores = pending * (weight / grad_scale)
        finite = torch.isfinite(scores).all(0)
        zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
        scores = torch.where(finite, scores, zero)
        self._add_layer_abs(pending_layers, weight / grad_scale, finite, zero)
        dropped = (~finite).sum()
        self._dropped = dropped if self._dropped is None else self._dropped + dropped
        self._chunks.append((indices, scores, finite.long()))
        self._columns += batch
        self._batches[self.preconditioning] = self._batches.get(self.preconditioning, 0) + 1
        if self._columns > max(4096, 2 * (0 if self._total is None else self._total[0].shape[0])):
            self._consolidate()
        return True

    def _add_layer_abs(self, pending_layers: dict[str, torch.Tensor], factor: Scalar, finite: torch.Tensor,
                       zero: torch.Tensor) -> None:
        """Add Σ over the ``finite [B]`` examples of ``|score × factor|`` per layer to ``[L, Q]``
        (a layer not called this micro-batch adds 0)."""
        absent = zero.new_zeros(len(self.queries), finite.shape[0])  # a layer not called this micro-batch
        values = [pending_layers.get(name, absent) for name in self.layers]
        stacked = torch.where(finite, (torch.stack(values) * factor).abs(), zero)  # [L, Q, B]
        layer_abs = stacked.nan_to_num(0.0, posinf=0.0, neginf=0.0).sum(-1)
        self._layer_abs = layer_abs if self._layer_abs is None else self._layer_abs + layer_abs

    def discard(self) -> None:
        """Drop the pending micro-batch (a step not meant for streaming, or a failed capture)."""
        self._pending, self._pending_layers = None, {}

    # ----------------------------------------------------------------------------- results
    @property
    def dropped_examples(self) -> int:
        """Example visits dropped for non-finite scores (reads a device counter: a sync)."""
        return 0 if self._dropped is None else int(self._dropped)

    def result(self) -> StreamedScores:
        """What accumulated since the last `reset`, on this process only (see `StreamedScores.gather`)."""
        self._consolidate()
        if self._total is None:
            device = "cpu" if self.queries is None else self.queries.measurements.device
            empty = StreamedScores.empty(0 if self.queries is None else len(self.queries), device, list(self.layers))
            empty.batches = dict(self._batches)
            return empty
        return StreamedScores(*self._total, dict(self._batches), list(self.layers), self._layer_abs)

    def reset(self, superseded: bool = True) -> None:
        """Forget every score (queries and routes are kept), and the superseded counts unless
        ``superseded=False``."""
        self._pending, self._chunks, self._columns, self._total = None, [], 0, None
        self._pending_layers, self._layer_abs = {}, None
        self._batches, self._dropped = {}, None
        if superseded:
            self.superseded_batches = {}

    def _consolidate(self) -> None:
        parts = ([self._total] if self._total is not None else []) + self._chunks
        if not parts:
            return
        indices, scores, visits = (torch.cat(x, dim=-1) for x in zip(*parts))
        self._total = _combine(indices, scores, visits)
        self._chunks, self._columns = [], 0

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self, result: Optional[StreamedScores] = None) -> dict:
        """The sums (this process's, or ``result``: e.g. the `StreamedScores.gather` of every
        process's) and counters, plus the preconditioned queries they are scored against (CPU
        copies), so that a resumed run scores the next visits exactly as this one would."""
        result = self.result() if result is None else result
        copy = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        queries = None
        if self.queries is not None:
            queries = {"preconditioning": self.preconditioning, "measurements": copy(self.queries.measurements),
                       "layers": {n: {"full": copy(q.full), "u": copy(q.u), "v": copy(q.v)}
                                  for n, q in self.queries.layers.items()}}
        return {"indices": result.indices.cpu(), "scores": result.scores.cpu(), "visits": result.visits.cpu(),
                "batches": dict(result.batches), "skipped_batches": self.skipped_batches,
                "superseded_batches": dict(self.superseded_batches), "layer_names": list(result.layer_names),
                "layer_abs": None if result.layer_abs is None else result.layer_abs.cpu(), "queries": queries}

    def load_state_dict(self, state: dict, device: Union[str, torch.device, None] = None) -> None:
        """Restore `state_dict`: the saved queries (on ``device``, default the current queries'
        device) when it holds them, then the sums (states saved before the per-layer sums load
        without them)."""
        self.reset()
        saved = state.get("queries")
        if saved is not None:
            device = device or ("cpu" if self.queries is None else self.queries.measurements.device)
            move = lambda t: None if t is None else t.to(device)  # noqa: E731
            layers = {n: QueryLayer(move(q["full"]), move(q["u"]), move(q["v"])) for n, q in saved["layers"].items()}
            self.set_queries(PreconditionedQueries(layers, move(saved["measurements"])), saved["preconditioning"])
        device = "cpu" if self.queries is None else self.queries.measurements.device
        if state.get("layer_abs") is not None:
            if list(state["layer_names"]) != list(self.layers):
                raise ValueError(f"Streamed per-layer sums were saved for layers {state['layer_names']}, "
                                 f"this scorer tracks {list(self.layers)}")
            self._layer_abs = state["layer_abs"].to(device, torch.float64)
        if state["indices"].numel():
            self._total = (state["indices"].to(device), state["scores"].to(device), state["visits"].to(device))
        self._batches = dict(state["batches"])
        self.skipped_batches = int(state["skipped_batches"])
        self.superseded_batches = dict(state.get("superseded_batches", {}))


def _combine(indices: torch.Tensor, scores: torch.Tensor, visits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum the columns of equal indices; examples never visited (all visits dropped) are left out."""
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    summed = torch.zeros(scores.shape[0], unique.shape[0], dtype=scores.dtype, device=scores.device)
    summed.index_add_(1, inverse, scores)
    counts = torch.zeros(unique.shape[0], dtype=torch.long, device=visits.device).index_add_(0, inverse, visits)
    keep = counts > 0
    return unique[keep], summed[:, keep], counts[keep]


__all__ = ["StreamedScores", "StreamingScorer", "PRECONDITIONINGS", "RANK"]
