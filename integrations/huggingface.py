"""Hugging Face ``Trainer`` adapter: `InfluenceTrainerCallback`.

    trainer = Trainer(model, args, train_dataset=train, data_collator=collate, processing_class=tokenizer,
                      callbacks=[InfluenceTrainerCallback(queries=query_examples)])

The callback only translates Trainer events into calls on an `InfluenceSession` (which owns the
tracker, the attribution schedule, the `TensorBoardReporter` and the artifacts). It reads public
surfaces only: the events' ``args`` / ``state`` and their ``model``, ``processing_class`` and
``train_dataloader`` keywords (``optimizer`` for its learning rate with ``stream_weight="lr"``), plus
module hooks on the model and a pass-through recorder of the training loader's batch sampler (the
dataset indices of each batch, for ``candidates="stream"``). It never needs the ``Trainer`` object.

* ``on_train_begin``: the session is built on the unwrapped model and its layer hooks go on, a
  forward pre-hook (``with_kwargs=True``) and a forward hook go on the model to see each training
  micro-batch's keyword inputs (``input_ids``, ``attention_mask`` so padding is excluded,
  ``labels``, ``num_items_in_batch``) and the loss it returns, a ``SummaryWriter`` is opened in the
  run's logging directory, and a resumed run's influence state is read from its ``checkpoint-N/``.
* ``on_substep_end`` (non-final micro-batches) and ``on_pre_optimizer_step`` (the final one): the
  micro-batch's statistics are committed with ``grad_scale = model_scale × loss_factor`` (see
  `TrainerLossScale`): ``loss_factor`` is the gradient that reached the model's returned loss in
  the training backward, so whatever the Trainer did to it (``1 / gradient_accumulation_steps``,
  the AMP ``GradScaler`` scale, a factor for tokens averaged across devices) is measured, not
  assumed.
* ``on_step_end`` (every ``every_n_steps``), ``on_save``, ``on_evaluate`` (with
  ``attribute_on_evaluate``), ``on_train_end``: attribution (whose result carries token- and
  layer-level views of each query's top sequences), reported to TensorBoard (`TokenReporter`) and
  written as artifacts; ``on_save`` also writes the session state into ``checkpoint-N/``
  (`infl_plugin.serialization`: safetensors + JSON, written atomically, main process only).

What to attribute and when is an `infl_plugin.config.options.AttributionOptions`, shared with the
Lightning callback (``options=``, also an OmegaConf structured config, or its fields as keywords).

Hooks come off at ``on_train_end`` and with `InfluenceTrainerCallback.close`. No Trainer event
reports an exception, so after a crashed ``trainer.train()`` the hooks stay on the model until
``callback.close()`` or the next ``on_train_begin`` (which drops what they captured); they are
harmless meanwhile: at most ``MAX_PENDING`` recorded micro-batches are kept, the layer hooks add
into fixed-size pending sums, and nothing is committed outside a Trainer step. Training is never
changed: statistics come from the training backward itself, attribution runs in eval mode with
forked RNGs and never touches ``.grad``, and a failing micro-batch or attribution only warns.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import replace
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from transformers import TrainerCallback

from infl_plugin.config.influence import InfluenceConfig, resolve_config
from infl_plugin.errors import ConfigurationError
from infl_plugin.run.indices import BatchIndexRecorder
from infl_plugin.config.options import AttributionOptions, resolve_options
from infl_plugin.run.query_formats import ACCEPTED_FORMATS, as_rows, readable_renderer
from infl_plugin.run.schedule import Reason
from infl_plugin.run.session import InfluenceSession
from infl_plugin.serialization import load_state, save_state, state_path as _state_path
from infl_plugin.tasks import CausalLMTask, ClassificationTask, Task
from infl_plugin.report.token_report import TokenReporter

from .hf_inputs import MAX_PENDING, MicroBatch, TrainerLossScale, TrainingInputs, model_loss
from .hf_queries import refuse_unsupported_training, trainer_attribution_data

# --------------------------------------------------------------------------------- the callback
class InfluenceTrainerCallback(TrainerCallback):
    """EK-FAC influence alongside ``Trainer.train``: statistics, attribution, TensorBoard, checkpoints.

    Args:
        queries: the examples to explain, in any of the formats of `infl_plugin.run.query_formats`:
            strings, ``{"prompt", "completion"}`` pairs, ``{"messages": [...]}`` chats (tokenized
            at train start as the trainer prepared its training text, see
            `integrations.hf_queries`), rows of the training dataset (raw or processed, a
            ``datasets.Dataset`` too), tokenized mappings (collated with ``collate_fn``), columns, or a
            ``DataLoader`` of query batches (used as it is; of others ``options.num_queries`` evenly
            spaced ones). ``None``: statistics are tracked and checkpointed, nothing is attributed.
        config: `InfluenceConfig` (or a mapping / DictConfig of its fields).
        task: how per-example losses are computed; default from the model class (``*ForCausalLM``
            / LM-head models → `CausalLMTask`, ``*ForSequenceClassification`` → `ClassificationTask`).
        options: the `AttributionOptions` shared with the Lightning callback (schedule, candidates,
            top-k, token views, strictness), or a mapping / DictConfig of its fields (an OmegaConf
            structured config). With ``candidates="stream"`` the dataset indices of training
            batches are read from the training loader's batch sampler
            (`infl_plugin.run.indices.BatchIndexRecorder`); a resumed run drops the records of the
            batches its first epoch skips (the Trainer's rule, unless ``ignore_data_skip``).
            ``"tfidf"`` decodes token ids with ``processing_class``. ``batch_size`` defaults to
            ``per_device_eval_batch_size``; ``progress`` is off with ``disable_tqdm``.
        collate_fn: batches query/candidate examples; default the training loader's (the Trainer's
            ``data_collator`` after its removal of unused dataset columns).
        writer: a ``SummaryWriter`` to log to; default one opened in `tensorboard_logdir`.
        logdir: where artifacts (and the default writer) go, overriding the above.
        resume_from: a checkpoint directory to restore the influence state from; by default a
            resumed run (``global_step > 0``) reads ``args.resume_from_checkpoint`` or
            ``output_dir/checkpoint-{global_step}``. A missing or damaged state warns and
            statistics restart from zero (``options.strict``: a damaged one raises `StateFileError`).
        **overrides: single `AttributionOptions` fields (``every_n_steps=100``, ``candidates="all"``).

    Invalid arguments raise `ConfigurationError` (a ``ValueError``) naming the argument, at construction.
    """

    def __init__(
        self,
        queries: Any = None,
        config: Union[InfluenceConfig, dict, None] = None,
        task: Optional[Task] = None,
        *,
        options: Union[AttributionOptions, dict, None] = None,
        collate_fn: Optional[Callable[[list], Any]] = None,
        writer: Any = None,
        logdir: Optional[Union[str, os.PathLike]] = None,
        resume_from: Optional[Union[str, os.PathLike]] = None,
        **overrides: Any,
    ) -> None:
        self.config = resolve_config("InfluenceTrainerCallback", config)
        _check(task is None or isinstance(task, Task), "task", task, "None or an infl_plugin.Task instance")
        _check(queries is None or isinstance(queries, torch.utils.data.DataLoader) or _indexable(queries), "queries",
               queries, f"None or a collection of queries ({ACCEPTED_FORMATS})")
        _check(collate_fn is None or callable(collate_fn), "collate_fn", collate_fn, "None or a callable")
        _check(writer is None or callable(getattr(writer, "add_scalar", None)), "writer", writer,
               "None or a SummaryWriter-like object (with add_scalar)")
        for name, value in (("logdir", logdir), ("resume_from", resume_from)):
            _check(value is None or isinstance(value, (str, os.PathLike)), name, value, "None or a path")
        self.options = resolve_options("InfluenceTrainerCallback", options, **overrides)
        self.queries = queries if queries is None or isinstance(queries, torch.utils.data.DataLoader) else as_rows(queries)
        self.task = task
        self.indices = BatchIndexRecorder()
        self.collate_fn = collate_fn
        self.writer = writer
        self.logdir = None if logdir is None else os.fspath(logdir)
        self.resume_from = None if resume_from is None else os.fspath(resume_from)
        self.session: Optional[InfluenceSession] = None
        self.inputs: Optional[TrainingInputs] = None
        self._own_writer: Any = None
        self._warned: set[str] = set()

    # ----------------------------------------------------------------------------- train begin / end
    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       **kwargs) -> None:
        self.close()  # leftovers of a crashed run: hooks off, uncommitted statistics dropped
        try:
            self._begin(args, state, _unwrapped(model, args), processing_class, train_dataloader)
        except BaseException:
            self.close()
            raise

    def _begin(self, args: Any, state: Any, model: nn.Module, processing_class: Any, train_dataloader: Any) -> None:
        if self.session is None or self.session.model is not model:
            self.session = self._new_session(model, args, state)
            self.inputs = TrainingInputs(model, TrainerLossScale(self.session.task), self._capturing)
        if getattr(args, "label_smoothing_factor", 0.0):
            self._warn_once("loss", "infl_plugin: the Trainer uses label smoothing; the statistics come from that "
                            "loss's gradients while the task's loss is plain cross-entropy")
        if state.global_step > 0:
            self._restore(args, state, model)
        # the training loader's collate_fn includes the Trainer's removal of unused dataset columns
        collate = self.collate_fn or getattr(train_dataloader, "collate_fn", None)
        refuse_unsupported_training(args, getattr(train_dataloader, "collate_fn", None))
        self._set_data(args, model, collate, train_dataloader, processing_class)
        if self.session.candidate_mode == "stream" and self.session.has_data:
            self._start_indices(train_dataloader, _resumed_batches(args, state, train_dataloader))
        if state.is_world_process_zero:
            self._open_reporter(args, processing_class)
        self.session.attach()
        self.inputs.attach()

    def _new_session(self, model: nn.Module, args: Any, state: Any) -> InfluenceSession:
        options = replace(self.options, progress=False) if getattr(args, "disable_tqdm", False) else self.options
        return InfluenceSession(model, self.task or default_task(model), self.config, options,
                                is_main=state.is_world_process_zero)

    def _start_indices(self, train_dataloader: Any, skipped: Optional[int]) -> None:
        """``candidates="stream"``: record the dataset indices of the training batches from the
        training loader's batch sampler, or fall back to ``"all"`` with a warning."""
        if not self.indices.install(train_dataloader):
            self._warn_once("no-indices", "infl_plugin: candidates='stream' needs the dataset indices of training "
                            "batches, which a loader without a batch sampler (an IterableDataset) does not give; "
                            "scoring candidates='all' instead")
            self.session.stop_streaming()
        elif skipped != 0:  # a resumed epoch first skips the batches trained before the checkpoint
            self.indices.skip_next_iteration(skipped)

    def _capturing(self) -> bool:
        return self.session is not None and self.session.needs_grad_scale

    def on_train_end(self, args, state, control, **kwargs) -> None:
        try:
            self._attribute(state.global_step, Reason.TRAIN_END)
        finally:
            self.close()

    def close(self) -> None:
        """Take every hook off the model and close the writer this callback opened; safe to call twice.

        Results stay readable (``callback.session``); the next ``on_train_begin`` attaches again.
        Call it after a ``trainer.train()`` that raised if the model is used further without the
        Trainer (the hooks are harmless meanwhile, see the module docstring).
        """
        self.indices.remove()
        if self.inputs is not None:
            self.inputs.close()
        if self.session is not None:
            self.session.close()
        if self._own_writer is not None:
            self._own_writer.flush()
            self._own_writer.close()
            self._own_writer = None

    # ----------------------------------------------------------------------------- micro-batches
    def on_substep_end(self, args, state, control, optimizer=None, **kwargs) -> None:
        self._commit(args, optimizer_step=False, optimizer=optimizer)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        self._commit(args, optimizer_step=True, optimizer=optimizer)

    def _commit(self, args: Any, optimizer_step: bool, optimizer: Any = None) -> None:
        if self.session is None or self.inputs is None or not self.inputs.active:
            return
        recorded = self.inputs.pop()
        if not recorded:
            self.indices.pop(None)  # the loader's batch was consumed all the same
            self._warn_once("no-forward", "infl_plugin: no training forward of the model was seen for a micro-batch "
                            "(is the callback's model the one being trained?); its statistics are skipped")
            return
        if len(recorded) > 1:
            self._warn_once("forwards", f"infl_plugin: {len(recorded)} training forwards in one micro-batch (a custom "
                            "compute_loss?); statistics use the last one's loss scale")
        micro = recorded[-1]
        indices = self.indices.pop(self.session.task.batch_size(micro.batch)) if self.indices.installed else None
        weight = None
        if self.config.stream_weight == "lr" and optimizer is not None:
            weight = float(optimizer.param_groups[0]["lr"])
        scale = None
        if self.session.needs_grad_scale:  # otherwise unused: skip its device syncs
            try:
                scale = self.inputs.scale.grad_scale(micro, args)
            except Exception as error:  # never break training: the micro-batch's statistics are skipped
                warnings.warn(f"infl_plugin: could not work out the loss scale of a micro-batch: {error}",
                              stacklevel=2)
                scale = math.nan
        self.session.after_backward(micro.batch, scale, optimizer_step, indices=indices, weight=weight)

    # ----------------------------------------------------------------------------- attribution
    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._attribute(state.global_step, Reason.EVERY_N_STEPS)

    def on_evaluate(self, args, state, control, **kwargs) -> None:
        self._attribute(state.global_step, Reason.EVALUATE)

    def on_save(self, args, state, control, **kwargs) -> None:
        if self.session is None:
            return
        self._attribute(state.global_step, Reason.SAVE)
        with self.session.tolerant("writing the influence state into the checkpoint"):
            self._save_state(args, state)

    def _attribute(self, step: int, reason: Reason) -> None:
        if self.session is not None and self.session.has_data:
            self.session.maybe_attribute(step, reason)

    # ----------------------------------------------------------------------------- data and logging
    def _set_data(self, args: Any, model: nn.Module, collate: Optional[Callable], train_dataloader: Any,
                  tokenizer: Any = None) -> None:
        if self.queries is None:
            self._warn_once("no-queries", "infl_plugin: InfluenceTrainerCallback got no queries; curvature statistics "
                            "are tracked and checkpointed, nothing is attributed")
            return
        training_set = getattr(train_dataloader, "dataset", None)
        if self.options.candidate_dataset is None and (training_set is None or not _indexable(training_set)):
            raise ConfigurationError("InfluenceTrainerCallback.candidates: the training loader's dataset is not "
                                     "indexable (an IterableDataset?); pass candidates=<indexable training examples>")
        data = trainer_attribution_data(self.options, self.queries, training_set, args=args, model=model,
                                        task=self.session.task, tokenizer=tokenizer, collate=collate,
                                        batch_size=self.options.batch_size or args.per_device_eval_batch_size,
                                        seed=self.config.seed)
        self.session.set_data(data)

    def _open_reporter(self, args: Any, tokenizer: Any) -> None:
        logdir = self.logdir or tensorboard_logdir(args)
        writer = self.writer
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = self._own_writer = SummaryWriter(log_dir=logdir)
        renderer = readable_renderer(self.options.renderer, tokenizer, self.options.image_shape)
        self.session.reporter = TokenReporter(writer, tokenizer=tokenizer, renderer=renderer,
                                              image_shape=self.options.image_shape)
        self.session.artifact_dir = logdir

    # ----------------------------------------------------------------------------- checkpoints
    def _save_state(self, args: Any, state: Any) -> None:
        session_state = self.session.state_dict()  # a collective: every rank
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        save_state(folder, session_state, {"global_step": int(state.global_step)})

    def _restore(self, args: Any, state: Any, model: nn.Module) -> None:
        """Read a resumed run's state; a missing or damaged one warns and statistics restart from zero."""
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        folder = next((c for c in candidates if isinstance(c, str) and any(
            os.path.exists(_state_path(c, suffix)) for suffix in (".json", ".safetensors"))), None)
        if folder is None:
            self._warn_once("no-state", f"infl_plugin: resuming at step {state.global_step} without a saved influence "
                            "state (looked in resume_from, args.resume_from_checkpoint, output_dir/checkpoint-N); "
                            "curvature statistics restart from zero")
            return
        try:
            session_state, meta = load_state(folder)
            if meta.get("global_step") != state.global_step:
                warnings.warn(f"infl_plugin: the influence state in {folder} is from step {meta.get('global_step')}, "
                              f"training resumes at step {state.global_step}", stacklevel=2)
            self.session.load_state_dict(session_state, rank=args.process_index)
        except Exception as error:
            if self.options.strict:
                raise
            warnings.warn(f"infl_plugin: cannot restore the influence state ({type(error).__name__}: {error}); "
                          "curvature statistics restart from zero", stacklevel=2)
            self.session.close()  # a partly loaded state is not kept
            self.session = self._new_session(model, args, state)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------------- helpers
def _resumed_batches(args: Any, state: Any, train_dataloader: Any) -> Optional[int]:
    """How many batches of its first epoch a run resumed at ``state.global_step`` skips (the
    Trainer's rule: the optimizer steps already taken in that epoch × gradient accumulation);
    ``None`` when unknown (a loader without a length)."""
    if state.global_step == 0 or getattr(args, "ignore_data_skip", False):
        return 0
    try:
        length = len(train_dataloader)
    except TypeError:
        return None
    accumulation = args.gradient_accumulation_steps
    per_epoch = max(length // accumulation + int(length % accumulation > 0), 1)
    return (state.global_step % per_epoch) * accumulation


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigurationError(f"InfluenceTrainerCallback.{name} must be {allowed}, got {value!r}")


def _indexable(value: Any) -> bool:  # a bare string is one text, not a collection of queries
    return hasattr(value, "__getitem__") and hasattr(value, "__len__") and not isinstance(value, (str, bytes))


def default_task(model: nn.Module) -> Task:
    """`CausalLMTask` or `ClassificationTask` from the (PEFT-unwrapped) model's class name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    config = getattr(base, "config", None)
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return CausalLMTask()
    if name.endswith("ForSequenceClassification"):
        problem = getattr(config, "problem_type", None)
        if getattr(config, "num_labels", 2) > 1 and problem in (None, "single_label_classification"):
            return ClassificationTask()
    raise ConfigurationError(f"InfluenceTrainerCallback.task: cannot pick a task for {name}; pass "
                             "task=CausalLMTask(), ClassificationTask() or your own infl_plugin.Task subclass")


def tensorboard_logdir(args: Any) -> str:
    """Where the run's TensorBoard events go, as the Trainer's own ``TensorBoardCallback`` decides:
    ``TENSORBOARD_LOGGING_DIR``, else ``args.logging_dir`` (transformers 4.x; 5.x has no such
    argument), else ``output_dir/runs`` (the parent of 5.x's per-run folders)."""
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    return getattr(args, "logging_dir", None) or os.path.join(args.output_dir, "runs")


def _unwrapped(model: Optional[nn.Module], args: Any) -> nn.Module:
    """The module whose layers are hooked; refuses compiled models (their graphs bypass module hooks)."""
    if model is None:
        raise ValueError("InfluenceTrainerCallback.on_train_begin received no model")
    # ``args.torch_compile`` is how a Trainer is asked to compile; a module the user compiled before
    # handing it over is torch's wrapper, which keeps the original as ``_orig_mod`` (the attribute
    # torch documents for reaching it; the wrapper class itself is not public)
    if getattr(args, "torch_compile", False) or hasattr(model, "_orig_mod"):
        raise RuntimeError(
            "InfluenceTrainerCallback does not support torch.compile (torch_compile=True or a compiled model): "
            "compiled graphs do not run the per-layer hooks that collect influence statistics. Train without "
            "torch_compile while the callback is attached.")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


__all__ = ["MAX_PENDING", "InfluenceTrainerCallback", "MicroBatch", "TrainerLossScale", "TrainingInputs", "default_task",
           "load_state", "model_loss", "save_state", "tensorboard_logdir"]
