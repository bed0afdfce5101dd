"""Which passages of the Python language reference taught a small GPT-2 to complete a sentence?

A GPT-2 built from ``GPT2Config`` (random initialisation) is trained with the Hugging Face
``Trainer`` on the language reference that ships with CPython (``pydoc_data.topics``), chunked into
64-token passages by a byte-level BPE tokenizer trained here on that text. Three topics are held
out ("with", "for", "lambda"); one prompt + completion from each is a query (only the completion
tokens are scored). `InfluenceTrainerCallback` accumulates EK-FAC statistics from the training
backward and, at the end of every epoch (each checkpoint save), finds each query's most helpful
and most harmful training passages, marks their most influential tokens and splits the influence
over layers. Nothing is downloaded; about 3 minutes on 2 CPU cores.

    python examples/hf_causal_lm.py --output-dir outputs/hf_causal_lm
    tensorboard --logdir outputs/hf_causal_lm/runs

TensorBoard: TEXT ``influence/query_000`` (top passages), ``influence_tokens/query_000`` (passages
with tokens marked); IMAGES ``influence_token_heatmaps/…``, ``influence_layers/…``,
``influence_plots/score_ccdf``; SCALARS ``influence_tracked/…`` next to the Trainer's ``train/loss``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Optional, Sequence

import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import infl_plugin as ip
from infl_plugin.integrations.huggingface import InfluenceTrainerCallback

HELD_OUT = ("with", "for", "lambda")
QUERIES = [  # (prompt, completion) from the held-out topics
    ('The "with" statement is used to wrap the execution of a block with', " methods defined by a context manager"),
    ('The "for" statement is used to iterate over the elements of a', " sequence (such as a string, tuple or list)"),
    ("Lambda expressions (sometimes called lambda forms) are used to create", " anonymous functions."),
]
PAD, EOS = "<|pad|>", "<|endoftext|>"


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts`` (every byte is in the alphabet: no unknown tokens)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS)


def passages(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, length: int) -> list[dict]:
    """Each text tokenized (+ end-of-text) and cut into consecutive ``length``-token passages."""
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        out += [{"input_ids": ids[i: i + length]} for i in range(0, len(ids) - 8, length)]
    return out


def query_examples(tokenizer: PreTrainedTokenizerFast) -> list[dict]:
    """Prompt + completion; labels are -100 on the prompt so only the completion is measured."""
    out = []
    for prompt, completion in QUERIES:
        p, c = tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"]
        out.append({"input_ids": p + c, "labels": [-100] * len(p) + c, "text": prompt + completion})
    return out


class Collate:
    """Right-pads ``input_ids``; ``attention_mask`` 0 and ``labels`` -100 on padding."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        batch = {"input_ids": torch.full((len(examples), width), self.pad_id),
                 "attention_mask": torch.zeros(len(examples), width, dtype=torch.long),
                 "labels": torch.full((len(examples), width), -100)}
        for n, e in enumerate(examples):
            length = len(e["input_ids"])
            batch["input_ids"][n, :length] = torch.tensor(e["input_ids"])
            batch["attention_mask"][n, :length] = 1
            batch["labels"][n, :length] = torch.tensor(e.get("labels", e["input_ids"]))
        return batch


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/hf_causal_lm")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--max-passages", type=int, default=None, help="train on the first N passages only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    started = time.perf_counter()

    train_texts = [text for name, text in sorted(topics.items()) if name not in HELD_OUT]
    tokenizer = train_tokenizer(train_texts)
    train = passages(train_texts, tokenizer, args.seq_len)[: args.max_passages]
    queries = query_examples(tokenizer)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=args.seq_len, n_embd=64, n_layer=4,
                                       n_head=4, bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    callback = InfluenceTrainerCallback(
        queries=queries,
        # a short demo: statistics on every step (the default, every 32nd, keeps long runs' overhead low)
        config=ip.InfluenceConfig(strategy="ekfac", module_types=["Conv1D"], update_every=1),
        top_k=10,
        token_sequences=3,
        candidates="all",  # every passage at each checkpoint; the default "stream" scores them as trained on
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=16,
        per_device_eval_batch_size=32, learning_rate=3e-3, warmup_steps=20, weight_decay=0.01,
        save_strategy="epoch", save_total_limit=1, logging_steps=20, report_to="tensorboard", use_cpu=True,
        seed=args.seed, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      data_collator=Collate(tokenizer.pad_token_id), processing_class=tokenizer, callbacks=[callback])
    trainer.train()

    result = callback.session.last_result
    print(f"\n{len(train)} training passages of {args.seq_len} tokens, {trainer.state.global_step} steps, "
          f"{time.perf_counter() - started:.0f}s in all. Most helpful passages per query (step {result.step}):")
    decoded = [tokenizer.decode(p["input_ids"]) for p in train]
    for q, (query, (_, completion)) in enumerate(zip(queries, QUERIES)):
        print(f"\nquery {q}: {query['text']!r}  (loss of the completion {float(result.measurements[q]):.2f})")
        for rank in range(5):
            index, score = int(result.helpful_indices[q, rank]), float(result.helpful_scores[q, rank])
            print(f"  #{rank + 1} passage {index:5d} score {score:+.3g}: {decoded[index].replace(chr(10), ' ')[:100]}")
        verbatim = [i for i, text in enumerate(decoded) if " ".join(completion.split()) in " ".join(text.split())]
        column = {int(i): j for j, i in enumerate(result.candidate_indices)}
        ranks = [int((result.scores[q] > result.scores[q, column[i]]).sum()) + 1 for i in verbatim if i in column]
        print(f"  passages holding the completion verbatim: {verbatim} rank {ranks} of {len(train)}")
    print(f"\ntensorboard --logdir {os.path.join(args.output_dir, 'runs')}")
    return {"result": result, "train": train, "tokenizer": tokenizer, "queries": queries}


if __name__ == "__main__":
    main()
