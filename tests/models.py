"""Tiny float64 models covering every layer kind: Conv2d, Linear, Conv1D, sequences with padding.

Imports no framework, so the core tests run without transformers: GPT-2's ``Conv1D`` is taken
from transformers when it is installed, else `_Conv1D` (the same layer: ``weight [d_in, d_out]``,
``y = x W + b``, matched by class name like the original). Hugging Face helpers are in `hf_models`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Conv1D(nn.Module):
    """GPT-2's transposed linear layer ``y = x W + b`` with ``W: [nx, nf]``, for runs without transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


_Conv1D.__name__ = _Conv1D.__qualname__ = "Conv1D"  # recognised by name, as transformers' is
try:
    from transformers.pytorch_utils import Conv1D
except ImportError:
    Conv1D = _Conv1D


class ImageNet(nn.Module):
    """Conv2d (stride 2, padding 1) → tanh → Linear; input ``[B, 2, 5, 5]`` → logits ``[B, 4]``."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias)
        self.fc = nn.Linear(27, 4, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class SeqNet(nn.Module):
    """Linear and GPT-2 Conv1D on tokens ``[B, T, 4]``, masked mean pooling, Linear head → ``[B, 3]``."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5, bias=bias)
        self.mix = Conv1D(6, 5)
        self.head = nn.Linear(6, 3, bias=bias)

    def hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = self.inp(x)
        h2 = self.mix(torch.tanh(h1))
        return h1, h2

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(x)[1])
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


def feature_data(n_train: int, seed: int = 0) -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """``n_train`` training and 8 held-out rows of 6 features with 3 classes (callback tests)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + 8, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3:].sum(1) > 0.5).long()
    dataset = torch.utils.data.TensorDataset
    return dataset(x[:n_train], y[:n_train]), dataset(x[n_train:], y[n_train:])


def image_data(n: int = 12, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (), generator=g)) for _ in range(n)]


def sequence_data(n: int = 12, tokens: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Examples with 1..tokens real tokens; padding positions hold random (non-zero) values."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = 1 + i % tokens
        mask = torch.zeros(tokens, dtype=torch.long)
        mask[:length] = 1
        items.append({"x": torch.randn(tokens, 4, generator=g, dtype=torch.float64), "attention_mask": mask,
                      "labels": torch.randint(0, 3, (), generator=g)})
    return items


def collate(items: list) -> object:
    if isinstance(items[0], dict):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return tuple(torch.stack([it[j] for it in items]) for j in range(len(items[0])))


def loader(items: list, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=collate)


def example_loss(model: nn.Module, item) -> torch.Tensor:
    """Cross-entropy of one example (no batching tricks), for brute-force references."""
    if isinstance(item, dict):
        logits = model(item["x"][None], item["attention_mask"][None])
        return F.cross_entropy(logits, item["labels"][None])
    return F.cross_entropy(model(item[0][None]), item[1][None])
