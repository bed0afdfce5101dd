"""What the scores say beyond their values: tails (CCDF, Hill exponent), layer shares, depth bins.

Plain functions of score tensors, shared by the attribution job (into the result) and the reports.
"""

from __future__ import annotations

import numpy as np
import torch


def ccdf(values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(s, P(|X| >= s))`` of the finite, non-zero ``|values|``, s ascending."""
    x = np.abs(np.asarray(torch.as_tensor(values).detach().cpu().double().reshape(-1)))
    x = np.sort(x[np.isfinite(x) & (x > 0)])
    if x.size == 0:
        return x, x
    return x, (x.size - np.searchsorted(x, x, side="left")) / x.size


def tail_exponent(values: torch.Tensor, tail_fraction: float = 0.1, min_tail: int = 10) -> float:
    """Hill estimate of α in ``P(|X| > s) ∝ s^-α`` on the largest ``tail_fraction`` of ``|values|``.

    ``α = k / Σ_{i<k} log(x_(i) / x_(k))`` over the k largest values (k = max(min_tail,
    tail_fraction·n)). Returns ``nan`` with fewer than ``min_tail + 1`` usable values. Smaller α =
    heavier tail (more of the influence held by few examples).
    """
    x = np.abs(np.asarray(torch.as_tensor(values).detach().cpu().double().reshape(-1)))
    x = np.sort(x[np.isfinite(x) & (x > 0)])[::-1]
    if x.size < min_tail + 1:
        return float("nan")
    k = min(max(min_tail, int(tail_fraction * x.size)), x.size - 1)
    logs = np.log(x[:k] / x[k])
    total = float(logs.sum())
    return float(k / total) if total > 0 else float("nan")


def layer_shares(abs_sums: torch.Tensor) -> torch.Tensor:
    """``[L, Q]`` sums of |score| per layer → ``[Q, L]`` shares (rows sum to 1; zeros stay zero)."""
    shares = abs_sums.T.double()
    total = shares.sum(1, keepdim=True)
    return torch.where(total > 0, shares / total.clamp(min=1e-300), torch.zeros_like(shares)).float()


def depth_bins(shares: torch.Tensor, bins: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``[Q, L]`` per-layer shares (layers in network order) → ``[Q, B]`` sums over B = min(bins, L)
    contiguous depth bins of near-equal size, and each bin's layer range ``[start, stop)``."""
    count = shares.shape[1]
    edges = np.linspace(0, count, min(bins, count) + 1).round().astype(int)
    ranges = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    return torch.stack([shares[:, a:b].sum(1) for a, b in ranges], dim=1), ranges


def signed_log_scores(values: torch.Tensor) -> np.ndarray:
    """``sign(s) · log10(1 + |s| / m)`` of the finite scores, m = median of the non-zero ``|s|``.

    Scale-free and readable despite heavy tails: 0 = no influence, ±1 = 9× the median example's
    magnitude, ±2 = 99×; the sign is kept (positive = helpful).
    """
    x = np.asarray(torch.as_tensor(values).detach().cpu().double().reshape(-1))
    x = x[np.isfinite(x)]
    magnitude = np.abs(x)
    nonzero = magnitude[magnitude > 0]
    median = float(np.median(nonzero)) if nonzero.size else 1.0
    return np.sign(x) * np.log10(1.0 + magnitude / median)


__all__ = ["ccdf", "depth_bins", "layer_shares", "signed_log_scores", "tail_exponent"]
