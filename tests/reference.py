"""Brute-force references for the tests: explicit per-example gradients and dense matrices.

Everything here avoids the code under test: per-example gradients come from one
``torch.autograd.grad`` call per example on the model's parameters, and are laid out as the layer
matrices ``[d_out, d_in (+ bias column)]`` that infl_plugin uses.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def layer_matrix_grad(module: nn.Module, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
    """Parameter gradients → ``[d_out, d_in (+1)]`` (Conv1D weights are stored transposed)."""
    if type(module).__name__ == "Conv1D":
        w = weight_grad.T
    else:
        w = weight_grad.reshape(weight_grad.shape[0], -1)
    return w if bias_grad is None else torch.cat([w, bias_grad[:, None]], dim=1)


def per_example_gradients(
    modules: Sequence[nn.Module], loss_fn: Callable[[int], torch.Tensor], n: int
) -> list[torch.Tensor]:
    """For each module, ``[n, d_out, d_in(+1)]`` gradients of ``loss_fn(i)`` (example i's loss)."""
    params = []
    for m in modules:
        params += [m.weight] + ([m.bias] if m.bias is not None else [])
    out: list[list[torch.Tensor]] = [[] for _ in modules]
    for i in range(n):
        grads = torch.autograd.grad(loss_fn(i), params, allow_unused=True)
        pos = 0
        for j, m in enumerate(modules):
            wg = grads[pos] if grads[pos] is not None else torch.zeros_like(m.weight)
            pos += 1
            bg = None
            if m.bias is not None:
                bg = grads[pos] if grads[pos] is not None else torch.zeros_like(m.bias)
                pos += 1
            out[j].append(layer_matrix_grad(m, wg, bg))
    return [torch.stack(g) for g in out]


def dense_fisher(grads: torch.Tensor) -> torch.Tensor:
    """``E_n[vec(DW_n) vec(DW_n)ᵀ]`` for ``grads: [n, d_out, d_in]`` (row-major vec)."""
    flat = grads.flatten(1)
    return flat.T @ flat / flat.shape[0]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (no ties expected)."""
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
