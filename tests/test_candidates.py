"""Candidate choice (``candidates="stream" | "all" | "tfidf" | "random"``) and the dataset indices of
training batches, in both callbacks on tiny models.

Ground truths: the dataset rows themselves (the recorded indices must point at the rows actually
trained on, with shuffling and gradient accumulation), training without the callback (bit for
bit), a count of the model forwards that see training rows ("stream" adds none), and hand-made
texts whose word overlap decides the TF-IDF candidates.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

import infl_plugin as ip
from hf_models import byte_tokenizer
from models import feature_data
from infl_plugin.results.artifacts import read_artifacts
from infl_plugin.run.candidates import TfidfIndex, select_candidates
from infl_plugin.run.indices import BatchIndexRecorder
from infl_plugin.integrations.huggingface import InfluenceTrainerCallback
from infl_plugin.integrations.lightning import InfluenceCallback, InfluenceCallbackConfig

hf_logging.set_verbosity_error()
pytestmark = [pytest.mark.filterwarnings("ignore:infl_plugin. the default layer selection"),
              pytest.mark.filterwarnings("ignore:.*TensorBoardLogger"),
              pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*no `validation_step`")]

N_TRAIN, BATCH = 48, 8  # 6 micro-batches per epoch


# --------------------------------------------------------------------------------- the recorder
class Rows(torch.utils.data.Dataset):
    """Item i is ``tensor(i)``: a batch shows which indices it holds."""

    def __len__(self) -> int:
        return 30

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(4))


@pytest.mark.parametrize("workers", [0, 2])
def test_recorder_gives_each_batch_its_indices_without_changing_the_order(workers):
    """Shuffled, with a final short batch, with worker processes (indices prefetched ahead)."""
    def epochs(recorder: BatchIndexRecorder | None) -> list[list[int]]:
        torch.manual_seed(0)
        loader = DataLoader(Rows(), batch_size=8, shuffle=True, num_workers=workers)
        if recorder is not None:
            assert recorder.install(loader)
        seen = []
        for _ in range(2):
            for batch in loader:
                if recorder is not None:
                    assert recorder.pop(batch.shape[0]).tolist() == batch.tolist()
                seen.append(batch.tolist())
        if recorder is not None:
            recorder.remove()
            assert type(loader.batch_sampler) is torch.utils.data.BatchSampler
        return seen

    assert epochs(BatchIndexRecorder()) == epochs(None)  # same shuffles: no random number drawn


def test_recorder_reports_unknown_indices():
    recorder = BatchIndexRecorder()
    loader = DataLoader(Rows(), batch_size=8)
    iterator = iter(loader)
    next(iterator)
    assert recorder.install(loader)
    assert recorder.pop(8) is None  # an iteration that began before the recorder
    batches = iter(loader)
    next(batches)
    with pytest.warns(UserWarning, match="indices"):
        assert recorder.pop(5) is None  # a batch of another size: misaligned
    next(batches)
    assert recorder.pop(8) is None  # the rest of that iteration stays unknown
    recorder.skip_next_iteration()
    next(iter(loader))
    assert recorder.pop(8) is None
    assert [recorder.pop(len(b)).tolist() for b in loader] == [b.tolist() for b in loader]
    assert not BatchIndexRecorder().install(DataLoader(Stream(), batch_size=2))
    assert not BatchIndexRecorder().install([torch.zeros(2)])


# --------------------------------------------------------------------------------- TF-IDF
def test_tfidf_picks_the_lexically_overlapping_examples():
    corpus = ["the cat sat on the mat", "dogs chase cats in the park", "stock markets fell sharply today",
              "a recipe for tomato soup", "the mat was red"]
    top = TfidfIndex(corpus).top(["where is the mat", "markets and stocks today"], 2)
    assert set(top[0].tolist()) == {0, 4} and top[1, 0].item() == 2
    ids = [[5, 6, 7], [8, 9, 10], [5, 6, 11]]  # token ids as words
    assert TfidfIndex([[str(t) for t in d] for d in ids]).top([["5", "6"]], 2)[0].tolist() == [0, 2]
    chosen = select_candidates("tfidf", 5, 1, documents=lambda: corpus, query_documents=lambda: ["tomato soup", "red mat"])
    assert chosen == [3, 4]
    assert select_candidates("random", 40, 7, seed=3) == select_candidates("random", 40, 7, seed=3)
    assert len(set(select_candidates("random", 40, 7, seed=3))) == 7
    assert select_candidates("all", 40) is None and select_candidates("stream", 40, 4) == [0, 13, 26, 39]


# --------------------------------------------------------------------------------- Lightning
def _data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    return feature_data(N_TRAIN, seed)


class Net(pl.LightningModule):
    """MLP on 6 features, shuffled training loader, dropout: any stray random draw changes training."""

    def __init__(self, dropout: float = 0.0, workers: int = 0) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))
        self.train_set, self.val_set = _data()
        self.workers = workers

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=BATCH, shuffle=True, num_workers=self.workers,
                          persistent_workers=self.workers > 0)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=4)


class Spy(Callback):
    """Records, per training batch, the indices the influence callback assigned and the inputs."""

    def __init__(self, callback: InfluenceCallback) -> None:
        self.callback, self.batches = callback, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((self.callback._batch_indices, batch[0].clone(), trainer.global_step))


def _fit(tmp_path, callbacks=(), epochs: int = 3, accumulate: int = 1, dropout: float = 0.0, workers: int = 0) -> Net:
    pl.seed_everything(0)
    module = Net(dropout, workers)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(tmp_path), deterministic=True,
                         accumulate_grad_batches=accumulate, callbacks=list(callbacks))
    trainer.fit(module)
    return module


def _callback(**kwargs) -> InfluenceCallback:
    options = dict(queries="val", num_queries=2, top_k=3, progress=False, strict=True,
                   config=ip.InfluenceConfig(update_every=1, stream_refresh_every=2))
    options.update(kwargs)
    return InfluenceCallback(**options)


@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_stream_indices_match_the_trained_rows_and_training_is_unchanged(tmp_path, workers):
    """The first epoch's iterator predates the callback: a single-process loader has drawn nothing
    from it yet, so its indices are recorded too; worker processes drew some already, so streaming
    starts with the second epoch."""
    plain = _fit(tmp_path, dropout=0.3, accumulate=2, workers=workers)
    callback = _callback(candidates="stream", every_n_steps=4)
    spy = Spy(callback)
    module = _fit(tmp_path, [callback, spy], dropout=0.3, accumulate=2, workers=workers)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), module.parameters()))
    known = [(indices, x) for indices, x, _ in spy.batches if indices is not None]
    assert len(spy.batches) == 18 and len(known) == (18 if workers == 0 else 12)
    for indices, x in known:
        assert torch.equal(module.train_set.tensors[0][indices], x)
    if workers:
        assert all(indices is None for indices, _, _ in spy.batches[:6])
    assert callback.session.unindexed_batches == 0  # streaming only where the indices are known: nothing wasted
    loader = module.trainer.train_dataloader
    assert type(loader.batch_sampler) is torch.utils.data.BatchSampler  # removed
    assert type(loader.batch_sampler.sampler) is torch.utils.data.RandomSampler


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle drawn from the epoch number (``set_epoch``, as Lightning calls it): the same order
    in a resumed run, which Lightning's checkpoints (no global RNG state) do not give otherwise."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class ResumableNet(Net):
    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=BATCH, sampler=EpochShuffle(len(self.train_set)))


def test_lightning_stream_resumes_exactly(tmp_path):
    """Killed after epoch 1 (6 steps) and resumed from its checkpoint: the attributions at steps 9
    and 18 equal the uninterrupted run's. The resumed fit streams its first epoch (the queries
    and sums restored, the indices recorded from the iterator Lightning built before the
    callbacks ran). Same operations in the same order: scores within float64 reassociation noise
    (rtol 1e-9), preconditioning counts and candidates exactly."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    config = ip.InfluenceConfig(strategy="ekfac", update_every=1, stream_refresh_every=2, min_statistics_steps=4,
                                accumulation_dtype="float64")

    def run(root, epochs, ckpt_path=None) -> list[dict]:
        pl.seed_everything(0)
        callback = _callback(candidates="stream", every_n_steps=9, attribute_at_train_end=False, config=config)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             default_root_dir=str(root), deterministic=True,
                             callbacks=[callback, ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True)])
        module = ResumableNet()
        trainer.fit(module, ckpt_path=ckpt_path)
        return read_artifacts(root, as_dataframe=False), list(module.parameters())

    whole, trained = run(tmp_path / "whole", 3)
    assert run(tmp_path / "first", 1)[0] == []
    resumed, retrained = run(tmp_path / "resumed", 3, ckpt_path=str(tmp_path / "first" / "ckpt" / "last.ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(trained, retrained))  # the same training: a valid comparison
    assert [r["step"] for r in whole] == [r["step"] for r in resumed] == [9, 18]
    assert "ekfac" in whole[1]["extra"]["streamed_batches"]
    for got, expected in zip(resumed, whole):
        assert got["extra"]["streamed_batches"] == expected["extra"]["streamed_batches"]
        assert got["candidate_indices"].tolist() == expected["candidate_indices"].tolist()
        torch.testing.assert_close(torch.as_tensor(got["scores"]), torch.as_tensor(expected["scores"]), rtol=1e-9,
                                   atol=0)


class ScoringForwards(Callback):
    """Counts the eval-mode forwards with gradients (a scoring pass) that see training rows."""

    def __init__(self) -> None:
        self.count = 0
        self.rows = _data()[0].tensors[0]

    def on_fit_start(self, trainer, pl_module):
        def hook(module, args):
            if not module.training and torch.is_grad_enabled():
                self.count += int((args[0][:, None] == self.rows[None]).all(-1).any())

        pl_module.model.register_forward_pre_hook(hook)


def test_lightning_stream_scores_the_examples_since_the_previous_attribution_without_a_pass(tmp_path):
    """Attributions at steps 9 and 18 (epochs 2 and 3; every epoch's indices are known): no
    scoring pass over training rows at all, while ``"all"`` runs one per attribution. The first
    step streams before any statistics (plain gradients); K-FAC queries from step 1 supersede it."""
    config = ip.InfluenceConfig(strategy="kfac", update_every=1, stream_refresh_every=2)
    counts = {}
    for mode in ("all", "stream"):
        callback = _callback(candidates=mode, every_n_steps=9, config=config)
        spy, forwards = Spy(callback), ScoringForwards()
        _fit(tmp_path / mode, [callback, spy, forwards])
        counts[mode] = forwards.count
    assert counts == {"all": 2 * N_TRAIN // BATCH, "stream": 0}  # candidates in batches of the training size
    tmp_path = tmp_path / "stream"
    results = read_artifacts(tmp_path, as_dataframe=False)
    assert [r["step"] for r in results] == [9, 18] and {r["candidate_mode"] for r in results} == {"stream"}
    assert [r["extra"]["streamed_superseded_batches"] for r in results] == [{"identity": 1}, {}]
    for result, window in zip(results, ((1, 9), (9, 18))):
        seen = {i for indices, _, step in spy.batches if indices is not None and window[0] <= step < window[1]
                for i in indices.tolist()}
        assert sorted(seen) == result["candidate_indices"].tolist()
        assert result["self_scores"] is None and result["extra"]["candidates_requested"] == "stream"
        # the per-layer view, from the streamed per-layer Σ|score|: the tracked layers, shares summing to 1
        names = read_artifacts(tmp_path.parent / "all", as_dataframe=False)[0]["layer_names"]
        assert names and result["layer_names"] == names
        shares = torch.as_tensor(result["layer_shares"])
        assert shares.shape == (result["scores"].shape[0], len(names)) and (shares >= 0).all()
        torch.testing.assert_close(shares.sum(1).double(), torch.ones(shares.shape[0], dtype=torch.float64),
                                   rtol=0, atol=1e-5)


def test_lightning_all_random_and_tfidf_modes(tmp_path):
    for mode, extra in (("all", {}), ("random", {"num_candidates": 10})):
        callback = _callback(candidates=mode, every_n_steps=6, **extra)
        _fit(tmp_path / mode, [callback], epochs=2)
        results = read_artifacts(tmp_path / mode, as_dataframe=False)
        assert len(results) == 2 and {r["candidate_mode"] for r in results} == {mode}
        expected = list(range(N_TRAIN)) if mode == "all" else select_candidates("random", N_TRAIN, 10, seed=0)
        for result in results:
            assert result["candidate_indices"].tolist() == expected  # the same subset at every attribution
    with pytest.raises(ValueError, match="candidates='tfidf' needs text"):  # float features: no text to compare
        _fit(tmp_path / "tfidf", [_callback(candidates="tfidf", num_candidates=3, every_n_steps=6)], epochs=1)


class Bag(pl.LightningModule):
    """Token ids ``[B, 4]`` → mean embedding → Linear: token data for TF-IDF on token-id words."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.EmbeddingBag(40, 8), nn.Linear(8, 3)
        ids = torch.stack([torch.arange(i, i + 4) % 40 for i in range(24)])  # example i: tokens i..i+3
        self.train_set = TensorDataset(ids, torch.arange(24) % 3)
        self.val_set = TensorDataset(ids[[5, 17]], torch.tensor([2, 2]))  # copies of examples 5 and 17

    def forward(self, ids):
        return self.head(self.embed(ids))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=2)


def test_lightning_tfidf_scores_each_querys_lexical_neighbours(tmp_path):
    """Query 5 shares 3 of its 4 tokens with examples 4 and 6, query 17 with 16 and 18."""
    callback = _callback(candidates="tfidf", num_candidates=3, every_n_steps=3)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[callback])
    trainer.fit(Bag())
    (result,) = read_artifacts(tmp_path, as_dataframe=False)
    assert result["candidate_mode"] == "tfidf" and result["candidate_indices"].tolist() == [4, 5, 6, 16, 17, 18]


def test_lightning_candidate_options_are_validated_and_configurable():
    for kwargs, field in (({"candidates": "everything"}, "InfluenceCallback.candidates"),
                          ({"candidates": "random"}, "InfluenceCallback.num_candidates"),
                          ({"candidates": "tfidf", "num_candidates": 0}, "InfluenceCallback.num_candidates"),
                          ({"num_candidates": 3, "max_candidates": 3}, "deprecated name of num_candidates")):
        with pytest.raises(ValueError, match=field):
            InfluenceCallback(**kwargs)
    with pytest.warns(DeprecationWarning, match="num_candidates"):
        assert InfluenceCallback(candidates="all", max_candidates=5).options.num_candidates == 5
    assert InfluenceCallback().options.candidates == "stream"
    callback = InfluenceCallback.from_config(
        InfluenceCallbackConfig(options=ip.AttributionOptions(candidates="random", num_candidates=4)))
    assert (callback.options.candidates, callback.options.num_candidates) == ("random", 4)
    assert isinstance(InfluenceCallback(candidates=_data()[0]).options.candidates, TensorDataset)


# --------------------------------------------------------------------------------- Hugging Face
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()


TOKENIZER = byte_tokenizer()
PAD = TOKENIZER.pad_token_id


def _texts(n: int, offset: int = 0) -> list[str]:
    """Text i holds words i, i + 1, i + 2 (of 26, cyclically): texts i ± 1 share two of its words,
    texts i ± 2 one, all others none."""
    return [" ".join(WORDS[(i + offset + k) % len(WORDS)] for k in range(3)) for i in range(n)]


def _examples(texts: list[str]) -> list[dict]:
    return [{"input_ids": TOKENIZER(t)["input_ids"][:24]} for t in texts]


def _collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), PAD)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for n, e in enumerate(examples):
        ids[n, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[n, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(TOKENIZER), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0,
                                      bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD))


def _train(tmp_path, items, callback=None, epochs: int = 2, **overrides) -> GPT2LMHeadModel:
    model = _gpt2()
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    num_train_epochs=epochs, learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                    logging_strategy="no", disable_tqdm=True, seed=0, data_seed=0, per_device_eval_batch_size=8)
    settings.update(overrides)
    Trainer(model=model, args=TrainingArguments(**settings), train_dataset=items, data_collator=_collate,
            processing_class=TOKENIZER, callbacks=[callback] if callback is not None else []).train()
    return model


def _hf_callback(**kwargs) -> InfluenceTrainerCallback:
    options = dict(queries=_examples(_texts(2, offset=40)), strict=True, token_sequences=0, top_k=3,
                   config=ip.InfluenceConfig(strategy="kfac", update_every=1, stream_refresh_every=2))
    options.update(kwargs)
    return InfluenceTrainerCallback(**options)


class Recorded(TrainerCallback):
    """Wraps the session's ``after_backward`` (after it exists) to see each micro-batch with its indices."""

    def __init__(self, callback: InfluenceTrainerCallback) -> None:
        self.callback, self.batches = callback, []

    def on_train_begin(self, args, state, control, **kwargs):
        session = self.callback.session
        commit = session.after_backward

        def after_backward(batch, *args, **kwargs):
            self.batches.append((kwargs.get("indices"), batch["input_ids"].clone()))
            return commit(batch, *args, **kwargs)

        session.after_backward = after_backward


def test_huggingface_stream_indices_match_training_unchanged_and_no_candidate_pass(tmp_path):
    """Shuffled (the Trainer's RandomSampler), 2 micro-batches per step, dropout, 2 epochs."""
    items = _examples(_texts(16))
    plain = _train(tmp_path / "plain", items)
    callback = _hf_callback(candidates="stream", every_n_steps=2, logdir=str(tmp_path / "tb"))
    recorded = Recorded(callback)
    forwards = []
    model = _gpt2()
    model.register_forward_pre_hook(lambda m, args, kwargs: forwards.append(kwargs["input_ids"].shape[0] > 2),
                                    with_kwargs=True)  # queries come in one batch of 2
    settings = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    num_train_epochs=2, learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                    logging_strategy="no", disable_tqdm=True, seed=0, data_seed=0, per_device_eval_batch_size=8)
    trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=items, data_collator=_collate,
                      processing_class=TOKENIZER, callbacks=[callback])
    trainer.add_callback(recorded)
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
    assert len(recorded.batches) == 8 and sum(forwards) == 8  # training forwards only
    order = []
    for indices, ids in recorded.batches:
        for row, i in zip(ids, indices.tolist()):
            reference = torch.tensor(items[i]["input_ids"])
            assert torch.equal(row[:len(reference)], reference)
            order.append(i)
    assert sorted(order) == sorted(list(range(16)) * 2) and order[:16] != list(range(16))  # shuffled
    results = read_artifacts(tmp_path / "tb", as_dataframe=False)
    assert [r["step"] for r in results] == [2, 4] and {r["candidate_mode"] for r in results} == {"stream"}
    # the first optimizer step (2 micro-batches of 4) streams before any statistics, with plain
    # gradients; the K-FAC queries of step 2 on supersede it
    assert results[0]["extra"]["streamed_superseded_batches"] == {"identity": 2}
    assert results[0]["candidate_indices"].tolist() == sorted(order[8:16])
    assert results[0]["extra"]["streamed_visits"] == 8


def test_huggingface_tfidf_and_random_candidates(tmp_path):
    texts = _texts(26)
    items = _examples(texts)
    queries = [texts[3], texts[20]]  # top 3 by word overlap: 3 (all words), 2 and 4 (two); 20, 19 and 21
    callback = _hf_callback(queries=_examples(queries), candidates="tfidf", num_candidates=3, every_n_steps=2,
                            logdir=str(tmp_path / "tfidf"))
    _train(tmp_path / "a", items, callback, epochs=1)
    results = read_artifacts(tmp_path / "tfidf", as_dataframe=False)
    assert {r["candidate_mode"] for r in results} == {"tfidf"}
    chosen = set(results[0]["candidate_indices"].tolist())
    assert chosen == {2, 3, 4, 19, 20, 21}
    callback = _hf_callback(candidates="random", num_candidates=5, every_n_steps=1, logdir=str(tmp_path / "random"))
    _train(tmp_path / "b", items, callback, epochs=1)
    results = read_artifacts(tmp_path / "random", as_dataframe=False)
    assert len(results) >= 2 and {r["candidate_mode"] for r in results} == {"random"}
    assert all(r["candidate_indices"].tolist() == select_candidates("random", 26, 5, seed=0) for r in results)


def test_huggingface_candidate_options_are_validated():
    for kwargs, field in (({"candidates": "best"}, "InfluenceTrainerCallback.candidates"),
                          ({"candidates": "tfidf"}, "InfluenceTrainerCallback.num_candidates"),
                          ({"candidates": "random", "num_candidates": -1}, "InfluenceTrainerCallback.num_candidates")):
        with pytest.raises(ValueError, match=field):
            InfluenceTrainerCallback(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert InfluenceTrainerCallback().options.candidates == "stream"


@pytest.mark.parametrize("resume_at", [3, 9])
def test_huggingface_stream_resumes_exactly(tmp_path, resume_at):
    """Killed after a save and resumed: every later attribution equals the uninterrupted run's.

    16 examples in batches of 2 (8 steps an epoch), 12 steps, saves every 3, attributions at 6 and
    12, EK-FAC queries refreshed every 4 steps. Resumed at 3: streamed sums so far, identity-scored
    queries and a resumed epoch that skips its first 3 batches. Resumed at 9: queries
    preconditioned with the step-6 attribution's factors (the tracker's own eigenvalues are not
    ready yet), in the second epoch. Same operations in the same order: scores within float64
    reassociation noise (rtol 1e-9), the preconditioning counts and candidates exactly."""
    import shutil

    items = _examples(_texts(16))
    config = ip.InfluenceConfig(strategy="ekfac", update_every=1, stream_refresh_every=4, min_statistics_steps=4,
                                accumulation_dtype="float64")

    def run(out, resume=None) -> list[dict]:
        callback = _hf_callback(candidates="stream", every_n_steps=6, config=config, logdir=str(out / "tb"))
        settings = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=12, learning_rate=1e-2,
                        report_to="none", use_cpu=True, save_strategy="steps", save_steps=3, logging_strategy="no",
                        disable_tqdm=True, seed=0, data_seed=0, per_device_eval_batch_size=8)
        Trainer(model=_gpt2(), args=TrainingArguments(**settings), train_dataset=items, data_collator=_collate,
                processing_class=TOKENIZER, callbacks=[callback]).train(resume_from_checkpoint=resume)
        return read_artifacts(out / "tb", as_dataframe=False)

    whole = run(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / f"checkpoint-{resume_at}", tmp_path / "resumed" / f"checkpoint-{resume_at}")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / f"checkpoint-{resume_at}"))
    later = [r for r in whole if r["step"] > resume_at]
    assert [r["step"] for r in whole] == [6, 12] and [r["step"] for r in resumed] == [r["step"] for r in later]
    batches = [r["extra"]["streamed_batches"] for r in whole]
    assert "ekfac" in batches[1] and sum(batches[1].values()) == 6
    for got, expected in zip(resumed, later):
        assert got["candidate_mode"] == expected["candidate_mode"] == "stream"
        assert got["extra"]["streamed_batches"] == expected["extra"]["streamed_batches"]
        assert got["extra"]["streamed_visits"] == expected["extra"]["streamed_visits"]
        assert got["candidate_indices"].tolist() == expected["candidate_indices"].tolist()
        torch.testing.assert_close(torch.as_tensor(got["scores"]), torch.as_tensor(expected["scores"]), rtol=1e-9,
                                   atol=0)
