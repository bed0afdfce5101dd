"""A short language-model fine-tune with retraining ground truth (the regime of most LM users).

A byte-level GPT-2 (vocabulary 256, width 64, 2 blocks, 32-byte sequences: every block layer
is as wide as the vocabulary) is pretrained for 300 steps on the first half of the Python
language reference (`pydoc_data.topics`, real English prose), then fine-tuned for 100 optimizer
steps (AdamW, lr 1e-3 decaying linearly to 0, gradient clipping at 1, batch 32) on 640
sequences of the second half. Ground truth: 100 random 50 % subsets fine-tuned with the same
recipe from the same pretrained weights (each with its own data order), measurement = each of
16 held-out query sequences' summed token loss (`CausalLMTask.measurement`). Cached under
``benchmarks/.cache``: about 8 minutes on 2 cores the first time.

Used by ``regimes.py``; `finetune` is the loop a user writes, with an optional tracker.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ground_truth as gt  # noqa: E402

import infl_plugin as ip  # noqa: E402

SEQ, N_TRAIN, N_QUERY, BATCH, STEPS, LR = 32, 640, 16, 32, 100, 1e-3
PRETRAIN_STEPS, N_SUBSETS = 300, 100


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0, loss_type="ForCausalLM")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def sequences() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pretraining [P, SEQ], fine-tuning [N_TRAIN, SEQ], queries [N_QUERY, SEQ])`` byte ids."""
    from pydoc_data.topics import topics
    text = " ".join(" ".join(v.split()) for _, v in sorted(topics.items())).encode("utf-8")
    rows = torch.tensor(list(text[: len(text) // SEQ * SEQ]), dtype=torch.long).view(-1, SEQ)
    half = rows.shape[0] // 2
    tail = rows[half:][torch.randperm(rows.shape[0] - half, generator=torch.Generator().manual_seed(0))]
    return rows[:half], tail[:N_TRAIN], tail[N_TRAIN: N_TRAIN + N_QUERY]


def pretrained() -> dict:
    """The pretrained weights (cached)."""
    def compute() -> dict:
        model = gpt2()
        data = sequences()[0]
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        order = torch.Generator().manual_seed(1)
        for _ in range(PRETRAIN_STEPS):
            rows = data[torch.randint(data.shape[0], (BATCH,), generator=order)]
            model(input_ids=rows, labels=rows).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return {"state": {k: v.clone() for k, v in model.state_dict().items()}}

    return gt.cached("lm-pretrained", {"steps": PRETRAIN_STEPS, "seq": SEQ, "version": 1}, compute)


def finetune(members: torch.Tensor, seed: int, step_hook: Optional[Callable] = None,
             on_model: Optional[Callable[[torch.nn.Module], None]] = None) -> torch.nn.Module:
    """Fine-tune the pretrained model on ``members`` (dataset indices) for `STEPS` optimizer steps.

    ``on_model(model)`` runs before training (to attach a tracker); ``step_hook(batch, indices, lr,
    step)`` after each optimizer step (the tracker's place).
    """
    model = gpt2()
    model.load_state_dict(pretrained()["state"])
    if on_model is not None:
        on_model(model)
    data = sequences()[1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / STEPS)
    order = torch.Generator().manual_seed(seed)
    queue: list[torch.Tensor] = []
    for step in range(STEPS):
        if len(queue) < BATCH:
            queue.extend(members[torch.randperm(len(members), generator=order)].tolist())
        indices = torch.tensor(queue[:BATCH])
        del queue[:BATCH]
        batch = {"input_ids": data[indices]}
        lr = schedule.get_last_lr()[0]
        model(**batch, labels=batch["input_ids"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step_hook is not None:
            step_hook(batch, indices, lr, step)
    return model


def query_batches() -> list[dict]:
    return [{"input_ids": sequences()[2]}]


def train_batches(size: int = 64) -> list[dict]:
    data = sequences()[1]
    return [{"input_ids": data[i: i + size]} for i in range(0, N_TRAIN, size)]


def measurements(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return ip.CausalLMTask().measurement(model, query_batches()[0]).double()


def truth() -> dict:
    """Masks ``[S, N]`` and query measurements ``[S, 1, Q]`` of the subset fine-tunes (cached)."""
    def compute() -> dict:
        g = torch.Generator().manual_seed(2)
        masks = torch.stack([torch.randperm(N_TRAIN, generator=g) < N_TRAIN // 2 for _ in range(N_SUBSETS)])
        losses = torch.zeros(N_SUBSETS, 1, N_QUERY, dtype=torch.float64)
        for s in range(N_SUBSETS):
            losses[s, 0] = measurements(finetune(masks[s].nonzero()[:, 0], seed=100 + s))
            print(f"subset {s + 1}/{N_SUBSETS}", flush=True)
        return {"masks": masks.to(gt.DTYPE), "losses": losses}

    key = {"n": N_TRAIN, "q": N_QUERY, "steps": STEPS, "batch": BATCH, "lr": LR, "subsets": N_SUBSETS, "version": 1}
    return gt.cached("lds-lm-finetune", key, compute)


if __name__ == "__main__":
    torch.set_num_threads(2)
    truth()
