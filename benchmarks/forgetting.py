"""Which forgetting rule keeps tracked factors as faithful as post-hoc ones in every regime?

Tracked statistics average every statistics step so far: after a run whose early steps sit far
from the final parameters (full-batch training converges in few, large steps), that average
keeps curvature the final model no longer has. This script trains each model with several
`InfluenceTracker` settings attached to the same run (trackers never change training) and reads
their factors at the end (the callbacks' attribution: a fresh eigenbasis from the covariances, the
bounded eigenvalue pass over the training set where the tracker asks for it), then compares the
LDS of their scores with `fit_factors` at the same final parameters (ground truth: 100 random
50 % subsets retrained to convergence, cached by `accuracy.lds_truth`, shared with `fidelity.py`).

Regimes (digits MLP classifier 64-32-10 on 500 examples, diabetes MLP regressor 10-32-1 on 300):

* full-batch Adam, cosine decay, 1500 steps, attributions at the end only or every 375 steps;
* minibatch Adam (batch 32, cosine decay) over 60 epochs, attributions every quarter.

Settings: the default (no forgetting), a half-life equal to a fraction of the run so far
(``half_life_fraction``: 5 %, 10 %, 20 %), and fixed half-lives.

    OMP_NUM_THREADS=2 python benchmarks/forgetting.py            # ~5 min on 2 cores (truth cached)
    OMP_NUM_THREADS=2 python benchmarks/forgetting.py --write    # also update RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ground_truth as gt  # noqa: E402
from common import setup_threads, table, write_section  # noqa: E402
from fidelity import L2, LR, lds_problem  # noqa: E402

import infl_plugin as ip  # noqa: E402

FULL_BATCH_STEPS, MINIBATCH, MINIBATCH_EPOCHS = 1500, 32, 60
SETTINGS = {
    "default (no forgetting)": {},
    "half_life_fraction=0.05": {"half_life_fraction": 0.05},
    "half_life_fraction=0.1": {"half_life_fraction": 0.1},
    "half_life_fraction=0.2": {"half_life_fraction": 0.2},
    "half_life=100": {"half_life": 100},
}


def train(kind: str, x, y, task: ip.Task, seed: int, batch: int, steps: int, attributions: int):
    """Adam (cosine decay) on ``mean loss + (l2/2)‖θ‖²`` for ``steps`` optimizer steps of ``batch``
    examples (reshuffled each epoch), one tracker per setting attached; the eigenbasis refreshed
    at each of ``attributions`` evenly spaced points before the end (what the callbacks do after an
    attribution). Returns the model, ``{name: (config, factors)}`` and the training batches."""
    model = gt.make_model(kind, seed)
    n = x.shape[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    configs = {name: ip.InfluenceConfig(**over) for name, over in SETTINGS.items()}
    tracked = {name: ip.InfluenceTracker(model, task, c).attach() for name, c in configs.items()}
    order = torch.Generator().manual_seed(seed)
    every = steps // attributions
    rows_queue: list[torch.Tensor] = []
    for step in range(1, steps + 1):
        if not rows_queue:
            rows_queue = list(torch.randperm(n, generator=order).split(batch))
        rows = rows_queue.pop(0)
        data = (x[rows], y[rows])
        optimizer.zero_grad()
        out = model(data[0])
        loss = F.cross_entropy(out, data[1]) if kind == "mlp" else F.mse_loss(out[:, 0], data[1])
        (loss + 0.5 * L2 * sum(p.pow(2).sum() for p in model.parameters())).backward()
        for tracker in tracked.values():
            tracker.step(data)
        optimizer.step()
        schedule.step()
        if step % every == 0 and step < steps:
            for tracker in tracked.values():
                tracker.refresh_eigenbasis()
    batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, n, 100)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factors = {name: (configs[name], t.factors(loader=batches)) for name, t in tracked.items()}
    for t in tracked.values():
        t.close()
    return model, factors, batches


def rows_for(kind: str, regime: str, seeds: list[int]) -> list[list]:
    x, y, xq, yq, task, truth = lds_problem(kind)
    n = x.shape[0]
    if regime.startswith("full-batch"):
        batch, steps = n, FULL_BATCH_STEPS
    else:
        batch, steps = MINIBATCH, MINIBATCH_EPOCHS * -(-n // MINIBATCH)
    attributions = 1 if regime.endswith("end only") else 4
    values: dict[str, list[float]] = {}
    for seed in seeds:
        model, factors, batches = train(kind, x, y, task, seed, batch, steps, attributions)
        lds = lambda f, c: gt.lds(ip.Attributor(model, task, f, c).pairwise_scores([(xq, yq)], batches), truth)  # noqa: E731
        config = ip.InfluenceConfig()
        post = lds(ip.fit_factors(model, task, batches, config), config)
        values.setdefault("fit_factors (post-hoc)", []).append(post)
        for name, (c, f) in factors.items():
            values.setdefault(name, []).append(lds(f, c) - post)
        print(f"{kind} {regime} seed {seed} done", flush=True)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    post = values.pop("fit_factors (post-hoc)")
    out = [[kind, regime, "fit_factors (post-hoc)", f"{mean(post):.3f}", ""]]
    for name, deltas in values.items():
        out.append([kind, regime, name, f"{mean(post) + mean(deltas):.3f}", f"{mean(deltas):+.3f} ("
                    + " ".join(f"{d:+.3f}" for d in deltas) + ")"])
    return out


REGIMES = ("full-batch, 1500 steps, attribution at the end only", "full-batch, 1500 steps, 4 attributions",
           "minibatch, 60 epochs, 4 attributions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    setup_threads()
    started = time.perf_counter()
    rows = [r for kind in ("mlp", "regmlp") for regime in REGIMES for r in rows_for(kind, regime, args.seeds)]
    body = table(["model", "regime", "statistics", "LDS", "Δ vs fit_factors (per seed)"], rows)
    print(body)
    print(f"{time.perf_counter() - started:.0f} s")
    if args.write:
        write_section("Forgetting: tracked factors against post-hoc ones in three regimes (forgetting.py)", body,
                      "OMP_NUM_THREADS=2 python benchmarks/forgetting.py --write")


if __name__ == "__main__":
    main()
