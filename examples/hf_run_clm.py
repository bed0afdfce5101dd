"""The transformers ``run_clm.py`` flow with influence added in one line.

Shaped like the transformers example script: ``HfArgumentParser`` over model, data and
``TrainingArguments`` dataclasses, a text dataset loaded with ``datasets``' ``"text"`` builder,
tokenized with ``.map(batched=True)``, grouped into ``block_size``-token blocks, trained with
``default_data_collator``, ``report_to tensorboard`` and resume from the last checkpoint. The only
addition is the ``InfluenceTrainerCallback`` in ``callbacks=``, whose queries are the validation
blocks (shown as decoded text in TensorBoard). Offline: the text is CPython's language reference
(``pydoc_data.topics``) written to local files, the tokenizer a byte-level BPE trained on it, the
GPT-2 built from a config.

    python examples/hf_run_clm.py --output_dir outputs/hf_run_clm --report_to tensorboard \\
        --num_train_epochs 1 --save_steps 50 --per_device_train_batch_size 8
    tensorboard --logdir outputs/hf_run_clm/runs
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional, Sequence

from datasets import load_dataset
from pydoc_data.topics import topics
from transformers import (GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments,
                          default_data_collator)
from transformers.trainer_utils import get_last_checkpoint

import infl_plugin as ip
from infl_plugin.integrations.huggingface import InfluenceTrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_causal_lm import train_tokenizer  # noqa: E402  (the byte-level BPE of the sibling example)


@dataclass
class ModelArguments:
    """The GPT-2 built from a config (random initialisation)."""

    n_layer: int = field(default=2, metadata={"help": "transformer blocks"})
    n_embd: int = field(default=64, metadata={"help": "width"})
    vocab_size: int = field(default=512, metadata={"help": "byte-level BPE vocabulary trained on the text"})


@dataclass
class DataTrainingArguments:
    """Where the text goes and how it is cut into blocks."""

    data_dir: Optional[str] = field(default=None, metadata={"help": "where train.txt / validation.txt are written "
                                                                    "(default: output_dir/data)"})
    block_size: int = field(default=64, metadata={"help": "tokens per training block"})
    max_topics: Optional[int] = field(default=None, metadata={"help": "use only this many topics (quick runs)"})
    validation_topics: int = field(default=3, metadata={"help": "topics held out as the validation split"})


def write_text_files(folder: str, max_topics: Optional[int], validation_topics: int) -> dict[str, str]:
    """The language reference as two local text files (one paragraph per line), for the ``"text"`` builder."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(topics)[:max_topics]
    splits = {"validation": names[:validation_topics], "train": names[validation_topics:]}
    files = {}
    for split, chosen in splits.items():
        files[split] = os.path.join(folder, f"{split}.txt")
        lines = [" ".join(p.split()) for name in chosen for p in topics[name].split("\n\n") if p.strip()]
        with open(files[split], "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    return files


def main(argv: Optional[Sequence[str]] = None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    files = write_text_files(data_args.data_dir or os.path.join(training_args.output_dir, "data"),
                             data_args.max_topics, data_args.validation_topics)
    raw_datasets = load_dataset("text", data_files=files)
    tokenizer = train_tokenizer(raw_datasets["train"]["text"], vocab_size=model_args.vocab_size)

    def tokenize_function(examples: dict) -> dict:
        return tokenizer(examples["text"])

    tokenized_datasets = raw_datasets.map(tokenize_function, batched=True, remove_columns=["text"])
    block_size = data_args.block_size

    def group_texts(examples: dict) -> dict:
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    lm_datasets = tokenized_datasets.map(group_texts, batched=True)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=block_size, n_embd=model_args.n_embd,
                        n_layer=model_args.n_layer, n_head=4, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=lm_datasets["train"], eval_dataset=lm_datasets["validation"],
        processing_class=tokenizer, data_collator=default_data_collator,
        callbacks=[InfluenceTrainerCallback(queries=lm_datasets["validation"],
                                            config=ip.InfluenceConfig(module_types=["Conv1D"]))],
    )
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and os.path.isdir(training_args.output_dir):
        checkpoint = get_last_checkpoint(training_args.output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


if __name__ == "__main__":
    main()
