"""Training overhead of curvature tracking: step time with and without infl_plugin.

Question: what fraction of a training step does tracking cost, on a small GPT-2 (4 layers,
width 256, 128-token sequences, batch 8, AdamW; the 16 block linear layers tracked, the tied
``lm_head`` not) and on the digits MLP (64-128-128-10, batch 64, SGD)?

Rows: plain step; the default settings (EK-FAC, empirical Fisher, statistics on every 32nd
optimizer step) in both of its phases — before the first attribution only the covariances A, S
accumulate; after it (``refresh_eigenbasis``, the steady state of the callbacks) the corrected
eigenvalues accumulate too; ``fisher="sampled"`` (one extra sampled-label backward per statistics
step); and the same with statistics on every step (``update_every=1``). All configurations run
interleaved in one process on the same model and optimizer; each repetition times ``--steps``
consecutive steps (the default interval, so each holds one statistics step; a quarter of that for
the every-step rows) and the table reports the median per step. The plain-loop rows call
`InfluenceTracker` exactly as the callbacks do (``set_batch`` before the forward, ``step`` after
``backward``).

Unless ``--no-frameworks`` or ``--quick``, the same GPT-2 is also trained through Lightning and
the Hugging Face Trainer with and without their callbacks at default settings (attribution
schedule off: only tracking is measured), when those integrations import.

    python benchmarks/overhead.py           # ~8 min on 2 cores
    python benchmarks/overhead.py --quick   # ~3 min
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import digits_batches, digits_mlp, interleaved, lm_batches, setup_threads, table, tiny_gpt2, write_section  # noqa: E402

import infl_plugin as ip  # noqa: E402

warnings.filterwarnings("ignore")
GPT2_MODULES = ["transformer.h.*.attn.c_*", "transformer.h.*.mlp.c_*"]


class Loop:
    """One model + optimizer + data; `step` runs a training step with an optional tracker."""

    def __init__(self, model, optimizer, batches, loss_fn: Callable, task: ip.Task):
        self.model, self.optimizer, self.batches, self.loss_fn, self.task = model, optimizer, batches, loss_fn, task
        self.i = 0

    def run(self, steps: int, tracker: Optional[ip.InfluenceTracker]) -> None:
        if tracker is not None:
            tracker.attach()
        try:
            for _ in range(steps):
                batch = self.batches[self.i % len(self.batches)]
                self.i += 1
                if tracker is not None:
                    tracker.set_batch(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.model, batch)
                loss.backward()
                if tracker is not None:
                    tracker.step(batch)
                self.optimizer.step()
        finally:
            if tracker is not None:
                tracker.close()


def gpt2_loop(batch_size: int = 8) -> tuple[Loop, dict]:
    model = tiny_gpt2()  # HF GPT-2 with its Conv1D layers
    model.train()
    batches = lm_batches(8 * batch_size, batch_size, seed=1)
    loss_fn = lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss  # noqa: E731
    loop = Loop(model, torch.optim.AdamW(model.parameters(), lr=1e-4), batches, loss_fn, ip.CausalLMTask())
    return loop, {"modules": GPT2_MODULES}


def digits_loop(batch_size: int = 64) -> tuple[Loop, dict]:
    model = digits_mlp()
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.05), digits_batches(batch_size), loss_fn, ip.ClassificationTask())
    return loop, {}


DEFAULT_EVERY = ip.InfluenceConfig().update_every


def tracker_configs() -> dict[str, tuple[dict, bool]]:
    """name → (InfluenceConfig overrides, steady state with eigenvalues)."""
    return {
        f"default (statistics every {DEFAULT_EVERY} steps), covariances phase": ({}, False),
        "default, steady state (covariances + eigenvalues)": ({}, True),
        'fisher="sampled", default (steady)': ({"fisher": "sampled"}, True),
        "statistics every step, covariances phase": ({"update_every": 1}, False),
        "statistics every step, steady state": ({"update_every": 1}, True),
        'fisher="sampled", every step (steady)': ({"fisher": "sampled", "update_every": 1}, True),
    }


def measure(loop: Loop, base: dict, steps: int, repeats: int) -> list[list]:
    """Rows of the table. A repetition runs ``steps`` steps (a multiple of the default interval, so
    each holds its share of statistics steps); the every-step rows run ``steps // 4`` (cost per step
    is what they report)."""
    trackers: dict[str, Optional[ip.InfluenceTracker]] = {"plain training step": None}
    counts = {"plain training step": steps}
    for name, (overrides, steady) in tracker_configs().items():
        config = ip.InfluenceConfig(**base, **overrides)
        tracker = ip.InfluenceTracker(loop.model, loop.task, config)
        if steady:  # accumulate some covariances (step 0 is a statistics step), then start the eigenvalue phase
            loop.run(2, tracker)
            tracker.attach()
            tracker.refresh_eigenbasis()
            tracker.close()
        trackers[name] = tracker
        counts[name] = steps if config.update_every > 1 else max(1, steps // 4)
    # any `steps` consecutive steps (a multiple of k) hold exactly steps / k statistics steps
    fns = {name: (lambda t=t, n=counts[name]: loop.run(n, t)) for name, t in trackers.items()}
    med = interleaved(fns, repeats=repeats, warmup=1)
    plain = med["plain training step"] / steps
    rows = []
    for name, seconds in med.items():
        per_step = seconds / counts[name]
        overhead = "—" if name == "plain training step" else f"**{100 * (per_step / plain - 1):+.1f} %**"
        rows.append([name, f"{1000 * per_step:.3g}", f"{per_step / plain:.3f}", overhead])
    return rows


# ------------------------------------------------------------------------------------- frameworks
def framework_rows(steps: int, repeats: int) -> tuple[list[list], str]:
    """Lightning and HF Trainer rows, when the callbacks import; else a note saying why not."""
    rows, notes = [], []
    try:
        rows += lightning_rows(steps, repeats)
    except Exception as error:  # noqa: BLE001
        notes.append(f"Lightning rows not measured: {type(error).__name__}: {error}")
    try:
        rows += hf_rows(steps, repeats)
    except Exception as error:  # noqa: BLE001
        notes.append(f"Hugging Face rows not measured: {type(error).__name__}: {error}")
    return rows, "\n".join(notes)


def lightning_rows(steps: int, repeats: int) -> list[list]:
    import lightning.pytorch as pl

    from infl_plugin.integrations.lightning import InfluenceCallback

    sequences = [{"input_ids": ids} for ids in torch.cat([b["input_ids"] for b in lm_batches(steps * 8, 8, seed=1)])]

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2()

        def training_step(self, batch, _):
            return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    loader = torch.utils.data.DataLoader(sequences, batch_size=8)
    modules = ["model." + p for p in GPT2_MODULES]

    def fit(with_callback: bool) -> None:
        callbacks = []
        if with_callback:
            callbacks = [InfluenceCallback(ip.InfluenceConfig(modules=modules), task="causal_lm", queries=sequences,
                                           num_queries=2, every_n_steps=None, attribute_on_save=False,
                                           attribute_at_train_end=False, candidates="all")]  # statistics only: streaming is benchmarks/streaming.py
        trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks, accelerator="cpu", devices=1)
        trainer.fit(Module(), loader)

    med = interleaved({"plain": lambda: fit(False), "callback": lambda: fit(True)}, repeats=repeats, warmup=1)
    return [[f"Lightning Trainer.fit, InfluenceCallback (default: statistics every {DEFAULT_EVERY} steps)",
             f"{1000 * med['callback'] / steps:.1f} (plain {1000 * med['plain'] / steps:.1f})",
             f"{med['callback'] / med['plain']:.3f}", f"**{100 * (med['callback'] / med['plain'] - 1):+.1f} %**"]]


def hf_rows(steps: int, repeats: int) -> list[list]:
    import tempfile

    from transformers import Trainer, TrainingArguments

    from infl_plugin.integrations.huggingface import InfluenceTrainerCallback

    data = [{"input_ids": b} for b in torch.cat([x["input_ids"] for x in lm_batches(steps * 8, 8, seed=1)])]

    def fit(with_callback: bool) -> None:
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=8, report_to=[], save_strategy="no",
                                     logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
            model = tiny_gpt2()
            collate = lambda rows: {"input_ids": torch.stack([r["input_ids"] for r in rows]),  # noqa: E731
                                    "labels": torch.stack([r["input_ids"] for r in rows])}
            callbacks = []
            if with_callback:
                callbacks = [InfluenceTrainerCallback(None, ip.InfluenceConfig(modules=GPT2_MODULES), ip.CausalLMTask(),
                                                      attribute_on_save=False, attribute_at_train_end=False, logdir=out)]
            Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=callbacks).train()

    med = interleaved({"plain": lambda: fit(False), "callback": lambda: fit(True)}, repeats=repeats, warmup=1)
    return [[f"HF Trainer.train, InfluenceTrainerCallback (default: statistics every {DEFAULT_EVERY} steps)",
             f"{1000 * med['callback'] / steps:.1f} (plain {1000 * med['plain'] / steps:.1f})",
             f"{med['callback'] / med['plain']:.3f}", f"**{100 * (med['callback'] / med['plain'] - 1):+.1f} %**"]]


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps per timed repetition (default: the default update_every, {DEFAULT_EVERY})")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-frameworks", action="store_true", help="skip the Lightning / HF Trainer rows")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    threads = setup_threads()
    steps = args.steps or DEFAULT_EVERY
    repeats = args.repeats or (2 if args.quick else 3)
    started = time.perf_counter()
    headers = ["configuration", "ms / step", "× plain", "overhead"]
    sections = []
    for title, build in (("Small GPT-2 (4 layers, width 256, seq 128, batch 8, vocab 8192)", gpt2_loop),
                         ("Digits MLP (64-128-128-10, batch 64)", digits_loop)):
        loop, base = build()
        rows = measure(loop, base, steps if build is gpt2_loop else 4 * steps, repeats)
        sections.append(f"**{title}**\n\n{table(headers, rows)}")
        print(sections[-1], flush=True)
    notes = ""
    if not args.no_frameworks and not args.quick:
        rows, notes = framework_rows(steps, repeats)
        if rows:
            sections.append(f"**Small GPT-2 through the framework callbacks** (whole `fit`/`train` call per repetition, "
                            f"{steps} steps)\n\n{table(headers, rows)}")
            print(sections[-1], flush=True)
    elapsed = time.perf_counter() - started
    body = (f"{threads} torch threads; medians of {repeats} interleaved repetitions of {steps} steps (digits: "
            f"{4 * steps}; the every-step rows a quarter of that); overhead = per-step time tracked / plain − 1.\n\n" + "\n\n".join(sections)
            + (f"\n\n{notes}" if notes else "") + f"\n\nTotal benchmark time {elapsed:.0f}s.")
    print(body)
    if not args.no_write:
        write_section("Training overhead (overhead.py)", body)


if __name__ == "__main__":
    main()
