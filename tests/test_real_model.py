"""A real language-model set-up with the Hugging Face callback: a Llama-architecture model with a
32000-token vocabulary (built from its config, no download) fine-tuned through a LoRA adapter with
bf16 autocast, gradient checkpointing and gradient accumulation 2."""

from __future__ import annotations

import logging
import math
from typing import Optional

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import infl_plugin as ip
from infl_plugin.integrations.huggingface import InfluenceTrainerCallback

VOCAB, LENGTH = 32000, 12


def _model(lora: bool = True) -> torch.nn.Module:
    """A 1-layer Llama (hidden 32, untied 32000-row embedding and head), with LoRA on q/v."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if not lora:
        return model
    adapter = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                              task_type="CAUSAL_LM")
    return peft.get_peft_model(model, adapter)


def _examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences of 4..LENGTH real tokens, right-padded (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        ids = torch.randint(0, VOCAB, (LENGTH,), generator=g)
        mask = (torch.arange(LENGTH) < 4 + i % (LENGTH - 3)).long()
        items.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return items


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _train(tmp_path, callback, seen: Optional[list] = None, lora: bool = True, steps: int = 3) -> torch.nn.Module:
    """Train 3 optimizer steps; ``seen`` collects the output dtypes of q_proj's LoRA A training calls
    (attribution passes run in eval mode)."""
    model = _model(lora)
    if seen is not None:
        lora_a = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"]
        lora_a.register_forward_hook(lambda module, args, out: seen.append(out.dtype) if module.training else None)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=steps,
        bf16=True, use_cpu=True, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_examples(24, seed=0), data_collator=_collate,
                      callbacks=[] if callback is None else [callback])
    trainer.train()
    return model


def test_lora_llama_with_bf16_checkpointing_and_accumulation(tmp_path, caplog):
    """The default selection tracks only the LoRA matrices (the frozen base weights, the embedding
    and the 32000-row head are left out), the memory estimate of that selection is logged before
    training, the statistics are finite and counted from every micro-batch, an attribution is
    written, and the trained parameters equal, bit for bit, those of the same run without the
    callback."""
    callback = InfluenceTrainerCallback(queries=_examples(2, seed=1), config=ip.InfluenceConfig(update_every=1),
                                        logdir=str(tmp_path / "influence"), token_sequences=0, top_k=3)
    seen: list = []
    with caplog.at_level(logging.INFO, logger="infl_plugin"):
        tracked = _train(tmp_path / "with", callback, seen)
    plain = _train(tmp_path / "without", None)
    for (name, p), q in zip(tracked.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    # bf16 autocast ran, and checkpointing re-ran the 6 micro-batches' attention forwards in backward
    assert seen == [torch.bfloat16] * 12

    session = callback.session
    names = [layer.name for layer in session.tracker.layers]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names
    assert {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    estimate = next(r.getMessage() for r in caplog.records if "curvature statistics of the tracked layers" in r.getMessage())
    assert all(n in estimate for n in names) and "in all" in estimate and "lm_head" not in estimate

    statistics = session.tracker.statistics
    assert session.skipped_batches == 0 and session.tracker.optimizer_steps == 3
    for name, totals in statistics.totals.items():
        assert totals.examples == 3 * 2 * 4, name  # 3 steps × 2 micro-batches × 4 sequences
        for value in (totals.a_sum, totals.s_sum):
            assert torch.isfinite(value).all() and float(value.abs().sum()) > 0, name
    result = session.last_result
    assert result is not None and result.step == 3 and torch.isfinite(result.scores).all()
    assert math.isfinite(float(result.helpful_scores[0, 0]))


def test_full_fine_tuning_leaves_the_vocabulary_head_out_by_default(tmp_path, caplog):
    """Without LoRA every Linear trains, the 32000-row head too: its S alone would be 32000² floats
    (3.8 GiB) to accumulate and eigendecompose. The default selection leaves it out, says so, and
    logs an estimate of what it does track; one optimizer step runs and attributes."""
    callback = InfluenceTrainerCallback(queries=_examples(2, seed=1), config=ip.InfluenceConfig(update_every=1),
                                        logdir=str(tmp_path / "influence"), token_sequences=0, top_k=3)
    with caplog.at_level(logging.INFO, logger="infl_plugin"), pytest.warns(UserWarning, match="lm_head"):
        _train(tmp_path, callback, lora=False, steps=1)
    names = [layer.name for layer in callback.session.tracker.layers]
    assert "lm_head" not in names and "model.layers.0.self_attn.q_proj" in names
    estimate = next(r.getMessage() for r in caplog.records if "curvature statistics of the tracked layers" in r.getMessage())
    assert "lm_head" not in estimate and "GiB" not in estimate and "in all" in estimate
    assert callback.session.last_result is not None and torch.isfinite(callback.session.last_result.scores).all()
