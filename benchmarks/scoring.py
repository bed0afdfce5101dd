"""Checkpoint attribution: infl_plugin against kronfluence on the same model, factors and queries.

Question: how many candidate (training) examples per second does each library score, how much
memory does it need, and is it the same computation?

Setup: a small GPT-2 (4 layers, width 256, 128-token sequences, 8192-token vocabulary; GPT-2's
Conv1D swapped for the equivalent nn.Linear so that kronfluence can track it) with the 16 linear
layers of its blocks tracked. Both libraries fit EK-FAC factors on the same sequences with the
empirical Fisher (real labels, deterministic) and score with the heuristic damping
0.1 × mean(eigenvalues); the measurement is each query's summed token loss. kronfluence is given
its fastest equal setting: all queries preconditioned before one pass over the candidates
(``query_gradient_accumulation_steps``), the same batch sizes; at rank 32 kronfluence uses its
default randomized ``svd_lowrank`` (its exact ``use_full_svd=True`` takes minutes per 16 queries
here), infl_plugin its exact truncated SVD.

Timing: the query phase (differentiate + precondition [+ SVD]) and the candidate phase (one
forward and backward per candidate batch + contraction) separately; kronfluence's candidate phase
is timed by wrapping its ``compute_dot_products_with_loader``. Configurations with several
repetitions run the two libraries interleaved in this process (medians); peak memory then comes
from a fresh subprocess per library that loads the model and measures the peak RSS while it loads
the factors and scores one candidate batch (see `common.PeakRSS`). Single-repetition
configurations (256 queries) take both the timing and the peak from that fresh process, scoring
all candidates, so the costliest configurations are not computed twice.

    python benchmarks/scoring.py            # ~8 min on 2 cores
    python benchmarks/scoring.py --quick    # ~2 min
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, PeakRSS, emit_result, interleaved, lm_batches, run_isolated, setup_threads, table, tiny_gpt2, write_section  # noqa: E402

import infl_plugin as ip  # noqa: E402

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

MODULES = ["transformer.h.*.attn.c_*", "transformer.h.*.mlp.c_*"]
QUERY_BATCH = 16
TRAIN_BATCH = 8
KF_DIR = CACHE / "kronfluence"
MODEL_PATH = CACHE / "scoring_model.pt"
OURS_FACTORS = CACHE / "scoring_ours.safetensors"


# ------------------------------------------------------------------------------------- kronfluence glue
def kf_task():
    from kronfluence.task import Task as KTask

    class LMTask(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"]).logits.float()
            logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            labels = batch["input_ids"][:, 1:].reshape(-1)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return list(TRACKED)

    return LMTask()


TRACKED: list[str] = []


class Sequences(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.ids = torch.cat([b["input_ids"] for b in batches])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def kf_analyzer(model):
    from kronfluence.analyzer import Analyzer, prepare_model

    task = kf_task()
    kmodel = prepare_model(copy.deepcopy(model), task)
    return Analyzer("scoring", kmodel, task, cpu=True, disable_tqdm=True, output_dir=str(KF_DIR))


def kf_score_args(rank):
    from kronfluence.arguments import ScoreArguments

    return ScoreArguments(damping_factor=None, query_gradient_low_rank=rank)


class KfPhaseTimer:
    """Wraps kronfluence's candidate pass to time it apart from the query phase."""

    def __init__(self):
        import kronfluence.score.pairwise as pairwise

        self.module, self.inner, self.seconds = pairwise, pairwise.compute_dot_products_with_loader, 0.0
        pairwise.compute_dot_products_with_loader = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def kf_run(analyzer, queries, train, rank):
    n_query = len(queries.ids)
    import dataclasses

    args = dataclasses.replace(kf_score_args(rank), query_gradient_accumulation_steps=max(1, -(-n_query // QUERY_BATCH)))
    analyzer.compute_pairwise_scores(
        "scores", "ekfac", queries, train, per_device_query_batch_size=min(QUERY_BATCH, n_query),
        per_device_train_batch_size=TRAIN_BATCH, score_args=args, overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores("scores")["all_modules"]


# ------------------------------------------------------------------------------------- setup
def build(n_fit: int):
    global TRACKED
    model = tiny_gpt2(linear=True)
    fit = lm_batches(n_fit, TRAIN_BATCH, seed=1)
    # a few optimizer steps so the checkpoint is not the random initialisation
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in fit:
        opt.zero_grad()
        model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        opt.step()
    model.eval()
    TRACKED = [layer.name for layer in ip.select_layers(model, MODULES)]
    return model, fit


def config(rank=None):
    return ip.InfluenceConfig(strategy="ekfac", fisher="empirical", damping=None, modules=MODULES, query_rank=rank)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = x.flatten().argsort().argsort().double()
    ry = y.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


# ------------------------------------------------------------------------------------- child: peak memory
def child(lib: str, n_query: int, rank, n_train: int, scores_path: str) -> None:
    """Fresh process: peak memory of loading the factors and scoring, and the time of each phase.

    The scores go to ``scores_path`` (unless ``-``) so that the parent can correlate them.
    """
    global TRACKED
    setup_threads()
    model = tiny_gpt2(linear=True)
    model.load_state_dict(torch.load(MODEL_PATH))
    model.eval()
    TRACKED = [layer.name for layer in ip.select_layers(model, MODULES)]
    queries = lm_batches(n_query, QUERY_BATCH, seed=3)
    train = lm_batches(n_train, TRAIN_BATCH, seed=2)
    if lib == "kronfluence":
        analyzer = kf_analyzer(model)
        q, t = Sequences(queries), Sequences(train)
        timer = KfPhaseTimer()
        with PeakRSS() as mem:
            start = time.perf_counter()
            scores = kf_run(analyzer, q, t, rank)
            total = time.perf_counter() - start
        query_s, candidate_s = total - timer.seconds, timer.seconds
    else:
        with PeakRSS() as mem:
            factors = ip.Factors.load(OURS_FACTORS)
            attributor = ip.Attributor(model, ip.CausalLMTask(), factors, config(rank))
            start = time.perf_counter()
            preconditioned = attributor.precondition(queries)
            middle = time.perf_counter()
            scores = attributor.pairwise_scores(preconditioned, train)
            query_s, candidate_s = middle - start, time.perf_counter() - middle
    if scores_path != "-":
        torch.save(scores, scores_path)
    emit_result({"peak_mib": mem.peak_mib, "delta_mib": mem.delta_mib, "baseline_mib": mem.baseline_mib,
                 "query_s": query_s, "candidate_s": candidate_s})


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer candidates, queries and repetitions (~2 min)")
    parser.add_argument("--candidates", type=int, default=None)
    parser.add_argument("--queries", type=str, default=None, help="comma-separated query counts (default 16,64,256)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--child", nargs=5, metavar=("LIB", "Q", "RANK", "N", "SCORES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        lib, q, rank, n, scores_path = args.child
        child(lib, int(q), None if rank == "full" else int(rank), int(n), scores_path)
        return

    threads = setup_threads()
    quick = args.quick
    n_train = args.candidates or (16 if quick else 32)
    query_counts = [int(q) for q in (args.queries or ("16" if quick else "16,64,256")).split(",")]
    repeats = args.repeats or (2 if quick else 3)
    n_fit = 16
    ranks = [None, 32]
    started = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)

    model, fit = build(n_fit)
    torch.save(model.state_dict(), MODEL_PATH)
    train = lm_batches(n_train, TRAIN_BATCH, seed=2)
    train_ds = Sequences(train)

    # factors: same data, strategy, Fisher, damping rule
    t0 = time.perf_counter()
    factors = ip.fit_factors(model, ip.CausalLMTask(), fit, config())
    fit_ours = time.perf_counter() - t0
    factors.save(OURS_FACTORS)
    from kronfluence.arguments import FactorArguments

    analyzer = kf_analyzer(model)
    t0 = time.perf_counter()
    analyzer.fit_all_factors(
        "ekfac", Sequences(fit), per_device_batch_size=TRAIN_BATCH,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True), overwrite_output_dir=True,
    )
    fit_kf = time.perf_counter() - t0
    timer = KfPhaseTimer()
    print(f"factors fitted: infl_plugin {fit_ours:.1f}s, kronfluence {fit_kf:.1f}s", flush=True)

    rows, spear_rows, mem_rows = [], [], []
    for n_query in query_counts:
        queries = lm_batches(n_query, QUERY_BATCH, seed=3)
        queries_ds = Sequences(queries)
        full_scores = {}
        for rank in ranks:
            label = "full" if rank is None else f"rank {rank}"
            rank_arg = "full" if rank is None else str(rank)
            script = str(Path(__file__).resolve())

            def isolated_run(lib: str, n: int, scores_path: str = "-") -> dict:
                return run_isolated(script, ["--child", lib, str(n_query), rank_arg, str(n), scores_path])

            # fewer repetitions for the long configurations keep the default run under 10 minutes
            reps = repeats if n_query < 64 or quick or args.repeats else (2 if n_query < 256 else 1)
            if reps > 1:
                # timing: the two libraries interleaved in this process, medians of the repetitions;
                # peak memory: a fresh process per library scoring one candidate batch (streaming keeps it flat)
                attributor = ip.Attributor(model, ip.CausalLMTask(), factors, config(rank))
                phase = {"ours_q": [], "ours_t": [], "kf_all": [], "kf_t": []}
                out = {}

                def ours():
                    t = time.perf_counter()
                    pq = attributor.precondition(queries)
                    t1 = time.perf_counter()
                    out["ours"] = attributor.pairwise_scores(pq, train)
                    phase["ours_q"].append(t1 - t)
                    phase["ours_t"].append(time.perf_counter() - t1)

                def kf():
                    timer.seconds = 0.0
                    t = time.perf_counter()
                    out["kf"] = kf_run(analyzer, queries_ds, train_ds, rank)
                    phase["kf_all"].append(time.perf_counter() - t)
                    phase["kf_t"].append(timer.seconds)

                # warm-up only once, on the smallest configuration (allocators, einsum paths)
                warm = 1 if (n_query == query_counts[0] and rank is None) else 0
                interleaved({"infl_plugin": ours, "kronfluence": kf}, repeats=reps, warmup=warm)
                med = lambda xs: float(torch.tensor(xs[warm:]).median())  # noqa: E731
                oq, ot = med(phase["ours_q"]), med(phase["ours_t"])
                kt = med(phase["kf_t"])
                kq = med([a - b for a, b in zip(phase["kf_all"], phase["kf_t"])])
                peaks = {lib: isolated_run(lib, TRAIN_BATCH) for lib in ("ours", "kronfluence")}
            else:
                # one repetition: each library's fresh process times the phases and measures the peak
                # together, so the largest configurations are not computed twice
                peaks, out = {}, {}
                for lib, key in (("ours", "ours"), ("kronfluence", "kf")):
                    path = CACHE / f"scores_{lib}.pt"
                    peaks[lib] = isolated_run(lib, n_train, str(path))
                    out[key] = torch.load(path)
                oq, ot = peaks["ours"]["query_s"], peaks["ours"]["candidate_s"]
                kq, kt = peaks["kronfluence"]["query_s"], peaks["kronfluence"]["candidate_s"]
            ours_total, kf_total = oq + ot, kq + kt
            rows.append([
                n_query, label, f"{oq:.2f} / {kq:.2f}", f"{ot:.2f} / {kt:.2f}",
                f"{n_train / ot:.1f} / {n_train / kt:.1f}", f"**{kt / ot:.2f}x**",
                f"{n_train / ours_total:.2f} / {n_train / kf_total:.2f}", f"**{kf_total / ours_total:.2f}x**", reps,
            ])
            rho = spearman(out["ours"], out["kf"])
            if rank is None:
                full_scores = {"ours": out["ours"], "kf": out["kf"]}
                spear_rows.append([n_query, "full vs full", f"{rho:.5f}"])
            else:
                spear_rows.append([n_query, "rank 32 vs rank 32", f"{rho:.4f}"])
                spear_rows.append([n_query, "ours rank 32 vs kronfluence full", f"{spearman(out['ours'], full_scores['kf']):.4f}"])
            mem_rows.append([
                n_query, label, f"{peaks['ours']['delta_mib']:.0f}", f"{peaks['kronfluence']['delta_mib']:.0f}",
                f"**{peaks['ours']['delta_mib'] / peaks['kronfluence']['delta_mib']:.2f}**",
                f"{peaks['ours']['peak_mib']:.0f} / {peaks['kronfluence']['peak_mib']:.0f}",
            ])
            print(f"[{time.perf_counter() - started:.0f}s]", flush=True)
            print(table(["Q", "rank", "query s (ours/kf)", "cand. s (ours/kf)", "cand/s (ours/kf)", "speedup",
                         "end-to-end cand/s", "speedup", "reps"], rows[-1:]), flush=True)
            print(table(["Q", "rank", "ours MiB", "kf MiB", "ratio", "process peak"], mem_rows[-1:]), flush=True)

    elapsed = time.perf_counter() - started
    body = f"""Small GPT-2 (4 layers, width 256, 128-token sequences, vocabulary 8192, Conv1D→Linear so kronfluence
can track it), 16 block linear layers tracked, EK-FAC fitted by each library on the same {n_fit} sequences
(empirical Fisher; fit time infl_plugin {fit_ours:.1f}s, kronfluence {fit_kf:.1f}s), damping 0.1 × mean eigenvalue,
{n_train} candidates (batches of {TRAIN_BATCH}), queries in batches of {QUERY_BATCH}, {threads} torch threads,
kronfluence {_kf_version()} (all queries preconditioned before one candidate pass; its default randomized SVD at
rank 32, ours exact).
Medians of the `reps` interleaved repetitions (one repetition: timed in the fresh process of the memory
measurement); "ours / kf" pairs; speedup = kronfluence time / ours.
"query s" = differentiate + precondition (+ SVD) the queries; "cand. s" = the pass over the candidates.

{table(["queries", "rank", "query s (ours / kf)", "candidate s (ours / kf)", "candidates/s (ours / kf)",
        "candidate-pass speedup", f"end-to-end cand/s for {n_train} (ours / kf)", "end-to-end speedup", "reps"], rows)}

Same computation (Spearman rank correlation of all query × candidate scores):

{table(["queries", "compared", "Spearman"], spear_rows)}

Peak memory while loading the factors and scoring (one candidate batch; all {n_train} with one repetition) ({PeakRSS.method}; MiB above the
process RSS before the block; "process peak" includes the interpreter, torch and the model):

{table(["queries", "rank", "infl_plugin MiB", "kronfluence MiB", "ours / kf", "process peak MiB (ours / kf)"], mem_rows)}

Total benchmark time {elapsed:.0f}s."""
    print(body)
    if not args.no_write:
        write_section("Checkpoint scoring against kronfluence (scoring.py)", body)


def _kf_version() -> str:
    try:
        from importlib.metadata import version

        return version("kronfluence")
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
