"""InfluenceCallback inside real Lightning fits: mixed precision, TensorBoard/artifact contents, resume,
hook hygiene, configuration, the LightningCLI example (training unchanged, zero learning rate = post-hoc
fit, accumulation = larger batch, exact resume, bad batch skipped, no hook left after a fit:
tests/test_contracts.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import infl_plugin as ip
from conftest import hook_count
from models import feature_data
from infl_plugin.results.artifacts import read_artifacts
from infl_plugin.integrations.lightning import InfluenceCallback, InfluenceCallbackConfig
from infl_plugin.scoring.analysis import signed_log_scores

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning"
N_TRAIN, BATCH = 48, 8  # 6 optimizer steps per epoch


def _data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    return feature_data(N_TRAIN, seed)


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.1, dropout: float = 0.0, batch_size: int = BATCH, shuffle: bool = False,
                 fail_at: int | None = None) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))
        self.lr, self.batch_size, self.shuffle, self.fail_at = lr, batch_size, shuffle, fail_at
        self.train_set, self.val_set = _data()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("training failed on purpose")
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=4)


def _trainer(tmp_path, callbacks=(), epochs: int = 1, logger=False, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, default_root_dir=str(tmp_path), deterministic=True)
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


# these short runs check statistics step by step, eigenvalues from the few steps between attributions included
EVERY_STEP = ip.InfluenceConfig(update_every=1, min_statistics_steps=1)


def _callback(**kwargs) -> InfluenceCallback:
    options = dict(queries="val", num_queries=2, top_k=3, progress=False, strict=True, config=EVERY_STEP,
                   candidates="all")  # every attribution scores the whole training set (see test_candidates.py)
    options.update(kwargs)
    return InfluenceCallback(**options)


# ------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_statistics_match_fp32(tmp_path, precision):
    """The 16-mixed loss scale (2^12 here) is undone: S agrees with fp32 to reduced-precision
    accuracy (relative Frobenius error < 5 %; bf16 has an 8-bit mantissa), not off by 2^24."""
    covariances = []
    for setting in ("32", precision):
        pl.seed_everything(0)
        module = Net(lr=0.0)
        callback = _callback(attribute_at_train_end=False)
        kwargs = {"precision": setting}
        if setting == "16-mixed":  # Lightning gives CPU no GradScaler by default: bring one
            kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))]}
        _trainer(tmp_path, [callback], **kwargs).fit(module)
        statistics = callback.session.tracker.statistics
        covariances.append({name: statistics.covariance(name)[1] for name in statistics.totals})
    for name, reference in covariances[0].items():
        error = (covariances[1][name] - reference).norm() / reference.norm()
        assert error < 0.05, (name, float(error))


# ------------------------------------------------------------------------------------ TensorBoard + artifacts
def test_tensorboard_tags_and_artifacts_agree(tmp_path):
    steps = N_TRAIN // BATCH
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = _callback(every_n_steps=steps, self_influence=True, renderer="image", image_shape=[2, 3])
    _trainer(tmp_path, [callback], epochs=2, logger=logger).fit(Net())
    logdir = Path(logger.log_dir)
    frame = read_artifacts(logdir)
    assert frame["step"].tolist() == [steps, 2 * steps]
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    last = frame.iloc[-1]
    for q in range(2):
        texts = acc.Tensors(f"influence/query_{q:03d}/text_summary")
        assert [t.step for t in texts] == [steps, 2 * steps]
        markdown = texts[-1].tensor_proto.string_val[0].decode()
        rows = [r for r in markdown.splitlines() if re.match(r"\| \d+ \|", r)]
        assert len(rows) == 2 * 3  # k helpful rows then k harmful rows
        logged = [int(r.split("|")[2]) for r in rows]
        assert logged == last["helpful_indices"][q].tolist() + last["harmful_indices"][q].tolist()
        top_1 = int(last["helpful_indices"][q, 0])  # tracked from the attribution where it entered the top
        scalar = acc.Scalars(f"influence_tracked/query_{q:03d}/example_{top_1:05d}")[-1]
        share = 100 * float(last["helpful_scores"][q, 0]) / float(np.abs(last["scores"][q]).sum())
        assert scalar.step == 2 * steps and scalar.value == pytest.approx(share, rel=1e-5)
        assert f"influence_examples/query_{q:03d}" in tags["images"]
        histogram = acc.Histograms(f"influence_score_log10/query_{q:03d}")[-1]
        assert histogram.histogram_value.num == last["num_candidates"] == N_TRAIN
        np.testing.assert_allclose(histogram.histogram_value.sum, signed_log_scores(last["scores"][q]).sum(), rtol=1e-4)
    assert {"influence_plots/score_ccdf", "influence_plots/layer_shares"} <= set(tags["images"])
    assert "influence/self_influence/text_summary" in tags["tensors"]
    assert last["config"] == EVERY_STEP.to_dict()
    assert np.allclose(last["layer_shares"].sum(1), 1.0)


# ------------------------------------------------------------------------------------ resume
def test_resumed_run_continues_the_influence_over_training_series(tmp_path):
    """The reporter's history (each tracked example's series, the previous top-k sets) is saved in
    the checkpoint: resuming after epoch 1 gives the same history as one uninterrupted run."""
    steps = N_TRAIN // BATCH

    def run(epochs, root, ckpt_path=None):
        pl.seed_everything(0)
        callback = _callback(every_n_steps=steps, attribute_at_train_end=False)
        trainer = _trainer(root, [callback, ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True)],
                           epochs=epochs, enable_checkpointing=True, logger=TensorBoardLogger(str(root), name="tb"))
        trainer.fit(Net(), ckpt_path=ckpt_path)
        return callback.session.reporter.state_dict()

    full = run(2, tmp_path / "a")
    first = run(1, tmp_path / "b")
    resumed = run(2, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    series = full["history"]["tracked"]["query_000"]
    assert series and all(e["steps"] == [steps, 2 * steps] for e in series if e["index"] in
                          {f["index"] for f in first["history"]["tracked"]["query_000"]})
    assert resumed == full and first != full


def test_attribution_on_checkpoint_save_during_validation(tmp_path):
    """ModelCheckpoint(monitor=...) saves from on_validation_end, inside torch.inference_mode; the
    saved callback state is the one after that attribution (refreshed eigenbasis)."""

    class WithValidation(Net):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

    callback = _callback(attribute_at_train_end=False)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss", save_top_k=-1)
    trainer = _trainer(tmp_path, [callback, checkpoint], epochs=2, enable_checkpointing=True, limit_val_batches=None)
    trainer.fit(WithValidation())
    frame = read_artifacts(tmp_path)
    assert frame["reason"].tolist() == ["save", "save"] and frame["step"].tolist() == [6, 12]
    saved = torch.load(sorted(checkpoint.best_k_models)[-1], weights_only=False)  # epoch=1-step=12.ckpt
    state = saved["callbacks"][callback.state_key]
    assert state["last_attribution_step"] == 12
    live = callback.state_dict()["tracker"]["statistics"]
    for name, (q_a, q_s) in state["tracker"]["statistics"]["bases"].items():
        assert torch.equal(q_a, live["bases"][name][0]) and torch.equal(q_s, live["bases"][name][1])


def test_attribution_after_each_validation_run_but_not_the_sanity_check(tmp_path):
    """``attribute_on_evaluate``: one attribution per validation run of ``fit`` (reason "evaluate"),
    none for the sanity check before training; the train-end one at the same step is not repeated."""

    class WithValidation(Net):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

    callback = _callback(attribute_on_evaluate=True)
    trainer = _trainer(tmp_path, [callback], epochs=2, limit_val_batches=None, num_sanity_val_steps=2)
    trainer.fit(WithValidation())
    frame = read_artifacts(tmp_path)
    assert frame["reason"].tolist() == ["evaluate", "evaluate"] and frame["step"].tolist() == [6, 12]
    assert callback.session.attributions == 2


# ------------------------------------------------------------------------------------ hooks
def test_no_hook_remains_after_an_exception(tmp_path):
    """Teardown after a failed fit removes the hooks (after a completed fit: tests/test_contracts.py)."""
    failing = Net(fail_at=3)
    before = hook_count(failing)
    callback = _callback(every_n_steps=2)
    with pytest.raises(RuntimeError, match="on purpose"):
        _trainer(tmp_path, [callback]).fit(failing)
    assert hook_count(failing) == before and not callback.session.attached


def test_loss_scale_is_worked_out_only_on_statistics_steps(tmp_path):
    """With ``update_every=3`` over 6 steps, steps 0 and 3 feed the statistics: only they need the
    loss scale (a device sync for token counts and the AMP scale), and they get it; step 0 reads it
    once more for the one-time check that the training loss is a mean."""
    class CountingTask(ip.ClassificationTask):
        calls = 0

        def training_loss_scale(self, batch):
            CountingTask.calls += 1
            return super().training_loss_scale(batch)

    callback = _callback(task=CountingTask(), config=ip.InfluenceConfig(update_every=3), attribute_at_train_end=False)
    _trainer(tmp_path, [callback]).fit(Net())
    assert CountingTask.calls == 2 + 1
    assert callback.session.tracker.updates == 2


def _covariances(callback: InfluenceCallback) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    statistics = callback.session.tracker.statistics
    return {name: statistics.covariance(name) for name in statistics.totals}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sum_reduced_training_loss_is_detected_and_undone(tmp_path, accumulate):
    """A ``training_step`` returning a summed cross-entropy makes every captured gradient B times
    the assumed mean's: the callback compares the loss Lightning backpropagates with the task's
    losses on the first statistics micro-batch, warns once, and its statistics equal those of the
    mean-loss run (lr = 0: same θ; float32 sums, relative 1e-5). ``strict=True`` refuses it."""

    class Summed(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y, reduction="sum")

    mean = _callback(attribute_at_train_end=False)
    pl.seed_everything(0)
    _trainer(tmp_path, [mean], accumulate_grad_batches=accumulate).fit(Net(lr=0.0))
    assert mean.session.loss_reduction == "mean"
    summed = _callback(attribute_at_train_end=False, strict=False)
    pl.seed_everything(0)
    with pytest.warns(UserWarning, match="sum of the per-example losses") as caught:
        _trainer(tmp_path, [summed], accumulate_grad_batches=accumulate).fit(Summed(lr=0.0))
    assert sum("sum of the per-example losses" in str(w.message) for w in caught) == 1
    assert summed.session.loss_reduction == "sum" and summed.session.skipped_batches == 0
    for name, (a, s) in _covariances(mean).items():
        torch.testing.assert_close(_covariances(summed)[name][0], a, rtol=1e-5, atol=0.0)
        torch.testing.assert_close(_covariances(summed)[name][1], s, rtol=1e-5, atol=0.0)
    with pytest.raises(ValueError, match="strict"):
        _trainer(tmp_path, [_callback(attribute_at_train_end=False)]).fit(Summed(lr=0.0))


# ------------------------------------------------------------------------------------ data
class Bare(pl.LightningModule):
    """A module with no ``*_dataloader()`` method: the loaders are given to ``fit``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("validation", [True, False])
def test_val_queries_come_from_the_loader_given_to_fit(tmp_path, validation):
    """``trainer.fit(model, train_loader, val_loader)`` with ``queries="val"``: the queries are the
    validation loader's examples, whether Lightning runs validation (the trainer's public
    ``val_dataloaders``) or not (``limit_val_batches=0``: the loader given to ``fit``)."""
    train_set, val_set = _data()
    callback = _callback(num_queries=3)
    trainer = _trainer(tmp_path, [callback], limit_val_batches=None if validation else 0)
    trainer.fit(Bare(), DataLoader(train_set, batch_size=BATCH), DataLoader(val_set, batch_size=4))
    assert callback.session.source.query_dataset is val_set
    assert callback.session.last_result.num_queries == 3 and callback.session.attributions == 1


def test_test_queries_without_a_test_loader_name_the_split(tmp_path):
    train_set, _ = _data()
    with pytest.raises(ValueError, match=r"queries='test'.*test_dataloader"):
        _trainer(tmp_path, [_callback(queries="test")]).fit(Bare(), DataLoader(train_set, batch_size=BATCH))


# ------------------------------------------------------------------------------------ configuration
def test_invalid_arguments_fail_naming_the_field():
    for kwargs, pattern in (({"top_k": 0}, "top_k"), ({"every_n_steps": -1}, "every_n_steps"),
                            ({"queries": "validation"}, r"queries.*\['train', 'val', 'test'\]"),
                            ({"task": "ranking"}, r"task.*classification"), ({"renderer": "pixels"}, "renderer"),
                            ({"config": {"strategy": "exact"}}, "strategy"), ({"config": {"dampning": 1.0}}, "dampning")):
        with pytest.raises(ValueError, match=pattern):
            InfluenceCallback(**kwargs)


def test_structured_config_mirrors_the_signature_and_loads_the_example_yaml():
    import inspect

    signature = {name: p for name, p in inspect.signature(InfluenceCallback.__init__).parameters.items()
                 if p.kind is not p.VAR_KEYWORD}
    assert set(signature) - {"self"} == set(InfluenceCallbackConfig.__dataclass_fields__)
    for name in ("task", "queries", "name"):
        assert signature[name].default == InfluenceCallbackConfig.__dataclass_fields__[name].default, name

    init_args = OmegaConf.load(EXAMPLE / "config.yaml").trainer.callbacks[0].init_args
    merged = OmegaConf.merge(OmegaConf.structured(InfluenceCallbackConfig), init_args)
    callback = InfluenceCallback.from_config(merged)
    assert callback.config.strategy == "ekfac" and callback.options.every_n_steps == init_args.options.every_n_steps
    assert callback.options == ip.AttributionOptions(**OmegaConf.to_container(merged.options))
    with pytest.raises(Exception, match="top_kk"):
        OmegaConf.merge(OmegaConf.structured(InfluenceCallbackConfig), {"options": {"top_kk": 3}})
    with pytest.raises(ValueError, match="strategy"):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(InfluenceCallbackConfig), {"config": {"strategy": "x"}}))
    with pytest.raises(ValueError, match="top_kk"):
        InfluenceCallback.from_config({"top_kk": 3})
    with pytest.raises(ValueError, match=r"InfluenceCallback\.top_k must be an integer >= 1, got 0"):
        InfluenceCallback.from_config({"options": {"top_k": 0}})


def test_options_are_one_validated_dataclass_shared_by_both_callbacks():
    """Flat keywords, ``options=`` (dataclass, dict, DictConfig) and the deprecated names all end in
    the same `AttributionOptions`; bad values name the callback's field."""
    expected = ip.AttributionOptions(every_n_steps=5, attribute_on_save=False, top_k=3)
    built = [InfluenceCallback(every_n_steps=5, attribute_on_save=False, top_k=3),
             InfluenceCallback(options=expected),
             InfluenceCallback(options={"every_n_steps": 5, "attribute_on_save": False}, top_k=3),
             InfluenceCallback(options=OmegaConf.structured(expected))]
    with pytest.warns(DeprecationWarning, match="on_save is deprecated"):
        built.append(InfluenceCallback(every_n_steps=5, on_save=False, top_k=3))
    assert all(c.options == expected for c in built)
    # LightningCLI passes every keyword, defaults included, next to a nested ``options:`` block
    assert InfluenceCallback(options=expected, every_n_steps=None, top_k=10, strict=False).options == expected
    for kwargs, pattern in (({"top_k": 0}, r"InfluenceCallback\.top_k must be an integer >= 1"),
                            ({"every_n_steps": "10"}, r"InfluenceCallback\.every_n_steps"),
                            ({"attribute_on_save": "yes"}, r"InfluenceCallback\.attribute_on_save must be None, True"),
                            ({"renderer": "png"}, r"InfluenceCallback\.renderer must be one of"),
                            ({"image_shape": [8, 0]}, r"InfluenceCallback\.image_shape"),
                            ({"on_save": True, "attribute_on_save": True}, "deprecated name of attribute_on_save"),
                            ({"top_kk": 3}, r"InfluenceCallback has no field\(s\) \['top_kk'\]")):
        with pytest.raises(ip.ConfigurationError, match=pattern):
            InfluenceCallback(**kwargs)
    with pytest.raises(ip.ConfigurationError, match=r"AttributionOptions\.top_k must be an integer >= 1"):
        ip.AttributionOptions(top_k=0)


# ------------------------------------------------------------------------------------ the example
def _run_example(tmp_path, *overrides: str, config: Path = EXAMPLE / "config.yaml") -> subprocess.CompletedProcess:
    command = [sys.executable, str(EXAMPLE / "train_digits.py"), "fit", "--config", str(config),
               f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_progress_bar=false", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})


@pytest.mark.slow
def test_lightning_cli_runs_the_example_yaml(tmp_path):
    done = _run_example(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=5",
                        "--trainer.limit_val_batches=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"tensorboard --logdir {tmp_path}" in done.stdout
    frame = read_artifacts(tmp_path)
    assert frame["step"].tolist() == [5] and frame["reason"].tolist() == ["train_end"]

    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLE / "config.yaml").read_text().replace("top_k:", "top_kk:"))
    done = _run_example(tmp_path, "--trainer.max_epochs=1", config=bad)
    assert done.returncode != 0 and "top_kk" in done.stderr


@pytest.mark.slow
def test_example_finds_the_planted_mislabeled_images(tmp_path):
    """The full Quickstart run: most planted label flips are in the logged self-influence table
    or among the logged most harmful examples of the queries (chance level: ~1 of 8)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        from digits import DigitsClassifier, DigitsDataModule
    finally:
        sys.path.remove(str(EXAMPLE))
    yaml = OmegaConf.load(EXAMPLE / "config.yaml")
    callback = InfluenceCallback.from_config(
        OmegaConf.merge(OmegaConf.structured(InfluenceCallbackConfig), yaml.trainer.callbacks[0].init_args),
        progress=False)
    pl.seed_everything(yaml.seed_everything)
    data = DigitsDataModule(**yaml.data)
    logger = TensorBoardLogger(str(tmp_path), name="digits")
    trainer = pl.Trainer(max_epochs=yaml.trainer.max_epochs, accelerator="cpu", devices=1, logger=logger,
                         callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(DigitsClassifier(**yaml.model), datamodule=data)
    last = read_artifacts(logger.log_dir).iloc[-1]
    assert last["step"] == trainer.global_step
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    markdown = acc.Tensors("influence/self_influence/text_summary")[-1].tensor_proto.string_val[0].decode()
    self_table = {int(r.split("|")[2]) for r in markdown.splitlines() if re.match(r"\| \d+ \|", r)}
    harmful = set(np.asarray(last["harmful_indices"]).reshape(-1).tolist())
    planted = set(data.mislabeled)
    assert len(planted & self_table) >= len(planted) // 2, (sorted(planted), sorted(self_table))
    assert len(planted & (self_table | harmful)) >= 3 * len(planted) // 4


def test_resume_accepts_changed_scoring_fields_and_refuses_statistics_fields_by_name(tmp_path):
    """A resumed fit may change ``damping`` / ``query_rank`` (the statistics continue as in one run);
    a change of a field that shapes the saved statistics raises, naming it."""
    steps = N_TRAIN // BATCH
    base = dict(fisher="sampled", update_every=1)

    def run(epochs, root, config, ckpt_path=None):
        pl.seed_everything(0)
        callback = _callback(every_n_steps=steps, config=ip.InfluenceConfig(**{**base, **config}))
        trainer = _trainer(root, [callback, ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True)],
                           epochs=epochs, enable_checkpointing=True)
        trainer.fit(Net(), ckpt_path=ckpt_path)
        return callback

    full = run(2, tmp_path / "a", {})
    run(1, tmp_path / "b", {})
    last = str(tmp_path / "b" / "ckpt" / "last.ckpt")
    resumed = run(2, tmp_path / "c", dict(damping=0.5, query_rank=2), ckpt_path=last)
    assert resumed.session.config.damping == 0.5 and resumed.session.attributions == full.session.attributions
    state_a, state_c = full.state_dict(), resumed.state_dict()
    for name, layer in state_a["tracker"]["statistics"]["layers"].items():
        for key, value in layer.items():
            other = state_c["tracker"]["statistics"]["layers"][name][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (name, key)
    with pytest.raises(ValueError, match=r"fisher='sampled' \(now 'empirical'\)"):
        run(2, tmp_path / "d", dict(fisher="empirical"), ckpt_path=last)
