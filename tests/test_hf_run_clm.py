"""The transformers example-script flow (``examples/hf_run_clm.py``, run_clm-shaped): text dataset
grouped into blocks, ``default_data_collator``, ``HfArgumentParser`` + ``TrainingArguments``,
``report_to tensorboard``, resume; the TensorBoard tables show the validation blocks as text."""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys

import pytest

pytest.importorskip("datasets")

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def example():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "hf_run_clm.py")
    spec = importlib.util.spec_from_file_location("hf_run_clm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def table_texts(logdir: str, tag: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = []
    for event_file in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(event_file, size_guidance={"tensors": 0})
        events.Reload()
        if f"{tag}/text_summary" in events.Tags()["tensors"]:
            texts += [e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")]
    return texts


@pytest.mark.slow
def test_run_clm_flow_reports_text_and_resumes(tmp_path, caplog):
    from datasets import disable_progress_bars

    disable_progress_bars()
    run_clm = example()
    out = str(tmp_path / "out")
    argv = ["--output_dir", out, "--report_to", "tensorboard", "--max_topics", "5", "--validation_topics", "2",
            "--block_size", "32", "--n_embd", "32", "--vocab_size", "320", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8", "--save_steps", "2", "--logging_steps", "2", "--use_cpu",
            "--disable_tqdm", "true", "--seed", "0"]
    with caplog.at_level(logging.WARNING, logger="infl_plugin"):
        trainer = run_clm.main(argv + ["--max_steps", "2"])
    callback = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "InfluenceTrainerCallback")
    validation = len(trainer.eval_dataset)
    assert validation > 8 and callback.session.last_result.num_queries == 8
    assert f"explaining 8 evenly spaced of the {validation} queries given" in caplog.text

    logdir = os.path.join(out, "runs")
    (query_table,) = table_texts(logdir, "influence/query_000")
    assert "input_ids" not in query_table and "attention_mask" not in query_table
    first_block = trainer.processing_class.decode(trainer.eval_dataset[0]["input_ids"], skip_special_tokens=True)
    assert first_block[:20].split()[0] in query_table

    resumed = run_clm.main(argv + ["--max_steps", "4"])  # resumes from checkpoint-2 (get_last_checkpoint)
    callback = next(c for c in resumed.callback_handler.callbacks if type(c).__name__ == "InfluenceTrainerCallback")
    assert resumed.state.global_step == 4 and callback.session.tracker.optimizer_steps == 4
    assert len(table_texts(logdir, "influence/query_000")) == 2
