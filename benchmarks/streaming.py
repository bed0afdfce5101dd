"""Streaming attribution: what scoring every training example from its own backward costs, and
how faithful the streamed scores are.

Part ``cost`` — on the small GPT-2 of ``overhead.py`` (4 layers, width 256, 128-token sequences,
batch 8, AdamW, the 16 block linear layers tracked) with 16 and 64 queries at full rank and at
rank 32: the training step with streaming on every step (queries preconditioned with EK-FAC
factors fitted once), with and without curvature statistics on the same step, and streaming on
every 4th step; the query refresh (one query pass) and its share at the default
``stream_refresh_every``; and the time per streamed example, ``(stream step − plain step) / batch``,
against the time per checkpoint candidate (``Attributor.pairwise_scores`` over 32 candidates /
32) with the very same preconditioned queries. Then the same at width 1024 (2 layers) with rank-32
queries. All configurations of a model run interleaved in one process.

Part ``fidelity`` — LDS against retraining: the digits MLP (64-32-10 tanh, float64, 1000 training
images) trained with minibatch SGD (batch 32, momentum 0.9, learning rate 0.1 decaying linearly to
0, 8 epochs); 100 random 50 % subsets retrained with the same recipe from 2 seeds each (cached
under ``benchmarks/.cache``); 50 held-out queries, measurement = query cross-entropy. Scores
compared: streamed EK-FAC scores (summed over visits, learning-rate weighted, waiting for EK-FAC,
last epoch only, other refresh intervals), in-run gradient dot products (streamed with
``strategy="identity"``, learning-rate weighted: TracIn-style), checkpoint EK-FAC at the final
parameters (post-hoc ``fit_factors`` and the tracker's own factors) and gradient dot products at
the final parameters. LDS = per query, Spearman over subsets between ``-Σ_{z∈S} score(q, z)`` and
the seed-averaged query loss of the model retrained on S; mean over queries.

    python benchmarks/streaming.py                   # both parts, ~8 min on 2 cores
    python benchmarks/streaming.py --part fidelity   # ~1 min once the retraining is cached
    python benchmarks/streaming.py --quick           # fewer steps and repetitions
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ground_truth as gt  # noqa: E402
from common import interleaved, lm_batches, setup_threads, table, tiny_gpt2, write_section  # noqa: E402

import infl_plugin as ip  # noqa: E402
from infl_plugin.scoring.streaming.scorer import RANK  # noqa: E402

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
GPT2_MODULES = ["transformer.h.*.attn.c_*", "transformer.h.*.mlp.c_*"]
BATCH = 8
NEVER = 10 ** 9  # an interval no run reaches: statistics only on step 0 (a warm-up step)


# ------------------------------------------------------------------------------------- cost
class StreamLoop:
    """The user's loop: forward, backward, optimizer step, then ``tracker.step`` with the indices."""

    def __init__(self, model, batches: list[dict]) -> None:
        self.model, self.batches = model, batches
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.i = 0

    def run(self, steps: int, tracker: Optional[ip.InfluenceTracker]) -> None:
        if tracker is not None:
            tracker.attach()
        try:
            for _ in range(steps):
                batch = self.batches[self.i % len(self.batches)]
                start = (self.i % len(self.batches)) * BATCH
                self.i += 1
                self.optimizer.zero_grad(set_to_none=True)
                self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
                self.optimizer.step()
                if tracker is not None:
                    tracker.step(batch, indices=torch.arange(start, start + BATCH))
        finally:
            if tracker is not None:
                tracker.close()


def cost_rows(width: int, layers: int, variants: list[tuple[int, Optional[int]]], steps: int, repeats: int,
              with_statistics: bool, candidates: int) -> tuple[list[list], list[list]]:
    """(step rows, per-example rows) for one model size."""
    model = tiny_gpt2(layers=layers, width=width)
    model.train()
    loop = StreamLoop(model, lm_batches(8 * BATCH, BATCH, seed=1))
    task = ip.CausalLMTask()
    base = ip.InfluenceConfig(modules=GPT2_MODULES)
    factors = ip.fit_factors(model, task, lm_batches(16, BATCH, seed=2), base)
    train = lm_batches(candidates, BATCH, seed=2)
    trackers: dict[str, Optional[ip.InfluenceTracker]] = {"plain training step": None}
    counts = {"plain training step": steps}
    refresh_s: dict[str, float] = {}
    candidate_fns = {}
    names = {}

    def tracker(config: ip.InfluenceConfig, queries: list, steady: bool) -> ip.InfluenceTracker:
        t = ip.InfluenceTracker(model, task, config, queries=queries)
        if steady:  # covariances from 2 steps, then the eigenvalue phase (the callbacks' steady state)
            loop.run(2, t)
            t.attach()
            t.refresh_eigenbasis()
            t.close()
        return t

    if with_statistics:
        config = ip.InfluenceConfig(modules=GPT2_MODULES, update_every=1)
        stats = ip.InfluenceTracker(model, task, config)
        loop.run(2, stats)
        stats.attach()
        stats.refresh_eigenbasis()
        stats.close()
        trackers["statistics every step (steady state), no streaming"] = stats
        counts["statistics every step (steady state), no streaming"] = steps
    for q, rank in variants:
        queries = lm_batches(q, 16, seed=3)
        label = f"Q={q}, {'full rank' if rank is None else f'rank {rank}'}"
        rows_for = [("stream every step", NEVER, 1)]
        if with_statistics:
            rows_for.append(("stream + statistics every step", 1, 1))
        if (q, rank) == variants[0]:
            rows_for.append(("stream every 4th step", NEVER, 4))
        for what, update_every, every in rows_for:
            config = ip.InfluenceConfig(modules=GPT2_MODULES, query_rank=rank, update_every=update_every,
                                        stream_every=every, stream_refresh_every=None)
            t = tracker(config, queries, steady=update_every == 1)
            t.attach()
            started = time.perf_counter()
            t.refresh_queries(factors)
            refresh_s[label] = time.perf_counter() - started
            t.close()
            name = f"{label}: {what}"
            trackers[name], counts[name] = t, steps
            names[name] = (label, what, every)
        att = ip.Attributor(model, task, factors, ip.InfluenceConfig(modules=GPT2_MODULES, query_rank=rank))
        pq = trackers[f"{label}: stream every step"].scorer.queries
        candidate_fns[f"candidates {label}"] = lambda att=att, pq=pq: att.pairwise_scores(pq, train)
    fns = {name: (lambda t=t, n=counts[name]: loop.run(n, t)) for name, t in trackers.items()}
    fns.update(candidate_fns)
    print(f"width {width}: timing {len(fns)} configurations", flush=True)
    med = interleaved(fns, repeats=repeats, warmup=1)
    plain = med["plain training step"] / steps
    step_rows = []
    for name in trackers:
        per_step = med[name] / counts[name]
        overhead = "—" if name == "plain training step" else f"**{100 * (per_step / plain - 1):+.1f} %**"
        step_rows.append([name, f"{1000 * per_step:.1f}", f"{per_step / plain:.3f}", overhead])
    example_rows = []
    for q, rank in variants:
        label = f"Q={q}, {'full rank' if rank is None else f'rank {rank}'}"
        streamed = (med[f"{label}: stream every step"] / steps - plain) / BATCH
        candidate = med[f"candidates {label}"] / candidates
        refresh_share = refresh_s[label] / ip.InfluenceConfig().stream_refresh_every / plain
        routes = trackers[f"{label}: stream every step"].scorer.routes
        route = ", ".join(sorted(set(routes.values())))
        example_rows.append([label, f"{1000 * streamed:.2f}", f"{1000 * candidate:.1f}", f"**{streamed / candidate:.3f}**",
                             f"{refresh_s[label]:.2f}", f"{100 * refresh_share:.1f} %", route])
    return step_rows, example_rows


def run_cost(quick: bool, repeats: int, publish) -> None:
    """Both model sizes; ``publish(body)`` after each, so a run cut short keeps the first table."""
    steps = 4 if quick else 8
    sections = []
    step_headers = ["configuration", "ms / step", "× plain", "overhead"]
    example_headers = ["queries", "ms / streamed example", "ms / checkpoint candidate", "streamed / candidate",
                       "query refresh s", f"refresh share of a step at stream_refresh_every={ip.InfluenceConfig().stream_refresh_every}",
                       "route(s)"]
    variants = [(16, None), (16, 32)] if quick else [(16, None), (64, None), (16, 32), (64, 32)]
    intro = (f"Medians of {repeats} interleaved repetitions of {steps} training steps (width 1024: {max(2, steps // 2)}); "
             "streaming rows score every step's 8 examples against EK-FAC-preconditioned queries (fitted once on 16 "
             "sequences; refreshes not included: see the refresh columns); \"+ statistics\" = curvature statistics "
             "(steady state: covariances + eigenvalues) on the same steps. ms / streamed example = (stream step − plain "
             "step) / 8; ms / checkpoint candidate = `Attributor.pairwise_scores` over the candidates (forward, backward "
             "to the tracked outputs, contraction) / their number, with the same preconditioned queries. Route: how the "
             "scorer contracted each layer (`dw`: per-example gradients formed; `dw (rank-r rebuilt)`: rank-r queries "
             "rebuilt once per refresh because forming DW_n is cheaper there; `rank-r`: factored queries, DW_n never "
             "formed).")
    sizes = [("**Small GPT-2 (4 layers, width 256, seq 128, batch 8, vocab 8192)**",
              dict(width=256, layers=4, variants=variants, steps=steps, with_statistics=True, candidates=32)),
             ("**Wider GPT-2 (2 layers, width 1024, seq 128, batch 8, vocab 8192), rank-32 queries**",
              dict(width=1024, layers=2, variants=[(16, 32)], steps=max(2, steps // 2), with_statistics=False,
                   candidates=16))]
    for title, kwargs in sizes:
        step_rows, example_rows = cost_rows(repeats=repeats, **kwargs)
        sections.append(f"{title}\n\n" + table(step_headers, step_rows) + "\n\n" + table(example_headers, example_rows))
        print(sections[-1], flush=True)
        publish(intro + "\n\n" + "\n\n".join(sections))


# ------------------------------------------------------------------------------------- fidelity
N_TRAIN, N_QUERY, N_SUBSETS, SEEDS = 1000, 50, 100, (0, 1)
EPOCHS, SGD_BATCH, LR, MOMENTUM = 8, 32, 0.1, 0.9


def lr_at(step: int, total: int) -> float:
    """Linear decay from LR to 0 over ``total`` steps (the learning rate of step ``step``)."""
    return LR * (1 - step / total)


def train_subsets(x, y, masks: torch.Tensor, seeds) -> torch.Tensor:
    """Retrain the MLP on each subset (rows of ``masks``) from each seed with the recipe; all models at
    once (stacked parameters: SGD with momentum is per coordinate, so they train independently).
    Returns the flat parameters ``[S·len(seeds), P]`` (subset-major)."""
    members = [torch.nonzero(m).squeeze(1) for m in masks]
    size = len(members[0])
    assert all(len(m) == size for m in members)
    runs = [(s, seed) for s in range(len(members)) for seed in seeds]
    inits = [gt.make_model("mlp", seed) for _, seed in runs]
    names = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    params = [torch.stack([m.get_parameter(n).detach() for m in inits]).requires_grad_(True) for n in names]
    per_epoch = math.ceil(size / SGD_BATCH)
    total = EPOCHS * per_epoch
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / total)
    generators = [torch.Generator().manual_seed(1000 + 7919 * s + seed) for s, seed in runs]
    for _ in range(EPOCHS):
        orders = torch.stack([members[s][torch.randperm(size, generator=g)] for (s, _), g in zip(runs, generators)])
        for start in range(0, size, SGD_BATCH):
            idx = orders[:, start: start + SGD_BATCH]  # [M, b]
            w1, b1, w2, b2 = params
            h = torch.tanh(torch.einsum("mbi,mhi->mbh", x[idx], w1) + b1[:, None])
            logits = torch.einsum("mbh,mch->mbc", h, w2) + b2[:, None]
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="none").view(idx.shape).mean(1)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            sched.step()
    return torch.cat([p.detach().flatten(1) for p in params], 1)


def query_losses(flat: torch.Tensor, xq, yq) -> torch.Tensor:
    """``[M, Q]`` query cross-entropies of ``M`` flat parameter vectors."""
    view = gt.Flat(gt.make_model("mlp"))
    out = []
    for f in flat:
        out.append(F.cross_entropy(view.logits(f, xq), yq, reduction="none"))
    return torch.stack(out)


def ground_truth(x, y, xq, yq, refresh: bool) -> dict:
    key = {"n": N_TRAIN, "q": N_QUERY, "subsets": N_SUBSETS, "seeds": list(SEEDS), "epochs": EPOCHS, "batch": SGD_BATCH,
           "lr": LR, "momentum": MOMENTUM, "schedule": "linear", "x": float(x.sum()), "version": 1}

    def compute() -> dict:
        g = torch.Generator().manual_seed(12345)
        masks = torch.zeros(N_SUBSETS, N_TRAIN, dtype=torch.bool)
        for s in range(N_SUBSETS):
            masks[s, torch.randperm(N_TRAIN, generator=g)[: N_TRAIN // 2]] = True
        flat = train_subsets(x, y, masks, SEEDS)
        losses = query_losses(flat, xq, yq).view(N_SUBSETS, len(SEEDS), -1).mean(1)
        return {"masks": masks, "losses": losses}

    return gt.cached("streaming-lds", key, compute, refresh)


def lds(scores: torch.Tensor, truth: dict) -> tuple[float, float]:
    """Mean and standard error over queries of the Spearman correlation across subsets."""
    predicted = -(truth["masks"].to(scores.dtype) @ scores.T)  # [S, Q]
    values = [gt.spearman(predicted[:, q], truth["losses"][:, q]) for q in range(scores.shape[0])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)), float(np.std(values) / math.sqrt(len(values)))


def streamed_run(x, y, queries: list, strategy: str = "ekfac", weight: str = "none", refresh_every: int = 10,
                 eigenbasis_every_epoch: bool = True, min_statistics_steps: Optional[int] = None) -> tuple[list[ip.StreamedScores], torch.nn.Module, ip.InfluenceTracker]:
    """Train the full-data model with the recipe and a streaming tracker; per-epoch streamed scores."""
    model = gt.make_model("mlp", 0)
    task = ip.ClassificationTask()
    config = ip.InfluenceConfig(strategy=strategy, update_every=1, accumulation_dtype="float64",
                                stream_refresh_every=refresh_every, stream_weight=weight,
                                **({} if min_statistics_steps is None else {"min_statistics_steps": min_statistics_steps}))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    per_epoch = math.ceil(N_TRAIN / SGD_BATCH)
    total = EPOCHS * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / total)
    g = torch.Generator().manual_seed(0)
    epochs = []
    tracker = ip.InfluenceTracker(model, task, config, queries=queries).attach()
    step = 0
    for _ in range(EPOCHS):
        order = torch.randperm(N_TRAIN, generator=g)
        for start in range(0, N_TRAIN, SGD_BATCH):
            idx = order[start: start + SGD_BATCH]
            lr = lr_at(step, total)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            tracker.step((x[idx], y[idx]), indices=idx, weight=lr if weight == "lr" else None)
            step += 1
        epochs.append(tracker.streamed_scores())
        tracker.reset_stream()
        if eigenbasis_every_epoch and len(epochs) < EPOCHS:
            tracker.refresh_eigenbasis()
    tracker.close()
    return epochs, model, tracker


def streamed_total(epochs: list[ip.StreamedScores]) -> torch.Tensor:
    """What one stream over the whole run (one attribution at the end) holds ``[Q, N]``: the
    scorer drops its sums whenever better-preconditioned queries arrive, so only the epochs scored
    with the run's best preconditioning count (an epoch during which the queries improved holds
    only the visits after that, as the scorer dropped the earlier ones)."""
    best = max(RANK[kind] for e in epochs for kind in e.batches)
    return sum(e.dense(N_TRAIN) for e in epochs if e.batches and all(RANK[k] == best for k in e.batches))


def run_fidelity(refresh: bool) -> str:
    started = time.perf_counter()
    x, y, xq, yq = gt.digits(N_TRAIN, N_QUERY)
    truth = ground_truth(x, y, xq, yq, refresh)
    truth_s = time.perf_counter() - started
    queries = [(xq, yq)]
    train = [(x[i: i + 100], y[i: i + 100]) for i in range(0, N_TRAIN, 100)]
    task = ip.ClassificationTask()
    rows = []

    def add(name: str, scores: torch.Tensor, note: str = "") -> None:
        mean, se = lds(scores, truth)
        rows.append([name, mean, se, note])
        print(f"{name}: LDS {mean:.3f} ± {se:.3f}", flush=True)

    epochs, model, tracker = streamed_run(x, y, queries)
    dense = [e.dense(N_TRAIN) for e in epochs]
    assert all(bool((e.visits == 1).all()) for e in epochs)  # the first epoch's early visits may be superseded
    phases = ", ".join(f"{k} {v}" for k, v in ip.StreamedScores.merge(epochs).batches.items())
    add("streamed EK-FAC, summed over all visits alike (refresh every 10 steps)", sum(dense),
        f"micro-batches by preconditioning: {phases}")
    add("streamed EK-FAC as one attribution at the end sees it (visits of worse queries superseded)",
        streamed_total(epochs), "the scorer drops the sums so far when better-preconditioned queries arrive")
    first = next(i for i, e in enumerate(epochs) if set(e.batches) == {"ekfac"})
    add("streamed, waiting for EK-FAC (only the epochs scored entirely with EK-FAC queries)", sum(dense[first:]),
        f"epochs {first + 1}-{EPOCHS}")
    add("streamed, last epoch only", dense[-1])
    lr_epochs, _, _ = streamed_run(x, y, queries, weight="lr")
    add("streamed EK-FAC, learning-rate weighted (stream_weight=\"lr\")", streamed_total(lr_epochs))
    for every in (1, 50):
        other, _, _ = streamed_run(x, y, queries, refresh_every=every)
        add(f"streamed EK-FAC, summed, refresh every {every} step(s)", streamed_total(other))
    other, _, _ = streamed_run(x, y, queries, min_statistics_steps=1)
    add("streamed EK-FAC, summed, EK-FAC from 1 eigenvalue step on (min_statistics_steps=1)",
        streamed_total(other))
    kfac, _, _ = streamed_run(x, y, queries, strategy="kfac")
    add("streamed K-FAC, summed (strategy=\"kfac\": the covariances so far with their own eigenvalues)",
        streamed_total(kfac))
    tracin, _, _ = streamed_run(x, y, queries, strategy="identity", weight="lr")
    add("in-run gradient dot products, lr-weighted (streamed, strategy=\"identity\"; TracIn-style)",
        streamed_total(tracin))

    config = ip.InfluenceConfig(accumulation_dtype="float64")
    posthoc = ip.fit_factors(model, task, train, config)
    checkpoint = ip.Attributor(model, task, posthoc, config).pairwise_scores(queries, train)
    add("checkpoint EK-FAC at the final parameters (fit_factors)", checkpoint)
    tracked = tracker.factors()
    add("checkpoint EK-FAC at the final parameters, tracked factors",
        ip.Attributor(model, task, tracked, tracker.config).pairwise_scores(queries, train))
    kfac_config = ip.InfluenceConfig(strategy="kfac", accumulation_dtype="float64")
    add("checkpoint K-FAC at the final parameters (fit_factors)",
        ip.Attributor(model, task, ip.fit_factors(model, task, train, kfac_config), kfac_config).pairwise_scores(queries, train))
    identity = ip.InfluenceConfig(strategy="identity", accumulation_dtype="float64")
    add("gradient dot products at the final parameters",
        ip.Attributor(model, task, ip.fit_factors(model, task, train, identity), identity).pairwise_scores(queries, train))

    reference = rows[[r[0] for r in rows].index("checkpoint EK-FAC at the final parameters (fit_factors)")][1]
    body_rows = [[r[0], f"{r[1]:.3f} ± {r[2]:.3f}", f"{r[1] / reference:.2f}", r[3]] for r in rows]
    accuracy = float((model(xq).argmax(1) == yq).double().mean())
    elapsed = time.perf_counter() - started
    return (f"Digits MLP 64-32-10 tanh (float64), {N_TRAIN} training images, minibatch SGD (batch {SGD_BATCH}, momentum "
            f"{MOMENTUM}, lr {LR} decaying linearly to 0, {EPOCHS} epochs = {EPOCHS * math.ceil(N_TRAIN / SGD_BATCH)} "
            f"steps; query accuracy {accuracy:.2f}); {N_QUERY} held-out queries. Ground truth: {N_SUBSETS} random 50 % "
            f"subsets × {len(SEEDS)} seeds retrained with the same recipe (cached; {truth_s:.0f}s this run). Streaming: "
            "`InfluenceTracker` with statistics on every step, the EK-FAC eigenbasis refreshed after each epoch (as an "
            "attribution would), queries refreshed at steps 1, 2, 4, 8 and then every 10 optimizer steps unless "
            "stated; the queries are K-FAC-preconditioned from the first statistics step until EK-FAC factors exist "
            "(the first due refresh sets an eigenbasis, EK-FAC takes over once `min_statistics_steps`, default "
            f"{ip.InfluenceConfig().min_statistics_steps}, statistics steps have accumulated eigenvalues in it). Each "
            "epoch is read separately; 'as one attribution at the end sees it' applies the scorer's rule (better "
            "queries supersede the sums so far), 'summed over all visits alike' ignores it (the mixing the rule "
            "prevents).\n\n"
            + table(["scores", "LDS (mean ± s.e. over queries)", "× checkpoint EK-FAC", "note"], body_rows)
            + f"\n\nTotal {elapsed:.0f}s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["cost", "fidelity", "all"], default="all")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--refresh", action="store_true", help="recompute the cached retraining ground truth")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    threads = setup_threads()
    repeats = args.repeats or (2 if args.quick else 3)
    if args.part in ("fidelity", "all"):
        body = run_fidelity(args.refresh)
        print(body)
        if not args.no_write:
            write_section("Streaming attribution: fidelity (streaming.py)", body)
    if args.part in ("cost", "all"):
        def publish(body: str) -> None:
            if not args.no_write:
                write_section("Streaming attribution: cost (streaming.py)", f"{threads} torch threads. " + body)

        run_cost(args.quick, repeats, publish)


if __name__ == "__main__":
    main()
