"""Influence in a plain PyTorch loop: which training digits helped or hurt each test digit?

Trains a small MLP on scikit-learn's digits (a few training labels deliberately flipped) with an
`InfluenceTracker` riding along, then prints, per query, the most helpful and most harmful training
images as ASCII art, and where the planted mislabeled images rank by self-influence.

    python examples/digits_plain.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import infl_plugin as ip

SHADES = " .:-=+*#%@"


def ascii_digit(image: torch.Tensor) -> list[str]:
    """8x8 image in [0, 1] → 8 lines of characters."""
    return ["".join(SHADES[min(int(v * (len(SHADES) - 1)), len(SHADES) - 1)] * 2 for v in row) for row in image.view(8, 8)]


def main() -> None:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train_x, train_y, test_x, test_y = x[:1200], y[:1200].clone(), x[1200:], y[1200:]
    planted = torch.arange(0, 1200, 150)[:8]
    train_y[planted] = (train_y[planted] + 5) % 10
    train = TensorDataset(train_x, train_y)

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    task = ip.ClassificationTask()
    # a 228-step demo: statistics on every step (the default, every 32nd, keeps long runs' overhead low)
    config = ip.InfluenceConfig(strategy="ekfac", update_every=1)
    with ip.InfluenceTracker(model, task, config) as tracker:
        for epoch in range(12):
            for xb, yb in DataLoader(train, batch_size=64, shuffle=True):
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                tracker.step((xb, yb))
            if epoch == 10:
                tracker.refresh_eigenbasis()  # the last epoch accumulates the EK-FAC eigenvalues
        factors = tracker.factors()
    accuracy = (model(test_x).argmax(1) == test_y).float().mean()
    print(f"test accuracy {accuracy:.3f}; curvature from {tracker.updates} training steps")

    attributor = ip.Attributor(model, task, factors, config)
    in_order = DataLoader(train, batch_size=256)
    queries = TensorDataset(test_x[:3], test_y[:3])
    top = attributor.top_k(DataLoader(queries, batch_size=3), in_order, k=3)
    for q in range(3):
        print(f"\nquery {q} (label {int(test_y[q])}): most helpful | most harmful training images")
        columns = [ascii_digit(test_x[q])]
        captions = ["query"]
        for kind, idx, score in (("+", top.helpful_indices[q], top.helpful_scores[q]),
                                 ("-", top.harmful_indices[q], top.harmful_scores[q])):
            for i, s in zip(idx.tolist(), score.tolist()):
                columns.append(ascii_digit(train_x[i]))
                captions.append(f"{kind}#{i} y={int(train_y[i])} {s:+.1e}")
        width = max(len(c) for c in captions)
        print("  ".join(c.ljust(width) for c in captions))
        for line in zip(*columns):
            print("  ".join(part.ljust(width) for part in line))

    self_scores = attributor.self_scores(in_order)
    rank = self_scores.argsort(descending=True).argsort()
    print("\nplanted mislabeled examples, rank by self-influence (of 1200):", sorted(rank[planted].tolist()))


if __name__ == "__main__":
    main()
