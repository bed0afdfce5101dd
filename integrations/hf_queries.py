"""The Hugging Face adapter's queries: any natural format, prepared as the trainer prepared its data.

`trainer_attribution_data` wires `infl_plugin.run.query_formats` to what a Trainer event passes at
train start: the training arguments (a ``TrainingArguments``, or TRL's ``SFTConfig`` whose
``dataset_text_field``, ``max_length``, ``truncation_mode`` and ``completion_only_loss`` say how
SFTTrainer prepared its training text: EOS appended, completion masked, truncated), the
``processing_class`` (tokenizer and chat template) and the model's position limit. Text queries
are batched by a `PadCollator` (the training collator may expect equal-length blocks or raw rows);
the first query batch is built at train start, so an error a framework's collator raises on what
the user passed surfaces then, as a `ConfigurationError` naming ``queries``, the first query's
type and keys, and what to pass instead. Packed or padding-free training is refused at train start
(`refuse_unsupported_training`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from infl_plugin.run.data import AttributionData, build_attribution_data
from infl_plugin.distributed import deepspeed_refusal
from infl_plugin.errors import ConfigurationError
from infl_plugin.config.options import AttributionOptions
from infl_plugin.run.query_formats import (PadCollator, Preparation, PreparedQueries, describe_example, format_error,
                                       pad_token_id, prepare_queries)
from infl_plugin.tasks import CausalLMTask, Task

OWNER = "InfluenceTrainerCallback.queries"


def is_sft_config(args: Any) -> bool:
    """Whether ``args`` are TRL ``SFTConfig``-like (they say how the trainer prepared its text)."""
    return all(hasattr(args, name) for name in ("dataset_text_field", "completion_only_loss", "max_length"))


def trainer_preparation(args: Any, model: nn.Module) -> Preparation:
    """How text queries are tokenized: as SFTTrainer prepared its training text when ``args`` is
    an ``SFTConfig`` (EOS after the text or completion, truncation to ``max_length``), else the
    text as the tokenizer gives it; never longer than the model's positions."""
    positions = model_positions(model)
    if not is_sft_config(args):
        return Preparation(max_length=positions)
    lengths = [n for n in (getattr(args, "max_length", None), positions) if isinstance(n, int)]
    return Preparation(text_field=getattr(args, "dataset_text_field", "text") or "text", add_eos=True,
                       completion_only=getattr(args, "completion_only_loss", None) is not False,
                       max_length=min(lengths) if lengths else None,
                       truncation_mode=getattr(args, "truncation_mode", "keep_start") or "keep_start")


def model_positions(model: nn.Module) -> Optional[int]:
    """The longest sequence the model's config allows (``n_positions`` / ``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def refuse_unsupported_training(args: Any, collate: Optional[Callable]) -> None:
    """Refuse at train start what the callback cannot follow: DeepSpeed (`deepspeed_refusal`), and
    packed (``SFTConfig(packing=True)``) or padding-free batches, which put several examples in one
    row (``position_ids`` restart per example) so that per-example statistics and scores would mix them."""
    if getattr(args, "deepspeed", None):
        raise ConfigurationError(deepspeed_refusal("InfluenceTrainerCallback", "TrainingArguments.deepspeed"))
    packed = bool(getattr(args, "packing", False))
    padding_free = bool(getattr(args, "padding_free", False) or getattr(collate, "padding_free", False))
    if packed or padding_free:
        what = "packing=True" if packed else "padding_free=True"
        raise ConfigurationError(
            f"InfluenceTrainerCallback does not support packed or padding-free training ({what}): a packed row holds "
            "several training examples, whose per-example gradients and influence scores would be mixed. Train with "
            "SFTConfig(packing=False, padding_free=False) while the callback is attached (each example is then one "
            "padded row; completion-only loss, chat templates and gradient accumulation are supported).")


def trainer_attribution_data(options: AttributionOptions, queries: Any, training_set: Any, *, args: Any,
                             model: nn.Module, task: Task, tokenizer: Any, collate: Optional[Callable],
                             batch_size: int, seed: int) -> AttributionData:
    """The `AttributionData` of a Trainer run: queries in any accepted format (see
    `infl_plugin.run.query_formats`), the training set as candidates, the first query batch checked."""
    query_collate = None
    if not isinstance(queries, DataLoader):
        queries = prepare_queries(queries, tokenizer, trainer_preparation(args, model), owner=OWNER)
        if isinstance(queries, PreparedQueries):
            if not isinstance(task, CausalLMTask):
                raise format_error(OWNER, queries.rows[0], f"text queries are scored as language-model losses, "
                                   f"but the task is {type(task).__name__}",
                                   "Pass tokenized examples in the training set's format.")
            query_collate = PadCollator(pad_token_id(tokenizer))
    data = build_attribution_data(options, queries, training_set, batch_size=batch_size, collate_fn=collate,
                                  query_collate_fn=query_collate, seed=seed, tokenizer=tokenizer, tokenized=True)
    check_first_batch(data.queries, task, queries)
    return data


def check_first_batch(loader: Any, task: Task, queries: Any) -> None:
    """Build the first query batch now (and check a causal LM task can read it), so that an error
    inside a collator or the task about the queries' format is raised at train start as a
    `ConfigurationError` naming ``queries``, not as a warning at the first attribution."""
    try:
        with torch.random.fork_rng(devices=[]):  # a loader's iterator draws its seed: training's RNG stays as it was
            batch = next(iter(loader))
        if isinstance(task, CausalLMTask):
            task.shifted_labels(batch)
    except StopIteration:  # no query batch at all: nothing to check
        return
    except ConfigurationError:
        raise
    except Exception as error:
        first = _first(queries)
        raise ConfigurationError(
            f"{OWNER}: batching the queries failed with {type(error).__name__}: {error}. The first query is "
            f"{describe_example(first)}; the training collator expects examples in the training set's format. Pass "
            "queries as the training set's rows (e.g. a split of the same processed dataset), as text (strings, "
            "{'prompt', 'completion'} or {'messages'} mappings, prepared and batched by the callback), as a "
            "DataLoader of ready batches, or give collate_fn= to batch them.") from error


def _first(queries: Any) -> Any:
    try:
        if isinstance(queries, DataLoader):
            return queries.dataset[0]
        return queries.rows[0] if isinstance(queries, PreparedQueries) else queries[0]
    except Exception:  # noqa: BLE001 - only for the message
        return queries


__all__ = ["check_first_batch", "is_sft_config", "model_positions", "refuse_unsupported_training",
           "trainer_attribution_data", "trainer_preparation"]
