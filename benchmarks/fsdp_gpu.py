"""Sharded training the CPU tests cannot reach: Lightning's `FSDPStrategy` and the Hugging Face
`Trainer` with ``fsdp=True`` (FSDP1 and FSDP2 through ``fsdp_config["version"]``), on GPUs.

Lightning refuses `FSDPStrategy` with ``accelerator="cpu"`` and the Hugging Face `Trainer` trains
with DDP on CPU whatever ``fsdp`` says, so ``tests/test_distributed.py`` covers FSDP2 through
`ModelParallelStrategy` only. This script runs, on every visible GPU (``torchrun
--nproc_per_node=<GPUs>``, NCCL), a tiny GPT-2 fine-tune of 8 global batches with the influence
callback (statistics every step, checkpoint candidates, attributions every 4 steps), once per set-up:

* ``lightning-fsdp1``: ``FSDPStrategy(auto_wrap_policy={GPT2Block}, use_orig_params=True)``;
* ``lightning-fsdp1-bf16``: the same with ``precision="bf16-mixed"`` (bf16 activations, float32
  statistics);
* ``hf-fsdp1``, ``hf-fsdp2``: ``Trainer(args=TrainingArguments(fsdp=True, fsdp_config={"version": v,
  "transformer_layer_cls_to_wrap": ["GPT2Block"]}))``;

and the same fine-tune in the same framework on one GPU without sharding as the reference. It prints, per set-up,
whether it finished, the largest score difference relative to the reference's largest score and
whether the top-5 lists agree (float64 training: expect 1e-5, the scores being stored in float32;
the bf16 set-up is compared with the float64 reference and only its top-5 says much), and writes
the table to `benchmarks/RESULTS.md`.

Run: ``python benchmarks/fsdp_gpu.py`` on a machine with one or more GPUs (with one GPU the
set-ups still shard over a world of one: the wrappers, flat parameters and mixed-precision policies
are exercised, the cross-rank exchange is not). ``--cpu`` runs the Hugging Face set-ups and a
`ModelParallelStrategy` stand-in on 2 CPU processes, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_section  # noqa: E402

HEADING = "Sharded training on GPUs: Lightning FSDPStrategy, Hugging Face FSDP (fsdp_gpu.py)"
N_TRAIN, LENGTH, VOCAB, GLOBAL_BATCH, STEPS = 64, 16, 128, 8, 8
SETUPS = ["lightning-fsdp1", "lightning-fsdp1-bf16", "hf-fsdp1", "hf-fsdp2"]


def examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (count, LENGTH), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def gpt2(dtype: torch.dtype = torch.float64):
    """float64 unless mixed precision is tested: one process and several then agree to rounding,
    which float32 EK-FAC inverses (their smallest eigenvalues) would amplify past any useful tolerance."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(dtype)


def run_lightning(setup: str, world: int, cpu: bool, out: Path) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from infl_plugin.integrations.lightning import InfluenceCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = gpt2(torch.float32 if setup.endswith("bf16") else torch.float64)

        def forward(self, **batch):
            return self.model(**batch)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_model(self) -> None:
            if cpu and self.device_mesh is not None:  # the CPU stand-in: FSDP2 per block
                from torch.distributed.fsdp import fully_shard

                for block in self.model.transformer.h:
                    fully_shard(block, mesh=self.device_mesh["data_parallel"])
                fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = InfluenceCallback(task="causal_lm", queries=examples(4, seed=1), candidates="all", every_n_steps=4,
                                 config={"update_every": 1},
                                 top_k=5, token_sequences=0, progress=False, strict=True)
    if setup.startswith("reference"):
        strategy, devices = "auto", 1
    elif cpu:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy, devices = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1), world
    else:
        from lightning.pytorch.strategies import FSDPStrategy

        strategy, devices = FSDPStrategy(auto_wrap_policy={GPT2Block}, use_orig_params=True), world
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu" if cpu else "gpu", devices=devices, strategy=strategy,
                         precision="bf16-mixed" if setup.endswith("bf16") else "32-true", callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=str(out / setup),
                         enable_model_summary=False, use_distributed_sampler=False)
    # rank r trains on the r-th contiguous part of each global batch (the Hugging Face Trainer's split
    # gives the same rows per step), so the sharded runs train exactly as one process does
    rank, per_rank = int(os.environ.get("RANK", "0")), GLOBAL_BATCH // devices
    batches = [list(range(start + rank * per_rank, start + (rank + 1) * per_rank))
               for start in range(0, N_TRAIN, GLOBAL_BATCH)]
    loader = DataLoader(examples(N_TRAIN, seed=0), batch_sampler=batches, collate_fn=collate)
    trainer.fit(Module(), loader)
    return _report(callback.session, trainer.global_rank)


def run_huggingface(setup: str, world: int, cpu: bool, out: Path) -> dict:
    from transformers import Trainer, TrainingArguments

    from infl_plugin.integrations.huggingface import InfluenceTrainerCallback

    sharded = setup.startswith("hf-")
    args = TrainingArguments(
        output_dir=str(out / setup), per_device_train_batch_size=GLOBAL_BATCH // max(world, 1), max_steps=STEPS,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=cpu, report_to=[],
        save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True, train_sampling_strategy="sequential",
        ddp_backend="gloo" if cpu and world > 1 else None,
        fsdp=sharded, fsdp_config={"version": int(setup[-1]), "transformer_layer_cls_to_wrap": ["GPT2Block"],
                                   "sync_module_states": False} if sharded else None,
    )
    callback = InfluenceTrainerCallback(queries=examples(4, seed=1), config={"update_every": 1}, candidates="all",
                                        every_n_steps=4, top_k=5,
                                        token_sequences=0, logdir=str(out / setup / "influence"), strict=True)
    trainer = Trainer(model=gpt2(), args=args, train_dataset=examples(N_TRAIN, seed=0), data_collator=collate,
                      callbacks=[callback])
    trainer.train()
    return _report(callback.session, args.process_index)


def _report(session, rank: int) -> dict:
    result = session.last_result
    return {"rank": rank, "attributions": session.attributions, "failed": session.failed_attributions,
            "scores": None if result is None else result.scores.tolist(),
            "helpful": None if result is None else result.helpful_indices.tolist()}


def child(setup: str, cpu: bool, out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    if "lightning" in setup:
        report = run_lightning(setup, world, cpu, out)
    else:
        report = run_huggingface(setup, world, cpu, out)
    if report["rank"] == 0:
        (out / f"{setup}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def launch(setup: str, processes: int, cpu: bool, out: Path) -> bool:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--child", setup, "--out", str(out)] + (["--cpu"] if cpu else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cpu:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        print(f"{setup} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}", flush=True)
    return done.returncode == 0


def main(cpu: bool) -> None:
    world = 2 if cpu else max(torch.cuda.device_count(), 0)
    if world == 0:
        raise SystemExit("fsdp_gpu.py needs a GPU (or --cpu to check the script on 2 CPU processes)")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        references = {}
        for framework in ("lightning", "hf"):
            launch(f"reference-{framework}", 1, cpu, out)
            references[framework] = json.loads((out / f"reference-{framework}.json").read_text())
        rows = []
        for setup in [s for s in SETUPS if not (cpu and s == "lightning-fsdp1-bf16")]:
            reference = references[setup.split("-")[0]]
            scale = max(abs(v) for row in reference["scores"] for v in row)
            ok = launch(setup, world, cpu, out) and (out / f"{setup}.json").exists()
            if not ok:
                rows.append([setup, world, "failed", "-", "-", "-"])
                continue
            run = json.loads((out / f"{setup}.json").read_text())
            pairs = [(a, b) for ra, rb in zip(run["scores"], reference["scores"]) for a, b in zip(ra, rb)]
            error = max(abs(a - b) for a, b in pairs) / scale
            rows.append([setup, world, "finished", f"{run['attributions']} ({run['failed']} failed)", f"{error:.1e}",
                         run["helpful"] == reference["helpful"]])
            print(rows[-1], flush=True)
    body = (f"{machine()}{' (--cpu check)' if cpu else ''}. Wall time {time.time() - started:.0f} s. A GPT-2 (2×64, "
            f"vocabulary {VOCAB}) fine-tuned for {STEPS} global batches of {GLOBAL_BATCH}, attributions every 4 steps "
            "over 64 candidates, against one unsharded process of the same framework.\n\n"
            + table(["set-up", "processes", "run", "attributions", "max |Δscore| / max |score|", "same top-5"], rows))
    print(body)
    if not cpu:
        write_section(HEADING, body, "python benchmarks/fsdp_gpu.py")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="check the script on 2 CPU processes")
    parser.add_argument("--child", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.cpu, Path(args.out))
    else:
        main(args.cpu)
