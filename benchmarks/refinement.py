"""Refining the query solve (`InfluenceConfig.refine_steps`): LDS and cost against EK-FAC and exact GGN.

For three small float64 problems with retraining ground truth (`accuracy.lds_truth`, cached in
``benchmarks/.cache``: 100 random 50 % subsets, 2 retraining seeds each) the script scores the
held-out queries with

* post-hoc EK-FAC (`fit_factors`, sampled Fisher with 8 draws: the matrix EK-FAC approximates is
  then the Gauss-Newton one), refine_steps = 0;
* the same factors refined by K ∈ {2, 5, 10, 20} PCG steps on the exact Gauss-Newton products over
  every training batch (refine_batches covers the training set: batch size 100);
* the dense exact Gauss-Newton solve with the same per-layer damping (`ground_truth.dense_ggn`),
  the limit the refinement converges to,

at the default damping heuristic (λ = 0.1 × mean eigenvalue per layer) and at λ = l2 = 1e-3.
Problems: multinomial logistic regression and a 64-32-10 tanh MLP on digits (500 train / 50
queries, `accuracy.train_model`) and a 10-32-1 tanh MLP regressor on diabetes (300 / 100,
full-batch Adam). Cost per query: wall time of the refinement over the queries (all queries
share each product's batched forward) and products per query, also in units of one forward +
backward of the training loss over the batches the products read; then the same on a small
GPT-2 (`common.tiny_gpt2`).

Run: ``OMP_NUM_THREADS=2 python benchmarks/refinement.py`` (``--quick``: the heuristic damping only).
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
from accuracy import lds_truth, train_model  # noqa: E402
from common import lm_batches, setup_threads, table, tiny_gpt2, write_section  # noqa: E402

import infl_plugin as ip  # noqa: E402
from infl_plugin.scoring.refine import GaussNewton  # noqa: E402

HEADING = "Refining the query solve (refinement.py)"
L2, BATCH, STEPS = 1e-3, 100, (2, 5, 10, 20)


def problem(kind: str):
    """``(model, task, train batches, queries, truth, x, y, xq, yq)`` for ``logreg``, ``mlp`` or ``regmlp``."""
    if kind == "regmlp":
        x, y, xq, yq = gt.diabetes(300, 100)
        trained = gt.cached("model-regmlp-refinement", {"n": 300, "l2": L2, "x": float(x.sum())}, lambda: {
            "flat": gt.train_mlp_batched(x, y, torch.ones(1, x.shape[0], dtype=gt.DTYPE), L2, [0], kind="regmlp")[0][0]})
        truth = lds_truth("regmlp", None, x, y, xq, yq, L2, 100, [0, 1], False)
        task = ip.RegressionTask()
    else:
        x, y, xq, yq = gt.digits(500, 50)
        trained = train_model(kind, x, y, L2, False)
        truth = lds_truth(kind, trained["flat"], x, y, xq, yq, L2, 100, [0, 1], False)
        task = ip.ClassificationTask()
    model = gt.make_model(kind)
    gt.Flat(model).set(trained["flat"])
    train = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, x.shape[0], BATCH)]
    return model, task, train, [(xq, yq)], truth, x, y, xq, yq


def exact_scores(kind, model, factors, x, y, xq, yq) -> torch.Tensor:
    """Dense ``∇f(q)ᵀ (G + Λ)⁻¹ ∇L(z)`` with ``Λ`` each layer's damping on its parameters."""
    view = gt.Flat(model)
    flat = view.get()
    loss_kind = "regmlp" if kind == "regmlp" else "mlp"
    ggn = gt.dense_ggn(view, flat, x, kind=loss_kind)
    damping = torch.cat([torch.full((size,), factors.layers[name.rsplit(".", 1)[0]].damping, dtype=gt.DTYPE)
                         for name, size in zip(view.names, view.sizes)])
    chol = torch.linalg.cholesky(ggn + torch.diag(damping))
    q = gt.per_example_grads(view, flat, xq, yq, loss_kind)
    return torch.cholesky_solve(q.T, chol).T @ gt.per_example_grads(view, flat, x, y, loss_kind).T


def forward_backward_time(model, task, batches) -> float:
    """Seconds of one forward + backward of the summed training loss over ``batches`` (one warm-up,
    then the median of 5: on small models one run swings by several times)."""
    times = []
    for _ in range(6):
        start = time.perf_counter()
        for batch in batches:
            torch.autograd.grad(task.loss(model, batch).sum(), [p for p in model.parameters() if p.requires_grad])
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[2]


def refined(model, task, factors, config, train, queries, steps: int):
    """``(scores [Q, N], seconds of the preconditioning, products per query)`` at ``steps``."""
    attributor = ip.Attributor(model, task, factors, ip.InfluenceConfig(**{**config, "refine_steps": steps}),
                               curvature_data=train)
    start = time.perf_counter()
    pq = attributor.precondition(queries)
    seconds = time.perf_counter() - start
    return attributor.pairwise_scores(pq, train), seconds, steps


def lds_rows(kind: str, damping):
    model, task, train, queries, truth, x, y, xq, yq = problem(kind)
    config = {"fisher": "sampled", "fisher_samples": 8, "accumulation_dtype": "float64", "damping": damping,
              "refine_batches": len(train)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factors = ip.fit_factors(model, task, train, ip.InfluenceConfig(**config))
    n_query = xq.shape[0]
    fb = forward_backward_time(model, task, train)
    base, base_s, _ = refined(model, task, factors, config, train, queries, 0)
    exact = gt.lds(exact_scores(kind, model, factors, x, y, xq, yq), truth)
    lds0 = gt.lds(base, truth)
    rows = [[kind, "EK-FAC (refine_steps=0)", f"{lds0:.3f}", "0 %", 0, "-", "-"]]
    for steps in STEPS:
        scores, seconds, products = refined(model, task, factors, config, train, queries, steps)
        value = gt.lds(scores, truth)
        per_query = max(seconds - base_s, 0.0) / n_query
        closed = (value - lds0) / (exact - lds0) if abs(exact - lds0) > 1e-12 else float("nan")
        rows.append([kind, f"refined, K={steps}", f"{value:.3f}", f"{100 * closed:.0f} %", products,
                     f"{1000 * per_query:.1f}", f"{per_query / fb:.2f}"])
        print(rows[-1], flush=True)
    rows.append([kind, "exact GGN (dense, same Λ)", f"{exact:.3f}", "100 %", "-", "-", "-"])
    return rows


def gpt2_cost(steps: int = 2, queries: int = 4, batches: int = 4):
    """Per-query refinement cost on a small GPT-2 (float32): seconds and forward+backward units."""
    model = tiny_gpt2(layers=2, width=128, seq=64, vocab=1024).eval()
    task = ip.CausalLMTask()
    train = lm_batches(16, 4, seq=64, vocab=1024)
    query_batches = lm_batches(queries, queries, seq=64, vocab=1024, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = ip.InfluenceConfig(refine_batches=batches)
        factors = ip.fit_factors(model, task, train, config)
        attributor = ip.Attributor(model, task, factors, config)
    chosen = train[:: len(train) // batches][:batches]
    fb = forward_backward_time(model, task, chosen)
    products = GaussNewton(model, task, attributor.layers, chosen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        ip.Attributor(model, task, factors, ip.InfluenceConfig(refine_batches=batches)).precondition(query_batches)
        plain = time.perf_counter() - start
        refine_cfg = ip.InfluenceConfig(refine_batches=batches, refine_steps=steps)
        start = time.perf_counter()
        ip.Attributor(model, task, factors, refine_cfg, curvature_data=train).precondition(query_batches)
        refined_s = time.perf_counter() - start
    one = {n: torch.randn((queries,) + tuple(s)) for n, s in factors.shapes.items()}
    start = time.perf_counter()
    products(one)
    product_s = time.perf_counter() - start
    per_query = (refined_s - plain) / queries
    n_params = sum(s[0] * s[1] for s in factors.shapes.values())
    return [[f"GPT-2 2×128, seq 64, vocab 1024 ({n_params / 1e6:.2f} M tracked parameters)", steps, batches,
             f"{plain:.2f}", f"{refined_s:.2f}", f"{per_query:.2f}", f"{per_query / steps / fb:.2f}",
             f"{product_s / queries / fb:.2f}"]]


def lm_rows(damping) -> list[list]:
    """LDS of EK-FAC and refined EK-FAC on `lm_finetune.py`'s 100-step GPT-2 fine-tune (no dense
    GGN at this size: LDS and cost only), products over 4 of its 10 training batches of 64."""
    model = lm.finetune(torch.arange(lm.N_TRAIN), seed=0).eval()
    task, train, queries = ip.CausalLMTask(), lm.train_batches(), lm.query_batches()
    config = {"fisher": "sampled", "damping": damping, "refine_batches": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factors = ip.fit_factors(model, task, train, ip.InfluenceConfig(**config))
        chosen = train[:: len(train) // 4][:4]
        fb = forward_backward_time(model, task, chosen)
        truth = lm.truth()
        base, base_s, _ = refined(model, task, factors, config, train, queries, 0)
        rows = [["GPT-2 fine-tune", "EK-FAC (refine_steps=0)", f"{gt.lds(base, truth):.3f}", 0, "-", "-"]]
        for steps in STEPS:
            scores, seconds, products = refined(model, task, factors, config, train, queries, steps)
            per_query = max(seconds - base_s, 0.0) / lm.N_QUERY
            rows.append(["GPT-2 fine-tune", f"refined, K={steps}", f"{gt.lds(scores, truth):.3f}", products,
                         f"{per_query:.2f}", f"{per_query / fb:.2f}"])
            print(rows[-1], flush=True)
    return rows


def lm_main(write: bool) -> None:
    started = time.time()
    parts = []
    for damping in (None, L2):
        label = "heuristic (0.1 × mean eigenvalue per layer)" if damping is None else f"λ = {damping:g} on every layer"
        parts.append(f"**Damping: {label}**\n\n" + table(
            ["problem", "scores", "LDS", "GGN products / query", "s / query",
             "cost / query in fwd+bwd over the product batches"], lm_rows(damping)))
    body = (f"Wall time {time.time() - started:.0f} s. The 100-step byte-level GPT-2 fine-tune of `lm_finetune.py` "
            "(16 query sequences, LDS against 100 half subsets fine-tuned from the same weights). Factors: post-hoc "
            "EK-FAC, sampled Fisher, one draw; Gauss-Newton products over 4 evenly spaced training batches of 64 "
            "sequences (`refine_batches=4`). Cost columns as above.\n\n" + "\n\n".join(parts))
    print(body)
    if write:
        write_section(HEADING + ": language-model fine-tune", body,
                      "OMP_NUM_THREADS=2 python benchmarks/refinement.py --part lm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the heuristic damping only")
    parser.add_argument("--part", choices=["small", "lm"], default="small",
                        help="the three small problems with exact GGN, or the GPT-2 fine-tune")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    threads = setup_threads()
    if args.part == "lm":
        lm_main(not args.no_write)
        return
    started = time.time()
    dampings = [None] if args.quick else [None, L2]
    parts = []
    for damping in dampings:
        rows = []
        for kind in ("logreg", "mlp", "regmlp"):
            rows += lds_rows(kind, damping)
        label = "heuristic (0.1 × mean eigenvalue per layer)" if damping is None else f"λ = {damping:g} on every layer"
        parts.append(f"**Damping: {label}**\n\n" + table(
            ["problem", "scores", "LDS", "EK-FAC → exact gap closed", "GGN products / query",
             "ms / query", "cost / query in fwd+bwd over the product batches"], rows))
    gpt = gpt2_cost()
    print(gpt, flush=True)
    parts.append("**Cost on a small GPT-2** (float32, 4 queries, curvature batches 4 × 64 tokens, default "
                 "damping)\n\n" + table(
                     ["model", "K", "refine_batches", "EK-FAC precondition (s)", "refined (s)", "s / query",
                      "per query and step, in fwd+bwd over the product batches",
                      "one product per query, in fwd+bwd"], gpt))
    body = (f"Wall time {time.time() - started:.0f} s on {threads} threads. "
            "LDS: Spearman over 100 retrained 50 % subsets (2 seeds), mean over queries (`accuracy.lds_truth`). "
            "Factors: post-hoc EK-FAC, sampled Fisher, 8 draws, float64; refinement over all training batches "
            "(batch 100). Gap closed = (LDS_K − LDS_EK-FAC) / (LDS_exact − LDS_EK-FAC). Cost columns: the "
            "refinement's extra wall time over plain preconditioning, per query (queries share each product's "
            "vmapped forward), and that divided by one forward + backward of the training loss over the same "
            "batches.\n\n" + "\n\n".join(parts))
    if not args.no_write:
        write_section(HEADING, body, "OMP_NUM_THREADS=2 python benchmarks/refinement.py" + (" --quick" if args.quick else ""))
    print(body)


if __name__ == "__main__":
    main()
