"""`LossReduction`: how a training loop's loss reduces the task's per-example losses, measured once.

The statistics need ``d(training loss) / d(loss_n)``: the task assumes the usual reduction (a batch
mean, `Task.training_loss_scale`), but a loop may sum instead. Comparing the loss a training step
backpropagates with ``Σ_n loss_n`` of the same batch tells them apart; a sum (or any other ratio)
is warned about once and then undone on every batch.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Union

import torch
from torch import nn

from .passes import isolated
from ..tasks import Task

TOLERANCE = 1.5  # factor within which a measured ratio counts as the mean or the sum


class LossReduction:
    """Measures (`check`) and applies (`scale`) the reduction of a training loss.

    ``mode`` is ``None`` until decided, then ``"mean"``, ``"sum"`` or the measured ratio (a float).
    """

    def __init__(self, task: Task, strict: bool = False) -> None:
        self.task = task
        self.strict = strict
        self.mode: Union[None, str, float] = None

    def check(self, model: nn.Module, batch: Any, loss: float, factor: float = 1.0) -> None:
        """Decide the reduction from one batch (once; later calls return at once).

        ``loss``: the value the training backward differentiates; ``factor``: what the adapter
        knows multiplies it besides the reduction (``1/accumulation`` × the AMP loss scale). The
        batch's ``Σ_n loss_n`` is computed without gradients in eval mode with forked RNGs (the
        caller pauses the tracker's hooks), and ``loss / (factor × Σ_n loss_n)`` is compared with
        the task's mean and a plain sum (1), within a factor `TOLERANCE` (eval mode turns dropout
        off). Undecided while the two coincide (one example) or the batch gives no finite loss.
        """
        mean = self.task.training_loss_scale(batch)
        if self.mode is not None or not (math.isfinite(mean) and mean > 0) or math.isclose(mean, 1.0):
            return
        with isolated(model), torch.no_grad():
            total = float(self.task.loss(model, batch).double().sum())
        if not (math.isfinite(total) and total > 0 and math.isfinite(loss) and loss > 0):
            return  # cannot tell from this batch; the next one tries again
        ratio = loss / (factor * total)
        distance = {name: abs(math.log(ratio / value)) for name, value in (("mean", mean), ("sum", 1.0))}
        nearest = min(distance, key=distance.get)
        if distance[nearest] > math.log(TOLERANCE):
            self.mode = ratio
            message = (f"infl_plugin: the training loss is neither the mean nor the sum of the task's per-example "
                       f"losses (loss / Σ losses = {ratio:.4g}; mean: {mean:.4g}, sum: 1); is the task right? "
                       "Statistics use the measured ratio")
        elif nearest == "sum":
            self.mode = "sum"
            message = (f"infl_plugin: the training loss is the sum of the per-example losses, not their mean (loss "
                       f"/ Σ losses = {ratio:.4g}, mean would be {mean:.4g}); statistics undo a sum from now on")
        else:
            self.mode = "mean"
            return
        if self.strict:
            raise ValueError(message + " (strict=True refuses the mismatch: make the loss a batch mean or pass a Task "
                             "whose training_loss_scale matches it)")
        warnings.warn(message, stacklevel=3)

    def scale(self, batch: Any) -> float:
        """``training_loss / Σ_n loss_n`` before accumulation and AMP: the task's mean unless `check`
        measured a sum (1) or another ratio (that ratio)."""
        if self.mode == "sum":
            return 1.0
        if isinstance(self.mode, float):
            return self.mode
        return self.task.training_loss_scale(batch)


__all__ = ["LossReduction"]
