"""InfluenceTrainerCallback inside a real ``transformers.Trainer`` on tiny GPT-2, Llama and BERT models.

Ground truths (training without the callback, bit for bit, a frozen model's (learning rate 0)
statistics and factors against post-hoc passes, accumulation against a k-times larger batch and
exact resumption are in tests/test_contracts.py): the same run without gradient checkpointing / with
less padding, and an uninterrupted run for resumption with changed fields. Models are float32 (the
Trainer's default); tolerances are float32 summation-order differences (different batch shapes,
padding) on float64 accumulators: rtol 1e-4 and an absolute floor of 1e-6 × the largest entry.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import warnings

import pytest
import torch
from pydoc_data.topics import topics
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments)
from transformers.utils import logging as hf_logging

import infl_plugin as ip
from infl_plugin.results.artifacts import read_artifacts
from infl_plugin.curvature.fitting import accumulate, new_statistics
from infl_plugin.curvature.hooks import LayerHooks
from infl_plugin.errors import ConfigurationError, StateFileError
from infl_plugin.integrations.huggingface import (MAX_PENDING, InfluenceTrainerCallback, TrainerLossScale, load_state,
                                                 tensorboard_logdir)
from infl_plugin.curvature.passes import isolated
from infl_plugin.run.data import make_loader
from infl_plugin.report.markdown import views_markdown
from infl_plugin.results.token_views import token_views
from hf_models import byte_tokenizer

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
pytestmark = [pytest.mark.filterwarnings("ignore:infl_plugin. not tracking requested modules"),
              pytest.mark.filterwarnings("ignore:infl_plugin. InfluenceTrainerCallback got no queries")]

SEQ = 16
RTOL = 1e-4


# --------------------------------------------------------------------------------- data and models
TOKENIZER = byte_tokenizer()
VOCAB = len(TOKENIZER)
PAD = TOKENIZER.pad_token_id


def lm_examples(n: int = 16, offset: int = 0) -> list[dict]:
    """Passages of 5..SEQ bytes of the CPython language reference (variable lengths → padding)."""
    text = topics["compound"]
    out = []
    for i in range(n):
        start = 37 * (i + offset)
        ids = TOKENIZER(text[start: start + 5 + (i * 7) % (SEQ - 4)])["input_ids"][:SEQ]
        out.append({"input_ids": ids})
    return out


def classification_examples(n: int = 16) -> list[dict]:
    return [dict(ex, label=i % 3) for i, ex in enumerate(lm_examples(n, offset=50))]


class Collate:
    """Right-pads ``input_ids`` (``attention_mask`` 0, ``labels`` -100 on padding) to ``pad_to`` or the longest."""

    def __init__(self, pad_to: int | None = None) -> None:
        self.pad_to = pad_to

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = self.pad_to or max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), PAD)
        mask = torch.zeros(len(examples), width, dtype=torch.long)
        labels = torch.full((len(examples), width), -100)
        for n, e in enumerate(examples):
            length = len(e["input_ids"])
            ids[n, :length] = torch.tensor(e["input_ids"])
            mask[n, :length] = 1
            labels[n, :length] = torch.tensor(e.get("labels", e["input_ids"]))
        batch = {"input_ids": ids, "attention_mask": mask}
        if "label" in examples[0]:
            batch["labels"] = torch.tensor([e["label"] for e in examples])
        else:
            batch["labels"] = labels
        return batch


def gpt2(dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                      bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD))


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD))


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32, num_labels=3,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                    pad_token_id=PAD))


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert}
LAYERS = {"gpt2": ["transformer.h.*.attn.c_*", "transformer.h.*.mlp.c_*"],
          "llama": ["model.layers.*_proj"],
          "bert": ["bert.encoder.layer.*.dense", "bert.encoder.layer.*.query", "classifier"]}


def examples_for(kind: str, n: int = 16) -> list[dict]:
    return classification_examples(n) if kind == "bert" else lm_examples(n)


def make_trainer(model, items, out, callback=None, collate=None, eval_dataset=None, **overrides) -> Trainer:
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=0.0,
                    report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                    seed=0, data_seed=0, per_device_eval_batch_size=8)
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=items, eval_dataset=eval_dataset,
                   data_collator=collate or Collate(), processing_class=TOKENIZER,
                   callbacks=[callback] if callback is not None else [])


def config(kind: str, **overrides) -> ip.InfluenceConfig:
    values = dict(strategy="kfac", modules=LAYERS[kind], accumulation_dtype="float64", update_every=1)
    values.update(overrides)
    return ip.InfluenceConfig(**values)


def task_for(kind: str) -> ip.Task:
    return ip.ClassificationTask() if kind == "bert" else ip.CausalLMTask()


def statistics_of(callback: InfluenceTrainerCallback) -> dict:
    return {name: s for name, s in callback.session.tracker.statistics.totals.items()}


def assert_statistics_close(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name in left:
        a, b = left[name], right[name]
        assert a.tokens == b.tokens and a.examples == b.examples, name
        for attr in ("a_sum", "s_sum"):
            x, y = getattr(a, attr), getattr(b, attr)
            torch.testing.assert_close(x, y, rtol=RTOL, atol=1e-6 * float(y.abs().max()), msg=f"{name}.{attr}")


def fitted_statistics(model, task, items, cfg, batch_size=8) -> dict:
    """Covariances from an explicit pass over ``items`` (eval mode, per-example losses, no scaling)."""
    layers = ip.select_layers(model, cfg.modules, cfg.module_types)
    statistics = new_statistics(layers, cfg)
    with LayerHooks(model, layers) as hooks, isolated(model):
        accumulate(model, task, hooks, statistics, make_loader(items, batch_size, Collate()), cfg, torch.Generator())
    return statistics.totals


def hooks_left(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]


# --------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gradient_checkpointing_equals_no_checkpointing(tmp_path, kind):
    """Recomputed forwards fire the layer hooks again; each micro-batch still counts once."""
    items = examples_for(kind)
    stats = []
    for checkpointing in (False, True):
        callback = InfluenceTrainerCallback(config=config(kind))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(MODELS[kind](), items, tmp_path / str(checkpointing), callback,
                         gradient_checkpointing=checkpointing).train()
        assert callback.session.tracker.micro_batches == 4
        stats.append(statistics_of(callback))
    assert_statistics_close(stats[0], stats[1])


def test_padding_changes_neither_statistics_nor_scores(tmp_path):
    items = lm_examples(16)
    stats, scores = [], []
    for pad_to in (SEQ, SEQ + 8):
        callback = InfluenceTrainerCallback(queries=lm_examples(2, offset=90), config=config("gpt2", strategy="ekfac"),
                                            token_sequences=0, logdir=str(tmp_path / f"logs{pad_to}"))
        make_trainer(gpt2(), items, tmp_path / str(pad_to), callback, collate=Collate(pad_to)).train()
        stats.append(statistics_of(callback))
        scores.append(callback.session.last_result.scores)
    assert_statistics_close(stats[0], stats[1])
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-3, atol=1e-4 * float(scores[1].abs().max()))


def test_loss_normalisation_is_measured_per_model(tmp_path):
    """Llama divides by num_items_in_batch; BERT's classifier accepts the keyword but takes a mean.

    transformers 4.x passes ``num_items_in_batch`` only to models whose forward takes ``**kwargs``
    for the loss (Llama, not BERT): then BERT's loss is a plain mean and there is nothing to measure.
    """
    modes, passed = {}, {}
    for kind in ("llama", "bert"):
        callback = InfluenceTrainerCallback(config=config(kind))
        model = MODELS[kind]()
        seen = []
        probe = model.register_forward_pre_hook(lambda m, a, kw: seen.append("num_items_in_batch" in kw),
                                                with_kwargs=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(model, examples_for(kind), tmp_path / kind, callback, gradient_accumulation_steps=2).train()
        probe.remove()
        modes[kind], passed[kind] = callback.inputs.scale.mode, any(seen)
    assert passed["llama"] and modes["llama"] == "num_items"
    assert modes["bert"] == ("mean" if passed["bert"] else None)


# --------------------------------------------------------------------------------- outputs
def test_event_files_artifacts_and_checkpoint_state(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    items = lm_examples(16)
    queries = lm_examples(2, offset=90)
    callback = InfluenceTrainerCallback(queries=queries, config=config("gpt2", strategy="ekfac"), top_k=3,
                                        candidates="all")  # a checkpoint pass: layer shares, self-influence views
    trainer = make_trainer(gpt2(), items, tmp_path, callback, learning_rate=1e-2, save_strategy="steps", save_steps=2)
    trainer.train()
    logdir = tensorboard_logdir(trainer.args)
    # transformers 4.x has args.logging_dir (default output_dir/runs/<time>_<host>); 5.x has none
    assert logdir == (getattr(trainer.args, "logging_dir", None) or os.path.join(str(tmp_path), "runs"))
    (event_file,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    events = EventAccumulator(event_file, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for q in range(2):
        for tag in (f"influence/query_{q:03d}", f"influence_tokens/query_{q:03d}"):
            assert f"{tag}/text_summary" in tags["tensors"]
        for tag in (f"influence_token_heatmaps/query_{q:03d}", f"influence_layers/query_{q:03d}"):
            assert tag in tags["images"]
        assert f"influence_score_log10/query_{q:03d}" in tags["histograms"]
    assert {"influence_plots/score_ccdf", "influence_plots/layer_shares"} <= set(tags["images"])
    tracked = [t for t in tags["scalars"] if t.startswith("influence_tracked/query_000/example_")]
    assert any([e.step for e in events.Scalars(t)] == [2, 4] for t in tracked)  # one series = one example
    assert [e.step for e in events.Scalars("influence_stats/topk_jaccard/query_000")] == [4]
    text = events.Tensors("influence_tokens/query_000/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "helpful #1" in text and "harmful #1" in text and "| rank | token |" in text

    rows = read_artifacts(logdir, as_dataframe=False)
    assert [r["step"] for r in rows] == [2, 4] and [r["reason"] for r in rows] == ["save", "save"]
    for row in rows:
        assert row["scores"].shape == (2, len(items))
        top = row["scores"].argmax(1)
        assert (row["helpful_indices"][:, 0] == top).all()
        assert row["helpful_scores"][:, 0] == pytest.approx(row["scores"].max(1))
        assert row["layer_shares"].sum(1) == pytest.approx([1.0, 1.0])

    state, meta = load_state(str(tmp_path / "checkpoint-2"))
    assert meta == {"global_step": 2}
    assert state["tracker"]["optimizer_steps"] == 2 and state["last_attribution_step"] == 2
    with open(tmp_path / "checkpoint-2" / "influence_state.json") as handle:
        assert json.load(handle)["state"]["__dict__"]["version"] == 1


def test_bert_classifier_attributes_on_a_step_schedule_and_on_evaluate(tmp_path, recwarn):
    """every_n_steps=3 and on_evaluate (eval at steps 2 and 4); the train-end attribution at step 4 is not repeated."""
    items = classification_examples(16)
    callback = InfluenceTrainerCallback(queries=classification_examples(2)[:2], config=config("bert"), top_k=3,
                                        every_n_steps=3, attribute_on_save=False, attribute_on_evaluate=True, token_sequences=1,
                                        candidates="all")
    trainer = make_trainer(bert(), items, tmp_path, callback, eval_dataset=items[:4], learning_rate=1e-2, max_steps=4,
                           eval_strategy="steps", eval_steps=2)
    trainer.train()
    rows = read_artifacts(tensorboard_logdir(trainer.args), as_dataframe=False)
    assert [(r["step"], r["reason"]) for r in rows] == [(2, "evaluate"), (3, "every_n_steps"), (4, "evaluate")]
    assert rows[-1]["scores"].shape == (2, 16)
    assert not [w for w in recwarn if "failed" in str(w.message)]
    # the classifier head sees one pooled vector per sequence: its share is kept apart from the tokens
    session = callback.session
    views = token_views(session.last_attributor, session.last_queries, 1, items[:3], [0, 1, 2], Collate())
    head = views.layer_names.index("classifier")
    for i in range(3):
        assert views.sequence_scores[i][head] != 0 and views.token_scores[i][head].abs().sum() == 0
        total = views.per_token(i).sum() + views.sequence_scores[i].sum()
        assert float(total) == pytest.approx(float(session.last_result.scores[1, i]), rel=1e-4)
    assert "classification head" in views_markdown(views)


def _truncate(path: str) -> None:
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def _random_bytes(path: str) -> None:
    size = os.path.getsize(path)  # same size: the damage is found by parsing, not by the recorded size
    with open(path, "wb") as handle:
        handle.write(random.Random(0).randbytes(size))


DAMAGES = {  # name: (file of the pair, damage, what the warning says)
    "truncated-safetensors": (".safetensors", _truncate, "bytes where"),
    "random-safetensors": (".safetensors", _random_bytes, "not a readable safetensors file"),
    "truncated-json": (".json", _truncate, "not valid JSON"),
    "random-json": (".json", _random_bytes, "not valid JSON"),
    "missing-safetensors": (".safetensors", os.remove, "is missing"),
    "missing-json": (".json", os.remove, "is missing"),
}


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> str:
    """``checkpoint-2`` of a 4-step run that saves every 2 steps (statistics only, no queries)."""
    out = tmp_path_factory.mktemp("saved")
    make_trainer(gpt2(), lm_examples(16), out, InfluenceTrainerCallback(config=config("gpt2")), max_steps=4,
                 per_device_train_batch_size=2, save_strategy="steps", save_steps=2).train()
    return str(out / "checkpoint-2")


def _resume_damaged(saved: str, out, damage: str, strict: bool = False):
    suffix, harm, _ = DAMAGES[damage]
    folder = out / "checkpoint-2"
    shutil.copytree(saved, folder)
    harm(str(folder / f"influence_state{suffix}"))
    callback = InfluenceTrainerCallback(config=config("gpt2"), strict=strict)
    model = gpt2()
    trainer = make_trainer(model, lm_examples(16), out, callback, max_steps=4, per_device_train_batch_size=2)
    return callback, model, trainer, str(folder / f"influence_state{suffix}")


def test_checkpoint_state_is_written_atomically_as_a_matching_pair(saved_checkpoint):
    names = sorted(name for name in os.listdir(saved_checkpoint) if name.startswith("influence_state"))
    assert names == ["influence_state.json", "influence_state.safetensors"]  # no temporary file left
    state, meta = load_state(saved_checkpoint)
    assert meta == {"global_step": 2} and state["tracker"]["optimizer_steps"] == 2


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_state_warns_and_statistics_restart(saved_checkpoint, tmp_path, damage):
    """Training resumes; the warning names the file and the damage; statistics count only the new steps."""
    callback, model, trainer, path = _resume_damaged(saved_checkpoint, tmp_path, damage)
    with pytest.warns(UserWarning, match="cannot restore the influence state") as caught:
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    (message,) = [str(w.message) for w in caught if "cannot restore" in str(w.message)]
    assert path in message and DAMAGES[damage][2] in message
    assert trainer.state.global_step == 4
    assert callback.session.tracker.optimizer_steps == 2 and callback.session.tracker.micro_batches == 2
    assert hooks_left(model) == []


@pytest.mark.parametrize("damage", ["truncated-safetensors", "missing-json"])
def test_a_damaged_checkpoint_state_raises_in_strict_mode(saved_checkpoint, tmp_path, damage):
    callback, model, trainer, path = _resume_damaged(saved_checkpoint, tmp_path, damage, strict=True)
    with pytest.raises(StateFileError, match="influence_state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert hooks_left(model) == []


def _assert_trees_equal(got, expected, path="state"):
    if isinstance(expected, torch.Tensor):
        largest = float(expected.abs().max()) if expected.numel() else 1.0
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9 * (largest or 1.0), msg=path)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), path
        for key in expected:
            _assert_trees_equal(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_trees_equal(g, e, f"{path}[{i}]")
    else:
        assert got == expected, path


# --------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("field, value", [
    ("config", 3), ("task", "causal_lm"), ("queries", 5), ("candidates", 5), ("num_candidates", 0),
    ("num_candidates", "3"), ("batch_size", 1.5), ("every_n_steps", 0), ("attribute_on_save", "yes"),
    ("attribute_on_evaluate", 1), ("attribute_at_train_end", None), ("top_k", 0), ("token_sequences", -1),
    ("top_tokens", True), ("self_influence", "no"), ("num_queries", 0), ("num_workers", -1), ("renderer", "svg"),
    ("collate_fn", 3), ("writer", object()), ("logdir", 3), ("resume_from", 3), ("strict", None), ("options", 3)])
def test_invalid_arguments_fail_at_construction_naming_the_field(field, value):
    with pytest.raises(ConfigurationError, match=rf"InfluenceTrainerCallback\.{field} must be .*got"):
        InfluenceTrainerCallback(**{field: value})


def test_configuration_flags_do_not_shadow_the_event_methods():
    callback = InfluenceTrainerCallback(config={"strategy": "kfac"}, attribute_on_save=False,
                                        attribute_on_evaluate=True, attribute_at_train_end=False)
    assert (callback.options.attribute_on_save, callback.options.attribute_on_evaluate,
            callback.options.attribute_at_train_end) == (False, True, False)
    assert callable(callback.on_save) and callable(callback.on_evaluate)
    with pytest.warns(DeprecationWarning, match="on_save is deprecated: use attribute_on_save"):
        assert InfluenceTrainerCallback(on_save=False).options.attribute_on_save is False
    with pytest.raises(ConfigurationError, match="dampnig"):
        InfluenceTrainerCallback(config={"dampnig": 1.0})


def test_options_work_as_a_structured_config():
    """The shared `AttributionOptions` as an OmegaConf structured config, merged with YAML-style overrides."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(ip.AttributionOptions)
    options = OmegaConf.merge(schema, {"every_n_steps": 4, "candidates": "all", "top_k": 2})
    callback = InfluenceTrainerCallback(config=OmegaConf.create({"strategy": "kfac"}), options=options)
    assert callback.options == ip.AttributionOptions(every_n_steps=4, candidates="all", top_k=2)
    assert callback.config.strategy == "kfac"
    with pytest.raises(ConfigurationError, match=r"InfluenceTrainerCallback\.options has no field"):
        InfluenceTrainerCallback(options={"top_kk": 1})


class _Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("boom")


def _train_forward_backward(model: torch.nn.Module, examples: list[dict]) -> None:
    """A training-mode forward and backward outside any Trainer (what a user may run after a crash)."""
    model.train()
    model(**Collate()(examples)).loss.backward()


def test_after_an_exception_hooks_are_bounded_then_inert_and_training_again_works(tmp_path):
    """No Trainer event reports an exception: the hooks stay, keep at most MAX_PENDING micro-batches,
    do nothing after ``close()``, and a second ``trainer.train()`` starts clean and finishes."""
    items = lm_examples(16)
    model = gpt2()
    callback = InfluenceTrainerCallback(config=config("gpt2"))
    trainer = make_trainer(model, items, tmp_path / "boom", callback)
    trainer.add_callback(_Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert callback.session.tracker.optimizer_steps == 2
    for i in range(MAX_PENDING + 3):
        _train_forward_backward(model, items[i: i + 2])
    assert len(callback.inputs.pending) == MAX_PENDING
    assert callback.session.tracker.optimizer_steps == 2  # nothing was committed outside the Trainer

    callback.close()
    assert hooks_left(model) == []
    _train_forward_backward(model, items[:2])
    assert len(callback.inputs.pending) == 0

    trainer = make_trainer(model, items, tmp_path / "again", callback)
    trainer.train()
    assert trainer.state.global_step == 4 and callback.session.tracker.optimizer_steps == 2 + 4
    assert hooks_left(model) == []
    for totals in statistics_of(callback).values():
        assert torch.isfinite(totals.a_sum).all() and torch.isfinite(totals.s_sum).all()


def test_a_second_train_after_an_exception_drops_the_uncommitted_micro_batch(tmp_path):
    """Crash between a backward and its commit, then ``train()`` again without ``close()``: the
    statistics equal those of an uninterrupted run that skips the crashed micro-batch's step."""

    class BoomInBackward(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 1:
                raise RuntimeError("boom")

    items = lm_examples(4)  # one batch: every step sees the same examples (learning rate 0)
    model = gpt2()
    callback = InfluenceTrainerCallback(config=config("gpt2"))
    trainer = make_trainer(model, items, tmp_path / "boom", BoomInBackward(), num_train_epochs=2)
    trainer.add_callback(callback)  # after the failing callback: step 2's statistics are never committed
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    make_trainer(model, items, tmp_path / "again", callback).train()
    reference = InfluenceTrainerCallback(config=config("gpt2"))
    make_trainer(gpt2(), items, tmp_path / "reference", reference, num_train_epochs=2).train()
    assert callback.session.tracker.optimizer_steps == reference.session.tracker.optimizer_steps == 2
    assert_statistics_close(statistics_of(callback), statistics_of(reference))


def test_loss_scale_is_worked_out_only_on_statistics_steps(tmp_path, monkeypatch):
    """16 examples in batches of 4 with ``update_every=2``: steps 0 and 2 feed the statistics, and
    only their micro-batches are measured and scaled (each a device sync on an accelerator)."""
    calls = {"measure": 0, "grad_scale": 0}
    for name in calls:
        original = getattr(TrainerLossScale, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TrainerLossScale, name, counted)
    callback = InfluenceTrainerCallback(config=config("gpt2", update_every=2))
    make_trainer(gpt2(), lm_examples(16), tmp_path, callback).train()
    assert calls == {"measure": 2, "grad_scale": 2}
    assert callback.session.tracker.updates == 2


def test_a_failing_micro_batch_only_warns(tmp_path, monkeypatch):
    items = lm_examples(16)
    callback = InfluenceTrainerCallback(config=config("gpt2"))
    model = gpt2()
    trainer = make_trainer(model, items, tmp_path, callback, learning_rate=1e-2)
    original = ip.InfluenceTracker.step
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("bad batch")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ip.InfluenceTracker, "step", flaky)
    with pytest.warns(UserWarning, match="bad batch"):
        trainer.train()
    assert callback.session.failed_batches == 1 and trainer.state.global_step == 4
    assert hooks_left(model) == []


def test_torch_compile_is_refused_with_a_clear_message(tmp_path):
    trainer = make_trainer(gpt2(), lm_examples(8), tmp_path, InfluenceTrainerCallback(config=config("gpt2")),
                           torch_compile=True)
    with pytest.raises(RuntimeError, match="torch.compile"):
        trainer.train()


def test_bf16_autocast_statistics_track_float32(tmp_path):
    """bf16 activations/gradients: same statistics as float32 up to bf16 precision (rtol 5e-2)."""
    items = lm_examples(16)
    stats = []
    for bf16 in (False, True):
        callback = InfluenceTrainerCallback(config=config("gpt2"))
        make_trainer(gpt2(), items, tmp_path / str(bf16), callback, bf16=bf16).train()
        stats.append(statistics_of(callback))
    for name, a in stats[1].items():
        b = stats[0][name]
        assert a.tokens == b.tokens
        for attr in ("a_sum", "s_sum"):
            x, y = getattr(a, attr), getattr(b, attr)
            assert torch.isfinite(x).all()
            assert float((x - y).norm() / y.norm()) < 5e-2, f"{name}.{attr}"


def test_amp_grad_scaler_scale_is_undone(tmp_path):
    """A GradScaler multiplies the backpropagated loss by 2^k (exact in float) and doubles it after every
    step (growth_interval=1): the statistics must equal those of a run without one."""
    items = lm_examples(16)
    stats = []
    for scaled in (False, True):
        callback = InfluenceTrainerCallback(config=config("gpt2"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = make_trainer(gpt2(), items, tmp_path / str(scaled), callback, gradient_accumulation_steps=2,
                                   per_device_train_batch_size=2, max_grad_norm=0.0)
            if scaled:  # the Trainer has no fp16 AMP on CPU: put a scaler where accelerate's backward applies it
                trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
            trainer.train()
        if scaled:
            assert trainer.accelerator.scaler.get_scale() == 2.0 ** 14  # 4 optimizer steps, each doubling
        stats.append(statistics_of(callback))
    assert_statistics_close(stats[1], stats[0])


def test_peft_lora_tracks_the_adapter_layers(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                        lora_dropout=0.0))
    callback = InfluenceTrainerCallback(queries=lm_examples(2, offset=90), config=ip.InfluenceConfig(strategy="kfac", update_every=1),
                                        top_k=3)
    make_trainer(model, lm_examples(16), tmp_path, callback, learning_rate=1e-2).train()
    names = callback.session.tracker.statistics.totals.keys()
    assert names and all("lora_" in name for name in names)
    assert callback.session.last_result is not None
    assert hooks_left(model) == []


@pytest.mark.slow
def test_language_model_example_runs(tmp_path):
    """The README example end to end on 48 passages (the full run takes minutes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_causal_lm", os.path.join(os.path.dirname(__file__), "..",
                                                                               "examples", "hf_causal_lm.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--output-dir", str(tmp_path), "--epochs", "1", "--max-passages", "48"])
    result = out["result"]
    assert result.scores.shape == (3, 48) and result.reason == "save"
    rows = read_artifacts(str(tmp_path / "runs"), as_dataframe=False)
    assert [r["step"] for r in rows] == [3]


def test_resume_accepts_changed_scoring_fields_and_restarts_naming_statistics_fields(tmp_path):
    """``damping`` / ``query_rank`` may change on resume (the state continues exactly); a changed
    field that shapes the saved statistics is named in the warning, and statistics restart."""
    items = lm_examples(16)
    queries = lm_examples(2, offset=90)

    def run(out, resume=None, **changes):
        callback = InfluenceTrainerCallback(queries=queries, config=config("gpt2", strategy="ekfac", **changes),
                                            top_k=3, token_sequences=0, candidates="all")
        trainer = make_trainer(gpt2(), items, out, callback, learning_rate=1e-2, max_steps=4,
                               per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
        trainer.train(resume_from_checkpoint=resume)
        return callback

    run(tmp_path / "whole")
    for name in ("resumed", "refused"):
        shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / name / "checkpoint-2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "cannot restore" warning
        warnings.filterwarnings("ignore", message=".*(not tracking requested|min_statistics_steps).*")
        resumed = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-2"), damping=0.5,
                      query_rank=2)
    assert resumed.session.config.damping == 0.5
    expected, _ = load_state(str(tmp_path / "whole" / "checkpoint-4"))
    got, _ = load_state(str(tmp_path / "resumed" / "checkpoint-4"))
    _assert_trees_equal(got["tracker"]["statistics"], expected["tracker"]["statistics"])
    with pytest.warns(UserWarning, match=r"cannot restore the influence state .*update_every=1 \(now 2\)"):
        refused = run(tmp_path / "refused", resume=str(tmp_path / "refused" / "checkpoint-2"), update_every=2)
    assert refused.session.tracker.optimizer_steps == 2  # restarted from zero at step 2
