"""What the Hugging Face adapter records of each training micro-batch, and the loss scale it measures.

`TrainingInputs` puts a forward pre-hook and a forward hook on the Trainer's model: the first
records the micro-batch's tensor keyword inputs, the second the loss the model returned, on which
(and on the per-token log-probabilities of a fused LM head, as TRL's ``SFTTrainer`` uses) a tensor
hook reads the gradient the training backward sends through it. `TrainerLossScale` turns those
into ``grad_scale = d(backpropagated objective) / d(Σ_n task_loss_n)``, which the statistics need
to undo whatever normalisation and scaling the Trainer (or a trainer subclass's ``compute_loss``)
applied, measured rather than assumed.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from infl_plugin.tasks import Task

MAX_PENDING = 4  # recorded micro-batches kept between commits (1 inside the Trainer's loop)


# --------------------------------------------------------------------------------- micro-batches
@dataclass
class MicroBatch:
    """One training forward as the model saw it.

    ``batch``: the tensor keyword inputs (``input_ids``, ``attention_mask``, ``labels``, …);
    ``num_items``: the ``num_items_in_batch`` the Trainer passed (a number or a 0-dim tensor), if
    any; ``model_scale``: the model's returned loss divided by ``Σ_n task_loss_n`` (set by the
    forward hook); ``loss_grad``: the gradient that reached that loss in the backward (0-dim);
    ``token_grad`` / ``token_mask``: the gradient that reached the per-token log-probabilities a
    fused LM head returned (``[B, T-1]``) and which of them are scored (its ``label_mask``).
    """

    batch: dict[str, torch.Tensor]
    num_items: Any = None
    model_scale: Optional[float] = None
    loss_grad: Optional[torch.Tensor] = None
    measured: bool = False
    token_grad: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None


class TrainerLossScale:
    """How the gradients a Trainer backpropagates relate to the task's per-example losses.

    ``grad_scale = model_scale × loss_factor``, where

    * ``model_scale`` = model loss / ``Σ_n task_loss_n``: ``1 / num_items_in_batch`` when the model
      normalises its summed loss by it (Hugging Face causal LMs when the Trainer passes it), else
      the task's own mean (``1 / tokens`` or ``1 / examples``). Which of the two a model does is
      measured once, on the first micro-batch where they differ, by comparing its returned loss with
      the task's summed loss computed from the returned logits (a BERT classifier accepts the
      keyword and ignores it, for instance);
    * ``loss_factor`` = d(backpropagated objective) / d(model loss), read by a tensor hook on the
      returned loss: ``1 / gradient_accumulation_steps`` when the Trainer divides, × the AMP
      ``GradScaler`` scale, × the process count when tokens are averaged across devices, whatever
      the Trainer version does.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.mode: Optional[str] = None  # "num_items" | "mean" once measured
        self.warned: set[str] = set()

    def measure(self, micro: MicroBatch, output: Any) -> None:
        """Set ``micro.model_scale`` from the model's output (forward hook; no graph is built)."""
        micro.measured = True
        mean = self.task.training_loss_scale(micro.batch)
        if micro.num_items is None:
            micro.model_scale = mean
            return
        num_items = float(micro.num_items)
        items = 1.0 / num_items if num_items > 0 else math.inf
        if math.isclose(items, mean, rel_tol=1e-9) or self.mode is not None:
            micro.model_scale = items if self.mode in (None, "num_items") else mean
            return
        loss = model_loss(output)
        total = self._summed_task_loss(output, micro.batch)
        if loss is None or total is None or not total > 0:
            self.warn("unmeasured", "infl_plugin: cannot compare the model's loss with the task's losses (no loss "
                      "or logits in the output, or an unsupported task); assuming loss = Σ losses / "
                      "num_items_in_batch")
            micro.model_scale = items
            return
        ratio = float(loss.detach().float().mean()) / total
        for mode, value in (("num_items", items), ("mean", mean)):
            if math.isclose(ratio, value, rel_tol=1e-3):
                self.mode, micro.model_scale = mode, value
                return
        self.warn("mismatch", f"infl_plugin: the model's loss is neither the mean nor the num_items_in_batch-"
                  f"normalised sum of the task's per-example losses (ratio {ratio:.4g}, expected {items:.4g} or "
                  f"{mean:.4g}); is the task right (labels, padding set to -100)? Using the measured ratio.")
        micro.model_scale = ratio

    def _summed_task_loss(self, output: Any, batch: dict[str, torch.Tensor]) -> Optional[float]:
        """``Σ_n task_loss_n`` from the model's output (no forward, no graph); ``None`` when the task
        cannot read this output."""
        try:
            with torch.no_grad():
                return float(self.task.loss_from_output(output, batch).double().sum())
        except (NotImplementedError, TypeError, KeyError, IndexError, ValueError, RuntimeError):
            return None

    def grad_scale(self, micro: MicroBatch, args: Any) -> float:
        """``d(backpropagated objective) / d(Σ_n task_loss_n)`` for a micro-batch whose backward just ran."""
        if micro.token_grad is not None:
            return self._token_grad_scale(micro)
        model_scale = micro.model_scale if micro.model_scale is not None else self.task.training_loss_scale(micro.batch)
        if micro.loss_grad is None:
            self.warn("no-loss-grad", "infl_plugin: the training backward did not pass through the loss the model "
                      "returned (no loss in the output: label smoothing or a compute_loss_func; or a custom "
                      "compute_loss); assuming the loss is divided by gradient_accumulation_steps and not scaled "
                      "by AMP")
            return model_scale / args.gradient_accumulation_steps
        return model_scale * float(micro.loss_grad.float().sum())

    def _token_grad_scale(self, micro: MicroBatch) -> float:
        """The scale read from the gradient at per-token log-probabilities: ``Σ_n task_loss_n`` is
        ``-Σ`` of the scored ones, so the objective's derivative in it is ``-grad`` at each scored
        token (the same at every token for a sum or mean of token losses: checked)."""
        grad = micro.token_grad.double()
        mask = micro.token_mask.to(grad.device).bool() if micro.token_mask is not None else torch.ones_like(grad).bool()
        scored = -grad[mask]
        if scored.numel() == 0:
            return 0.0
        scale = float(scored.mean())
        if float((scored - scale).abs().max()) > 1e-4 * abs(scale) + 1e-12:
            self.warn("token-weights", "infl_plugin: the training loss weights the tokens unequally (a weighted "
                      "token loss such as loss_type='dft'); the statistics use its mean token weight")
        return scale

    def warn(self, key: str, message: str) -> None:
        """Warn once per ``key``."""
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=3)


def model_loss(output: Any) -> Optional[torch.Tensor]:
    """The loss a model returned (``output["loss"]`` of a ``ModelOutput`` or dict), else ``None``."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def _output_field(output: Any, name: str) -> Optional[torch.Tensor]:
    """A tensor field of a model output (``ModelOutput`` or dict), else ``None``."""
    value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
    return value if isinstance(value, torch.Tensor) else None


class TrainingInputs:
    """Hooks on the Trainer's model that record each training micro-batch's inputs and loss gradient.

    Only forwards in training mode with gradients enabled are recorded (evaluation and the
    session's own eval-mode passes are not); a gradient-checkpointing recomputation never reruns
    the root module, so each micro-batch is recorded once. At most ``MAX_PENDING`` micro-batches
    wait for a commit, and every hook does nothing once `close` ran.
    """

    def __init__(self, model: nn.Module, scale: TrainerLossScale, capturing: Callable[[], bool]) -> None:
        self.model = model
        self.scale = scale
        self.capturing = capturing  # the loss scale is measured only for micro-batches that feed the statistics
        self.pending: deque[MicroBatch] = deque(maxlen=MAX_PENDING)
        self.active = False
        self._handles: list[Any] = []

    def attach(self) -> None:
        """Hooks on (idempotent)."""
        if not self._handles:
            self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                             self.model.register_forward_hook(self._after, with_kwargs=True)]
        self.active = True

    def close(self) -> None:
        """Hooks off, pending micro-batches dropped; tensor hooks already on a loss become no-ops."""
        self.active = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.pending.clear()

    def pop(self) -> list[MicroBatch]:
        """The micro-batches recorded since the last call, oldest first."""
        pending = list(self.pending)
        self.pending.clear()
        return pending

    def _recording(self, module: nn.Module) -> bool:
        return self.active and module.training and torch.is_grad_enabled()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording(module):
            return
        try:
            batch = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k != "num_items_in_batch"}
            if args and isinstance(args[0], torch.Tensor) and "input_ids" not in batch:
                batch["input_ids"] = args[0]
            self.pending.append(MicroBatch(batch, kwargs.get("num_items_in_batch")))
        except Exception as error:  # never break training
            self.scale.warn("record", f"infl_plugin: could not record a training batch: {error}")

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (self._recording(module) and self.pending and not self.pending[-1].measured and self.capturing()):
            return
        micro = self.pending[-1]
        try:
            self.scale.measure(micro, output)
            loss = model_loss(output)
            if loss is not None and loss.requires_grad:
                loss.register_hook(self._loss_hook(micro))
            log_probs = _output_field(output, "log_probs")
            if log_probs is not None and log_probs.requires_grad:
                micro.token_mask = _output_field(output, "label_mask")
                log_probs.register_hook(self._token_hook(micro))
        except Exception as error:  # never break training
            self.scale.warn("measure", f"infl_plugin: could not measure the loss scale: {error}")

    def _token_hook(self, micro: MicroBatch) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:  # returns None: the gradient itself is untouched
            if self.active:
                micro.token_grad = grad.detach()

        return hook

    def _loss_hook(self, micro: MicroBatch) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:  # returns None: the gradient itself is untouched
            if self.active:
                micro.loss_grad = grad.detach()

        return hook


__all__ = ["MAX_PENDING", "MicroBatch", "TrainerLossScale", "TrainingInputs", "model_loss"]
