"""Explicit forward/backward passes that leave training exactly as it was.

Fitting, sampled-Fisher updates and attribution need their own backward passes. They run with the
model in eval mode (no dropout, no batch-norm statistic updates), inside forked RNGs (so the
training run draws the same random numbers afterwards), and differentiate with respect to the
tracked layers' outputs only (parameters' ``.grad`` are never touched).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from .hooks import LayerHooks, Sink
from ..tasks import Task


@contextmanager
def forked_rng() -> Iterator[None]:
    """Fork the global RNGs for the block: torch (CPU + current CUDA device), numpy and ``random``.

    Whatever the block draws, the states are restored after it, so training draws the same random
    numbers as if the block had not run (only the current CUDA device is forked, and only once
    CUDA is initialised: forking every device would initialise them all).
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Eval mode and forked RNGs (`forked_rng`) for the block; every module's mode is restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    with forked_rng():
        model.eval()
        try:
            yield
        finally:
            for module, mode in modes:
                module.training = mode


def backward_pass(
    model: nn.Module,
    task: Task,
    hooks: LayerHooks,
    batch: Any,
    sink: Sink,
    *,
    measurement: bool = False,
    sample: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-example losses (or measurements) of ``batch``; their sum is backpropagated into ``sink``.

    Returns the detached per-example values ``Tensor[batch]``. Gradients reaching the sink are those
    of the per-example functions (no mean, no scaling).
    """
    previous_mask, hooks.explicit_mask = hooks.explicit_mask, task.token_mask(batch)
    try:
        with hooks.recording(sink) as outputs, torch.enable_grad():
            values = task.measurement(model, batch) if measurement else task.loss(model, batch, sample, generator)
            if values.numel():
                hooks.backward(values.sum(), outputs)
    finally:
        hooks.explicit_mask = previous_mask
    return values.detach()


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free module)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
