"""Each process's share of a candidate pass, and the gather that puts the shares back in order.

Under a distributed run an attribution's candidate pass (and self-influence) is split by batch:
rank r scores batches r, r + world, r + 2·world, … of the candidate loader, then the per-example
results are exchanged so that every process holds all of them, in the loader's order. Every rank
runs the same number of forward and backward passes: a rank with one batch fewer repeats the
loader's first batch and drops its result, because under sharded training (FSDP) each forward
gathers the parameters from every rank and a rank that stopped early would leave the others
waiting.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch

from ..distributed import all_gather_columns, ranks


class RankShare:
    """This process's batches of ``loader`` (re-iterable; the loader must keep its order).

    After an iteration, `sizes` holds the examples of each batch this rank owns, in order; the
    batches yielded after them (`padding` of them) are repeats whose results must be dropped.
    """

    def __init__(self, loader: Iterable, batch_size: Callable[[Any], int], rank: int, world: int) -> None:
        self.loader, self.batch_size, self.rank, self.world = loader, batch_size, rank, world
        self.sizes: list[int] = []
        self.padding = 0

    @classmethod
    def current(cls, loader: Iterable, batch_size: Callable[[Any], int]) -> "RankShare":
        """The share of this process in the default process group (all of ``loader`` alone)."""
        rank, world = ranks()
        return cls(loader, batch_size, rank, world)

    def __iter__(self) -> Iterator[Any]:
        self.sizes, self.padding = [], 0
        first, count = None, 0
        for index, batch in enumerate(self.loader):
            if first is None:
                first = batch
            count = index + 1
            if index % self.world == self.rank:
                self.sizes.append(self.batch_size(batch))
                yield batch
        self.padding = math.ceil(count / self.world) - len(self.sizes)
        for _ in range(self.padding):
            yield first

    def gather(self, own: torch.Tensor) -> torch.Tensor:
        """This rank's results ``[R, Σ sizes]`` (padding already dropped) → every rank's, ``[R, N]``
        in the loader's order (a collective when distributed)."""
        if self.world == 1:
            return own
        results = all_gather_columns(own)
        sizes = all_gather_columns(torch.tensor([self.sizes], dtype=torch.long).reshape(1, -1))
        starts = [torch.cat([torch.zeros(1, dtype=torch.long), s[0].cumsum(0)]).tolist() for s in sizes]
        batches = sum(s.shape[1] for s in sizes)
        columns = []
        for index in range(batches):
            rank, position = index % self.world, index // self.world
            columns.append(results[rank][:, starts[rank][position]: starts[rank][position + 1]])
        return torch.cat(columns, dim=1) if columns else own[:, :0]


__all__ = ["RankShare"]
