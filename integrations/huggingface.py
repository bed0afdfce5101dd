"""Hugging Face ``Trainer`` adapter: `InfluenceTrainerCallback`.

    trainer = Trainer(model, args, train_dataset=train, data_collator=collate, processing_class=tokenizer,
                      callbacks=[InfluenceTrainerCallback(queries=query_examples)])

The callback only translates Trainer events into calls on an `InfluenceSession` (which owns the
tracker, the attribution schedule, the `TensorBoardReporter` and the artifacts):

* ``on_train_begin``: the session is built on the unwrapped model (its layer hooks go on), a
  forward pre-hook (``with_kwargs=True``) and a forward hook go on the model to see each training
  micro-batch's keyword inputs (``input_ids``, ``attention_mask`` so padding is excluded,
  ``labels``, ``num_items_in_batch``), a ``SummaryWriter`` is opened in the run's logging
  directory, and a resumed run's influence state is read from its ``checkpoint-N/``.
* ``on_substep_end`` (non-final micro-batches) and ``on_pre_optimizer_step`` (the final one, before
  the AMP scaler updates): the micro-batch's statistics are committed with ``grad_scale`` = the
  loss the Trainer backpropagated divided by ``Σ_n task_loss_n`` (see `TrainerLossScale`).
* ``on_step_end`` (every ``every_n_steps``), ``on_save``, ``on_evaluate`` (optional),
  ``on_train_end``: attribution, reported to TensorBoard with token- and layer-level views
  (`TokenReporter`) and written as artifacts; ``on_save`` also writes the session state into
  ``checkpoint-N/`` (safetensors + JSON, main process only).
* Hooks come off at ``on_train_end`` and when an exception leaves the training loop.

Training is never changed: statistics come from the training backward itself, attribution runs in
eval mode with forked RNGs and never touches ``.grad``, and a failing micro-batch or attribution
only warns.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from infl_plugin.config import InfluenceConfig
from infl_plugin.session import InfluenceSession, make_loader, spaced_indices
from infl_plugin.tasks import IGNORE_INDEX, CausalLMTask, ClassificationTask, Task
from infl_plugin.token_report import TokenReporter

STATE_FILE = "influence_state"  # checkpoint-N/influence_state.safetensors + .json


# --------------------------------------------------------------------------------- micro-batches
@dataclass
class MicroBatch:
    """One training forward as the model saw it.

    ``batch``: the tensor keyword inputs (``input_ids``, ``attention_mask``, ``labels``, …);
    ``num_items``: the ``num_items_in_batch`` the Trainer passed, if any; ``model_scale``: the
    model's returned loss divided by ``Σ_n task_loss_n`` (set by the forward hook).
    """

    batch: dict[str, torch.Tensor]
    num_items: Optional[float]
    model_scale: Optional[float] = None


class TrainerLossScale:
    """How the loss a Trainer backpropagates relates to the task's per-example losses.

    ``grad_scale = model_scale × trainer_factor``, where

    * ``model_scale`` = model loss / ``Σ_n task_loss_n``: ``1 / num_items_in_batch`` when the model
      normalises its summed loss by it (Hugging Face causal LMs when the Trainer passes it), else
      the task's own mean (``1 / tokens`` or ``1 / examples``). Which of the two a model does is
      measured once, on the first micro-batch where they differ, by comparing its returned loss with
      the task's summed loss computed from the returned logits (a BERT classifier accepts the
      keyword and ignores it, for instance);
    * ``trainer_factor`` = ``1 / current_gradient_accumulation_steps`` unless the Trainer treats
      the loss as already scaled for accumulation (``num_items_in_batch`` passed, a
      ``compute_loss_func``, or ``loss_is_scaled_for_ga``), × the process count when tokens are
      averaged across devices, × the AMP ``GradScaler`` scale (fp16).
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.mode: Optional[str] = None  # "num_items" | "mean" once measured
        self.warned: set[str] = set()

    def measure(self, micro: MicroBatch, output: Any) -> None:
        """Set ``micro.model_scale`` from the model's output (forward hook; no graph is built)."""
        mean = self.task.training_loss_scale(micro.batch)
        if micro.num_items is None:
            micro.model_scale = mean
            return
        items = 1.0 / micro.num_items if micro.num_items > 0 else math.inf
        if math.isclose(items, mean, rel_tol=1e-9) or self.mode is not None:
            micro.model_scale = items if self.mode in (None, "num_items") else mean
            return
        loss = getattr(output, "loss", None)
        total = summed_task_loss(self.task, output, micro.batch)
        if loss is None or total is None or not total > 0:
            self._warn("unmeasured", "infl_plugin: cannot compare the model's loss with the task's losses (no loss "
                       "or logits in the output, or an unsupported task); assuming loss = Σ losses / "
                       "num_items_in_batch")
            micro.model_scale = items
            return
        ratio = float(loss.detach()) / total
        for mode, value in (("num_items", items), ("mean", mean)):
            if math.isclose(ratio, value, rel_tol=1e-3):
                self.mode, micro.model_scale = mode, value
                return
        self._warn("mismatch", f"infl_plugin: the model's loss is neither the mean nor the num_items_in_batch-"
                   f"normalised sum of the task's per-example losses (ratio {ratio:.4g}, expected {items:.4g} or "
                   f"{mean:.4g}); is the task right (labels, padding set to -100)? Using the measured ratio.")
        micro.model_scale = ratio

    def grad_scale(self, micro: MicroBatch, args: Any, trainer: Any = None, optimizer: Any = None) -> float:
        """``training_loss / Σ_n task_loss_n`` for a micro-batch whose backward just ran."""
        model_scale = micro.model_scale if micro.model_scale is not None else self.task.training_loss_scale(micro.batch)
        passed = micro.num_items is not None
        if trainer is not None:
            explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
            custom = getattr(trainer, "compute_loss_func", None) is not None
            scaled = explicit if explicit is not None else passed or custom
            steps = getattr(trainer, "current_gradient_accumulation_steps", None) or args.gradient_accumulation_steps
        else:
            scaled, steps = passed, args.gradient_accumulation_steps
        factor = 1.0 if scaled else 1.0 / steps
        if passed and getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
            if trainer is not None:
                factor *= trainer.accelerator.num_processes // trainer.get_tp_size()
            else:
                factor *= args.world_size
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None) or getattr(optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            factor *= float(scaler.get_scale())
        return model_scale * factor

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=3)


def summed_task_loss(task: Task, output: Any, batch: dict[str, torch.Tensor]) -> Optional[float]:
    """``Σ_n task_loss_n`` from a model output's logits (``None`` for other tasks or outputs)."""
    logits = getattr(output, "logits", None)
    labels = batch.get("labels")
    if not isinstance(logits, torch.Tensor):
        return None
    with torch.no_grad():
        if isinstance(task, CausalLMTask):
            targets = task.shifted_labels(batch).to(logits.device)
            return sum(float(F.cross_entropy(logits[n].float(), targets[n], ignore_index=IGNORE_INDEX, reduction="sum"))
                       for n in range(logits.shape[0]))
        if isinstance(task, ClassificationTask) and isinstance(labels, torch.Tensor) and logits.dim() == 2:
            return float(F.cross_entropy(logits.float(), labels.to(logits.device), reduction="sum"))
    return None


class TrainingInputs:
    """Hooks on the Trainer's model that record each training micro-batch's keyword inputs.

    Only forwards in training mode with gradients enabled are recorded (evaluation and the
    session's own eval-mode passes are not); a gradient-checkpointing recomputation never reruns
    the root module, so each micro-batch is recorded once.
    """

    def __init__(self, model: nn.Module, scale: TrainerLossScale, capturing: Callable[[], bool]) -> None:
        self.model = model
        self.scale = scale
        self.capturing = capturing  # the loss scale is measured only for micro-batches that feed the statistics
        self.pending: list[MicroBatch] = []
        self._handles: list[Any] = []

    def attach(self) -> None:
        if not self._handles:
            self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                             self.model.register_forward_hook(self._after, with_kwargs=True)]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.pending = []

    def pop(self) -> list[MicroBatch]:
        pending, self.pending = self.pending, []
        return pending

    def _recording(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording(module):
            return
        try:
            batch = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k != "num_items_in_batch"}
            if args and isinstance(args[0], torch.Tensor) and "input_ids" not in batch:
                batch["input_ids"] = args[0]
            num_items = kwargs.get("num_items_in_batch")
            self.pending.append(MicroBatch(batch, None if num_items is None else float(num_items)))
        except Exception as error:  # never break training
            self.scale._warn("record", f"infl_plugin: could not record a training batch: {error}")

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._recording(module) and self.pending and self.pending[-1].model_scale is None and self.capturing():
            try:
                self.scale.measure(self.pending[-1], output)
            except Exception as error:  # never break training
                self.scale._warn("measure", f"infl_plugin: could not measure the loss scale: {error}")


# --------------------------------------------------------------------------------- the callback
class InfluenceTrainerCallback(TrainerCallback):
    """EK-FAC influence alongside ``Trainer.train``: statistics, attribution, TensorBoard, checkpoints.

    Args:
        queries: the examples to explain (indexable, same format as training examples; collated
            with ``collate_fn``), or a ready ``DataLoader`` of query batches. ``None``: statistics
            are tracked and checkpointed but nothing is attributed.
        config: `InfluenceConfig` (or a dict of its fields).
        task: how per-example losses are computed; default from the model class (``*ForCausalLM``
            / LM-head models → `CausalLMTask`, ``*ForSequenceClassification`` → `ClassificationTask`).
        candidates: the training examples to score (indexable); default the training loader's
            dataset (the Trainer's ``train_dataset``), in dataset order.
        max_candidates: score this many evenly spaced candidates (``None``: all).
        collate_fn: batches query/candidate examples; default the training loader's (the Trainer's
            ``data_collator`` after its removal of unused dataset columns).
        batch_size: batch size of the attribution passes (default ``per_device_eval_batch_size``).
        every_n_steps: also attribute every n optimizer steps.
        on_save / on_evaluate / at_train_end: attribute at checkpoint saves / evaluations / the end.
        top_k: helpful and harmful examples kept per query.
        token_sequences: top sequences per query shown with their tokens marked (0: none).
        top_tokens: tokens marked per sequence.
        self_influence: also compute every candidate's self-influence.
        writer: a ``SummaryWriter`` to log to; default one opened in the run's logging directory
            (see `tensorboard_logdir`: next to the Trainer's own TensorBoard events when it writes any).
        logdir: where artifacts (and the default writer) go, overriding the above.
        resume_from: a checkpoint directory to restore the influence state from; by default a
            resumed run (``global_step > 0``) reads ``args.resume_from_checkpoint`` or
            ``output_dir/checkpoint-{global_step}``.
        strict: raise statistics and attribution errors instead of warning.
    """

    def __init__(
        self,
        queries: Any = None,
        config: Union[InfluenceConfig, dict, None] = None,
        task: Optional[Task] = None,
        *,
        candidates: Any = None,
        max_candidates: Optional[int] = None,
        collate_fn: Optional[Callable[[list], Any]] = None,
        batch_size: Optional[int] = None,
        every_n_steps: Optional[int] = None,
        on_save: bool = True,
        on_evaluate: bool = False,
        at_train_end: bool = True,
        top_k: int = 10,
        token_sequences: int = 3,
        top_tokens: int = 8,
        self_influence: bool = False,
        writer: Any = None,
        logdir: Optional[str] = None,
        resume_from: Optional[str] = None,
        strict: bool = False,
    ) -> None:
        self.queries = queries
        self.config = InfluenceConfig.from_dict(config) if isinstance(config, dict) else config or InfluenceConfig()
        self.task = task
        self.candidates = candidates
        self.max_candidates = max_candidates
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.every_n_steps = every_n_steps
        self.on_save_attribute = on_save
        self.on_evaluate_attribute = on_evaluate
        self.at_train_end = at_train_end
        self.top_k = top_k
        self.token_sequences = token_sequences
        self.top_tokens = top_tokens
        self.self_influence = self_influence
        self.writer = writer
        self.logdir = logdir
        self.resume_from = resume_from
        self.strict = strict
        self.session: Optional[InfluenceSession] = None
        self.inputs: Optional[TrainingInputs] = None
        self.trainer: Any = None
        self._own_writer: Any = None
        self._warned: set[str] = set()

    # ----------------------------------------------------------------------------- train begin / end
    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       **kwargs) -> None:
        trainer = _calling_trainer()
        model = _unwrapped(model, args, trainer)
        if self.session is None or self.session.model is not model:
            self._close_session()
            task = self.task or default_task(model)
            self.session = InfluenceSession(
                model, task, self.config, every_n_steps=self.every_n_steps, on_save=self.on_save_attribute,
                at_train_end=self.at_train_end, on_evaluate=self.on_evaluate_attribute, top_k=self.top_k, self_influence=self.self_influence,
                is_main=state.is_world_process_zero, progress=not getattr(args, "disable_tqdm", False),
                strict=self.strict)
            session = self.session
            self.inputs = TrainingInputs(model, TrainerLossScale(task), lambda: session.capturing)
        self.trainer = trainer
        if any(getattr(trainer, name, None) is not None for name in ("label_smoother", "compute_loss_func")):
            self._warn_once("loss", "infl_plugin: the Trainer uses label smoothing or a compute_loss_func; the "
                            "statistics come from that loss's gradients while the task's loss is plain cross-entropy")
        self.session.attach()
        self.inputs.attach()
        self._guard_training_loop()
        # the training loader's collate_fn includes the Trainer's removal of unused dataset columns
        collate = (self.collate_fn or getattr(train_dataloader, "collate_fn", None)
                   or getattr(trainer, "data_collator", None))
        self._set_data(args, collate, train_dataloader)
        if state.is_world_process_zero:
            self._open_reporter(args, processing_class, collate)
        if state.global_step > 0:
            self._restore(args, state)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        try:
            self._attribute(state.global_step, "train_end")
        finally:
            self._shutdown()

    # ----------------------------------------------------------------------------- micro-batches
    def on_substep_end(self, args, state, control, optimizer=None, **kwargs) -> None:
        self._commit(args, optimizer, optimizer_step=False)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        self._commit(args, optimizer, optimizer_step=True)

    def _commit(self, args: Any, optimizer: Any, optimizer_step: bool) -> None:
        if self.session is None or self.inputs is None:
            return
        recorded = self.inputs.pop()
        if not recorded:
            self._warn_once("no-forward", "infl_plugin: no training forward of the model was seen for a micro-batch "
                            "(is the callback's model the one being trained?); its statistics are skipped")
            return
        if len(recorded) > 1:
            self._warn_once("forwards", f"infl_plugin: {len(recorded)} training forwards in one micro-batch (a custom "
                            "compute_loss?); statistics use the last one's loss scale")
        micro = recorded[-1]
        scale = None
        if self.session.capturing:  # otherwise unused: skip its device syncs
            try:
                scale = self.inputs.scale.grad_scale(micro, args, self.trainer, optimizer)
            except Exception as error:  # never break training: the micro-batch's statistics are skipped
                warnings.warn(f"infl_plugin: could not work out the loss scale of a micro-batch: {error}",
                              stacklevel=2)
                scale = math.nan
        self.session.after_backward(micro.batch, scale, optimizer_step)

    # ----------------------------------------------------------------------------- attribution
    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._attribute(state.global_step, "every_n_steps")

    def on_evaluate(self, args, state, control, **kwargs) -> None:
        self._attribute(state.global_step, "evaluate")

    def on_save(self, args, state, control, **kwargs) -> None:
        if self.session is None:
            return
        self._attribute(state.global_step, "save")
        with self.session.tolerant("writing the influence state into the checkpoint"):
            self._save_state(args, state)

    def _attribute(self, step: int, reason: str) -> None:
        if self.session is not None and self.session.has_data:
            self.session.maybe_attribute(step, reason)

    # ----------------------------------------------------------------------------- data and logging
    def _set_data(self, args: Any, collate: Optional[Callable], train_dataloader: Any) -> None:
        if self.queries is None:
            self._warn_once("no-queries", "infl_plugin: InfluenceTrainerCallback got no queries; curvature statistics "
                            "are tracked and checkpointed, nothing is attributed")
            return
        candidates = self.candidates
        if candidates is None:
            candidates = getattr(train_dataloader, "dataset", None)
            if not hasattr(candidates, "__getitem__"):
                candidates = getattr(self.trainer, "train_dataset", None)
        if candidates is None or not hasattr(candidates, "__getitem__") or not hasattr(candidates, "__len__"):
            raise ValueError("InfluenceTrainerCallback needs an indexable training set to score: pass candidates=...")
        batch_size = self.batch_size or args.per_device_eval_batch_size
        indices = None if self.max_candidates is None else spaced_indices(len(candidates), self.max_candidates)
        query_loader = self.queries if isinstance(self.queries, torch.utils.data.DataLoader) else make_loader(
            self.queries, batch_size, collate)
        query_dataset = getattr(query_loader, "dataset", None)
        self.session.set_data(query_loader, make_loader(candidates, batch_size, collate, indices),
                              query_dataset=query_dataset, candidate_dataset=candidates, candidate_indices=indices)

    def _open_reporter(self, args: Any, tokenizer: Any, collate: Optional[Callable]) -> None:
        logdir = self.logdir or tensorboard_logdir(args, self.trainer)
        writer = self.writer
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = self._own_writer = self._own_writer or SummaryWriter(log_dir=logdir)
        reporter = TokenReporter(writer, tokenizer=tokenizer, collate_fn=collate, sequences=self.token_sequences,
                                 top_tokens=self.top_tokens)
        reporter.session = self.session
        self.session.reporter = reporter
        self.session.artifact_dir = logdir

    # ----------------------------------------------------------------------------- checkpoints
    def _save_state(self, args: Any, state: Any) -> None:
        session_state = self.session.state_dict()  # a collective: every rank
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        save_state(folder, session_state, {"global_step": int(state.global_step)})

    def _restore(self, args: Any, state: Any) -> None:
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        folder = next((c for c in candidates if isinstance(c, str) and os.path.isfile(_state_path(c, ".json"))), None)
        if folder is None:
            self._warn_once("no-state", f"infl_plugin: resuming at step {state.global_step} without a saved influence "
                            "state (looked in resume_from, args.resume_from_checkpoint, output_dir/checkpoint-N); "
                            "curvature statistics restart from zero")
            return
        session_state, meta = load_state(folder)
        if meta.get("global_step") != state.global_step:
            warnings.warn(f"infl_plugin: the influence state in {folder} is from step {meta.get('global_step')}, "
                          f"training resumes at step {state.global_step}", stacklevel=2)
        self.session.load_state_dict(session_state, rank=args.process_index)

    # ----------------------------------------------------------------------------- teardown
    def _guard_training_loop(self) -> None:
        """Take the hooks off when an exception leaves the Trainer's epoch loop (no Trainer event says so)."""
        trainer = self.trainer
        run_epoch = getattr(trainer, "_run_epoch", None)
        if run_epoch is None or getattr(run_epoch, "_infl_guard", False):
            return

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return run_epoch(*args, **kwargs)
            except BaseException:
                self._shutdown()
                raise

        guarded._infl_guard = True  # type: ignore[attr-defined]
        trainer._run_epoch = guarded

    def _shutdown(self) -> None:
        """Hooks off, writer closed, Trainer left as found; safe to call twice."""
        if self.inputs is not None:
            self.inputs.close()
        if self.session is not None:
            self.session.close()
        if self.trainer is not None and getattr(self.trainer.__dict__.get("_run_epoch"), "_infl_guard", False):
            del self.trainer.__dict__["_run_epoch"]
        if self._own_writer is not None:
            self._own_writer.flush()
            self._own_writer.close()
            self._own_writer = None
        self.trainer = None

    def _close_session(self) -> None:
        self._shutdown()
        self.session, self.inputs = None, None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------------- helpers
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
    raise ValueError(f"InfluenceTrainerCallback cannot pick a task for {name}; pass task=CausalLMTask(), "
                     "ClassificationTask() or your own infl_plugin.Task subclass")


def tensorboard_logdir(args: Any, trainer: Any = None) -> str:
    """Where the run's TensorBoard events go: ``TENSORBOARD_LOGGING_DIR``, else the directory of the
    Trainer's own ``TensorBoardCallback`` (``report_to="tensorboard"``), else ``args.logging_dir``
    (older transformers), else ``output_dir/runs``."""
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        if type(callback).__name__ == "TensorBoardCallback" and getattr(callback, "logging_dir", None):
            return callback.logging_dir
    return getattr(args, "logging_dir", None) or os.path.join(args.output_dir, "runs")


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose method is running this callback (found on the call stack)."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def _unwrapped(model: Optional[nn.Module], args: Any, trainer: Any) -> nn.Module:
    """The module whose layers are hooked; refuses compiled models (their graphs bypass module hooks)."""
    if model is None:
        raise ValueError("InfluenceTrainerCallback.on_train_begin received no model")
    wrapped = getattr(trainer, "model_wrapped", None)
    compiled = getattr(args, "torch_compile", False) or any(hasattr(m, "_orig_mod") for m in (model, wrapped))
    if compiled:
        raise RuntimeError(
            "InfluenceTrainerCallback does not support torch.compile (torch_compile=True or a compiled model): "
            "compiled graphs do not run the per-layer hooks that collect influence statistics. Train without "
            "torch_compile while the callback is attached.")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _state_path(folder: str, suffix: str) -> str:
    return os.path.join(folder, STATE_FILE + suffix)


def save_state(folder: str, state: dict, meta: Optional[dict] = None) -> None:
    """Write a nested state (tensors, dicts, lists, tuples, scalars) as safetensors + JSON."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "", tensors)
    os.makedirs(folder, exist_ok=True)
    tmp = _state_path(folder, ".safetensors.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, _state_path(folder, ".safetensors"))
    with open(_state_path(folder, ".json.tmp"), "w", encoding="utf-8") as handle:
        json.dump({"meta": meta or {}, "state": tree}, handle)
    os.replace(_state_path(folder, ".json.tmp"), _state_path(folder, ".json"))


def load_state(folder: str) -> tuple[dict, dict]:
    """Read what `save_state` wrote: ``(state, meta)``."""
    with open(_state_path(folder, ".json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    tensors = load_file(_state_path(folder, ".safetensors"))
    return _unflatten(saved["state"], tensors), saved["meta"]


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": {str(k): _flatten(v, f"{key}/{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        items = [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    return value


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(_unflatten(v, tensors) for v in tree["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in tree["__dict__"].items()}
    return tree


__all__ = ["InfluenceTrainerCallback", "MicroBatch", "TrainerLossScale", "TrainingInputs", "default_task",
           "load_state", "save_state", "tensorboard_logdir"]
