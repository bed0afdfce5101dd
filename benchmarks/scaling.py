"""How checkpoint scoring scales: candidates, queries, model width, against the floor.

Question: how does infl_plugin's scoring cost grow with the number of candidates N, of queries Q
and with the model width, and how does scoring one candidate compare with one plain
forward + backward pass on it (the floor: no method can score a candidate without one)?

Model: the small GPT-2 of the other benchmarks (4 layers, 128-token sequences, vocabulary 8192,
HF Conv1D layers as they are), the 16 block linear layers tracked, EK-FAC fitted on 16 sequences.
"query s" = differentiate and precondition the queries (once per attribution); "per candidate" =
the candidate pass divided by N (forward, backward to the tracked outputs, contraction with all
queries); "fwd+bwd" = a plain training forward + ``loss.backward()`` (parameter gradients) on the
same batches. Medians of interleaved repetitions in one process.

    python benchmarks/scaling.py           # ~6 min on 2 cores
    python benchmarks/scaling.py --quick   # ~2 min
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, lm_batches, setup_threads, table, tiny_gpt2, write_section  # noqa: E402

import infl_plugin as ip  # noqa: E402

warnings.filterwarnings("ignore")
MODULES = ["transformer.h.*.attn.c_*", "transformer.h.*.mlp.c_*"]
BATCH = 8


class Setup:
    def __init__(self, width: int, n_fit: int = 16):
        self.model = tiny_gpt2(width=width)
        self.model.eval()
        self.fit = lm_batches(n_fit, BATCH, seed=1)
        self.factors = ip.fit_factors(self.model, ip.CausalLMTask(), self.fit, self.config())

    @staticmethod
    def config(rank=None):
        return ip.InfluenceConfig(modules=MODULES, query_rank=rank)

    def attributor(self, rank=None):
        return ip.Attributor(self.model, ip.CausalLMTask(), self.factors, self.config(rank))

    def plain(self, batches):
        def run():
            for batch in batches:
                self.model.zero_grad(set_to_none=True)
                self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
            self.model.zero_grad(set_to_none=True)
        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    threads = setup_threads()
    quick = args.quick
    repeats = args.repeats or (2 if quick else 3)
    started = time.perf_counter()
    base = Setup(256)
    sections = []

    # 1. candidates
    n_values = [8, 16, 32] if quick else [16, 32, 64, 128]
    queries = lm_batches(16, 16, seed=3)
    att = base.attributor()
    pq = att.precondition(queries)
    fns = {n: (lambda n=n: att.pairwise_scores(pq, lm_batches(n, BATCH, seed=2))) for n in n_values}
    med = interleaved(fns, repeats=repeats, warmup=1)
    rows = [[n, f"{med[n]:.2f}", f"{1000 * med[n] / n:.1f}", f"{n / med[n]:.1f}"] for n in n_values]
    sections.append("**Candidates N** (Q = 16 preconditioned queries, full rank, width 256)\n\n"
                    + table(["N", "candidate pass s", "ms / candidate", "candidates / s"], rows))
    print(sections[-1], flush=True)

    # 2. queries (full rank and rank 32), with the floor
    n_train = 16 if quick else 32
    train = lm_batches(n_train, BATCH, seed=2)
    q_values = [4, 16, 64] if quick else [4, 16, 64, 256]
    rows = []
    for rank in (None, 32):
        att = base.attributor(rank)
        for q in q_values:
            queries = lm_batches(q, 16, seed=3)
            t = time.perf_counter()
            pq = att.precondition(queries)
            query_s = time.perf_counter() - t
            med = interleaved({"score": lambda: att.pairwise_scores(pq, train), "plain": base.plain(train)},
                              repeats=repeats, warmup=1)
            rows.append(["full" if rank is None else f"rank {rank}", q, f"{query_s:.2f}", f"{1000 * query_s / q:.0f}",
                         f"{1000 * med['score'] / n_train:.1f}", f"{1000 * med['plain'] / n_train:.1f}",
                         f"**{med['score'] / med['plain']:.2f}**"])
            print(table(["rank", "Q", "query s", "ms / query", "ms / candidate", "fwd+bwd ms / candidate",
                         "candidate / fwd+bwd"], rows[-1:]), flush=True)
    sections.append(f"**Queries Q** (N = {n_train} candidates, width 256; query s measured once, candidate pass and "
                    "plain fwd+bwd interleaved)\n\n"
                    + table(["rank", "Q", "query s", "ms / query", "ms / candidate", "plain fwd+bwd ms / candidate",
                             "candidate / fwd+bwd"], rows))

    # 3. width
    widths = [128, 256] if quick else [128, 256, 384, 512]
    rows = []
    queries = lm_batches(16, 16, seed=3)
    for width in widths:
        setup = base if width == 256 else Setup(width)
        att = setup.attributor()
        t = time.perf_counter()
        pq = att.precondition(queries)
        query_s = time.perf_counter() - t
        med = interleaved({"score": lambda: att.pairwise_scores(pq, train), "plain": setup.plain(train)},
                          repeats=repeats, warmup=1)
        params = sum(layer.shape[0] * layer.shape[1] for layer in att.layers)
        rows.append([width, f"{params / 1e6:.2f}", f"{query_s:.2f}", f"{1000 * med['score'] / n_train:.1f}",
                     f"{1000 * med['plain'] / n_train:.1f}", f"**{med['score'] / med['plain']:.2f}**"])
        print(table(["width", "tracked M", "query s", "ms / cand", "fwd+bwd ms", "ratio"], rows[-1:]), flush=True)
    sections.append(f"**Model width** (Q = 16 full rank, N = {n_train})\n\n"
                    + table(["width", "tracked params (M)", "query s (Q=16)", "ms / candidate",
                             "plain fwd+bwd ms / candidate", "candidate / fwd+bwd"], rows))

    elapsed = time.perf_counter() - started
    body = (f"{threads} torch threads; medians of {repeats} interleaved repetitions; batches of {BATCH} candidates, "
            "16 queries per query batch.\n\n" + "\n\n".join(sections) + f"\n\nTotal benchmark time {elapsed:.0f}s.")
    print(body)
    if not args.no_write:
        write_section("Scaling (scaling.py)", body)


if __name__ == "__main__":
    main()
