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

``--lds`` measures the same question against ground truth instead: the linear datamodeling score
(LDS: 100 random 50 % subsets, each retrained from 2 seeds, cached under ``benchmarks/.cache`` by
`accuracy.lds_truth`) of factors tracked by `InfluenceTracker` during a minibatch training run
next to ``fit_factors`` at the same final parameters, on the digits MLP (64-32-10, classification)
and a diabetes regression MLP (10-32-1), for several statistics settings (see `TRACKERS`), all
attached to the same training run (trackers never change training), over three training seeds;
and post-hoc EK-FAC next to the exact GGN.

    OMP_NUM_THREADS=1 python benchmarks/fidelity.py --lds    # ~10 min (ground truth cached: 25 min more without)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import infl_plugin as ip
from infl_plugin.integrations.lightning import InfluenceCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "lightning"))
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ground_truth as gt  # noqa: E402
from accuracy import lds_truth  # noqa: E402
from common import table, write_section  # noqa: E402


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
                                 progress=False, strict=True, candidates="all")
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


# ------------------------------------------------------------------------------------- LDS
LDS_HEADING = "Tracked vs post-hoc factors against retraining (fidelity.py --lds)"
L2, LR, BATCH, EPOCHS = 1e-3, 0.01, 32, 60
OLD = {"min_statistics_steps": 1}  # before min_statistics_steps: eigenvalues from whatever steps there were


def trackers(every: int) -> dict[str, dict]:
    """Tracker settings compared (name → InfluenceConfig overrides); ``every``: attribution interval."""
    quarter = max(1, every // 4)
    return {
        "update_every=32, min_statistics_steps=1 (previous default)": {**OLD},
        "update_every=1, min_statistics_steps=1": {**OLD, "update_every": 1},
        "update_every=32, min_statistics_steps=8": {"min_statistics_steps": 8},
        "**default** (update_every=32, min_statistics_steps=32)": {},
        f"update_every=32, min_statistics_steps=1, half_life={every}": {**OLD, "half_life": every},
        f"default + half_life={every}": {"half_life": every},
        f"update_every=1, min_statistics_steps=1, half_life={every}": {**OLD, "update_every": 1, "half_life": every},
        f"update_every=1, min_statistics_steps=1, half_life={quarter}": {**OLD, "update_every": 1, "half_life": quarter},
        "update_every=1, min_statistics_steps=1, statistics_fraction=1/32":
            {**OLD, "update_every": 1, "statistics_fraction": 1 / 32},
        f"update_every=1, min_statistics_steps=1, statistics_fraction=1/32, half_life={every}":
            {**OLD, "update_every": 1, "statistics_fraction": 1 / 32, "half_life": every},
        'default, fisher="sampled"': {"fisher": "sampled"},
        'update_every=32, min_statistics_steps=1, fisher="sampled"': {**OLD, "fisher": "sampled"},
        'update_every=1, min_statistics_steps=1, fisher="sampled"': {**OLD, "update_every": 1, "fisher": "sampled"},
    }


def lds_problem(kind: str):
    """``(x, y, xq, yq, task, truth)``: digits (500 train / 50 queries) or diabetes (300 / 100)."""
    x, y, xq, yq = gt.digits(500, 50) if kind == "mlp" else gt.diabetes(300, 100)
    truth = lds_truth(kind, None, x, y, xq, yq, L2, 100, [0, 1], False)
    task = ip.ClassificationTask() if kind == "mlp" else ip.RegressionTask()
    return x, y, xq, yq, task, truth


def train_tracked(kind: str, x, y, task: ip.Task, configs: dict[str, ip.InfluenceConfig], seed: int, every: int):
    """Minibatch Adam (cosine decay) on ``mean loss + (l2/2)‖θ‖²`` with one `InfluenceTracker` per
    config attached; every ``every`` steps before the end the eigenbasis is refreshed (as the
    callbacks do after an attribution), and the factors are read at the end (the last attribution,
    with the bounded eigenvalue pass over the training set where the tracker asks for it).
    Returns the trained model, ``{name: tracked factors}`` and the training batches in order."""
    model = gt.make_model(kind, seed)
    n = x.shape[0]
    steps = EPOCHS * -(-n // BATCH)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, n, BATCH)]
    tracked = {name: ip.InfluenceTracker(model, task, config).attach() for name, config in configs.items()}
    order = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(EPOCHS):
        for rows in torch.randperm(n, generator=order).split(BATCH):
            batch = (x[rows], y[rows])
            optimizer.zero_grad()
            out = model(batch[0])
            loss = F.cross_entropy(out, batch[1]) if kind == "mlp" else F.mse_loss(out[:, 0], batch[1])
            (loss + 0.5 * L2 * sum(p.pow(2).sum() for p in model.parameters())).backward()
            for tracker in tracked.values():
                tracker.step(batch)
            optimizer.step()
            schedule.step()
            step += 1
            if step % every == 0 and step < steps:
                for tracker in tracked.values():
                    tracker.refresh_eigenbasis()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the min_statistics_steps notes: the rows say what ran
        factors = {name: tracker.factors(loader=batches) for name, tracker in tracked.items()}
    for tracker in tracked.values():
        tracker.close()
    return model, factors, batches


def lds_rows(kind: str, seeds: list[int], attributions: int, keep: Optional[Callable[[str], bool]] = None,
             exact_too: bool = True) -> tuple[list[list], list[list]]:
    """Tracked-vs-post-hoc rows (the settings whose name ``keep`` accepts; all by default) and
    post-hoc-vs-exact-GGN rows for one model, means over ``seeds``."""
    x, y, xq, yq, task, truth = lds_problem(kind)
    queries = [(xq, yq)]
    every = EPOCHS * -(-x.shape[0] // BATCH) // attributions
    settings = {k: v for k, v in trackers(every).items() if keep is None or keep(k)}
    results: dict[str, list[float]] = {}
    exact: dict[str, list[float]] = {}

    def lds_of(model, factors, config, batches) -> float:
        return gt.lds(ip.Attributor(model, task, factors, config).pairwise_scores(queries, batches), truth)

    for seed in seeds:
        configs = {name: ip.InfluenceConfig(**over) for name, over in settings.items()}
        # a sampled-Fisher tracker's extra passes would also feed the hooks of empirical trackers
        # armed for the next training backward: the two kinds ride along separate (identical) runs
        factors, params = {}, []
        for fisher in ("empirical", "sampled"):
            group = {name: c for name, c in configs.items() if c.fisher == fisher}
            if group:
                model, tracked, batches = train_tracked(kind, x, y, task, group, seed, every)
                factors.update(tracked)
                params.append(gt.Flat(model).get())
        assert all(torch.equal(params[0], p) for p in params), "tracking changed training"
        post = {}
        for fisher, draws in (("empirical", 1), ("sampled", 1), ("sampled", 8)):
            config = ip.InfluenceConfig(fisher=fisher, fisher_samples=draws)
            post[(fisher, draws)] = lds_of(model, ip.fit_factors(model, task, batches, config), config, batches)
            exact.setdefault(f"post-hoc EK-FAC, {fisher} Fisher, {draws} draw(s), damping heuristic", []).append(post[(fisher, draws)])
        for name, f in factors.items():
            value = lds_of(model, f, configs[name], batches)
            results.setdefault(name, []).append(value)
            results.setdefault(name + " Δ", []).append(value - post[(configs[name].fisher, 1)])
        if exact_too:  # exact GGN at the final parameters, λ = l2 (G + λI: the regularised objective's GGN)
            view = gt.Flat(model)
            flat = view.get()
            ggn = gt.dense_ggn(view, flat, x, kind=kind)
            scores = gt.exact_scores(ggn, L2, gt.per_example_grads(view, flat, xq, yq, kind),
                                     gt.per_example_grads(view, flat, x, y, kind))
            exact.setdefault(f"exact GGN (dense), damping {L2:g}", []).append(gt.lds(scores, truth))
            for draws in (1, 8):
                config = ip.InfluenceConfig(fisher="sampled", fisher_samples=draws, damping=L2)
                exact.setdefault(f"post-hoc EK-FAC, sampled Fisher, {draws} draw(s), damping {L2:g}", []).append(
                    lds_of(model, ip.fit_factors(model, task, batches, config), config, batches))
        print(f"{kind} seed {seed} done", flush=True)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    tracked_rows = [[name, mean(results[name]), f"{mean(results[name + ' Δ']):+.3f}",
                     " ".join(f"{v:+.3f}" for v in results[name + " Δ"])] for name in settings]
    exact_rows = [[name, mean(values), " ".join(f"{v:.3f}" for v in values)] for name, values in exact.items()]
    return tracked_rows, exact_rows


LDS_READING = """Reading. Δ = tracked LDS − `fit_factors` LDS at the same final parameters (same Fisher, one
draw), per training seed; the target is Δ ≥ −0.02 on every model. The seeds agree to about ±0.005,
so the gaps are systematic. They come from the EK-FAC eigenvalues. Accumulated during training
over the statistics steps since the last eigenbasis refresh (`min_statistics_steps=1`, the
previous behaviour), they cost the regression model −0.019 with 4–8 statistics steps per interval
and −0.032 with 9–15: the basis they are measured in was fitted to covariances from earlier in
training. Read by the bounded pass at the attribution instead (current parameters, fresh basis from
all covariances so far), the gap is −0.012 on the regression model and +0.033 on the classifier,
whatever the schedule. Hence the default `min_statistics_steps=32`: intervals with fewer than 32
statistics steps (1,024 optimizer steps at `update_every=32`) use the bounded pass; `8` (tried
first) still fell short with 2 attributions. The covariances averaged over the whole run are not
the problem: on the classifier they beat post-hoc ones. An exponential moving average (`half_life`
= the attribution interval) on top of the default narrows the regression gap (−0.005 / −0.008 with
4 / 2 attributions) but lowers the classifier's lead (+0.016 / +0.028 instead of +0.033): an
option, not the default. Statistics on every step (`update_every=1`) are no more faithful than the
default (−0.012 / +0.019) at 50–130 % overhead; with a short half-life (a quarter of the interval)
they come closest to post-hoc factors on both models (−0.002 / +0.001). Statistics on every step
from a fraction of each batch (`statistics_fraction=1/32`, the FLOPs of whole batches on every 32nd
step) did not beat the default on either model and pay the hooks' per-step cost: an option, not the
default. With
`fisher="sampled"`, statistics on every step draw fresh pseudo-labels at each visit (60 draws per
example over 60 epochs) and beat the one-draw post-hoc fit by 0.055 on the classifier;
`fisher_samples=8` gives post-hoc fitting the same (+0.06 on the classifier, nothing on the
regression model, as for the digits logistic regression in `accuracy.py`).

Post-hoc EK-FAC against the exact GGN (both at λ = l2 = 0.001, sampled Fisher): 8 pseudo-label draws
close about half of the classifier's gap (0.638 → 0.699 against 0.758) and little of the regression
model's (0.190 → 0.192 against 0.220): what remains there is the Kronecker structure, not the
sampling.

Targets. Tracked within 0.02 LDS of `fit_factors` at the default: **met** on both models and both
schedules (worst −0.012; previous default −0.032). Tracking overhead: the default takes statistics on
the same training steps as before (`update_every=32`: +1.8 % / +3.0 % of a small-GPT-2 step in
`overhead.py`); the bounded eigenvalue pass it adds runs at attribution time, not in training steps.
Post-hoc EK-FAC towards the exact GGN: best documented settings (sampled Fisher, `fisher_samples=8`)
0.699 vs 0.758 (classifier) and 0.192 vs 0.220 (regression)."""


def lds_main(seeds: list[int], write: bool) -> None:
    started = time.perf_counter()
    parts = []
    problems = (("digits MLP 64-32-10 (classification, 500 train / 50 queries)", "mlp"),
                ("diabetes MLP 10-32-1 (regression, 300 train / 100 queries)", "regmlp"))
    headers = ["tracker settings", "tracked LDS", "Δ vs fit_factors", "Δ per seed"]
    for title, kind in problems:
        tracked_rows, exact_rows = lds_rows(kind, seeds, 4)
        parts.append(f"**{title}**, 4 attributions\n\n" + table(headers, tracked_rows)
                     + "\n\n" + table(["post-hoc / exact", "LDS", "per seed"], exact_rows))
        print(parts[-1], flush=True)
    for title, kind in problems:
        tracked_rows, _ = lds_rows(kind, seeds, 2, lambda name: "default" in name or name.endswith("min_statistics_steps=8"), exact_too=False)
        parts.append(f"**{title}**, 2 attributions (the last interval holds 9–15 statistics steps)\n\n"
                     + table(headers, tracked_rows))
        print(parts[-1], flush=True)
    body = (f"Training: minibatch Adam (lr {LR}, cosine decay), batch {BATCH}, {EPOCHS} epochs (digits 960 steps, "
            f"diabetes 600), mean loss + (l2/2)‖θ‖² with l2 = {L2:g}, float64 model, float32 statistics. Attributions "
            "at equal intervals: the eigenbasis is refreshed after each but the last, which reads the factors at the end "
            "of training. Every tracker rides along the same training run (trackers never change training; the "
            "sampled-Fisher ones along an identical second run). Reference: `fit_factors` on the training set at the "
            "final parameters with the same Fisher. LDS ground truth: 100 random 50 % subsets retrained from 2 seeds each "
            "by full-batch Adam (`accuracy.lds_truth`, cached); measurement: the query loss; damping: the heuristic "
            f"unless stated. Means over training seeds {seeds}.\n\n" + "\n\n".join(parts)
            + "\n\n" + LDS_READING + f"\n\nTotal time {time.perf_counter() - started:.0f} s.")
    print(body)
    if write:
        write_section(LDS_HEADING, body)


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
    parser.add_argument("--lds", action="store_true", help="LDS against retraining instead (see the module docstring)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of --lds")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.lds:
        lds_main(args.seeds, not args.no_write)
        return
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
