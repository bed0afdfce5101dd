"""Tasks: how to get per-example losses, measurements and token masks from a batch.

A task's ``loss`` returns one loss per example (``Tensor[batch]``); with ``sample=True`` the
targets are drawn from the model's own predictive distribution, which turns the gradient second
moment into the true Fisher (= the Gauss-Newton matrix for these losses). ``measurement`` is the
query function f whose change the influence predicts (default: the loss).

``training_loss_scale(batch)`` states how the training loop's scalar loss relates to the sum of the
per-example losses (``training_loss = scale × Σ_n loss_n``) so that gradients seen by hooks during
training can be turned back into per-example gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BatchFormatError

IGNORE_INDEX = -100


class Task:
    """Base class; subclass and implement `loss` for a custom model or batch layout."""

    def loss(
        self, model: nn.Module, batch: Any, sample: bool = False, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Per-example training loss, ``Tensor[batch]``; sampled targets when ``sample``."""
        raise NotImplementedError

    def loss_from_output(
        self, output: Any, batch: Any, sample: bool = False, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """`loss` from the model's output on ``batch`` (a forward already run), ``Tensor[batch]``.

        Lets an adapter compare the loss a training step returned with the task's losses without
        another forward; tasks that do not implement it raise ``NotImplementedError``.
        """
        raise NotImplementedError

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example query measurement f, ``Tensor[batch]`` (default: the loss)."""
        return self.loss(model, batch)

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model output the loss is a function of (logits, predictions), ``[batch, ...]``.

        `InfluenceConfig.refine_steps` differentiates it with respect to the parameters for exact
        Gauss-Newton-vector products; tasks that do not implement it raise ``NotImplementedError``.
        """
        raise NotImplementedError

    def output_hessian(self, output: torch.Tensor, batch: Any, u: torch.Tensor) -> torch.Tensor:
        """``H u`` with ``H`` the Hessian of ``Σ_n loss_n`` with respect to ``output`` (same shape as ``u``).

        Default: forward-over-reverse differentiation of `loss_from_output`, exact for any loss; the
        built-in tasks use closed forms. The Gauss-Newton matrix is ``Σ_n J_nᵀ H_n J_n`` with it.
        """
        total = lambda o: self.loss_from_output(o, batch).sum()  # noqa: E731
        return torch.func.jvp(torch.func.grad(total), (output.detach(),), (u,))[1]

    def token_mask(self, batch: Any) -> Optional[torch.Tensor]:
        """``[batch, tokens]`` mask of real (non-padding) tokens, or ``None``."""
        if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
            return batch["attention_mask"]
        return None

    def batch_size(self, batch: Any) -> int:
        """Number of examples in ``batch``."""
        first = _first_tensor(batch)
        return 0 if first is None else int(first.shape[0])

    def training_loss_scale(self, batch: Any) -> float:
        """``training_loss / Σ_n loss_n`` for the loss a training loop usually computes (a mean)."""
        return 1.0 / max(self.batch_size(batch), 1)


class ClassificationTask(Task):
    """Cross-entropy classification.

    Batches are ``(inputs, labels)`` tuples (``model(inputs)`` gives logits ``[batch, classes]``)
    or mappings with a ``"labels"`` key whose other entries are passed as keyword arguments (a
    Hugging Face sequence classifier; ``.logits`` is read from its output). Training is assumed to
    use ``F.cross_entropy(logits, labels)`` (mean over the batch).
    """

    def loss(self, model, batch, sample=False, generator=None):
        return self.loss_from_output(self.output(model, batch), batch, sample, generator)

    def output(self, model, batch):
        _require_pair_or_mapping(self, batch, "labels", "(inputs, labels)")
        if isinstance(batch, Mapping):
            return _logits(model(**{k: v for k, v in batch.items() if k != "labels"}))
        return _logits(model(batch[0]))

    def output_hessian(self, output, batch, u):
        """``(diag p − p pᵀ) u`` per example, ``p = softmax(logits)``."""
        return _softmax_hessian(output, u)

    def loss_from_output(self, output, batch, sample=False, generator=None):
        logits = _logits(output)
        labels = batch["labels"] if isinstance(batch, Mapping) else batch[1]
        if sample:
            labels = sample_categorical(logits, generator)
        return F.cross_entropy(_full_precision(logits), labels.to(logits.device), reduction="none")


class RegressionTask(Task):
    """Regression with a unit-variance Gaussian likelihood: ``loss_n = ½‖pred_n − y_n‖²``.

    With ``sample=True`` targets are ``pred + ε``, ``ε ~ N(0, I)``, so the sampled Fisher is the
    Gauss-Newton matrix ``Jᵀ J``. Batches are ``(inputs, targets)``. Training is assumed to use
    ``F.mse_loss(pred, y)`` (mean over all elements), i.e. ``2/(batch·outputs) × Σ_n loss_n``.
    """

    def loss(self, model, batch, sample=False, generator=None):
        return self.loss_from_output(self.output(model, batch), batch, sample, generator)

    def output(self, model, batch):
        _require_pair_or_mapping(self, batch, None, "(inputs, targets)")
        return _logits(model(batch[0]))

    def output_hessian(self, output, batch, u):
        """The identity: ``½‖pred − y‖²`` has unit Hessian in ``pred``."""
        return u

    def loss_from_output(self, output, batch, sample=False, generator=None):
        pred = _full_precision(_logits(output))
        pred = pred.reshape(pred.shape[0], -1)
        if sample:
            noise = torch.randn(pred.shape, generator=generator, dtype=pred.dtype,
                                device=generator.device if generator is not None else pred.device)
            target = pred.detach() + noise.to(pred.device)
        else:
            target = batch[1].to(pred.dtype).reshape(pred.shape)
        return 0.5 * (pred - target).pow(2).sum(dim=1)

    def training_loss_scale(self, batch):
        target = batch[1]
        return 2.0 / max(target.numel(), 1)


class CausalLMTask(Task):
    """Next-token prediction; the per-sequence loss is the **sum** of its token cross-entropies.

    Batches are mappings with ``input_ids`` and optionally ``attention_mask`` and ``labels``
    (default: ``input_ids``). Labels equal to ``-100`` and positions with ``attention_mask == 0``
    are ignored. Training is assumed to use the Hugging Face loss: the mean over the batch's
    non-ignored shifted tokens.
    """

    def shifted_labels(self, batch: Mapping) -> torch.Tensor:
        """Targets aligned with the logits: ``[batch, tokens]`` with ``-100`` where ignored."""
        if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
            raise BatchFormatError(
                f"{type(self).__name__} expects batches as mappings with an 'input_ids' tensor [batch, tokens] and "
                f"optionally 'attention_mask' and 'labels'; got {_describe(batch)}"
            )
        labels = batch.get("labels")
        labels = batch["input_ids"] if labels is None else labels
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        return shifted

    def loss(self, model, batch, sample=False, generator=None):
        return self.loss_from_output(self.output(model, batch), batch, sample, generator)

    def output(self, model, batch):
        self.shifted_labels(batch)  # checks the layout before the model runs
        inputs = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            inputs["attention_mask"] = batch["attention_mask"]
        return _logits(model(**inputs))

    def output_hessian(self, output, batch, u):
        """``(diag p_t − p_t p_tᵀ) u_t`` at every scored token ``t`` (ignored tokens and padding: 0)."""
        valid = (self.shifted_labels(batch) != IGNORE_INDEX).to(device=u.device, dtype=u.dtype)
        return _softmax_hessian(output, u) * valid.unsqueeze(-1)

    def loss_from_output(self, output, batch, sample=False, generator=None):
        logits = _full_precision(_logits(output))
        targets = self.shifted_labels(batch).to(logits.device)
        valid = targets != IGNORE_INDEX
        if sample:
            drawn = sample_categorical(logits.reshape(-1, logits.shape[-1]), generator).reshape(targets.shape)
            targets = torch.where(valid, drawn, targets)
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).reshape(targets.shape)
        return (token_loss * valid).sum(dim=1)

    def training_loss_scale(self, batch):
        return 1.0 / max(int((self.shifted_labels(batch) != IGNORE_INDEX).sum()), 1)


def _require_pair_or_mapping(task: Task, batch: Any, key: Optional[str], pair: str) -> None:
    """Raise `BatchFormatError` unless ``batch`` is a ``pair`` sequence, or (when ``key``) a mapping
    holding ``key``; checked before the model sees the batch so the message names the layout."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return
    if key is not None and isinstance(batch, Mapping) and key in batch:
        return
    expected = f"{pair} pairs" + (f" or mappings with a {key!r} key (the other keys go to the model)" if key else "")
    hint = ""
    if isinstance(batch, Mapping) and key is not None:
        near = [k for k in batch if isinstance(k, str) and k.rstrip("s") == key.rstrip("s")]
        hint = f"; rename {near[0]!r} to {key!r}" if near else f"; keys present: {sorted(map(str, batch))}"
    raise BatchFormatError(f"{type(task).__name__} expects batches as {expected}, got {_describe(batch)}{hint}")


def _describe(batch: Any) -> str:
    """A short description of a batch's layout for error messages."""
    if isinstance(batch, torch.Tensor):
        return f"a bare tensor of shape {list(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a mapping with keys {sorted(map(str, batch))}"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} item(s)"
    return f"a {type(batch).__name__}"


def sample_categorical(logits: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row of ``logits: [n, classes]`` from softmax(logits), on ``generator``'s device."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(-1).to(logits.device)


def _softmax_hessian(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(diag p − p pᵀ) u`` along the last axis with ``p = softmax(logits)``: the Hessian of the
    cross-entropy in the logits, whatever the label (``logits``, ``u``: ``[..., classes]``)."""
    p = torch.softmax(_full_precision(logits.detach()), dim=-1).to(u.dtype)
    pu = p * u
    return pu - p * pu.sum(-1, keepdim=True)


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in at least float32 (bf16/fp16 logits are upcast, float64 kept)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}")


def _first_tensor(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Recursively move the tensors of a batch (tensors, mappings, lists, tuples) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch
