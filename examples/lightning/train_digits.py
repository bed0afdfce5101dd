"""Quickstart: train an MLP on sklearn digits with `InfluenceCallback`, then open TensorBoard.

    python examples/lightning/train_digits.py fit --config examples/lightning/config.yaml

The callback is configured in config.yaml under ``trainer.callbacks``. After training this says
how many of the planted mislabeled training images rank in the top 1 %, 5 % and 10 % by
self-influence, how many are among the queries' most harmful examples, and prints the
``tensorboard --logdir ...`` line with the tags to open.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from digits import DigitsClassifier, DigitsDataModule, mislabel_report  # noqa: E402
from infl_plugin.integrations.lightning import InfluenceCallback  # noqa: E402


class DigitsCLI(LightningCLI):
    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        logger = self.trainer.logger
        root = getattr(logger, "root_dir", None) or self.trainer.default_root_dir
        callback = next((c for c in self.trainer.callbacks if isinstance(c, InfluenceCallback)), None)
        result = callback.session.last_result if callback is not None and callback.session is not None else None
        if result is None:
            print(f"planted mislabeled training indices: {self.datamodule.mislabeled}")
            print(f"tensorboard --logdir {root}")
            return
        print("\n" + mislabel_report(result, self.datamodule.mislabeled, root))


def main(args=None) -> None:
    DigitsCLI(DigitsClassifier, DigitsDataModule, args=args)


if __name__ == "__main__":
    main()
