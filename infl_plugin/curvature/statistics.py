"""Accumulators of per-layer curvature statistics, fed by hook captures.

Per tracked layer (``a: [batch, tokens, d_in]``, ``g: [batch, tokens, d_out]``):

* ``A_sum = Σ_tokens a aᵀ`` ``[d_in, d_in]`` and the token count → ``A = A_sum / tokens``;
* ``S_sum = Σ_tokens g gᵀ`` ``[d_out, d_out]`` → ``S = S_sum / examples`` (the per-example
  gradient of a sequence sums over its tokens, so ``A ⊗ S`` has the scale of the Fisher);
* ``L_sum = Σ_n (Q_Sᵀ DW_n Q_A)²`` ``[d_out, d_in]`` with ``DW_n = Σ_t g_{n,t} a_{n,t}ᵀ`` in the
  current eigenbasis (or the identity basis for the diagonal Fisher) → EK-FAC eigenvalues
  ``L_sum / examples``. A layer applied several times in one forward (weight sharing,
  recurrence) has ``DW_n = Σ_calls Σ_t g aᵀ``: its calls are joined before squaring.

Captures first land in *pending* buffers; `commit` rescales them (hooks see gradients of a scaled
mean loss, statistics want per-example gradients: ``S`` and ``L`` scale with the square), checks
them for NaN/inf and adds them to the totals, or drops them. Accumulation is float32 or float64
whatever the model's dtype.

Why plain tensors and not ``torchmetrics.Metric`` states: every accumulator is a sum, so one
flattened ``all_reduce(SUM)`` per attribution (`all_reduce_`) synchronises processes with d²
memory, while Metric's gather-then-sum holds world_size × d² per factor during sync.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..distributed import collective_device
from .hooks import Capture
from .layers import TrackedLayer

_CHUNK_ELEMENTS = 1 << 25  # per-example gradient chunk: 32M elements (128 MiB in float32)


@dataclass
class LayerStatistics:
    """Totals for one layer (see module docstring). ``None`` entries are not tracked."""

    a_sum: Optional[torch.Tensor] = None
    s_sum: Optional[torch.Tensor] = None
    lambda_sum: Optional[torch.Tensor] = None
    tokens: Union[float, torch.Tensor] = 0.0  # a 0-dim device tensor only while pending (see `commit`)
    examples: float = 0.0
    lambda_examples: float = 0.0


class CurvatureStatistics:
    """Per-layer sums of ``a aᵀ``, ``g gᵀ`` and squared rotated per-example gradients.

    Args:
        layers: tracked layers.
        covariances: accumulate ``A_sum``/``S_sum`` (needed by kfac/ekfac).
        dtype: accumulation dtype.
    """

    def __init__(self, layers: Sequence[TrackedLayer], covariances: bool = True, dtype: torch.dtype = torch.float32):
        self.layers = {layer.name: layer for layer in layers}
        self.covariances = covariances
        self.dtype = dtype
        self.totals: dict[str, LayerStatistics] = {name: LayerStatistics() for name in self.layers}
        self.bases: Optional[dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]] = None
        self._rotations: Optional[dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]] = None
        self._pending: dict[str, LayerStatistics] = {}  # this micro-batch, unscaled
        self._calls: dict[str, int] = {}  # captures per layer in the pending micro-batch
        self._deferred: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # rotated (a, g) per call
        self._seen: set[str] = set()  # layers whose calls per micro-batch have been counted once
        self._shared: set[str] = set()  # layers called more than once in a micro-batch
        self._broken_by: Optional[str] = None  # a layer found shared after its first call was squared
        self.skipped_batches = 0

    # ----------------------------------------------------------------------------- basis
    def set_basis(self, bases: Optional[dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]]) -> None:
        """Start accumulating eigenvalues in ``bases`` (name → (Q_A, Q_S); ``None`` = identity).

        ``bases=None`` stops eigenvalue accumulation. Previous eigenvalue sums are reset. The
        bases are kept as given (float64 from `factors.eigenbases`) and used in ``dtype``.
        """
        self.bases = bases
        self._rotations = None if bases is None else {
            name: tuple(None if q is None else q.to(self.dtype) for q in pair) for name, pair in bases.items()
        }
        for stats in self.totals.values():
            stats.lambda_sum, stats.lambda_examples = None, 0.0

    # ----------------------------------------------------------------------------- sink
    def __call__(self, capture: Capture) -> None:
        """Hook sink: add one layer call's contribution to the pending buffers.

        Covariances add up call by call. Eigenvalues need the example's gradient summed over all
        calls of a layer (weight sharing, recurrence) before squaring: the rotated ``a``/``g`` of a
        layer known to be called several times per micro-batch (or not yet observed) are kept and
        joined along the token axis at `commit`; a layer seen called once is squared right away.
        """
        name = capture.layer.name
        a = capture.a.to(self.dtype)
        g = capture.g.to(self.dtype)
        pending = self._pending.setdefault(name, LayerStatistics())
        if a.shape[0] == 0:
            return
        calls = self._calls[name] = self._calls.get(name, 0) + 1
        defer = name in self._shared or name not in self._seen  # decided before this call is counted
        if calls > 1:
            self._shared.add(name)
        pending.examples = max(pending.examples, a.shape[0])
        if self.covariances:
            a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            pending.a_sum = _add(pending.a_sum, a2.T @ a2)
            pending.s_sum = _add(pending.s_sum, g2.T @ g2)
            pending.tokens += capture.num_tokens
        if self._rotations is not None:
            q_a, q_s = self._rotations[name]
            if (q_a is not None and q_a.device != a.device) or (q_s is not None and q_s.device != a.device):
                q_a = None if q_a is None else q_a.to(a.device)
                q_s = None if q_s is None else q_s.to(a.device)
                self._rotations[name] = (q_a, q_s)
            if defer:
                self._defer(name, a if q_a is None else a @ q_a, g if q_s is None else g @ q_s)
            elif calls == 1:
                pending.lambda_sum = _add(pending.lambda_sum, squared_rotated_gradients(a, g, q_a, q_s))
            else:
                self._broken_by = name

    def _defer(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        """Keep one call's rotated ``a: [B, T, d_in]``, ``g: [B, T, d_out]`` until `commit`."""
        calls = self._deferred.setdefault(name, [])
        if calls and calls[0][0].shape[0] != a.shape[0]:
            raise ValueError(
                f"Layer {name!r} is applied several times in one forward pass with different batch sizes "
                f"({calls[0][0].shape[0]} and {a.shape[0]}): its per-example gradient, summed over the calls, "
                "is not defined; leave it out with InfluenceConfig.modules"
            )
        calls.append((a, g))

    def _flush(self) -> None:
        """Square the per-example gradients summed over each deferred layer's calls; note call counts."""
        for name, calls in self._deferred.items():
            a = torch.cat([c[0] for c in calls], dim=1)
            g = torch.cat([c[1] for c in calls], dim=1)
            pending = self._pending[name]
            pending.lambda_sum = _add(pending.lambda_sum, squared_rotated_gradients(a, g, None, None))
        self._deferred = {}
        if self._broken_by is not None:
            warnings.warn(
                f"infl_plugin: layer {self._broken_by!r} was called more than once in a forward pass for the first "
                "time; the eigenvalue statistics of this micro-batch are dropped (later ones sum its calls)",
                stacklevel=3,
            )
            for pending in self._pending.values():
                pending.lambda_sum = None
        self._seen.update(self._calls)
        self._calls, self._broken_by = {}, None

    # ----------------------------------------------------------------------------- commit
    def commit(self, grad_scale: float = 1.0, decay: float = 1.0) -> bool:
        """Move pending contributions into the totals; ``grad_scale`` divides the captured gradients.

        ``decay`` (in (0, 1]) first multiplies the totals, counts included (`decay_`), so that with
        a decay on every commit the results are exponential moving averages. Returns ``False``
        (and drops them, decaying nothing) when nothing was captured, when no real token was seen,
        or when any value is NaN/inf; `skipped_batches` counts the latter two.
        """
        self._flush()
        pending, self._pending = self._pending, {}
        if not pending or all(p.examples == 0 for p in pending.values()):
            return False
        tensors = [t for p in pending.values() for t in (p.a_sum, p.s_sum, p.lambda_sum) if t is not None]
        finite = bool(torch.stack([t.sum() for t in tensors]).isfinite().all()) if tensors else True
        for p in pending.values():  # masked token counts are device tensors, ready after the sync above
            p.tokens = float(p.tokens)
        no_tokens = self.covariances and all(p.tokens == 0 for p in pending.values())
        if no_tokens or not finite or grad_scale == 0 or not torch.isfinite(torch.tensor(grad_scale)):
            self.skipped_batches += 1
            return False
        square = 1.0 / float(grad_scale) ** 2
        self.decay_(decay)
        for name, p in pending.items():
            totals = self.totals[name]
            if p.a_sum is not None:
                totals.a_sum = _add(totals.a_sum, p.a_sum)
                totals.s_sum = _add(totals.s_sum, p.s_sum * square)
                totals.tokens += p.tokens
                totals.examples += p.examples
            if p.lambda_sum is not None:
                totals.lambda_sum = _add(totals.lambda_sum, p.lambda_sum * square)
                totals.lambda_examples += p.examples
        return True

    def decay_(self, factor: float) -> None:
        """Multiply every total and its count by ``factor``: averages keep their meaning
        (``A = A_sum / tokens``) while older contributions weigh ``factor`` less per call."""
        if factor == 1.0:
            return
        for totals in self.totals.values():
            for attr in ("a_sum", "s_sum", "lambda_sum"):
                value = getattr(totals, attr)
                if value is not None:
                    value.mul_(factor)
            totals.tokens *= factor
            totals.examples *= factor
            totals.lambda_examples *= factor

    def discard(self) -> None:
        """Drop pending contributions (e.g. of a training backward not meant for statistics)."""
        self._pending, self._deferred, self._calls, self._broken_by = {}, {}, {}, None

    # ----------------------------------------------------------------------------- results
    def covariance(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [d_in, d_in], S [d_out, d_out])`` averaged as described in the module docstring."""
        stats = self.totals[name]
        if stats.a_sum is None or stats.tokens == 0:
            raise RuntimeError(f"No covariance statistics were accumulated for layer {name!r}")
        return stats.a_sum / stats.tokens, stats.s_sum / stats.examples

    def eigenvalues(self, name: str) -> torch.Tensor:
        """Corrected eigenvalues ``E_n[(Q_Sᵀ DW_n Q_A)²]``: ``[d_out, d_in]``."""
        stats = self.totals[name]
        if stats.lambda_sum is None or stats.lambda_examples == 0:
            raise RuntimeError(f"No eigenvalue statistics were accumulated for layer {name!r}")
        return stats.lambda_sum / stats.lambda_examples

    @property
    def has_covariances(self) -> bool:
        return all(s.a_sum is not None and s.tokens > 0 for s in self.totals.values())

    @property
    def has_eigenvalues(self) -> bool:
        return all(s.lambda_sum is not None and s.lambda_examples > 0 for s in self.totals.values())

    def reset(self, covariances: bool = True, eigenvalues: bool = True) -> None:
        for stats in self.totals.values():
            if covariances:
                stats.a_sum, stats.s_sum, stats.tokens, stats.examples = None, None, 0.0, 0.0
            if eigenvalues:
                stats.lambda_sum, stats.lambda_examples = None, 0.0
        self.discard()

    # ----------------------------------------------------------------------------- processes
    def all_reduce_(self) -> None:
        """Sum every accumulator over processes with one flattened ``all_reduce`` (no-op alone)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        device = collective_device()
        names = sorted(self.totals)
        parts: list[torch.Tensor] = []
        for name in names:
            s, layer = self.totals[name], self.layers[name]
            shapes = {"a_sum": (layer.in_features,) * 2, "s_sum": (layer.out_features,) * 2, "lambda_sum": layer.shape}
            for attr, shape in shapes.items():
                value = getattr(s, attr)
                parts.append(torch.zeros(shape, dtype=self.dtype) if value is None else value)
            parts.append(torch.tensor([s.tokens, s.examples, s.lambda_examples], dtype=self.dtype))
        flat = torch.cat([p.flatten().to(device) for p in parts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        values = iter(torch.split(flat, [p.numel() for p in parts]))
        for name in names:
            s = self.totals[name]
            a_sum, s_sum, lambda_sum, counts = (next(values) for _ in range(4))
            s.tokens, s.examples, s.lambda_examples = (float(c) for c in counts)
            layer = self.layers[name]
            s.a_sum = a_sum.reshape((layer.in_features,) * 2) if s.tokens else None
            s.s_sum = s_sum.reshape((layer.out_features,) * 2) if s.tokens else None
            s.lambda_sum = lambda_sum.reshape(layer.shape) if s.lambda_examples else None

    def reduced(self) -> "CurvatureStatistics":
        """A copy whose totals are summed over processes; this object is left as it is."""
        copy = CurvatureStatistics(list(self.layers.values()), self.covariances, self.dtype)
        copy.load_state_dict(self.state_dict())
        copy._seen, copy._shared = set(self._seen), set(self._shared)  # which layers' calls to join
        copy.all_reduce_()
        return copy

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Tensors and counters (bases included), for checkpoints."""
        state: dict = {"skipped_batches": self.skipped_batches, "layers": {}}
        for name, s in self.totals.items():
            state["layers"][name] = {
                "a_sum": s.a_sum, "s_sum": s.s_sum, "lambda_sum": s.lambda_sum,
                "tokens": s.tokens, "examples": s.examples, "lambda_examples": s.lambda_examples,
            }
        state["bases"] = self.bases
        return state

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.totals) ^ set(state["layers"]))
        if missing:
            raise ValueError(f"Saved statistics are for other layers; differing layer names: {missing}")
        self.skipped_batches = int(state.get("skipped_batches", 0))
        for name, values in state["layers"].items():
            self.totals[name] = LayerStatistics(**values)
        lambdas = {n: (s.lambda_sum, s.lambda_examples) for n, s in self.totals.items()}
        self.set_basis(state.get("bases"))
        for name, (lambda_sum, count) in lambdas.items():
            self.totals[name].lambda_sum, self.totals[name].lambda_examples = lambda_sum, count


def squared_rotated_gradients(
    a: torch.Tensor, g: torch.Tensor, q_a: Optional[torch.Tensor], q_s: Optional[torch.Tensor]
) -> torch.Tensor:
    """``Σ_n (Q_Sᵀ DW_n Q_A)²`` for ``a: [B, T, d_in]``, ``g: [B, T, d_out]`` → ``[d_out, d_in]``.

    Rotating ``a`` and ``g`` before forming ``DW_n = Σ_t g_t a_tᵀ`` costs ``B·T·d²`` instead of
    ``B·d³``; ``DW_n`` is formed in batch chunks bounded to ``_CHUNK_ELEMENTS``.
    """
    if q_a is not None:
        a = a @ q_a
    if q_s is not None:
        g = g @ q_s
    out = torch.zeros(g.shape[-1], a.shape[-1], dtype=a.dtype, device=a.device)
    chunk = max(1, _CHUNK_ELEMENTS // (g.shape[-1] * a.shape[-1]))
    for start in range(0, a.shape[0], chunk):
        dw = torch.einsum("bto,bti->boi", g[start: start + chunk], a[start: start + chunk])
        out += dw.pow(2).sum(0)
    return out


def _add(total: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    return value.clone() if total is None else total.add_(value)
