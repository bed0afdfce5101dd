"""Fidelity of in-training EK-FAC factors against post-hoc factors at the same checkpoint.

`InfluenceCallback` builds its factors from the training run itself: covariances accumulated over
every step so far (at changing parameters), the eigenbasis refreshed at each attribution, and the
eigenvalues accumulated over the steps since the previous attribution (the first attribution runs
one bounded eigenvalue pass instead). This script trains the Quickstart digits MLP with the
callback, and at the final attribution compares its factors with ``ip.fit_factors`` on the
training set at the final parameters (the post-hoc reference), on:

* Spearman / Pearson correlation of the score matrices ``[queries, train]`` (mean over queries);
* overlap of the top-10 helpful and harmful sets per query;
* Spearman correlation of self-influence, and planted mislabeled images in its top 16;
* relative Frobenius error of the preconditioned query gradients ``(G + λI)⁻¹ ∇f(q)``.

    python benchmarks/fidelity.py     # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

import infl_plugin as ip
from infl_plugin.integrations.lightning import InfluenceCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "lightning"))
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(-1).argsort(-1).double()


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def overlap(a: torch.Tensor, b: torch.Tensor, k: int, largest: bool) -> float:
    ta, tb = a.topk(k, largest=largest).indices, b.topk(k, largest=largest).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ta, tb)) / (k * a.shape[0])


def run(every: int, fisher: str, update_every: int, epochs: int, num_queries: int, seed: int) -> dict:
    pl.seed_everything(seed)
    data = DigitsDataModule(num_mislabeled=8, seed=seed)
    model = DigitsClassifier()
    config = ip.InfluenceConfig(fisher=fisher, update_every=update_every)
    callback = InfluenceCallback(config=config, every_n_steps=every, num_queries=num_queries, top_k=10,
                                 progress=False, strict=True)
    with tempfile.TemporaryDirectory() as root:  # artifacts of this run are not needed
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, callbacks=[callback], default_root_dir=root)
        trainer.fit(model, datamodule=data)
    session = callback.session
    assert session.last_attribution_step == trainer.global_step
    task = ip.ClassificationTask()
    train = DataLoader(data.train_set, batch_size=64)
    started = time.perf_counter()
    reference = ip.fit_factors(model, task, train, config)
    post_hoc_s = time.perf_counter() - started
    queries = DataLoader(Subset(data.val_set, session.query_indices.tolist()), batch_size=64)
    out = {"every": every, "fisher": fisher, "steps": trainer.global_step, "attributions": session.attributions,
           "post_hoc_s": post_hoc_s}
    scores, self_scores, preconditioned = [], [], []
    for factors in (session.last_factors, reference):
        attributor = ip.Attributor(model, task, factors, config)
        pq = attributor.precondition(queries)
        preconditioned.append(torch.cat([layer.full.flatten(1) for layer in pq.layers.values()], dim=1))
        scores.append(attributor.pairwise_scores(pq, train))
        self_scores.append(attributor.self_scores(train))
    tracked, post = scores
    out["spearman"] = float(pearson(ranks(tracked), ranks(post)).mean())
    out["pearson"] = float(pearson(tracked, post).mean())
    out["top10_helpful"] = overlap(tracked, post, 10, True)
    out["top10_harmful"] = overlap(tracked, post, 10, False)
    out["self_spearman"] = float(pearson(ranks(self_scores[0]), ranks(self_scores[1])))
    planted = set(data.mislabeled)
    out["planted_top16"] = tuple(len(planted & set(s.topk(16).indices.tolist())) for s in self_scores)
    out["query_rel_err"] = float((preconditioned[0] - preconditioned[1]).norm() / preconditioned[1].norm())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, nargs="+", default=[45, 120, 360], help="every_n_steps values")
    parser.add_argument("--fisher", nargs="+", default=["empirical", "sampled"], choices=["empirical", "sampled"])
    parser.add_argument("--update-every", type=int, nargs="+", default=[1, 10, 30],
                        help="InfluenceConfig.update_every values (statistics on every k-th step)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    lines = [
        f"sklearn digits MLP 64-64-10, 1,438 training images with 8 planted label flips, SGD lr 0.05 momentum 0.9, "
        f"batch 32 = 45 steps/epoch, {args.epochs} epochs, {args.queries} validation queries, EK-FAC, damping "
        "heuristic. Reference: `ip.fit_factors` on the training set at the final parameters. Tracked: the "
        "callback's factors at its final attribution (covariances over the whole run, eigenbasis refreshed at the "
        "previous attribution, eigenvalues accumulated since; `every_n_steps = steps` means a single attribution at "
        "the end, which uses the bounded eigenvalue pass at the final parameters). `update_every = k`: statistics on "
        "every k-th training step only (the lever that bounds the tracking overhead, see overhead.py).",
        "",
        "| update_every | every_n_steps | Fisher | attributions | score Spearman | score Pearson | top-10 helpful overlap | "
        "top-10 harmful overlap | self-infl. Spearman | planted in self top-16 (tracked / post-hoc) | "
        "query precond. rel. error |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for fisher, update_every, every in itertools.product(args.fisher, args.update_every, args.every):
        r = run(every, fisher, update_every, args.epochs, args.queries, args.seed)
        lines.append(
            f"| {update_every} | {r['every']} | {fisher} | {r['attributions']} | {r['spearman']:.3f} | {r['pearson']:.3f} | "
            f"{r['top10_helpful']:.2f} | {r['top10_harmful']:.2f} | {r['self_spearman']:.3f} | "
            f"{r['planted_top16'][0]} / {r['planted_top16'][1]} of 8 | {r['query_rel_err']:.3f} |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "Reading (`update_every = 1`): the tracked factors keep the ranking of the strongest examples (top-10 sets overlap ~70 %, "
        "self-influence Spearman ≥ 0.999, the same planted flips found) while the bulk of small scores is "
        "reordered (Spearman over all pairs ~0.5, Pearson ~0.85). The gap comes from statistics gathered while "
        "θ moves: even a single end-of-run attribution (its eigenvalues from a pass at the final θ) differs by "
        "~0.5 in preconditioned query gradients, because the covariances span the whole run. Resetting the "
        "covariances at each refresh (a window of one attribution interval) moved score Spearman only from "
        "0.50 to 0.55 (every 45 steps, empirical), so the simpler whole-run covariances were kept. For "
        "post-hoc-grade factors at a checkpoint, call `ip.fit_factors` there. Statistics on every 10th or 30th step "
        "only (the library default is 32, for a few percent of overhead) cost about 0.1 in score Spearman and "
        "0.05–0.1 in top-10 overlap on this 360-step run: with attributions every 45 steps, the EK-FAC eigenvalues "
        "then come from 1–5 batches (see the query error at every_n_steps = 45). The planted flips are still found.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("Fidelity of in-training factors (Lightning callback) vs post-hoc factors at the same checkpoint", text)


if __name__ == "__main__":
    main()
