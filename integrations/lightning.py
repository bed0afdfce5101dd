"""PyTorch Lightning adapter: `InfluenceCallback` translates Trainer events into `InfluenceSession` calls.

Add it to a Trainer (or to ``trainer.callbacks`` of a LightningCLI YAML with ``class_path:
infl_plugin.integrations.lightning.InfluenceCallback``), train as usual, then open TensorBoard:
the ``influence*`` sections hold, per scheduled attribution, which training examples helped and
hurt each held-out query (see `infl_plugin.report.tensorboard` for every tag).

Event mapping (all math lives in the core):

* ``setup("fit")``: build the session, hooks on; ``teardown`` / ``on_exception``: hooks off.
* ``on_train_start``: resolve queries (a Dataset, or a split: the trainer's training or validation
  loader, else the datamodule's/module's ``*_dataloader()``) and candidates (default: the training
  dataset in fixed order, with the training loader's collate function).
* ``on_train_batch_start``: announce the micro-batch; ``on_before_backward`` (first statistics
  micro-batch): check the loss is the task's mean, not a sum (`InfluenceSession.check_training_loss`);
  ``on_after_backward``: commit its statistics
  with ``grad_scale = task scale / accumulate_grad_batches × AMP loss scale``; whether it ends an
  optimizer step follows Lightning's accumulation (including the epoch's last batch).
* ``candidates="stream"``: each training batch's dataset indices come from the training loader's
  batch sampler (`infl_plugin.run.indices.BatchIndexRecorder`, installed at ``on_train_start``, moved to
  a reloaded loader at ``on_train_epoch_start``, removed at ``teardown``); Lightning builds the first
  epoch's iterator before any callback runs, so streaming starts with the second epoch.
* ``on_train_batch_end`` after an optimizer step: attribution every ``every_n_steps``;
  ``on_save_checkpoint``: attribution on save (then the saved state is refreshed, so a resumed run
  continues exactly); ``on_validation_end`` (``attribute_on_evaluate``): after each validation run
  of ``fit``; ``on_train_end``: attribution at the end. At most one attribution per step.
* ``state_dict`` / ``load_state_dict``: statistics, eigenbasis, counters (like ``WeightAveraging``).

What to attribute and when is an `infl_plugin.config.options.AttributionOptions`, shared with the Hugging
Face callback (``options:`` in a LightningCLI YAML, or its fields as keywords). Hydra / OmegaConf
users: `InfluenceCallbackConfig` holds the callback's arguments as a structured config;
`InfluenceCallback.from_config` builds the callback from it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from infl_plugin.config.influence import InfluenceConfig, plain_fields, reject_unknown_fields, resolve_config
from infl_plugin.run.data import build_attribution_data
from infl_plugin.distributed import deepspeed_refusal
from infl_plugin.errors import ConfigurationError
from infl_plugin.run.indices import BatchIndexRecorder
from infl_plugin.config.options import AttributionOptions, resolve_options
from infl_plugin.report.tensorboard import TensorBoardReporter
from infl_plugin.run.schedule import Reason
from infl_plugin.run.session import InfluenceSession
from infl_plugin.tasks import CausalLMTask, ClassificationTask, RegressionTask, Task

TASKS = {"classification": ClassificationTask, "regression": RegressionTask, "causal_lm": CausalLMTask}
SPLITS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}


@dataclass
class InfluenceCallbackConfig:
    """Structured config of the callback (``OmegaConf.structured(InfluenceCallbackConfig)``).

    Datasets and custom tasks are objects, so here ``queries`` and ``task`` are names; build with
    `InfluenceCallback.from_config`.
    """

    config: InfluenceConfig = field(default_factory=InfluenceConfig)
    task: str = "classification"
    queries: str = "val"
    options: AttributionOptions = field(default_factory=AttributionOptions)
    name: str = "influence"


_CONFIG_FIELDS = frozenset(f.name for f in fields(InfluenceCallbackConfig))


class InfluenceCallback(Callback):
    """Tracks EK-FAC statistics during ``fit``, attributes on a schedule, reports to TensorBoard.

    Args:
        config: the `InfluenceConfig` (strategy, Fisher, layers, damping, …) or a mapping of its fields.
        task: ``"classification"``, ``"regression"``, ``"causal_lm"`` or a `Task` instance; it must
            match how ``training_step`` computes its loss (a batch mean for classification).
        queries: held-out examples to explain: a split name (``"val"``: the trainer's validation
            loader, also one given as ``fit(model, train_loader, val_loader)``; ``"train"``: the
            training loader; ``"test"``: the datamodule's/module's ``test_dataloader()``) or a
            Dataset; ``options.num_queries`` evenly spaced items are used.
        options: the `AttributionOptions` shared with the Hugging Face callback (schedule,
            candidates, top-k, rendering, strictness), or a mapping of its fields.
        name: distinguishes several instances in a checkpoint (``state_key``).
        **overrides: single `AttributionOptions` fields (``every_n_steps=100``, ``candidates="all"``).

    Invalid values raise `ConfigurationError` (a ``ValueError``) naming the field, at construction.
    ``attribute_on_evaluate`` attributes after each validation run during ``fit`` (not the sanity check).
    """

    def __init__(
        self,
        config: Union[InfluenceConfig, dict, None] = None,
        task: Union[str, Task] = "classification",
        queries: Union[str, Dataset] = "val",
        options: Union[AttributionOptions, dict, None] = None,
        name: str = "influence",
        **overrides: Any,
    ) -> None:
        self.config = resolve_config("InfluenceCallback", config)
        self.task = _task(task)
        if isinstance(queries, str) and queries not in SPLITS:
            raise ConfigurationError(f"InfluenceCallback.queries must be a Dataset or one of {list(SPLITS)}, "
                                     f"got {queries!r}")
        self.queries = queries
        self.options = resolve_options("InfluenceCallback", options, **overrides)
        self.name = name
        self.indices = BatchIndexRecorder()
        self.session: Optional[InfluenceSession] = None
        self._batch_indices: Any = None
        self._stream_from_epoch = 0
        self._trainer: Optional[pl.Trainer] = None
        self._batch: Any = None
        self._stepped_at: Optional[int] = None
        self._pending_state: Optional[dict] = None

    @classmethod
    def from_config(cls, cfg: Any, **objects: Any) -> "InfluenceCallback":
        """Build from an `InfluenceCallbackConfig`, a DictConfig or a mapping of its fields.

        Unknown fields raise `ConfigurationError` naming them; ``objects`` override fields or
        single options with objects (``queries=dataset``, ``task=MyTask()``, ``candidates=dataset``).
        """
        values = plain_fields(cfg)
        reject_unknown_fields(InfluenceCallbackConfig, values, owner="InfluenceCallback")
        own = {k: v for k, v in objects.items() if k in _CONFIG_FIELDS}
        return cls(**{**values, **own}, **{k: v for k, v in objects.items() if k not in own})

    @property
    def state_key(self) -> str:
        return f"InfluenceCallback[{self.name}]"

    # ----------------------------------------------------------------------------- lifecycle
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != TrainerFn.FITTING.value:
            return
        if "DeepSpeed" in type(trainer.strategy).__name__:
            raise ConfigurationError(deepspeed_refusal("InfluenceCallback", f"strategy={type(trainer.strategy).__name__}"))
        self._trainer = trainer
        self._stepped_at = None
        if self.session is not None and self.session.model is not pl_module:  # a new fit on another module
            self.session.close()
            self.session = None
        if self.session is None:
            self.session = InfluenceSession(pl_module, self.task, self.config, self.options,
                                            is_main=trainer.is_global_zero, log=rank_zero_info)
        self.session.attach()
        if self._pending_state is not None:
            self.session.load_state_dict(self._pending_state, rank=trainer.global_rank)
            self._pending_state = None
        self._connect_logger(trainer)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.close()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Every hook off (layer hooks, the batch-index recorder); safe to call twice."""
        self.indices.remove()
        if self.session is not None:
            self.session.close()

    def _connect_logger(self, trainer: "pl.Trainer") -> None:
        """Reporter and artifact directory on the main process.

        ``trainer.log_dir`` is a broadcast under DDP: it is read on every rank, before the branch.
        """
        log_dir = trainer.log_dir
        if not trainer.is_global_zero:
            return
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is not None:
            self.session.reporter = TensorBoardReporter(tensorboard.experiment, self.options.renderer,
                                                        self.options.image_shape)
            self.session.artifact_dir = tensorboard.log_dir
        else:
            warnings.warn("InfluenceCallback: the trainer has no TensorBoardLogger; attributions are written as "
                          "artifacts only", stacklevel=2)
            self.session.artifact_dir = log_dir or trainer.default_root_dir

    # ----------------------------------------------------------------------------- data
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        train = trainer.train_dataloader
        if not isinstance(train, DataLoader):
            raise ValueError("InfluenceCallback needs a single training DataLoader to read candidates from; "
                             f"got {type(train).__name__}")
        if isinstance(self.queries, str):
            query_loader = self._split_loader(trainer, pl_module, self.queries)
            queries, query_collate = query_loader.dataset, query_loader.collate_fn
        else:
            queries, query_collate = self.queries, train.collate_fn
        if self.options.candidate_mode == "stream":
            self._start_indices(trainer, train)
        data = build_attribution_data(self.options, queries, train.dataset,
                                      batch_size=self.options.batch_size or train.batch_size or 32,
                                      collate_fn=train.collate_fn, query_collate_fn=query_collate, seed=self.config.seed)
        self.session.set_data(data, stream=False)

    def _split_loader(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", split: str) -> DataLoader:
        """The loader of ``split`` as the trainer has it: the training loader; the validation loader
        (also when given as ``fit(model, train_loader, val_loader)``); else the datamodule's or
        module's ``*_dataloader()`` (the only source of a test split during ``fit``)."""
        loader: Any = None
        if split == "train":
            loader = trainer.train_dataloader
        elif split == "val":
            loader = trainer.val_dataloaders if trainer.val_dataloaders is not None else _fit_val_loader(trainer)
        if loader is None:
            source = trainer.datamodule if trainer.datamodule is not None else pl_module
            try:
                loader = getattr(source, SPLITS[split])()
            except Exception as error:
                raise ValueError(f"InfluenceCallback.queries={split!r}: the trainer has no {split} loader and "
                                 f"{type(source).__name__}.{SPLITS[split]}() failed ({error}); pass a Dataset or "
                                 "another split") from error
        if not isinstance(loader, DataLoader):
            raise ValueError(f"InfluenceCallback.queries={split!r}: the {split} loader must be one DataLoader, "
                             f"got {type(loader).__name__}")
        return loader

    # ----------------------------------------------------------------------------- training events
    def _start_indices(self, trainer: "pl.Trainer", train: DataLoader) -> None:
        """``candidates="stream"``: record the dataset indices of the training batches from the
        training loader's batch sampler (`BatchIndexRecorder`), or fall back to ``"all"``.

        The epoch under way already has its data iterator. A single-process loader with torch's
        ``BatchSampler`` has drawn nothing from it yet, so its indices are recorded and streaming
        (`InfluenceSession.start_streaming`) starts with this epoch, also in a resumed fit; worker
        processes have already drawn indices, so streaming starts with the next epoch, not to pay
        for scores that could not be attributed to examples."""
        if self.indices.install(train, current_iteration=True):
            now = self.indices.covers_current_iteration and train.num_workers == 0
            self._stream_from_epoch = trainer.current_epoch + (0 if now else 1)
            if not now:
                rank_zero_info("InfluenceCallback: streaming influence from the next epoch on: the dataset indices "
                               "of training batches are read from the training loader's sampler, and this epoch's "
                               "worker processes drew them before callbacks run; attributions until then score the "
                               "candidates as candidates='all'")
            return
        warnings.warn("InfluenceCallback: candidates='stream' needs the dataset indices of training batches, which "
                      "a loader without a batch sampler (an IterableDataset) does not give; scoring candidates='all' "
                      "instead", stacklevel=3)
        self.session.stop_streaming()

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.indices.installed and isinstance(trainer.train_dataloader, DataLoader):
            self.indices.install(trainer.train_dataloader, current_iteration=True)  # a reloaded loader
            if trainer.current_epoch >= self._stream_from_epoch:
                self.session.start_streaming()  # a collective: every rank, at the same epoch

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._batch = batch
        self._batch_indices = self.indices.pop(self.task.batch_size(batch)) if self.indices.installed else None
        if self.session is not None and pl_module.training:
            self.session.before_forward(batch)

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Any) -> None:
        """First statistics micro-batch: compare the loss about to be backpropagated (already divided
        by the accumulation and AMP-scaled) with the task's losses, so a summed loss is detected."""
        session = self.session
        if (session is None or not pl_module.training or self._batch is None or not session.capturing
                or session.loss_reduction is not None):
            return
        with session.tolerant("checking how the training loss is reduced"):
            session.check_training_loss(self._batch, float(loss.detach()), _loss_factor(trainer, pl_module))

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.session is None or not pl_module.training or self._batch is None:
            return
        scale = None
        if self.session.needs_grad_scale:  # otherwise unused: skip its device syncs
            try:
                scale = self.session.task_loss_scale(self._batch) * _loss_factor(trainer, pl_module)
            except Exception:  # the session counts and warns about bad batches
                scale = float("nan")
        weight = _learning_rate(trainer) if self.config.stream_weight == "lr" else None
        self.session.after_backward(self._batch, grad_scale=scale,
                                    optimizer_step=_ends_optimizer_step(trainer, pl_module.automatic_optimization),
                                    indices=self._batch_indices, weight=weight)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch = None
        if self.session is None or self._stepped_at == trainer.global_step:
            return
        self._stepped_at = trainer.global_step
        self.session.maybe_attribute(trainer.global_step, Reason.EVERY_N_STEPS)

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        session = self.session
        if session is None or not session.attached or trainer.state.fn != TrainerFn.FITTING or not session.has_data:
            return
        before = session.attributions
        session.maybe_attribute(trainer.global_step, Reason.SAVE)
        if session.attributions != before:  # the callback state was dumped before this hook: refresh it
            checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if (self.session is not None and self.session.has_data and trainer.state.fn == TrainerFn.FITTING
                and not trainer.sanity_checking):
            self.session.maybe_attribute(trainer.global_step, Reason.EVALUATE)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.session is not None and self.session.has_data:
            self.session.maybe_attribute(trainer.global_step, Reason.TRAIN_END)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.session is None:
            return dict(self._pending_state or {})
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.session is None:
            self._pending_state = state_dict
        else:
            self.session.load_state_dict(state_dict, rank=self._trainer.global_rank if self._trainer else 0)


def _task(task: Any) -> Task:
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task in TASKS:
        return TASKS[task]()
    raise ConfigurationError(f"InfluenceCallback.task must be a Task or one of {list(TASKS)}, got {task!r}")


def _fit_val_loader(trainer: "pl.Trainer") -> Optional[DataLoader]:
    """A validation DataLoader passed to ``fit`` that Lightning has not loaded (validation off:
    ``limit_val_batches=0`` or no ``validation_step``). No public property exposes it then, so the
    val loop's data source is read defensively (``None`` when its layout differs)."""
    source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
    instance = getattr(source, "instance", None)
    return instance if isinstance(instance, DataLoader) else None


def _learning_rate(trainer: "pl.Trainer") -> Optional[float]:
    """The first optimizer's first parameter group's learning rate (the streamed scores' step weight)."""
    optimizers = trainer.optimizers
    return float(optimizers[0].param_groups[0]["lr"]) if optimizers else None


def _loss_factor(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> float:
    """What Lightning multiplies the training step's loss by before backward: ``1/accumulate_grad_batches``
    (automatic optimization) × the AMP loss scale."""
    accumulation = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
    return _amp_scale(trainer) / accumulation


def _amp_scale(trainer: "pl.Trainer") -> float:
    """The loss scale of the 16-mixed GradScaler for the backward just run (1 otherwise)."""
    plugin = trainer.precision_plugin
    scaler = getattr(plugin, "scaler", None) if isinstance(plugin, MixedPrecision) else None
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


def _ends_optimizer_step(trainer: "pl.Trainer", automatic: bool) -> bool:
    """Whether the current micro-batch ends an optimizer step (Lightning's own accumulation rule)."""
    if not automatic:
        return True
    epoch_loop = trainer.fit_loop.epoch_loop
    should_accumulate = getattr(epoch_loop, "_should_accumulate", None)
    if callable(should_accumulate):
        return not should_accumulate()
    return epoch_loop.batch_progress.current.ready % trainer.accumulate_grad_batches == 0


__all__ = ["InfluenceCallback", "InfluenceCallbackConfig", "TASKS", "SPLITS"]
