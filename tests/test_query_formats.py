"""Queries in every natural format (`infl_plugin.run.query_formats`) and through the Hugging Face callback:
strings with ``default_data_collator`` blocks, errors naming the argument, readable text, the
itemised duration of an attribution."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator
from transformers.utils import logging as hf_logging

import infl_plugin as ip
from infl_plugin.errors import ConfigurationError
from infl_plugin.integrations.huggingface import InfluenceTrainerCallback
from infl_plugin.run.query_formats import (PadCollator, Preparation, TokenTextRenderer, as_rows, prepare_queries,
                                       query_format)
from infl_plugin.report.renderers import make_renderer
from hf_models import byte_tokenizer

hf_logging.disable_progress_bar()
TOKENIZER = byte_tokenizer()
TOKENIZER.add_special_tokens({"eos_token": "<eos>"})
TOKENIZER.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}<assistant>{% endif %}")
BLOCK = 16


def scored_text(example: dict) -> str:
    return TOKENIZER.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])


def test_every_format_becomes_a_scored_token_sequence():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "more"}, {"role": "assistant", "content": "bye"}]}
    queries = prepare_queries(["plain text", {"prompt": "2 + 2 =", "completion": " 4"}, chat, {"text": "a row"}],
                              TOKENIZER, Preparation(add_eos=True))
    assert [query_format(queries.rows[i]) for i in range(4)] == ["text", "prompt_completion", "messages", "text"]
    assert scored_text(queries[0]) == "plain text<eos>" and queries[0]["text"] == "plain text<eos>"
    assert scored_text(queries[1]) == " 4<eos>"
    assert scored_text(queries[2]) == "hello\nbye\n"
    assert scored_text(queries[3]) == "a row<eos>"
    whole = prepare_queries([{"prompt": "2 + 2 =", "completion": " 4"}], TOKENIZER, Preparation(completion_only=False))
    assert scored_text(whole[0]) == "2 + 2 = 4"
    short = prepare_queries(["abcdefgh"], TOKENIZER, Preparation(max_length=3, truncation_mode="keep_end"))
    assert TOKENIZER.decode(short[0]["input_ids"]) == "fgh"
    batch = PadCollator(TOKENIZER.pad_token_id)([queries[0], queries[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][1].sum()) == len(queries[1]["input_ids"])


def test_columns_and_tokenized_rows_are_kept_as_they_are():
    columns = {"input_ids": torch.arange(12).reshape(3, 4), "attention_mask": torch.ones(3, 4, dtype=torch.long)}
    rows = prepare_queries(columns, TOKENIZER)
    assert len(rows) == 3 and rows[2]["input_ids"].tolist() == [8, 9, 10, 11]
    tokenized = [{"input_ids": [1, 2, 3]}]
    assert prepare_queries(tokenized, TOKENIZER) is tokenized


@pytest.mark.parametrize("queries, match", [
    ([{"question": 1}], "no format the callback can score.*'question'"),
    ([{"messages": [{"role": "user", "content": "no answer"}]}], "no assistant turn"),
    ([{"prompt": "a", "completion": ["b"]}], "both be strings or both be lists"),
])
def test_unreadable_queries_name_the_format_received_and_accepted(queries, match):
    with pytest.raises(ConfigurationError, match=match) as error:
        prepare_queries(queries, TOKENIZER)[0]
    assert "Accepted: strings" in str(error.value)


def test_a_bare_string_or_a_single_example_mapping_fails_at_construction():
    with pytest.raises(ConfigurationError, match="InfluenceTrainerCallback.queries"):
        InfluenceTrainerCallback(queries="one text")
    with pytest.raises(ConfigurationError, match="read as columns"):
        as_rows({"prompt": "a", "completion": "b"})


def test_token_sequences_render_as_text():
    renderer = TokenTextRenderer(TOKENIZER, make_renderer("auto"))
    ids = TOKENIZER("def f(): pass")["input_ids"]
    for example in ({"input_ids": ids, "attention_mask": [1] * len(ids)}, {"input_ids": torch.tensor(ids)}):
        assert renderer(example).text == "def f(): pass"


# --------------------------------------------------------------------------------- through the Trainer
def blocks(n: int, offset: int = 0) -> list[dict]:
    """Equal-length blocks as run_clm groups them (default_data_collator cannot pad)."""
    text = "The for statement is used to iterate over the elements of a sequence. " * 20
    out = []
    for i in range(n):
        ids = TOKENIZER(text[(i + offset) * 7:])["input_ids"][:BLOCK]
        out.append({"input_ids": ids, "attention_mask": [1] * BLOCK, "labels": ids})
    return out


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(TOKENIZER), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id))


def train(out, queries, **options) -> InfluenceTrainerCallback:
    callback = InfluenceTrainerCallback(queries=queries, config=ip.InfluenceConfig(module_types=["Conv1D"]),
                                        candidates="all", token_sequences=1, **options)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=1, report_to="none",
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=gpt2(), args=args, train_dataset=blocks(8), data_collator=default_data_collator,
            processing_class=TOKENIZER, callbacks=[callback]).train()
    return callback


def test_strings_with_default_data_collator_blocks_attribute_with_itemised_durations(tmp_path):
    callback = train(tmp_path, ["The for statement", "iterate over the elements of a sequence"])
    result = callback.session.last_result
    assert result.scores.shape == (2, 8)
    durations = result.extra["durations"]
    assert {"factors", "queries", "candidates", "token_views", "eigenbasis_refresh"} <= set(durations)
    # the attribution's parts add up to at most its duration; the TensorBoard report written after
    # it is itemised beside them, outside duration_s
    assert result.duration_s >= sum(v for k, v in durations.items() if k != "report") * 0.999
    assert durations["report"] > 0


def test_a_collator_error_on_the_queries_is_a_configuration_error_at_train_start(tmp_path):
    with pytest.raises(ConfigurationError, match=r"queries: batching the queries failed.*'input_ids'"):
        train(tmp_path, [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])  # unequal lengths for default_data_collator


def test_truncation_by_num_queries_is_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="infl_plugin"):
        callback = train(tmp_path, blocks(5, offset=40), num_queries=2)
    assert callback.session.last_result.num_queries == 2
    assert "explaining 2 evenly spaced of the 5 queries given" in caplog.text
