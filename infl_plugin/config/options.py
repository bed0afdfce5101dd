"""`AttributionOptions`: what both training callbacks share, in one validated dataclass.

The Lightning `InfluenceCallback` and the Hugging Face `InfluenceTrainerCallback` attribute on
the same schedule, choose queries and candidates the same way and report the same views; this is
the one place those options are declared, documented and checked. Like `InfluenceConfig` it is a
plain dataclass, so it works as an OmegaConf structured config
(``OmegaConf.structured(AttributionOptions)``) and as a nested LightningCLI argument, and an
invalid or unknown value raises `ConfigurationError` (a ``ValueError``) naming the field and what
it allows, at construction. Names never collide with callback hooks (``attribute_on_save``, not
``on_save``).

Callbacks take the options as ``options=`` (an `AttributionOptions`, a mapping or a DictConfig)
and any of its fields as keywords (``every_n_steps=100``), merged by `resolve_options`, which also
maps the earlier names (``on_save``, ``on_evaluate``, ``at_train_end``, ``max_candidates``) with a
``DeprecationWarning``.
"""

from __future__ import annotations

import contextvars
import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, List, Optional

from .._checks import KnownFields, flag, integer, plain_fields, reject_unknown_fields
from ..errors import ConfigurationError
from .choices import DEFAULT_CANDIDATES, RENDERERS, check_candidates

DEPRECATED_NAMES = {"on_save": "attribute_on_save", "on_evaluate": "attribute_on_evaluate",
                    "at_train_end": "attribute_at_train_end", "max_candidates": "num_candidates"}

_OWNER: contextvars.ContextVar[str] = contextvars.ContextVar("infl_plugin_options_owner", default="AttributionOptions")


@dataclass
class AttributionOptions(metaclass=KnownFields):
    """When to attribute, what to score, and what to keep and show.

    Attributes:
        every_n_steps: attribute every n optimizer steps (``None``: not on a step count).
        attribute_on_save: attribute whenever a checkpoint is saved; ``None`` (default): only when
            ``every_n_steps`` is ``None``, so a step schedule is not multiplied by the saves.
        attribute_on_evaluate: attribute after each evaluation during training.
        attribute_at_train_end: attribute when training ends (at most one attribution per step).
        num_queries: how many query examples to explain, evenly spaced over the ones given
            (``None``: all; a ready query loader is used as it is).
        candidates: what an attribution scores (`infl_plugin.run.candidates`): ``"stream"`` (the
            training examples seen since the previous attribution, with the scores streamed from
            their training backward, no candidate pass; ``"all"`` until streamed scores exist),
            ``"all"`` (a pass over the training set in a fixed order), ``"tfidf"`` (each query's
            ``num_candidates`` nearest training examples by TF-IDF of their text or token ids),
            ``"random"`` (a fixed seeded subset of ``num_candidates``), or an indexable dataset
            (not in a YAML/structured config) to score in full instead of the training set.
        num_candidates: ``"tfidf"``: candidates per query; ``"random"``: subset size; ``"all"`` and
            the ``"stream"`` fallback: at most this many evenly spaced examples (``None``: all).
        top_k: most helpful / harmful examples kept and shown per query.
        self_influence: also rank every candidate by self-influence (finds mislabeled examples;
            forms per-example gradients, keep off for very wide layers).
        batch_size: batch size of the attribution passes (default: the training loader's in
            Lightning, ``per_device_eval_batch_size`` in Hugging Face).
        num_workers: worker processes of the attribution loaders.
        renderer: how an example is shown: one of ``"auto"``, ``"image"``, ``"text"``, ``"repr"``,
            or a `infl_plugin.report.renderers.Renderer` (not in a YAML/structured config).
        image_shape: reshape flat examples to this image shape (``[8, 8]`` for sklearn digits).
        token_sequences: per query, the top helpful and harmful sequences whose per-token and
            per-layer scores are computed and shown (token inputs only; 0: none).
        top_tokens: tokens marked per shown sequence.
        progress: progress bar over the candidates during an attribution.
        strict: raise statistics, attribution and checkpoint-state errors instead of warning.
    """

    every_n_steps: Optional[int] = None
    attribute_on_save: Optional[bool] = None
    attribute_on_evaluate: bool = False
    attribute_at_train_end: bool = True
    num_queries: Optional[int] = 8
    candidates: Any = DEFAULT_CANDIDATES
    num_candidates: Optional[int] = None
    top_k: int = 10
    self_influence: bool = False
    batch_size: Optional[int] = None
    num_workers: int = 0
    renderer: Any = "auto"
    image_shape: Optional[List[int]] = None
    token_sequences: int = 3
    top_tokens: int = 8
    progress: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        owner = _OWNER.get()
        for name, minimum, optional in (("every_n_steps", 1, True), ("num_queries", 1, True),
                                        ("top_k", 1, False), ("batch_size", 1, True), ("num_workers", 0, False),
                                        ("token_sequences", 0, False), ("top_tokens", 1, False)):
            integer(owner, name, getattr(self, name), minimum, optional)
        flag(owner, "attribute_on_save", self.attribute_on_save, optional=True)
        for name in ("attribute_on_evaluate", "attribute_at_train_end", "self_influence", "progress", "strict"):
            flag(owner, name, getattr(self, name))
        check_candidates(self.candidates, self.num_candidates, owner, allow_dataset=True)
        renderer = self.renderer
        if not (renderer in RENDERERS if isinstance(renderer, str) else callable(renderer) or hasattr(renderer, "render")):
            raise ConfigurationError(f"{owner}.renderer must be one of {list(RENDERERS)} or a Renderer, "
                                     f"got {self.renderer!r}")
        if self.image_shape is not None:
            shape = list(self.image_shape)
            if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
                raise ConfigurationError(f"{owner}.image_shape must be None or a list of integers >= 1, "
                                         f"got {self.image_shape!r}")
            self.image_shape = shape

    @property
    def candidate_mode(self) -> str:
        """The `infl_plugin.run.candidates` mode: ``candidates``, or ``"all"`` for a given dataset."""
        return self.candidates if isinstance(self.candidates, str) else "all"

    @property
    def candidate_dataset(self) -> Any:
        """The dataset given as ``candidates`` (``None``: the training set)."""
        return None if isinstance(self.candidates, str) else self.candidates


def resolve_options(owner: str, options: Any = None, **overrides: Any) -> AttributionOptions:
    """``options`` (``None``, an `AttributionOptions`, a mapping or a DictConfig) with ``overrides``
    (fields given as keywords) applied, validated with ``owner`` naming the fields in errors
    (``InfluenceCallback.top_k must be …``). Deprecated names are mapped with a warning; giving a
    deprecated name and its new name together, or an unknown name, is an error.

    A keyword equal to its field's default does not replace the value set in ``options``: a
    LightningCLI passes every keyword of the signature, defaults included, next to a nested
    ``options:`` block, which must keep its values."""
    for old, new in DEPRECATED_NAMES.items():
        if old in overrides:
            if new in overrides:
                raise ConfigurationError(f"{owner}.{old} is the deprecated name of {new}: set only {new}")
            warnings.warn(f"{owner}.{old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)
            overrides[new] = overrides.pop(old)
    reject_unknown_fields(AttributionOptions, overrides, owner=owner)
    if options is not None:  # a keyword left at its default keeps the value set in ``options``
        overrides = {k: v for k, v in overrides.items() if not _is_default(k, v)}
    token = _OWNER.set(owner)
    try:
        if options is None:
            return AttributionOptions(**overrides)
        if isinstance(options, AttributionOptions):
            return replace(options, **overrides)
        if isinstance(options, Mapping) or hasattr(options, "keys"):
            values = plain_fields(options)
            reject_unknown_fields(AttributionOptions, values, owner=f"{owner}.options")
            return AttributionOptions(**{**values, **overrides})
        raise ConfigurationError(f"{owner}.options must be None, an AttributionOptions or a mapping of its fields, "
                                 f"got {type(options).__name__}")
    finally:
        _OWNER.reset(token)


def _is_default(name: str, value: Any) -> bool:
    """Whether ``value`` is field ``name``'s default (plain values only: a dataset is never one)."""
    default = _DEFAULTS[name]
    return type(value) is type(default) and isinstance(value, (bool, int, str, type(None))) and value == default


AttributionOptions.__signature__ = inspect.Signature(  # the dataclass fields, not the metaclass's (*args, **kwargs)
    list(inspect.signature(AttributionOptions.__init__).parameters.values())[1:]
)

OPTION_FIELDS = tuple(f.name for f in fields(AttributionOptions))
_DEFAULTS = {f.name: f.default for f in fields(AttributionOptions)}

__all__ = ["AttributionOptions", "DEPRECATED_NAMES", "OPTION_FIELDS", "resolve_options"]
