"""Quickstart: train an MLP on sklearn digits with `InfluenceCallback`, then open TensorBoard.

    python examples/lightning/train_digits.py fit --config examples/lightning/config.yaml

The callback is configured in config.yaml under ``trainer.callbacks``. After training this prints
the ``tensorboard --logdir ...`` line and the planted mislabeled training indices to look for in
the "influence/self_influence" table and the harmful tables.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from digits import DigitsClassifier, DigitsDataModule  # noqa: E402


class DigitsCLI(LightningCLI):
    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        logger = self.trainer.logger
        root = getattr(logger, "root_dir", None) or self.trainer.default_root_dir
        print(f"planted mislabeled training indices: {self.datamodule.mislabeled}")
        print(f"tensorboard --logdir {root}")


def main(args=None) -> None:
    DigitsCLI(DigitsClassifier, DigitsDataModule, args=args)


if __name__ == "__main__":
    main()
