"""sklearn digits (8×8 images, 10 classes) with a few deliberately mislabeled training images.

`DigitsDataModule` splits the 1,797 images into train / val (fixed seed), standardises pixels and
flips the labels of ``num_mislabeled`` training images to another class (recorded in
``mislabeled``). `DigitsClassifier` is a small MLP trained with mean cross-entropy, the loss
`infl_plugin.ClassificationTask` assumes. `mislabel_report` says where the planted images rank.
"""

from __future__ import annotations

import math
from typing import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from infl_plugin import AttributionResult


class DigitsDataModule(pl.LightningDataModule):
    """Train/val split of sklearn digits; ``mislabeled`` lists the planted training indices."""

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, num_mislabeled: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_mislabeled = num_mislabeled
        self.seed = seed
        self.mislabeled: list[int] = []
        self.train_set = self.val_set = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(y), generator=generator)
        x = torch.tensor(x, dtype=torch.float32)[order]
        y = torch.tensor(y, dtype=torch.long)[order]
        x = (x - x.mean()) / x.std()
        n_val = int(round(self.val_fraction * len(y)))
        x_train, y_train = x[n_val:], y[n_val:].clone()
        flipped = torch.randperm(len(y_train), generator=generator)[: self.num_mislabeled]
        shift = torch.randint(1, 10, (self.num_mislabeled,), generator=generator)
        y_train[flipped] = (y_train[flipped] + shift) % 10
        self.mislabeled = sorted(flipped.tolist())
        self.train_set = TensorDataset(x_train, y_train)
        self.val_set = TensorDataset(x[:n_val], y[:n_val])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


def mislabel_report(result: AttributionResult, planted: Sequence[int], logdir: str) -> str:
    """Where the planted mislabeled images rank in ``result`` (an attribution with self-influence),
    and the TensorBoard command and tags to look at."""
    planted = set(int(i) for i in planted)
    lines = [f"Planted mislabeled training images: {sorted(planted)} ({len(planted)} of {result.num_candidates})."]
    if result.self_scores is not None:
        order = result.candidate_indices[result.self_scores.nan_to_num(float("-inf")).argsort(descending=True)]
        found = []
        for percent in (1, 5, 10):
            top = set(order[: math.ceil(percent / 100 * len(order))].tolist())
            found.append(f"{len(planted & top)} in the top {percent} % ({len(top)} examples)")
        lines.append(f"Self-influence at step {result.step}: " + ", ".join(found)
                     + f" (chance: {len(planted) / 100:.2g}, {len(planted) / 20:.2g}, {len(planted) / 10:.2g}).")
    harmful = planted & set(result.harmful_indices.reshape(-1).tolist())
    lines.append(f"Among the queries' top-{result.top_k} most harmful examples: {len(harmful)} of {len(planted)} "
                 f"{sorted(harmful)}.")
    lines += [
        f"Look: tensorboard --logdir {logdir}",
        "  TEXT   influence/self_influence            the ranked list (rank, index, self-influence, top %, label)",
        "  IMAGES influence_examples/self_influence   those images with their (possibly wrong) labels",
        "  TEXT   influence/query_000 ...             each validation query's most helpful / harmful examples",
    ]
    return "\n".join(lines)


class DigitsClassifier(pl.LightningModule):
    """64 → hidden → 10 MLP, SGD with momentum."""

    def __init__(self, hidden: int = 64, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
