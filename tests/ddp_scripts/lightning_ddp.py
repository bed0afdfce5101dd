"""Lightning fits with `InfluenceCallback` on the same global batches, alone or under DDP.

Launched by ``tests/test_distributed.py`` as ``torchrun --nproc_per_node 2 lightning_ddp.py OUT``
(gloo on CPU; Lightning picks up the torchrun environment) and imported by it for the
single-process reference. Each global batch of ``GLOBAL_BATCH`` rows is split between the ranks
in order (`RankBatches`; ``use_distributed_sampler=False``), so with equal per-rank batches DDP's
gradient average equals one process's batch mean and both runs see the same training.

Fits, one after the other in the same processes:

* ``compare`` (named after their logger): three fits (``logger=False``, a ``CSVLogger``, a
  ``TensorBoardLogger``), each attributing every 2 of 8 steps with the validation loader given
  to ``fit`` as queries; the ``CSVLogger`` fit also saves a checkpoint every 4 steps (the
  callback's ``state_dict`` sums the statistics over the ranks).
* ``stream``: as ``compare`` without a logger, scoring the candidates streamed from the
  training backward (each rank its own examples, gathered at the attribution).
* ``skip``: rank 1's statistics of its first micro-batch are refused (a NaN loss scale) while
  rank 0's are kept, and an attribution follows at once (every step).
* ``refine``: as ``stream`` with ``refine_steps=3``: the streaming queries handed the factors of
  each attribution are refined with Gauss-Newton products summed over the ranks (each rank its
  share of the curvature batches).

Rank 0 writes ``OUT/<name>.pt`` (summed statistics, factors, last scores, parameters); every rank
writes ``OUT/<name>_rank<r>.json`` (counters and infl_plugin warnings).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import infl_plugin as ip
from infl_plugin.integrations.lightning import InfluenceCallback
from reports import run, save_report

N_TRAIN, N_VAL, GLOBAL_BATCH = 32, 8, 8  # 4 optimizer steps per epoch


def datasets() -> tuple[TensorDataset, TensorDataset]:
    """Training rows ``(x [6], y, index)`` and validation rows ``(x, y)``; fixed by a seed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3:].sum(1) > 0.5).long()
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN], torch.arange(N_TRAIN))
    return train, TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


class RankBatches(Sampler[list[int]]):
    """Rank ``rank``'s contiguous share of each global batch, in dataset order."""

    def __init__(self, length: int, global_batch: int, rank: int, world: int) -> None:
        self.length, self.global_batch, self.rank, self.world = length, global_batch, rank, world
        self.per_rank = global_batch // world

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.length, self.global_batch):
            first = start + self.rank * self.per_rank
            yield list(range(first, first + self.per_rank))

    def __len__(self) -> int:
        return self.length // self.global_batch


class Net(pl.LightningModule):
    """Linear → tanh → Linear classifier trained with a batch-mean cross-entropy and SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RefuseFirstBatchOn(ip.ClassificationTask):
    """A classification task whose loss scale is NaN for the first global batch on one rank, so
    that rank skips those statistics (counted and warned) while the others keep theirs."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def training_loss_scale(self, batch: Any) -> float:
        if int(os.environ.get("RANK", "0")) == self.rank and int(batch[2].min()) < GLOBAL_BATCH:
            return math.nan
        return super().training_loss_scale(batch)


def fit(root: Path, name: str, logger: Any, world: int, rank: int, mode: str = "compare",
        candidates: str = "all") -> dict:
    """One fit; returns what a rank reports (the summed state on every rank, results on rank 0)."""
    pl.seed_everything(0, verbose=False)
    train, val = datasets()
    train_loader = DataLoader(train, batch_sampler=RankBatches(N_TRAIN, GLOBAL_BATCH, rank, world))
    val_loader = DataLoader(val, batch_size=4)
    skip = mode == "skip"
    callback = InfluenceCallback(
        config=ip.InfluenceConfig(update_every=1, refine_steps=3 if mode == "refine" else 0, refine_batches=4),
        task=RefuseFirstBatchOn(rank=1) if skip else "classification",
        queries="val", num_queries=4, candidates=candidates, every_n_steps=1 if skip else 2, top_k=3, progress=False,
        strict=not skip,
    )
    strategy = "ddp" if world > 1 else "auto"
    checkpoints = [ModelCheckpoint(dirpath=str(root / name / "ckpt"), filename="{step}", every_n_train_steps=4,
                                   save_top_k=-1)] if name == "csv" else []
    trainer = pl.Trainer(
        max_epochs=1 if skip else 2, accelerator="cpu", devices=world, strategy=strategy, logger=logger,
        callbacks=[callback, *checkpoints], use_distributed_sampler=False, enable_checkpointing=bool(checkpoints),
        enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root / name), deterministic=True,
    )
    model = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_loader, val_loader)
    state = callback.state_dict()  # a collective (statistics summed over processes): every rank
    session = callback.session
    report = {
        "rank": rank, "world": world, "attributions": session.attributions,
        "failed_attributions": session.failed_attributions, "skipped_batches": session.skipped_batches,
        "steps": trainer.global_step,
        "warnings": [str(w.message) for w in caught if "infl_plugin" in str(w.message)],
    }
    if rank == 0:
        result = session.last_result
        report.update(state=state, factors=session.last_factors, parameters=[p.detach().clone() for p in model.parameters()],
                      scores=None if result is None else result.scores, last_step=None if result is None else result.step,
                      candidate_indices=None if result is None else result.candidate_indices,
                      artifact_dir=session.artifact_dir)
    return report


def loggers(root: Path) -> dict[str, Any]:
    """The three logger set-ups a DDP run must survive."""
    return {"none": False, "csv": CSVLogger(str(root / "csv")), "tensorboard": TensorBoardLogger(str(root / "tb"))}


def main(out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    runs = [(name, logger, "compare", "all") for name, logger in loggers(out).items()]
    runs += [("stream", False, "compare", "stream"), ("skip", False, "skip", "all"), ("refine", False, "refine", "stream")]
    for name, logger, mode, candidates in runs:
        save_report(out, name, rank, fit(out, name, logger, world, rank, mode, candidates))


if __name__ == "__main__":
    run(main)
