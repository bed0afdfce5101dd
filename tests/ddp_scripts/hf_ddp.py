"""A Hugging Face ``Trainer`` run of a tiny GPT-2 with `InfluenceTrainerCallback`, alone or under
``torchrun --nproc_per_node 2`` (``ddp_backend="gloo"``, ``use_cpu=True``).

Launched by ``tests/test_distributed.py`` as ``torchrun ... hf_ddp.py OUT`` and imported by it for
the single-process reference. The training sampler is sequential: under 2 processes Accelerate
gives rank r the batches r, r + 2, …, so global step k trains on rows ``[2kb, 2kb + 2b)`` of a
per-device batch b, exactly the rows of a single process with batch 2b. Checkpoints are saved
every 2 steps (the callback's ``on_save`` sums the statistics over the ranks). Rank 0 writes
``OUT/<name>.pt`` (summed statistics, last scores); every rank writes ``OUT/<name>_rank<r>.json``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import infl_plugin as ip
from infl_plugin.integrations.huggingface import InfluenceTrainerCallback
from reports import run, save_report

N_TRAIN, N_QUERIES, LENGTH, VOCAB, GLOBAL_BATCH, STEPS = 32, 4, 8, 64, 8, 4


def examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Token sequences of ``LENGTH`` with their labels (causal LM), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (count, LENGTH), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def train(out: Path, name: str, world: int) -> dict:
    """Train ``STEPS`` global batches; the report holds the summed state and the last scores."""
    net = model()
    args = TrainingArguments(
        output_dir=str(out / name), per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
        learning_rate=0.1, optim="sgd", use_cpu=True, ddp_backend="gloo" if world > 1 else None, report_to=[],
        save_strategy="steps", save_steps=2, logging_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="sequential",
    )
    callback = InfluenceTrainerCallback(
        queries=examples(N_QUERIES, seed=1), config=ip.InfluenceConfig(update_every=1), candidates="all",
        every_n_steps=2, top_k=3, token_sequences=0, logdir=str(out / name / "influence"), strict=True,
    )
    trainer = Trainer(model=net, args=args, train_dataset=examples(N_TRAIN, seed=0), data_collator=collate,
                      callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    session = callback.session
    state = session.state_dict()  # a collective (statistics summed over processes): every rank
    result = session.last_result
    return {
        "rank": args.process_index, "world": world, "steps": trainer.state.global_step,
        "attributions": session.attributions, "failed_attributions": session.failed_attributions,
        "skipped_batches": session.skipped_batches, "state": state,
        "scores": None if result is None else result.scores, "last_step": None if result is None else result.step,
        "parameters": [p.detach().clone() for p in net.parameters()],
        "warnings": [str(w.message) for w in caught if "infl_plugin" in str(w.message)],
    }


def main(out: Path) -> None:
    report = train(out, "ddp", int(os.environ["WORLD_SIZE"]))
    save_report(out, "ddp", report["rank"], report)


if __name__ == "__main__":
    run(main)
