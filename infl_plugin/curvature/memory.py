"""Memory a layer selection needs for curvature statistics, estimated before anything is allocated.

Per layer with gradient matrix ``[d_out, d_in]`` and accumulation itemsize ``s``:

* statistics (kept all run): ``A_sum`` ``d_in²`` and ``S_sum`` ``d_out²`` (kfac, ekfac) and the
  eigenvalue sums ``d_out·d_in`` (ekfac, diagonal), times ``s``;
* eigenbasis (kfac, ekfac; kept once computed): ``Q_A``, ``Q_S`` in float64 plus their copies in
  the accumulation dtype used to rotate captures, ``(d_in² + d_out²)·(8 + s)``;
* eigendecomposition scratch (transient, one layer at a time, so only the largest counts): the
  float64 covariance, its symmetrised copy and the eigenvectors, ``3·d²·8`` for the larger side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config.influence import InfluenceConfig
from .layers import TrackedLayer

_FLOAT64 = 8


@dataclass(frozen=True)
class LayerMemory:
    """One layer's estimate in bytes (see the module docstring)."""

    name: str
    shape: tuple[int, int]
    statistics: int
    eigenbasis: int
    scratch: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of statistics per layer and in total for one strategy and accumulation dtype."""

    strategy: str
    dtype: str
    layers: tuple[LayerMemory, ...]

    @property
    def statistics_bytes(self) -> int:
        return sum(layer.statistics for layer in self.layers)

    @property
    def eigenbasis_bytes(self) -> int:
        return sum(layer.eigenbasis for layer in self.layers)

    @property
    def scratch_bytes(self) -> int:
        return max((layer.scratch for layer in self.layers), default=0)

    @property
    def total_bytes(self) -> int:
        """Statistics and eigenbases of every layer plus the largest eigendecomposition scratch."""
        return self.statistics_bytes + self.eigenbasis_bytes + self.scratch_bytes

    def table(self) -> str:
        """A plain-text table, one row per layer and a total row."""
        rows = [(layer.name or "<root>", f"{layer.shape[0]}x{layer.shape[1]}", _size(layer.statistics),
                 _size(layer.eigenbasis), _size(layer.scratch)) for layer in self.layers]
        rows.append(("total", f"{len(self.layers)} layers", _size(self.statistics_bytes),
                     _size(self.eigenbasis_bytes), _size(self.scratch_bytes) + " (peak)"))
        header = ("layer", "d_out x d_in", f"statistics ({self.dtype})", "eigenbasis", "eigh scratch")
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
        lines.append(f"{self.strategy}: about {_size(self.total_bytes)} in all")
        return "\n".join(lines)


def estimate_memory(layers: Sequence[TrackedLayer], config: InfluenceConfig) -> MemoryEstimate:
    """Estimate what ``config.strategy`` in ``config.accumulation_dtype`` holds for ``layers``."""
    itemsize = torch.empty((), dtype=getattr(torch, config.accumulation_dtype)).element_size()
    covariances = config.strategy in ("kfac", "ekfac")
    eigenvalues = config.strategy in ("ekfac", "diagonal")
    out = []
    for layer in layers:
        d_out, d_in = layer.shape
        squares = d_in * d_in + d_out * d_out
        statistics = (squares * covariances + d_out * d_in * eigenvalues) * itemsize
        eigenbasis = squares * (_FLOAT64 + itemsize) if covariances else 0
        scratch = 3 * max(d_in, d_out) ** 2 * _FLOAT64 if covariances else 0
        out.append(LayerMemory(layer.name, (d_out, d_in), statistics, eigenbasis, scratch))
    return MemoryEstimate(config.strategy, config.accumulation_dtype, tuple(out))


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


__all__ = ["LayerMemory", "MemoryEstimate", "estimate_memory"]
