"""TRL's SFTTrainer as a client of `InfluenceTrainerCallback`: queries prepared as the trainer prepared
its training set, the loss scale of its own ``compute_loss`` measured exactly (with gradient
accumulation), packing refused at train start, resume. Tiny GPT-2 from a config, byte-level
tokenizer, data made here; nothing is downloaded."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import infl_plugin as ip  # noqa: E402
from infl_plugin.run.data import make_loader  # noqa: E402
from infl_plugin.errors import ConfigurationError  # noqa: E402
from infl_plugin.curvature.fitting import accumulate, new_statistics  # noqa: E402
from infl_plugin.curvature.hooks import LayerHooks  # noqa: E402
from infl_plugin.integrations.huggingface import InfluenceTrainerCallback, load_state  # noqa: E402
from infl_plugin.integrations.hf_queries import trainer_preparation  # noqa: E402
from infl_plugin.curvature.passes import isolated  # noqa: E402
from infl_plugin.run.query_formats import PadCollator, prepare_queries  # noqa: E402
from hf_models import byte_tokenizer  # noqa: E402

try:
    from trl import SFTConfig, SFTTrainer
except Exception as error:  # an installed TRL that this transformers cannot run
    pytest.skip(f"TRL's SFTTrainer cannot be imported here: {error}", allow_module_level=True)

hf_logging.disable_progress_bar()
datasets.disable_progress_bars()
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
LAYERS = ["transformer.h.*.attn.c_*", "transformer.h.*.mlp.c_*"]


def tokenizer():
    tok = byte_tokenizer()
    tok.add_special_tokens({"eos_token": "<eos>"})
    tok.chat_template = TEMPLATE
    return tok


TOKENIZER = tokenizer()


def pairs(n: int = 8, offset: int = 0) -> list[dict]:
    names = ["len", "abs", "sum", "min", "max", "sorted", "repr", "hash", "iter", "next"]
    return [{"prompt": f"{names[(i + offset) % len(names)]}(x) is", "completion": f" a builtin #{i + offset}"}
            for i in range(n)]


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(TOKENIZER), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=TOKENIZER.eos_token_id, eos_token_id=TOKENIZER.eos_token_id,
                                      pad_token_id=TOKENIZER.pad_token_id))


def config(**overrides) -> ip.InfluenceConfig:
    values = dict(strategy="kfac", modules=LAYERS, accumulation_dtype="float64", update_every=1)
    values.update(overrides)
    return ip.InfluenceConfig(**values)


def sft_trainer(out, callback=None, train=None, **overrides) -> SFTTrainer:
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=0.0,
                    report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                    seed=0, data_seed=0, per_device_eval_batch_size=8, max_length=40, dataloader_num_workers=0, bf16=False)
    settings.update(overrides)
    return SFTTrainer(model=gpt2(), args=SFTConfig(**settings), processing_class=TOKENIZER,
                      train_dataset=datasets.Dataset.from_list(train or pairs()),
                      callbacks=[callback] if callback is not None else [])


def statistics_of(callback: InfluenceTrainerCallback) -> dict:
    return dict(callback.session.tracker.statistics.totals)


def fitted_statistics(model, rows, cfg) -> dict:
    """Covariances from an explicit pass over the prepared training rows (per-example summed losses)."""
    layers = ip.select_layers(model, cfg.modules, cfg.module_types)
    statistics = new_statistics(layers, cfg)
    loader = make_loader(rows, 4, PadCollator(TOKENIZER.pad_token_id))
    with LayerHooks(model, layers) as hooks, isolated(model):
        accumulate(model, ip.CausalLMTask(), hooks, statistics, loader, cfg, torch.Generator())
    return statistics.totals


def assert_statistics_close(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name in left:
        for attr in ("a_sum", "s_sum"):
            x, y = getattr(left[name], attr), getattr(right[name], attr)
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6 * float(y.abs().max()), msg=f"{name}.{attr}")


def infl_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "infl_plugin" in str(w.message)]


def test_queries_are_prepared_as_sfttrainer_prepared_its_training_rows(tmp_path):
    """Raw training rows as queries → the same input_ids and completion-masked labels as TRL's own rows."""
    trainer = sft_trainer(tmp_path)
    processed = trainer.train_dataset
    by_ids = {tuple(row["input_ids"]): row["labels"] for row in processed}
    queries = prepare_queries(pairs(), TOKENIZER, trainer_preparation(trainer.args, trainer.model))
    for i in range(len(queries)):
        query = queries[i]
        assert by_ids[tuple(query["input_ids"])] == query["labels"]
        assert query["text"].endswith("<eos>") and query["labels"][0] == -100
    chat = prepare_queries([{"messages": [{"role": "user", "content": "len(x) is"},
                                          {"role": "assistant", "content": " a builtin"}]}], TOKENIZER)[0]
    scored = TOKENIZER.decode([t for t, label in zip(chat["input_ids"], chat["labels"]) if label != -100])
    assert scored == " a builtin\n"


def test_loss_scale_of_sfttrainer_is_measured_exactly(tmp_path):
    """SFTTrainer's compute_loss (fused LM head, Σ token losses / num_items_in_batch over 2
    accumulated micro-batches): no fallback warning, statistics equal an explicit pass of
    per-example summed losses; prompt/completion, chat and plain-string queries attribute."""
    queries = [pairs(1, offset=3)[0], "sum(x) is a builtin",
               {"messages": [{"role": "user", "content": "abs(x) is"}, {"role": "assistant", "content": " a builtin"}]}]
    callback = InfluenceTrainerCallback(queries=queries, config=config(), candidates="all", token_sequences=0)
    trainer = sft_trainer(tmp_path, callback, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert infl_warnings(caught) == []
    assert callback.session.tracker.optimizer_steps == 2
    assert callback.session.last_result.scores.shape == (3, 8)
    assert_statistics_close(statistics_of(callback), fitted_statistics(trainer.model, trainer.train_dataset, config()))


def test_packing_is_refused_at_train_start(tmp_path):
    callback = InfluenceTrainerCallback(queries=pairs(2), config=config())
    trainer = sft_trainer(tmp_path, callback, packing=True, max_length=32)
    with pytest.raises(ConfigurationError, match="packing=True"):
        trainer.train()


def test_query_errors_name_the_argument_and_the_formats(tmp_path):
    with pytest.raises(ConfigurationError, match="InfluenceTrainerCallback.queries"):
        sft_trainer(tmp_path, InfluenceTrainerCallback(queries=[{"question": 1}], config=config())).train()


@pytest.mark.parametrize("candidates", ["all", "stream"])
def test_sfttrainer_resume_continues_exactly(tmp_path, candidates):
    """Killed after the step-2 save and resumed: the step-4 attribution equals the uninterrupted
    run's, checkpoint-scored or streamed (queries, preconditioning and sums restored)."""
    def run(out, resume=None):
        callback = InfluenceTrainerCallback(queries=pairs(1, offset=5), config=config(), top_k=3,
                                            token_sequences=0, candidates=candidates)
        trainer = sft_trainer(out, callback, learning_rate=1e-2, max_steps=4, per_device_train_batch_size=2,
                              save_strategy="steps", save_steps=2)
        trainer.train(resume_from_checkpoint=resume)
        return callback

    whole = run(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-2"))
    assert resumed.session.attributions == whole.session.attributions == 2
    expected, _ = load_state(str(tmp_path / "whole" / "checkpoint-4"))
    got, _ = load_state(str(tmp_path / "resumed" / "checkpoint-4"))
    for name, value in expected["tracker"]["statistics"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got["tracker"]["statistics"][name], value)
    got, expected = resumed.session.last_result, whole.session.last_result
    assert got.candidate_mode == expected.candidate_mode == candidates
    assert got.extra.get("streamed_batches") == expected.extra.get("streamed_batches")
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-5, atol=0)
