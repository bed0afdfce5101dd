"""Accuracy benchmark: infl_plugin identity/K-FAC/EK-FAC and kronfluence K-FAC/EK-FAC against
dense exact-GGN influence, actual leave-one-out retraining and LDS, on sklearn digits.

Models (float64): (a) multinomial logistic regression ``nn.Linear(64, 10)`` trained by Newton to
‖∇J‖ < 1e-10; (b) a 64-32-10 tanh MLP trained by full-batch Adam then L-BFGS (‖∇J‖ < 1e-6).
Objective ``mean CE + (l2/2)‖θ‖²`` (all parameters, biases included).

Metrics (each a per-query statistic averaged over the queries; the measurement is the query's
cross-entropy):

* ``GGN``: Pearson with ``∇f(q)ᵀ (G + λI)⁻¹ ∇L(z)`` where G is the dense exact GGN
  ``(1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n`` (torch.func) over all N training examples.
* ``LOO`` (logistic regression only): Pearson with the actual change of the query loss when one
  training example is removed (``n_loo`` random examples, warm-started Newton to 1e-10).
* ``LDS``: 100 random 50 % subsets, each retrained from ``lds_seeds`` initialisations; Spearman
  across subsets between ``-Σ_{z∈S} score(q, z)`` and the seed-averaged query loss.

Apples to apples: both libraries use the true Fisher with labels sampled from the model
(infl_plugin ``fisher="sampled"``; kronfluence ``use_empirical_fisher=False`` with a Task whose
``sample=True`` branch draws with the *same* generator, seed, batch order and sampling function, so
both see identical pseudo-labels), the same batches (size 100, training order), float64 statistics,
the same absolute damping λ added to every eigenvalue, and per-example *summed* gradients.
``passes`` > 1 reads the training set that many times (more pseudo-label draws per example).

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/accuracy.py`` (retraining ground truth is
cached in ``benchmarks/.cache``; ``--refresh`` recomputes it).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, TensorDataset

warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's torch.cuda.amp deprecation notes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ground_truth as gt  # noqa: E402
from common import write_section  # noqa: E402

import infl_plugin as ip  # noqa: E402
from infl_plugin.tasks import sample_categorical  # noqa: E402

HEADING = "Accuracy (benchmarks/accuracy.py)"
BATCH = 100


# ----------------------------------------------------------------------------- training (cached)
def train_model(kind, x, y, l2, refresh):
    n = x.shape[0]

    def compute():
        if kind == "logreg":
            theta, gnorm = gt.lr_newton(gt.with_bias(x), y, torch.ones(1, n, dtype=gt.DTYPE),
                                        torch.tensor([float(n)]), l2, torch.zeros(1, 10, 65, dtype=gt.DTYPE))
            return {"flat": gt.logreg_to_flat(theta[0]), "gnorm": float(gnorm[0])}
        flat, _ = gt.train_mlp_batched(x, y, torch.ones(1, n, dtype=gt.DTYPE), l2, [0])
        view = gt.Flat(gt.make_model("mlp"))
        flat, gnorm = gt.train_lbfgs(view, flat[0], x, y, torch.ones(n, dtype=gt.DTYPE), n, l2, tol=1e-6, max_rounds=20)
        return {"flat": flat, "gnorm": gnorm}

    return gt.cached(f"model-{kind}", {"kind": kind, "n": n, "l2": l2, "x": float(x.sum())}, compute, refresh)


def loo_truth(theta_flat, x, y, xq, yq, l2, n_loo, refresh):
    """Query-loss changes ``[Q, n_loo]`` when each of ``n_loo`` random examples is removed."""
    n = x.shape[0]

    def compute():
        removed = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:n_loo]
        weights = torch.ones(n_loo, n, dtype=gt.DTYPE)
        weights[torch.arange(n_loo), removed] = 0.0
        theta0 = gt.flat_to_logreg(theta_flat)
        xb, xqb = gt.with_bias(x), gt.with_bias(xq)
        thetas, gnorms = [], []
        for chunk in weights.split(25):
            th, gn = gt.lr_newton(xb, y, chunk, torch.full((chunk.shape[0],), float(n)), l2,
                                  theta0.expand(chunk.shape[0], -1, -1))
            thetas.append(th)
            gnorms.append(gn)
        theta = torch.cat(thetas)
        qloss = lambda th: F.cross_entropy(torch.einsum("ni,mci->mnc", xqb, th).transpose(1, 2), yq.expand(th.shape[0], -1),  # noqa: E731
                                           reduction="none")
        delta = (qloss(theta) - qloss(theta0[None])).T  # [Q, n_loo]
        return {"removed": removed, "delta": delta, "gnorm_max": float(torch.cat(gnorms).max())}

    return gt.cached("loo-logreg", {"n": n, "l2": l2, "n_loo": n_loo, "x": float(x.sum()), "q": float(xq.sum())},
                     compute, refresh)


def lds_truth(kind, theta_flat, x, y, xq, yq, l2, n_subsets, seeds, refresh):
    """Masks ``[S, N]`` and query losses ``[S, seeds, Q]`` of models retrained on 50 % subsets."""
    n = x.shape[0]

    def compute():
        g = torch.Generator().manual_seed(2)
        masks = torch.stack([torch.randperm(n, generator=g) < n // 2 for _ in range(n_subsets)]).to(gt.DTYPE)
        losses = torch.zeros(n_subsets, len(seeds), xq.shape[0], dtype=gt.DTYPE)
        gmax = 0.0
        if kind == "logreg":
            # Strictly convex: the optimum does not depend on the initialisation, so "seeds" are
            # inits near the full-data optimum θ* (seed 0: θ* itself; others: θ* + N(0, 0.1²));
            # their agreement is reported as a convergence check. Newton to ‖∇J‖ < 1e-9 (1e-10 sits
            # at the float64 floor on some subsets). Each model sees only its subset's rows.
            xb, xqb = gt.with_bias(x), gt.with_bias(xq)
            theta_star = gt.flat_to_logreg(theta_flat)
            idx = torch.stack([m.nonzero()[:, 0] for m in masks])  # [S, N/2]
            for si, seed in enumerate(seeds):
                noise = torch.randn(n_subsets, 10, 65, generator=torch.Generator().manual_seed(seed), dtype=gt.DTYPE)
                init = theta_star + 0.1 * noise * (seed != 0)
                for rows in torch.arange(n_subsets).split(25):
                    ones = torch.ones(len(rows), idx.shape[1], dtype=gt.DTYPE)
                    th, gn = gt.lr_newton(xb[idx[rows]], y[idx[rows]], ones, ones.sum(1), l2, init[rows], tol=1e-9)
                    gmax = max(gmax, float(gn.max()))
                    logits = torch.einsum("ni,mci->mnc", xqb, th)
                    losses[rows, si] = F.cross_entropy(logits.transpose(1, 2), yq.expand(len(rows), -1), reduction="none")
        else:  # "mlp" (digits) or "regmlp" (diabetes regression, used by fidelity.py)
            view = gt.Flat(gt.make_model(kind))
            for si, seed in enumerate(seeds):
                flat, gn = gt.train_mlp_batched(x, y, masks, l2, [1000 * seed + i for i in range(n_subsets)], kind=kind)
                gmax = max(gmax, float(gn.max()))
                for i in range(n_subsets):
                    losses[i, si] = gt.example_losses(kind, view.logits(flat[i], xq), yq)
        return {"masks": masks, "losses": losses, "gnorm_max": gmax}

    key = {"kind": kind, "n": n, "l2": l2, "subsets": n_subsets, "seeds": list(seeds), "x": float(x.sum()),
           "q": float(xq.sum())}
    return gt.cached(f"lds-{kind}", key, compute, refresh)


# ----------------------------------------------------------------------------- attribution methods
def ours(model, strategy, damping, passes, x, y, xq, yq):
    task = ip.ClassificationTask()
    train = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, x.shape[0], BATCH)]
    cfg = ip.InfluenceConfig(strategy=strategy, damping=damping, fisher="sampled", accumulation_dtype="float64", seed=0)
    factors = ip.fit_factors(model, task, train * passes, cfg)
    attributor = ip.Attributor(model, task, factors, cfg)
    return attributor.pairwise_scores([(xq, yq)], train)


class KronTask:
    """kronfluence Task; the sampled branch mirrors infl_plugin's draws exactly (same generator)."""

    def __new__(cls):
        from kronfluence.task import Task

        class _Task(Task):
            generator = None

            def compute_train_loss(self, batch, model, sample=False):
                inputs, labels = batch
                logits = model(inputs)
                if sample:
                    labels = sample_categorical(logits, self.generator)
                return F.cross_entropy(logits, labels, reduction="sum")

            def compute_measurement(self, batch, model):
                inputs, labels = batch
                return F.cross_entropy(model(inputs), labels, reduction="sum")

        return _Task()


def kronfluence_scores(model, kind, strategies, dampings, passes, x, y, xq, yq):
    """``{(strategy, damping): scores [Q, N]}`` from kronfluence (factors fitted once per strategy)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    f64 = torch.float64
    task = KronTask()
    prepared = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(analysis_name=f"accuracy_{kind}", model=prepared, task=task, cpu=True, disable_tqdm=True,
                        output_dir=str(gt.CACHE / "kronfluence"), log_level=logging.ERROR)
    train_ds = TensorDataset(x, y)
    fit_ds = ConcatDataset([train_ds] * passes)
    out = {}
    for strategy in strategies:
        task.generator = torch.Generator().manual_seed(0)
        fargs = FactorArguments(strategy=strategy, use_empirical_fisher=False, covariance_max_examples=None,
                                lambda_max_examples=None, activation_covariance_dtype=f64,
                                gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64)
        fname = f"{strategy}_p{passes}"
        analyzer.fit_all_factors(factors_name=fname, dataset=fit_ds, per_device_batch_size=BATCH,
                                 factor_args=fargs, overwrite_output_dir=True)
        for damping in dampings:
            sargs = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                                   score_dtype=f64, query_gradient_svd_dtype=f64)
            sname = f"{fname}_d{damping:g}"
            analyzer.compute_pairwise_scores(scores_name=sname, factors_name=fname, query_dataset=TensorDataset(xq, yq),
                                             train_dataset=train_ds, per_device_query_batch_size=xq.shape[0],
                                             per_device_train_batch_size=BATCH, score_args=sargs,
                                             overwrite_output_dir=True)
            out[(strategy, damping)] = analyzer.load_pairwise_scores(sname)["all_modules"].to(gt.DTYPE)
    return out


# ----------------------------------------------------------------------------- metrics and report
def metrics(scores, exact, loo, lds):
    row = {"ggn": gt.mean_rowwise(gt.pearson, scores, exact)}
    if loo is not None:
        row["loo"] = gt.mean_rowwise(gt.pearson, scores[:, loo["removed"]], loo["delta"])
    predicted = -(lds["masks"] @ scores.T)  # [S, Q]: higher = lower loss expected
    actual = lds["losses"].mean(1)  # [S, Q]
    row["lds"] = gt.mean_rowwise(gt.spearman, predicted.T, actual.T)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-query", type=int, default=50)
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--dampings", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--passes", type=int, nargs="+", default=[1, 8], help="pseudo-label passes over the data")
    p.add_argument("--n-loo", type=int, default=150)
    p.add_argument("--lds-subsets", type=int, default=100)
    p.add_argument("--lds-seeds", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["logreg", "mlp"])
    p.add_argument("--refresh", action="store_true", help="recompute cached ground truth")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    args = p.parse_args()
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    start, cpu_start = time.time(), time.process_time()

    x, y, xq, yq = gt.digits(args.n_train, args.n_query)
    lines = []
    notes = []
    table = {}  # (kind, damping, name, passes) -> metrics
    for kind in args.models:
        t0 = time.time()
        trained = train_model(kind, x, y, args.l2, args.refresh)
        model = gt.make_model(kind)
        view = gt.Flat(model)
        view.set(trained["flat"])
        flat = trained["flat"]
        ggn = gt.dense_ggn(view, flat, x)
        tr_grads = gt.per_example_grads(view, flat, x, y)
        q_grads = gt.per_example_grads(view, flat, xq, yq)
        loo = loo_truth(flat, x, y, xq, yq, args.l2, args.n_loo, args.refresh) if kind == "logreg" else None
        lds = lds_truth(kind, flat, x, y, xq, yq, args.l2, args.lds_subsets, list(range(args.lds_seeds)), args.refresh)
        seed_spread = float((lds["losses"][:, 0] - lds["losses"][:, -1]).abs().max())
        notes.append(f"{kind}: trained ‖∇J‖ = {trained['gnorm']:.1e}; LDS retrain max ‖∇J‖ = {lds['gnorm_max']:.1e}, "
                     f"max |loss(seed 0) − loss(seed {args.lds_seeds - 1})| = {seed_spread:.1e}"
                     + (f"; LOO retrain max ‖∇J‖ = {loo['gnorm_max']:.1e}" if loo else "")
                     + f" (ground truth {time.time() - t0:.0f} s incl. cache)")
        kron = {passes: kronfluence_scores(model, kind, ("kfac", "ekfac"), args.dampings, passes, x, y, xq, yq)
                for passes in args.passes}
        for damping in args.dampings:
            exact = gt.exact_scores(ggn, damping, q_grads, tr_grads)
            rows = [("exact GGN (dense)", "-", exact), ("infl_plugin identity", "-", ours(model, "identity", damping, 1, x, y, xq, yq))]
            for passes in args.passes:
                for strategy in ("kfac", "ekfac"):
                    rows.append((f"infl_plugin {strategy}", passes, ours(model, strategy, damping, passes, x, y, xq, yq)))
            for passes in args.passes:
                for strategy in ("kfac", "ekfac"):
                    rows.append((f"kronfluence {strategy}", passes, kron[passes][(strategy, damping)]))
            for name, passes, scores in rows:
                m = metrics(scores, exact, loo, lds)
                table[(kind, damping, name, passes)] = m
                loo_s = f"{m['loo']:.3f}" if "loo" in m else "-"
                lines.append(f"| {kind} | {damping:g} | {name} | {passes} | {m['ggn']:.3f} | {loo_s} | {m['lds']:.3f} |")
                print(lines[-1], flush=True)

    elapsed, cpu = time.time() - start, time.process_time() - cpu_start
    gaps = {}
    for (kind, damping, name, passes), m in table.items():
        if name == "infl_plugin ekfac":
            k = table[(kind, damping, "kronfluence ekfac", passes)]
            for col in m:
                gaps[col] = min(gaps.get(col, float("inf")), m[col] - k[col])
    acceptance = ", ".join(f"{col.upper()} {gap:+.1e}" for col, gap in gaps.items())
    import kronfluence

    command = "OMP_NUM_THREADS=2 python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    text = f"""Wall time {elapsed:.0f} s, process CPU time {cpu:.0f} s, 1-min load average at the end {os.getloadavg()[0]:.1f}
(the machine may be shared, so wall time can exceed CPU time / threads); kronfluence {kronfluence.__version__};
{'ground truth computed: ' + ', '.join(gt.COMPUTED) if gt.COMPUTED else 'all ground truth from cache'}.

Setup: sklearn digits, standardised, {args.n_train} training / {args.n_query} held-out query examples, float64,
objective mean CE + (l2/2)‖θ‖² with l2 = {args.l2:g} on all parameters. Measurement: query cross-entropy.
Columns are per-query statistics averaged over the {args.n_query} queries: **GGN** = Pearson with dense
exact-GGN influence ∇f(q)ᵀ(G + λI)⁻¹∇L(z) (torch.func, all training examples); **LOO** = Pearson with the
actual query-loss change when one of {args.n_loo} random training examples is removed (logistic regression,
Newton warm-started from θ*, to ‖∇J‖ ≈ 1e-10, see the checks below); **LDS** = Spearman over {args.lds_subsets} random 50 % subsets ({args.lds_seeds}
retraining seeds each, losses averaged) between −Σ_(z∈S) score and the query loss.
Retraining: logistic regression by Newton (‖∇J‖ < 1e-9; strictly convex, so its seeds are inits near θ*);
MLP from fresh random inits by full-batch Adam, 2000 cosine-decayed steps (the usual fixed-budget LDS
protocol; the MLP under study: Adam then L-BFGS to ‖∇J‖ ≈ 1e-6).
Fisher: the *true* (sampled) Fisher in both libraries — infl_plugin `fisher="sampled"`, kronfluence
`use_empirical_fisher=False` with a Task that draws the same pseudo-labels (same generator, seed, batch
order, sampling function); **passes** = reads of the training set for the statistics (pseudo-label draws per
example). λ is the absolute damping added to every eigenvalue in both libraries (for logistic regression
with λ = l2 the damped GGN is the exact Hessian of the objective). Batch size 100, float64 statistics.

| model | λ | method | passes | GGN | LOO | LDS |
|---|---|---|---|---|---|---|
""" + "\n".join(lines) + f"""

Acceptance (ours EK-FAC − kronfluence EK-FAC, worst case over models, λ and passes): {acceptance}
(criterion: ≥ −0.01).

Notes: with identical pseudo-labels the two libraries agree to the printed precision in every row,
so the remaining gaps to the exact GGN are the method's (Kronecker structure, sampled Fisher), not
implementation differences (damping definition, Fisher normalisation per example, per-example *sum*
gradients all coincide). With one pseudo-label draw per example (passes = 1) the EK-FAC corrected
eigenvalues are noisy and EK-FAC can trail K-FAC (logistic regression); more draws help both.

Ground-truth checks: """ + "; ".join(notes) + ".\n"
    write_section(HEADING, text, command.strip(), Path(args.out))
    print(f"wrote {args.out} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
