"""One validated configuration object for the whole pipeline, its fields in four groups.

`InfluenceConfig` is a plain dataclass, so it works as an OmegaConf structured config
(``OmegaConf.structured(InfluenceConfig)``) and as LightningCLI ``init_args``. Every field is
checked in ``__post_init__``; an invalid value raises `ConfigurationError` (a ``ValueError``)
naming the field and the allowed values. An unknown keyword (``InfluenceConfig(dampnig=1)``) is
refused the same way, naming the allowed fields, by the small metaclass `KnownFields` (the
dataclass's own ``__init__`` and fields stay untouched, so OmegaConf and LightningCLI see a
plain dataclass).

The fields fall in four groups (`infl_plugin.config.groups`): ``config.curvature``,
``config.tracking``, ``config.scoring`` and ``config.streaming`` are frozen views of theirs, and a
group may be given as a keyword or a YAML block (``InfluenceConfig(scoring={"damping": 0.1})``)
beside the flat keywords, which stay the primary spelling (``InfluenceConfig(damping=0.1)``,
``config.damping``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any, List, Optional

from .. import _checks
from .._checks import KnownFields, plain_fields, reject_unknown_fields
from ..errors import ConfigurationError
from .choices import ACCUMULATION_DTYPES, FISHERS, STRATEGIES, STREAM_WEIGHTS, SUPPORTED_TYPES
from .groups import GROUP_FIELDS, flatten_groups, group_classes

_KnownFields = KnownFields  # the name the options module used before `_checks` held it


class _GroupedFields(KnownFields):
    """`KnownFields` that also takes the groups (``curvature=``, ``scoring=``, …) as keywords."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **flatten_groups(cls.__name__, kwargs))


@dataclass
class InfluenceConfig(metaclass=_GroupedFields):
    """Settings of curvature tracking, factor fitting and scoring.

    Attributes:
        strategy: curvature approximation: ``"identity"`` (plain gradient dot products),
            ``"diagonal"`` (diagonal Fisher), ``"kfac"`` (A ⊗ S) or ``"ekfac"`` (A ⊗ S eigenbasis
            with eigenvalues corrected to E[(Q_Sᵀ DW Q_A)²], the paper's method).
        damping: λ in (G + λI)⁻¹. ``None`` uses 0.1 × mean(eigenvalues) per layer (the paper's
            heuristic); a float is an absolute value and must be > 0.
        fisher: ``"empirical"`` uses the real labels (free from the training backward);
            ``"sampled"`` draws labels from the model's predictive distribution (the true Fisher,
            one extra forward/backward per sampled step).
        modules: fnmatch patterns on qualified module names (``"transformer.h.*.mlp.*"``);
            ``None`` tracks every supported layer.
        module_types: class names to track, among ``"Linear"``, ``"Conv1D"`` and ``"Conv2d"``;
            combined with ``modules`` as an intersection. ``None`` accepts every supported type.
            Default selection (``modules=None``): every supported layer with a trainable
            parameter, except the unembedding (output head over the vocabulary: the layer a
            model reports as its output embeddings, a layer whose weight is tied to an
            ``nn.Embedding``, or the last layer with a vocabulary-sized output when the vocabulary is
            over twice as wide as every other layer), which the paper leaves
            out and whose ``vocabulary²`` statistics alone take gigabytes; a warning names what
            was left out. Patterns in ``modules`` that match such a layer (``["*"]``,
            ``["lm_head"]``) track it. Only trainable parameters belong to a layer's gradient
            (a frozen weight with a trainable bias is a bias-only layer).
        query_rank: rank r of each layer's preconditioned query gradient (paper: 32). ``None``
            keeps queries at full rank.
        update_every: accumulate curvature statistics on every n-th optimizer step. Exact
            statistics cost about as much as the tracked layers' forward and backward, so the
            default 32 keeps tracking to a few percent of training; use 1 for short runs. EK-FAC
            eigenvalues come from the statistics steps between attributions: with fewer than
            ``min_statistics_steps`` of them an attribution reads them in a bounded pass instead.
        sample_every: with ``fisher="sampled"``, run the sampled-label pass every n-th
            statistics step.
        accumulation_dtype: ``"float32"`` or ``"float64"`` for the accumulators, whatever the
            model's dtype.
        max_fit_batches: bound on the batches read by each post-hoc fitting pass (``None``: all).
        seed: seed (an integer) of the generator that draws pseudo-labels for the sampled Fisher.
        stream_every: with streaming queries set (see `InfluenceTracker`), score the examples of
            every n-th optimizer step from its training backward; n > 1 trades coverage (examples
            trained on at other steps get no score from that visit) for overhead.
        stream_refresh_every: the longest interval, in optimizer steps, between refreshes of the
            streaming queries (re-differentiated and re-preconditioned at the current parameters
            with the best factors available). Early in a run the intervals double from one step
            (refreshes at steps 1, 2, 4, 8, …) up to this cap, so a 100-step fine-tune streams with
            curvature from its first steps and a long run pays a handful of extra refreshes. Each
            costs one query pass plus the preconditioning (1.7 s for 16 full-rank queries on the
            small GPT-2 of benchmarks/streaming.py, 42 s for rank-32 queries at width 1024, whose
            exact truncated SVD dominates). Default 200: a few percent of training for a few
            full-rank queries; an `InfluenceSession` (the callbacks) also refreshes them at every
            attribution. ``None``: only when the queries are set or
            `InfluenceTracker.refresh_queries` is called (no automatic refresh at all).
        stream_weight: per-step weight of streamed scores. ``"none"`` sums an example's scores
            over its visits (the influence of the example at the times it was trained on);
            ``"lr"`` multiplies each step's scores by the learning rate the caller passes as
            ``weight=`` (the step length the example actually moved the parameters by, as in
            TracIn): use it when the learning rate varies a lot over the scored steps (warm-up,
            decay to zero), so that visits at a negligible learning rate do not count fully.
        fisher_samples: with ``fisher="sampled"``, pseudo-label draws per example in each
            post-hoc pass (`fit_factors`, the tracker's bounded eigenvalue pass); the statistics
            average over the draws. During training the draws accumulate over epochs instead (one
            per visit of an example). Must be 1 with ``fisher="empirical"``.
        half_life: optimizer steps after which a training step's curvature statistics weigh half
            as much (an exponential moving average, decayed at every statistics step); ``None``
            weighs the whole run equally (unless ``half_life_fraction`` is set). Tie it to the
            attribution interval.
        half_life_fraction: a half-life that grows with the run: at each statistics step the
            sums decay with a half-life of this fraction of the optimizer steps so far, so a step
            s weighs ``(s / t)^(ln 2 / fraction)`` at step t (0.25: the last half of the run holds
            about 86 % of the weight, whatever the run's length). Ignored when ``half_life`` is
            set; ``None`` (default): no such forgetting.
        statistics_fraction: fraction of each statistics step's examples (a random subset,
            rounded up) whose statistics are taken; with ``update_every=1`` a fraction ``1/k``
            spreads the cost of statistics on every k-th step over every step.
        min_statistics_steps: statistics steps the EK-FAC eigenvalues accumulated during training
            must rest on to be used (default 32: 1,024 optimizer steps at ``update_every=32``).
            With fewer, an attribution given a loader (the callbacks' candidates) reads the
            eigenvalues in a bounded pass at the current parameters instead (logged at INFO;
            ``max_fit_batches`` bounds it), and one without a loader warns; the eigenbasis is
            kept until enough accumulated.
            Eigenvalues from 4-15 statistics steps lost 0.02-0.03 LDS against post-hoc factors,
            the bounded pass about 0.01 (``benchmarks/fidelity.py --lds``). 1: always use the
            tracked eigenvalues.
        refine_steps: preconditioned conjugate-gradient steps refining each query's
            preconditioned gradient towards ``(G + Λ)⁻¹ ∇f(q)`` with G the exact Gauss-Newton
            matrix of the tracked parameters (``Λ``: each layer's damping), EK-FAC as the
            preconditioner (`infl_plugin.scoring.refine`). Each step costs one Gauss-Newton-vector product
            per query over ``refine_batches`` training batches. 0 (default): plain EK-FAC.
        refine_batches: evenly spaced training batches the Gauss-Newton-vector products of
            ``refine_steps`` read (the curvature data given to the `Attributor`).
    """

    strategy: str = "ekfac"
    damping: Optional[float] = None
    fisher: str = "empirical"
    modules: Optional[List[str]] = None
    module_types: Optional[List[str]] = None
    query_rank: Optional[int] = None
    update_every: int = 32
    sample_every: int = 1
    accumulation_dtype: str = "float32"
    max_fit_batches: Optional[int] = None
    seed: int = 0
    stream_every: int = 1
    stream_refresh_every: Optional[int] = 200
    stream_weight: str = "none"
    fisher_samples: int = 1
    half_life: Optional[float] = None
    half_life_fraction: Optional[float] = None
    statistics_fraction: float = 1.0
    min_statistics_steps: int = 32
    refine_steps: int = 0
    refine_batches: int = 8

    def __post_init__(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("fisher", self.fisher, FISHERS)
        _choice("accumulation_dtype", self.accumulation_dtype, ACCUMULATION_DTYPES)
        _damping(self.damping)
        _positive_int("update_every", self.update_every)
        _positive_int("sample_every", self.sample_every)
        if self.query_rank is not None:
            _positive_int("query_rank", self.query_rank)
        if self.max_fit_batches is not None:
            _positive_int("max_fit_batches", self.max_fit_batches)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigurationError(f"InfluenceConfig.seed must be an integer, got {self.seed!r}")
        _positive_int("stream_every", self.stream_every)
        if self.stream_refresh_every is not None:
            _positive_int("stream_refresh_every", self.stream_refresh_every)
        _choice("stream_weight", self.stream_weight, STREAM_WEIGHTS)
        _positive_int("fisher_samples", self.fisher_samples)
        if self.fisher_samples > 1 and self.fisher != "sampled":
            raise ConfigurationError(
                f"InfluenceConfig.fisher_samples must be 1 unless fisher='sampled', got {self.fisher_samples!r} "
                f"with fisher={self.fisher!r}"
            )
        if self.half_life is not None:
            _positive_number("half_life", self.half_life)
        if self.half_life_fraction is not None:
            _positive_number("half_life_fraction", self.half_life_fraction)
        _positive_number("statistics_fraction", self.statistics_fraction)
        if self.statistics_fraction > 1:
            raise ConfigurationError(
                f"InfluenceConfig.statistics_fraction must be a number in (0, 1], got {self.statistics_fraction!r}"
            )
        _positive_int("min_statistics_steps", self.min_statistics_steps)
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ConfigurationError(f"InfluenceConfig.refine_steps must be an integer >= 0, got {self.refine_steps!r}")
        _positive_int("refine_batches", self.refine_batches)
        for name in ("modules", "module_types"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                    raise ConfigurationError(f"InfluenceConfig.{name} must be None or a list of strings, got {value!r}")
                if len(value) == 0:
                    raise ConfigurationError(f"InfluenceConfig.{name} must be None or a non-empty list of strings")
                setattr(self, name, list(value))
        if self.module_types is not None:
            for value in self.module_types:
                _choice("module_types", value, SUPPORTED_TYPES)

    @property
    def curvature(self) -> Any:
        """The curvature group: ``strategy``, ``fisher``, ``modules``, ``module_types``,
        ``accumulation_dtype``, ``seed``, ``fisher_samples``, ``max_fit_batches``."""
        return self._group("curvature")

    @property
    def tracking(self) -> Any:
        """The tracking group: ``update_every``, ``sample_every``, ``half_life``,
        ``half_life_fraction``, ``statistics_fraction``, ``min_statistics_steps``."""
        return self._group("tracking")

    @property
    def scoring(self) -> Any:
        """The scoring group: ``damping``, ``query_rank``, ``refine_steps``, ``refine_batches``."""
        return self._group("scoring")

    @property
    def streaming(self) -> Any:
        """The streaming group: ``stream_every``, ``stream_refresh_every``, ``stream_weight``."""
        return self._group("streaming")

    def _group(self, name: str) -> Any:
        return GROUPS[name](**{field: getattr(self, field) for field in GROUP_FIELDS[name]})

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python copy, flat (for JSON metadata, artifacts and logging)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "InfluenceConfig":
        """Build from a mapping (a loaded JSON or a DictConfig), flat or with group blocks; unknown
        keys are an error."""
        values = flatten_groups(cls.__name__, dict(values))
        reject_unknown_fields(cls, values)
        return cls(**values)


def resolve_config(owner: str, config: Any) -> InfluenceConfig:
    """``config`` as an `InfluenceConfig`: ``None`` (the defaults), an instance, or a mapping /
    OmegaConf DictConfig of its fields; anything else raises `ConfigurationError` naming ``owner.config``."""
    if config is None:
        return InfluenceConfig()
    if isinstance(config, InfluenceConfig):
        return config
    if hasattr(config, "keys"):
        return InfluenceConfig.from_dict(plain_fields(config))
    raise ConfigurationError(f"{owner}.config must be None, an InfluenceConfig or a mapping of its fields, got "
                             f"{type(config).__name__}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    _checks.choice("InfluenceConfig", name, value, allowed)


def _positive_int(name: str, value: Any) -> None:
    _checks.positive_int("InfluenceConfig", name, value)


def _positive_number(name: str, value: Any) -> None:
    _checks.positive_number("InfluenceConfig", name, value)


def _damping(value: Any) -> None:
    """``None`` or a finite number > 0 (``inf`` would zero every score, NaN would poison them)."""
    if value is None:
        return
    ok = not isinstance(value, (bool, str)) and isinstance(value, (int, float))
    if not (ok and math.isfinite(value) and value > 0.0):
        raise ConfigurationError(
            f"InfluenceConfig.damping must be None (heuristic) or a finite float > 0, got {value!r}"
        )


InfluenceConfig.__signature__ = inspect.Signature(  # the dataclass fields, not the metaclass's (*args, **kwargs)
    list(inspect.signature(InfluenceConfig.__init__).parameters.values())[1:]
)

GROUPS = group_classes(InfluenceConfig)  # group name → its frozen dataclass
CurvatureSettings, TrackingSettings, ScoringSettings, StreamingSettings = (GROUPS[g] for g in GROUP_FIELDS)

__all__ = ["ACCUMULATION_DTYPES", "CurvatureSettings", "FISHERS", "GROUPS", "InfluenceConfig", "STRATEGIES",
           "STREAM_WEIGHTS", "ScoringSettings", "StreamingSettings", "TrackingSettings", "plain_fields",
           "reject_unknown_fields", "resolve_config"]
