"""Scores of the public API on small models, saved once and compared bit for bit after a change.

Covers post-hoc fits of every strategy (MLP classifier, regressor, tiny GPT-2 built from its
config), factors tracked in a plain training loop, streamed scores, and both callbacks (their
artifacts, read back with `read_artifacts`). Every value is a tensor; ``--check`` compares each
with ``torch.equal`` (NaNs equal where both are NaN) and lists what differs.

Usage::

    python benchmarks/check_identical.py --save /tmp/baseline.pt    # before a change
    python benchmarks/check_identical.py --check /tmp/baseline.pt   # after it: exit 1 on any difference
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import infl_plugin as ip

Results = dict[str, torch.Tensor]
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


def _classifier_data() -> tuple[TensorDataset, TensorDataset]:
    """64 training and 6 query rows of 10 features, 4 classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 10, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def _mlp(d_in: int, d_out: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, d_out))


def _post_hoc(prefix: str, model: nn.Module, task: ip.Task, train: DataLoader, queries: DataLoader,
              strategies: tuple[str, ...] = STRATEGIES, **config) -> Results:
    out: Results = {}
    for strategy in strategies:
        cfg = ip.InfluenceConfig(strategy=strategy, **config)
        factors = ip.fit_factors(model, task, train, cfg)
        attributor = ip.Attributor(model, task, factors, cfg)
        key = f"{prefix}/{strategy}"
        out[key + "/scores"] = attributor.pairwise_scores(queries, train)
        out[key + "/per_layer"] = attributor.pairwise_scores(queries, train, per_layer=True)
        out[key + "/self"] = attributor.self_scores(train)
        top = attributor.top_k(queries, train, k=3)
        for name in ("helpful_scores", "helpful_indices", "harmful_scores", "harmful_indices"):
            out[f"{key}/top/{name}"] = getattr(top, name)
    return out


def classifier() -> Results:
    train_set, query_set = _classifier_data()
    train, queries = DataLoader(train_set, batch_size=16), DataLoader(query_set, batch_size=3)
    out = _post_hoc("classifier", _mlp(10, 4), ip.ClassificationTask(), train, queries)
    out.update(_post_hoc("classifier_sampled_rank", _mlp(10, 4), ip.ClassificationTask(), train, queries,
                         strategies=("ekfac",), fisher="sampled", query_rank=2, damping=0.01))
    return out


def regressor_tracked() -> Results:
    """A regressor trained in a plain loop with the tracker, streaming on, then scored from its factors."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g)
    y = (x @ torch.randn(5, 2, generator=g)).tanh()
    train_set, query_set = TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
    model, task = _mlp(5, 2, seed=1), ip.RegressionTask()
    cfg = ip.InfluenceConfig(update_every=1, min_statistics_steps=1, stream_refresh_every=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    queries = list(DataLoader(query_set, batch_size=4))
    with ip.InfluenceTracker(model, task, cfg, queries=queries) as tracker:
        for epoch in range(3):
            for start in range(0, 32, 8):
                idx = torch.arange(start, start + 8)
                batch = train_set[idx]
                F.mse_loss(model(batch[0]), batch[1]).backward()
                optimizer.step()
                optimizer.zero_grad()
                tracker.step(batch, grad_scale=1.0 / (8 * 2), indices=idx)
            tracker.refresh_eigenbasis()
        streamed = tracker.streamed_scores()
        factors = tracker.factors(DataLoader(train_set, batch_size=8))
    out: Results = {"regressor/streamed/" + k: v for k, v in
                    (("indices", streamed.indices), ("scores", streamed.scores), ("visits", streamed.visits),
                     ("layer_abs", streamed.layer_abs), ("dense", streamed.dense(32)))}
    attributor = ip.Attributor(model, task, factors, cfg)
    out["regressor/tracked/scores"] = attributor.pairwise_scores(queries, DataLoader(train_set, batch_size=8))
    out.update(_post_hoc("regressor", model, task, DataLoader(train_set, batch_size=8), queries))
    return out


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _token_rows(n: int, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 64, (4 + i % 9,), generator=g).tolist()} for i in range(n)]


def _pad(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding: ``input_ids`` 0, ``attention_mask`` 0 and ``labels`` -100 on padding."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for n, r in enumerate(rows):
        ids[n, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[n, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def gpt2_post_hoc() -> Results:
    train = DataLoader(_token_rows(16, 0), batch_size=4, collate_fn=_pad)
    queries = DataLoader(_token_rows(3, 1), batch_size=3, collate_fn=_pad)
    out = _post_hoc("gpt2", _gpt2(), ip.CausalLMTask(), train, queries, strategies=("ekfac", "kfac"),
                    module_types=["Conv1D"])
    cfg = ip.InfluenceConfig(module_types=["Conv1D"])
    model = _gpt2()
    attributor = ip.Attributor(model, ip.CausalLMTask(), ip.fit_factors(model, ip.CausalLMTask(), train, cfg), cfg)
    for name, value in sorted(attributor.token_scores(queries, next(iter(train))).items()):
        out[f"gpt2/token_scores/{name}"] = value
    return out


ARTIFACT_ARRAYS = ("scores", "candidate_indices", "query_indices", "helpful_indices", "helpful_scores",
                   "harmful_indices", "harmful_scores", "layer_shares", "tail_exponents", "measurements", "self_scores")


def _artifacts(prefix: str, logdir: Path) -> Results:
    out: Results = {}
    for row in ip.read_artifacts(logdir, as_dataframe=False):
        key = f"{prefix}/step{row['step']}"
        for name in ARTIFACT_ARRAYS:
            if row.get(name) is not None:
                out[f"{key}/{name}"] = torch.as_tensor(row[name])
        meta = json.dumps({k: row[k] for k in ("strategy", "fisher", "config", "layer_names", "num_candidates",
                                               "candidate_mode")}, sort_keys=True, default=str)
        out[f"{key}/metadata"] = torch.tensor(list(meta.encode()), dtype=torch.uint8)
    if not out:
        raise RuntimeError(f"{prefix}: no artifact was written under {logdir}")
    return out


def lightning_callback() -> Results:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from infl_plugin.integrations.lightning import InfluenceCallback

    train_set, val_set = _classifier_data()

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _mlp(10, 4)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(train_set, batch_size=8)

        def val_dataloader(self):
            return DataLoader(val_set, batch_size=3)

    out: Results = {}
    for candidates in ("all", "stream"):
        with tempfile.TemporaryDirectory() as root:
            pl.seed_everything(0)
            module = Net()
            callback = InfluenceCallback(queries="val", num_queries=4, top_k=3, progress=False, strict=True,
                                         every_n_steps=4, self_influence=candidates == "all", candidates=candidates,
                                         config=ip.InfluenceConfig(update_every=1, min_statistics_steps=1))
            logger = TensorBoardLogger(root, name="tb")
            pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                       limit_val_batches=0, default_root_dir=root, deterministic=True,
                       callbacks=[callback]).fit(module)
            out.update(_artifacts(f"lightning/{candidates}", Path(logger.log_dir)))
            for name, p in module.named_parameters():
                out[f"lightning/{candidates}/params/{name}"] = p.detach().clone()
    return out


def huggingface_callback() -> Results:
    from transformers import Trainer, TrainingArguments

    from infl_plugin.integrations.huggingface import InfluenceTrainerCallback

    out: Results = {}
    for candidates in ("all", "stream"):
        with tempfile.TemporaryDirectory() as root:
            model = _gpt2()
            callback = InfluenceTrainerCallback(
                queries=_token_rows(2, 1), top_k=3, candidates=candidates, progress=False,
                config=ip.InfluenceConfig(module_types=["Conv1D"], update_every=1, min_statistics_steps=1),
                logdir=root)
            args = TrainingArguments(output_dir=root, per_device_train_batch_size=4, num_train_epochs=2,
                                     learning_rate=1e-2, gradient_accumulation_steps=2, report_to="none",
                                     use_cpu=True, save_strategy="steps", save_steps=2, logging_strategy="no",
                                     disable_tqdm=True, seed=0, data_seed=0)
            Trainer(model=model, args=args, train_dataset=_token_rows(16, 0), data_collator=_pad,
                    callbacks=[callback]).train()
            out.update(_artifacts(f"huggingface/{candidates}", Path(root)))
            for name, p in model.named_parameters():
                out[f"huggingface/{candidates}/params/{name}"] = p.detach().clone()
    return out


CASES: dict[str, Callable[[], Results]] = {
    "classifier": classifier, "regressor_tracked": regressor_tracked, "gpt2_post_hoc": gpt2_post_hoc,
    "lightning_callback": lightning_callback, "huggingface_callback": huggingface_callback,
}


def compute() -> Results:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    out: Results = {}
    for name, case in CASES.items():
        part = case()
        print(f"{name}: {len(part)} tensors", flush=True)
        out.update({k: v.detach().cpu() for k, v in part.items() if v is not None})
    return out


def differences(expected: Results, got: Results) -> list[str]:
    """What differs between two result sets: missing or extra keys, dtype, shape or any value."""
    problems = [f"missing: {k}" for k in sorted(expected.keys() - got.keys())]
    problems += [f"extra: {k}" for k in sorted(got.keys() - expected.keys())]
    for key in sorted(expected.keys() & got.keys()):
        a, b = expected[key], got[key]
        same = a.dtype == b.dtype and a.shape == b.shape and (
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                  and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))))
        if not same:
            problems.append(f"differs: {key}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path, help="compute and write the results to this file")
    group.add_argument("--check", type=Path, help="compute and compare with the results in this file")
    args = parser.parse_args()
    results = compute()
    if args.save is not None:
        torch.save(results, args.save)
        print(f"saved {len(results)} tensors to {args.save}")
        return 0
    problems = differences(torch.load(args.check), results)
    for line in problems:
        print(line)
    print(f"{len(results)} tensors: " + ("bit-identical" if not problems else f"{len(problems)} differences"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
