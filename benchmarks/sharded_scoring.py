"""Checkpoint scoring shared out over processes: one process vs two, on the same candidates.

Under a distributed run every rank runs the attribution's job in step and scores its share of
the candidate batches (`infl_plugin.run.shares.RankShare`), then the scores are gathered. This
script times `AttributionJob.run` (queries preconditioned, 512 candidates scored, self-influence
off) on a small GPT-2 (2 layers, width 128, 64 tokens, vocabulary 1024; factors fitted post hoc
on 8 batches) in three set-ups, interleaved round by round so that machine load hits all alike:

* one process with 1 thread;
* one process with 2 threads (the whole 2-core machine);
* two processes under ``torchrun`` (gloo), 1 thread each, each scoring half of the batches.

Each round launches a fresh ``torchrun`` (its start-up is outside the timing: the processes time
the job themselves, after one warm-up run). Run: ``python benchmarks/sharded_scoring.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import lm_batches, machine, table, tiny_gpt2, write_section  # noqa: E402

import infl_plugin as ip  # noqa: E402
from infl_plugin.config.options import AttributionOptions  # noqa: E402
from infl_plugin.run.data import AttributionData  # noqa: E402
from infl_plugin.run.job import AttributionJob  # noqa: E402

HEADING = "Checkpoint scoring over processes (sharded_scoring.py)"
CANDIDATES, BATCH, QUERIES, ROUNDS = 512, 16, 16, 3


def job_seconds(repeats: int = 2) -> float:
    """Median seconds of one `AttributionJob.run` over the candidates (after a warm-up)."""
    model = tiny_gpt2(layers=2, width=128, seq=64, vocab=1024).eval()
    task = ip.CausalLMTask()
    train = lm_batches(CANDIDATES, BATCH, seq=64, vocab=1024)
    queries = lm_batches(QUERIES, QUERIES, seq=64, vocab=1024, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = ip.InfluenceConfig()
        factors = ip.fit_factors(model, task, train[:8], config)
        job = AttributionJob(model, task, config, AttributionOptions(progress=False, top_k=5))
        data = AttributionData(queries, train)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            result = job.run(factors, data, step=0, reason="manual")
            times.append(time.perf_counter() - start)
    assert result.scores.shape == (QUERIES, CANDIDATES)
    return statistics.median(times[1:])


def child() -> None:
    """One process of a set-up: time the job and print ``{"seconds": …}`` (rank 0)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    seconds = job_seconds()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"seconds": seconds}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def launch(processes: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes > 1:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   __file__, "--child"]
    else:
        command = [sys.executable, __file__, "--child"]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])["seconds"]


def main() -> None:
    setups = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2), "2 processes, 1 thread each": (2, 1)}
    times: dict[str, list[float]] = {name: [] for name in setups}
    started = time.time()
    for _ in range(ROUNDS):
        for name, (processes, threads) in setups.items():
            times[name].append(launch(processes, threads))
            print(name, times[name][-1], flush=True)
    base = statistics.median(times["1 process, 1 thread"])
    rows = [[name, f"{statistics.median(t):.2f}", " ".join(f"{x:.2f}" for x in t), f"{base / statistics.median(t):.2f}×"]
            for name, t in times.items()]
    body = (f"{machine()}. Wall time {time.time() - started:.0f} s. `AttributionJob.run` with {QUERIES} queries "
            f"and {CANDIDATES} candidates in batches of {BATCH} (GPT-2 2×128, 64 tokens, vocabulary 1024, EK-FAC), "
            f"median of 2 runs after a warm-up per launch, {ROUNDS} launches per set-up interleaved.\n\n"
            + table(["set-up", "median s", "per launch", "speed-up vs 1 process, 1 thread"], rows))
    print(body)
    write_section(HEADING, body, "python benchmarks/sharded_scoring.py")


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        main()
