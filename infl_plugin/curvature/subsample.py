"""A sink that forwards each capture restricted to a random subset of its examples.

Curvature statistics cost ``Σ(d_in² + d_out²)`` per token (plus the eigenvalue rotations), so
taking them on a fraction ``f`` of each step's examples on every step costs about what whole
batches on every ``1/f``-th step cost, while the estimate is spread over many more batches (and
parameter values). The subset is drawn once per training step (`next_step`) and shared by every
layer call of that step, so each example's per-layer statistics stay complete.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch

from .hooks import Capture, Sink


class ExampleSubsample:
    """Sink wrapper keeping ``ceil(fraction × batch)`` random examples (rows) of every capture.

    Args:
        sink: where the reduced captures go (a `CurvatureStatistics`).
        fraction: share of each batch kept, in (0, 1].
        seed: seed of the subset generator (its own stream: pseudo-label draws are unaffected).
    """

    def __init__(self, sink: Sink, fraction: float, seed: int = 0) -> None:
        self.sink = sink
        self.fraction = float(fraction)
        self.generator = torch.Generator().manual_seed(seed)
        self._rows: dict[int, torch.Tensor] = {}  # batch size → sorted row indices [k] of this step

    def next_step(self) -> None:
        """Draw fresh subsets for the next training step."""
        self._rows = {}

    def rows(self, batch: int) -> torch.Tensor:
        """The kept row indices ``[ceil(fraction × batch)]`` for a capture of ``batch`` examples."""
        rows = self._rows.get(batch)
        if rows is None:
            keep = max(1, math.ceil(self.fraction * batch - 1e-9))
            rows = torch.randperm(batch, generator=self.generator)[:keep].sort().values
            self._rows[batch] = rows
        return rows

    def __call__(self, capture: Capture) -> None:
        rows = self.rows(capture.a.shape[0]).to(capture.a.device)
        mask: Optional[torch.Tensor] = None if capture.mask is None else capture.mask[rows]
        self.sink(replace(capture, a=capture.a[rows], g=capture.g[rows], mask=mask))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
