"""Module hooks that hand ``(a, g)`` pairs of tracked layers to a sink.

A forward hook on each tracked layer registers a tensor hook on that call's output, closing over
the call's input and the token mask current at forward time. When the gradient of that output is
computed — by the trainer's ``loss.backward()`` or by an explicit ``torch.autograd.grad`` — the
tensor hook turns input and gradient into ``a: [batch, tokens, d_in]`` and ``g: [batch, tokens,
d_out]`` and calls the sink once. This pairing is what makes gradient checkpointing safe: a
recomputed forward either registers the hook that will fire (reentrant) or one that never fires
(non-reentrant), so each backward contributes exactly once. Parameters' ``.grad`` are never read.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .layers import TrackedLayer


@dataclass
class Capture:
    """One layer call's activations and output gradients.

    ``a``: ``[batch, tokens, d_in]`` and ``g``: ``[batch, tokens, d_out]``, padding already zeroed;
    ``mask``: ``[batch, tokens]`` bool when a token mask applied to this layer, else ``None``.
    """

    layer: TrackedLayer
    a: torch.Tensor
    g: torch.Tensor
    mask: Optional[torch.Tensor]

    @property
    def num_tokens(self) -> torch.Tensor | int:
        """Real tokens of the call; a 0-dim tensor on the model's device when masked (reading it
        inside the backward would stall an accelerator's queue once per layer)."""
        if self.mask is not None:
            return self.mask.sum()
        return self.a.shape[0] * self.a.shape[1]


Sink = Callable[[Capture], None]


def fan_out(*sinks: Sink) -> Optional[Sink]:
    """One sink handing each capture to every one of ``sinks`` in turn (``None`` when none,
    the sink itself when one), so a single training backward feeds several consumers."""
    if not sinks:
        return None
    if len(sinks) == 1:
        return sinks[0]

    def sink(capture: Capture) -> None:
        for each in sinks:
            each(capture)

    return sink


class LayerHooks:
    """Hooks on a fixed set of layers; a context manager that always removes them.

    Args:
        model: the root module; a forward pre-hook on it picks up an ``attention_mask`` keyword
            (``[batch, tokens]``) so padding is excluded without the caller doing anything.
        layers: the layers to observe (from `select_layers`).
    """

    def __init__(self, model: nn.Module, layers: Sequence[TrackedLayer]) -> None:
        self.model = model
        self.layers = list(layers)
        self.sink: Optional[Sink] = None
        self.on_error: Optional[Callable[[TrackedLayer, Exception], None]] = None
        self.explicit_mask: Optional[torch.Tensor] = None
        self._auto_mask: Optional[torch.Tensor] = None
        self._recorded: Optional[list[torch.Tensor]] = None
        self._handles: list[RemovableHandle] = []

    # ----------------------------------------------------------------------------- lifecycle
    def attach(self) -> "LayerHooks":
        """Register the hooks (idempotent: never piles up handles)."""
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
        return self

    def close(self) -> None:
        """Remove every hook; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recorded = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "LayerHooks":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- masks
    @property
    def token_mask(self) -> Optional[torch.Tensor]:
        """The mask applied to the next forward: the explicit one, else the captured keyword."""
        return self.explicit_mask if self.explicit_mask is not None else self._auto_mask

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._auto_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    # ----------------------------------------------------------------------------- explicit passes
    @contextmanager
    def recording(self, sink: Sink) -> Iterator[list[torch.Tensor]]:
        """Route captures to ``sink`` and collect the tracked outputs of the forwards inside.

        Differentiate a loss with respect to the yielded outputs (``torch.autograd.grad``) to run
        a backward that fills the sink but leaves every parameter's ``.grad`` untouched. Errors
        inside these explicit passes are raised, not routed to ``on_error``.
        """
        previous = self.sink, self.on_error
        self.sink, self.on_error, self._recorded = sink, None, []
        try:
            yield self._recorded
        finally:
            (self.sink, self.on_error), self._recorded = previous, None

    def backward(self, loss: torch.Tensor, outputs: Sequence[torch.Tensor]) -> None:
        """Backpropagate ``loss`` to recorded ``outputs`` only (fires the tensor hooks)."""
        if not outputs:
            raise RuntimeError("No tracked layer took part in the forward pass with gradients enabled")
        torch.autograd.grad(loss, list(outputs), allow_unused=True)

    # ----------------------------------------------------------------------------- hooks
    @staticmethod
    def _capture(layer: TrackedLayer, x: torch.Tensor, grad: torch.Tensor, mask: Optional[torch.Tensor]) -> Capture:
        a = layer.activations(x)
        g = layer.output_gradients(grad)
        applied = None
        if mask is not None and tuple(mask.shape) == tuple(a.shape[:2]):
            applied = mask.to(device=a.device, dtype=torch.bool)
            keep = applied.unsqueeze(-1)
            a = a * keep.to(a.dtype)
            g = g * keep.to(g.dtype)
        return Capture(layer, a, g, applied)

    def _forward_hook(self, layer: TrackedLayer) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            sink, on_error = self.sink, self.on_error
            if sink is None or not inputs or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = inputs[0].detach()
            mask = self.token_mask
            if self._recorded is not None:
                self._recorded.append(output)

            def on_grad(grad: torch.Tensor) -> None:
                try:
                    sink(self._capture(layer, x, grad.detach(), mask))
                except Exception as error:  # noqa: BLE001 - passive hooks must never break training
                    if on_error is None:
                        raise
                    on_error(layer, error)

            output.register_hook(on_grad)

        return hook
