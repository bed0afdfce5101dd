"""Lightning fits with `InfluenceCallback` under FSDP2 (`ModelParallelStrategy`, each ``nn.Linear``
and the root wrapped with ``fully_shard``) on 2 CPU processes, or the same module alone.

Launched by ``tests/test_distributed.py`` as ``torchrun --nproc_per_node 2 lightning_fsdp.py OUT``
and imported by it for the single-process reference. The data, the per-rank split of each global
batch and the classifier are `lightning_ddp`'s, in float64 (so that one process and two agree to
rounding): FSDP2 averages the gradients over the ranks as DDP does.

Fits, one after the other in the same processes:

* ``all``: attributions every 2 of 8 steps scoring the candidate loader (each rank its share of
  the batches, gathered), self-influence on; a checkpoint every 4 steps.
* ``stream``: scores streamed from the training backward (each rank its own examples).
* ``resume``: the ``all`` fit resumed from its step-4 checkpoint and trained to step 8.

Rank 0 writes ``OUT/<name>.pt``; every rank writes ``OUT/<name>_rank<r>.json`` and the last result it
holds (every rank holds the gathered one) as ``OUT/<name>_result<r>.pt``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import infl_plugin as ip
from infl_plugin.integrations.lightning import InfluenceCallback
from lightning_ddp import GLOBAL_BATCH, N_TRAIN, Net, RankBatches, datasets
from reports import run, save_report


class ShardedNet(Net):
    """`lightning_ddp.Net` in float64 with SGD and momentum, sharded layer by layer with FSDP2 when a
    device mesh exists."""

    def __init__(self) -> None:
        super().__init__()
        self.model.double()

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.model:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # with momentum: Lightning's sharded checkpoint loading fails on an empty optimizer state
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.5)


def float64(dataset: TensorDataset) -> TensorDataset:
    x, *rest = dataset.tensors
    return TensorDataset(x.double(), *rest)


def fit(root: Path, name: str, world: int, rank: int, candidates: str = "all", resume: Optional[str] = None) -> dict:
    """One fit; returns what a rank reports (results on every rank)."""
    pl.seed_everything(0, verbose=False)
    train, val = (float64(d) for d in datasets())
    train_loader = DataLoader(train, batch_sampler=RankBatches(N_TRAIN, GLOBAL_BATCH, rank, world))
    callback = InfluenceCallback(
        config=ip.InfluenceConfig(update_every=1), task="classification", queries="val", num_queries=4,
        candidates=candidates, every_n_steps=2, top_k=3, progress=False, strict=True,
        self_influence=candidates == "all",
    )
    if world > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                              save_distributed_checkpoint=False)
    else:
        strategy = "auto"
    checkpoints = [ModelCheckpoint(dirpath=str(root / name / "ckpt"), filename="{step}", every_n_train_steps=4,
                                   save_top_k=-1)] if candidates == "all" and resume is None else []
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=world, strategy=strategy, logger=False,
        callbacks=[callback, *checkpoints], use_distributed_sampler=False, enable_checkpointing=bool(checkpoints),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(root / name), deterministic=True,
    )
    model = ShardedNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_loader, DataLoader(float64(val), batch_size=4), ckpt_path=resume)
    session, last = callback.session, callback.session.last_result
    report = {
        "rank": rank, "world": world, "attributions": session.attributions,
        "failed_attributions": session.failed_attributions, "skipped_batches": session.skipped_batches,
        "steps": trainer.global_step,
        "warnings": [str(w.message) for w in caught if "infl_plugin" in str(w.message)],
        "scores": None if last is None else last.scores, "last_step": None if last is None else last.step,
        "candidate_indices": None if last is None else last.candidate_indices,
        "self_scores": None if last is None else last.self_scores,
        "helpful_indices": None if last is None else last.helpful_indices,
    }
    if rank == 0:
        report["factors"] = session.last_factors
    return report


def main(out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    runs = [("all", "all", None), ("stream", "stream", None), ("resume", "all", str(out / "all" / "ckpt" / "step=4.ckpt"))]
    for name, candidates, resume in runs:
        report = fit(out, name, world, rank, candidates, resume)
        torch.save({k: report[k] for k in ("scores", "self_scores", "helpful_indices")}, out / f"{name}_result{rank}.pt")
        save_report(out, name, rank, report)


if __name__ == "__main__":
    run(main)
