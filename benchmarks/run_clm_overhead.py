"""What the callback costs in the run_clm-shaped flow, and where the time goes.

Runs ``examples/hf_run_clm.py`` (GPT-2 2×64 from a config, 64-token blocks of the Python language
reference, batch 8, one epoch = 113 optimizer steps, saves every 50 steps) with its
``InfluenceTrainerCallback`` and with a do-nothing callback in its place, interleaved, each run in
a fresh output directory. Reports the Trainer's ``train_runtime`` per variant and, from the
artifacts, each attribution's itemised ``durations`` (factors with the eigenvalue pass, streaming
query refresh, scoring, token views, eigenbasis refresh, and the TensorBoard report written after
it); the rest of the difference is what the
hooks cost on the training steps (statistics every ``update_every`` steps, streaming on every step).

    OMP_NUM_THREADS=2 python benchmarks/run_clm_overhead.py            # ~5 min on 2 cores
    OMP_NUM_THREADS=2 python benchmarks/run_clm_overhead.py --write    # also update RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import hf_run_clm  # noqa: E402
from common import machine, setup_threads, table, write_section  # noqa: E402

import infl_plugin as ip  # noqa: E402

ARGS = ["--report_to", "none", "--num_train_epochs", "1", "--save_steps", "50", "--per_device_train_batch_size", "8",
        "--disable_tqdm", "true", "--seed", "0", "--use_cpu", "true"]


class Absent(TrainerCallback):
    """Stands in for the influence callback: the same Trainer without it."""

    def __init__(self, **kwargs) -> None:
        super().__init__()


def run(with_callback: bool) -> tuple[float, list[dict]]:
    """One run of the example; ``(train_runtime seconds, artifacts)``."""
    original = hf_run_clm.InfluenceTrainerCallback
    if not with_callback:
        hf_run_clm.InfluenceTrainerCallback = Absent
    try:
        with tempfile.TemporaryDirectory() as out:
            trainer = hf_run_clm.main(ARGS + ["--output_dir", out])
            runtime = float(trainer.state.log_history[-1]["train_runtime"])
            artifacts = ip.read_artifacts(out, as_dataframe=False) if with_callback else []
    finally:
        hf_run_clm.InfluenceTrainerCallback = original
    return runtime, artifacts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    setup_threads()
    started = time.perf_counter()
    times: dict[str, list[float]] = {"without": [], "with": []}
    attributions: list[dict] = []
    for _ in range(args.repeats):
        for variant in ("without", "with"):
            runtime, artifacts = run(variant == "with")
            times[variant].append(runtime)
            attributions = artifacts or attributions
            print(variant, f"{runtime:.1f} s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    rows = [["train_runtime, without the callback", f"{best['without']:.1f}", ""],
            ["train_runtime, with the callback", f"{best['with']:.1f}",
             f"+{100 * (best['with'] / best['without'] - 1):.0f} %"]]
    spent = 0.0
    for a in attributions:
        parts = a["extra"].get("durations", {})
        spent += a["duration_s"] + parts.get("report", 0.0)  # the TensorBoard report runs after the attribution
        rows.append([f"attribution at step {a['step']} ({a['reason']})", f"{a['duration_s']:.1f}",
                     ", ".join(f"{k} {v:.1f}" for k, v in parts.items())])
    rows.append(["training steps' share of the difference (with − without − attributions and reports)",
                 f"{best['with'] - best['without'] - spent:.1f}", ""])
    body = (f"{machine()}. Best of {args.repeats} interleaved runs per variant; wall time "
            f"{time.perf_counter() - started:.0f} s.\n\n" + table(["", "seconds", "note"], rows))
    print(body)
    if args.write:
        write_section("The run_clm-shaped flow with and without the callback (run_clm_overhead.py)", body,
                      "OMP_NUM_THREADS=2 python benchmarks/run_clm_overhead.py --write")


if __name__ == "__main__":
    main()
