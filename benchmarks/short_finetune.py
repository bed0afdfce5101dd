"""Streaming on a short language-model fine-tune: how faithful, and why.

The regime of most LM users: `lm_finetune.py`'s byte-level GPT-2, fine-tuned for 100 AdamW steps
(linear decay, clipping, batch 32) on 640 sequences, 16 held-out query sequences, ground truth
from 100 retrained half subsets. One training run per tracker setting (a streaming tracker's query
refreshes run passes that another tracker's hooks would see; training itself is the same in every
run, checked). Each step's streamed scores are read separately, so the same run gives every way of
combining an example's visits:

* ``kept``: what one attribution at the end reads: the sum over the visits scored with the run's
  best preconditioning (the scorer drops its sums when better-preconditioned queries arrive);
* ``all``: the sum over every visit alike, whatever its queries' preconditioning;
* ``last``: the example's latest visit only, scored against the queries of that moment.

Side by side: checkpoint EK-FAC at the final weights (`fit_factors`, and the tracker's own factors
read as an attribution reads them) and plain gradient dot products at the final weights.

    OMP_NUM_THREADS=2 python benchmarks/short_finetune.py            # ~5 min (+8 min truth, cached)
    OMP_NUM_THREADS=2 python benchmarks/short_finetune.py --write    # also update RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ground_truth as gt  # noqa: E402
import lm_finetune as lm  # noqa: E402
from common import machine, setup_threads, table, write_section  # noqa: E402

import infl_plugin as ip  # noqa: E402
from infl_plugin.scoring.streaming.scorer import RANK  # noqa: E402

SETTINGS = {
    "defaults": {},
    "update_every=1": {"update_every": 1},
    "update_every=1, min_statistics_steps=8": {"update_every": 1, "min_statistics_steps": 8},
    "half_life_fraction=0.2": {"half_life_fraction": 0.2},
    "strategy=kfac": {"strategy": "kfac"},
    "defaults, stream_refresh_every=None (no automatic refresh: the former behaviour on short runs)": {"stream_refresh_every": None},
}

def streamed_run(overrides: dict) -> tuple[torch.nn.Module, list, ip.InfluenceTracker]:
    """The full-data fine-tune with a streaming tracker; per step ``(step, StreamedScores)``."""
    task = ip.CausalLMTask()
    config = ip.InfluenceConfig(**{"strategy": "ekfac", "fisher": "empirical", **overrides})
    holder: dict = {}
    steps: list = []

    def attach(model: torch.nn.Module) -> None:
        holder["tracker"] = ip.InfluenceTracker(model, task, config, queries=lm.query_batches()).attach()

    def hook(batch, indices, lr, step) -> None:
        tracker = holder["tracker"]
        tracker.step(batch, indices=indices)
        steps.append((step, tracker.streamed_scores()))
        tracker.reset_stream()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lm.finetune(torch.arange(lm.N_TRAIN), seed=0, step_hook=hook, on_model=attach)
    holder["tracker"].close()
    return model, steps, holder["tracker"]


def combine(steps: list, how: str) -> tuple[torch.Tensor, dict]:
    """Scores ``[Q, N]`` from per-step streamed scores, and the visits kept by preconditioning."""
    scores = torch.zeros(lm.N_QUERY, lm.N_TRAIN, dtype=torch.float64)
    kept: dict[str, int] = {}
    best = max(RANK[next(iter(s.batches), "identity")] for _, s in steps)
    for _, streamed in steps:
        kind = next(iter(streamed.batches), "identity")
        if how == "kept" and RANK[kind] != best:
            continue
        dense = streamed.dense(lm.N_TRAIN)
        seen = streamed.indices
        if how == "last":
            scores[:, seen] = dense[:, seen]
        else:
            scores[:, seen] += dense[:, seen]
        kept[kind] = kept.get(kind, 0) + len(seen)
    return scores, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    setup_threads()
    started = time.perf_counter()
    truth = lm.truth()
    task = ip.CausalLMTask()
    batches = lm.train_batches()
    rows, reference = [], None
    for name, overrides in SETTINGS.items():
        model, steps, tracker = streamed_run(overrides)
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        if reference is None:
            reference = params
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = ip.InfluenceConfig(strategy="ekfac", fisher="empirical")
                post = ip.Attributor(model, task, ip.fit_factors(model, task, batches, config), config)
                checkpoint = gt.lds(post.pairwise_scores(lm.query_batches(), batches), truth)
                identity = ip.InfluenceConfig(strategy="identity")
                plain = ip.Attributor(model, task, ip.fit_factors(model, task, batches, identity), identity)
                dots = gt.lds(plain.pairwise_scores(lm.query_batches(), batches), truth)
            rows.append(["checkpoint EK-FAC at the final weights (fit_factors)", "-", f"{checkpoint:.3f}", "1.00", ""])
            rows.append(["gradient dot products at the final weights", "-", f"{dots:.3f}",
                         f"{dots / checkpoint:.2f}", ""])
        assert torch.equal(params, reference), "tracking changed training"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tracked = ip.Attributor(model, task, tracker.factors(loader=batches), tracker.config)
            value = gt.lds(tracked.pairwise_scores(lm.query_batches(), batches), truth)
        rows.append([f"checkpoint, tracked factors ({name})", "-", f"{value:.3f}", f"{value / checkpoint:.2f}", ""])
        for how in ("kept", "all", "last"):
            scores, kept = combine(steps, how)
            value = gt.lds(scores, truth)
            rows.append([f"streamed ({name})", how, f"{value:.3f}", f"{value / checkpoint:.2f}",
                         ", ".join(f"{k} {v}" for k, v in kept.items())])
        print(f"{name} done ({time.perf_counter() - started:.0f} s)", flush=True)
    body = (f"{machine()}. Wall time {time.perf_counter() - started:.0f} s.\n\n"
            + table(["scores", "visits combined", "LDS", "× checkpoint EK-FAC", "example visits kept, by preconditioning"],
                    rows))
    print(body)
    if args.write:
        write_section("Streaming on a short LM fine-tune (short_finetune.py)", body,
                      "OMP_NUM_THREADS=2 python benchmarks/short_finetune.py --write")


if __name__ == "__main__":
    main()
