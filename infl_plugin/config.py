"""One validated configuration object for the whole pipeline.

`InfluenceConfig` is a plain dataclass, so it works as an OmegaConf structured config
(``OmegaConf.structured(InfluenceConfig)``) and as LightningCLI ``init_args``. Every field is
checked in ``__post_init__``; an invalid value raises ``ValueError`` naming the field and the
allowed values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, List, Optional

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHERS = ("empirical", "sampled")
ACCUMULATION_DTYPES = ("float32", "float64")


@dataclass
class InfluenceConfig:
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
        module_types: class names to track (``["Linear", "Conv1D"]``); combined with ``modules``
            as an intersection. ``None`` accepts every supported type.
        query_rank: rank r of each layer's preconditioned query gradient (paper: 32). ``None``
            keeps queries at full rank.
        update_every: accumulate curvature statistics on every n-th optimizer step. Exact
            statistics cost about as much as the tracked layers' forward and backward, so the
            default 32 keeps tracking to a few percent of training; use 1 for short runs, and keep
            an attribution interval of about 10 × ``update_every`` steps or more (EK-FAC
            eigenvalues come from the statistics steps between attributions).
        sample_every: with ``fisher="sampled"``, run the sampled-label pass every n-th
            statistics step.
        accumulation_dtype: ``"float32"`` or ``"float64"`` for the accumulators, whatever the
            model's dtype.
        max_fit_batches: bound on the batches read by each post-hoc fitting pass (``None``: all).
        seed: seed of the generator that draws pseudo-labels for the sampled Fisher.
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

    def __post_init__(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("fisher", self.fisher, FISHERS)
        _choice("accumulation_dtype", self.accumulation_dtype, ACCUMULATION_DTYPES)
        if self.damping is not None and not float(self.damping) > 0.0:
            raise ValueError(f"InfluenceConfig.damping must be None (heuristic) or a float > 0, got {self.damping!r}")
        _positive_int("update_every", self.update_every)
        _positive_int("sample_every", self.sample_every)
        if self.query_rank is not None:
            _positive_int("query_rank", self.query_rank)
        if self.max_fit_batches is not None:
            _positive_int("max_fit_batches", self.max_fit_batches)
        for name in ("modules", "module_types"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"InfluenceConfig.{name} must be None or a list of strings, got {value!r}")
                if len(value) == 0:
                    raise ValueError(f"InfluenceConfig.{name} must be None or a non-empty list of strings")
                setattr(self, name, list(value))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python copy (for JSON metadata and logging)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "InfluenceConfig":
        """Build from a mapping (a loaded JSON or a DictConfig); unknown keys are an error."""
        reject_unknown_fields(cls, values)
        return cls(**dict(values))


def reject_unknown_fields(cls: type, values: Any, owner: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming the keys of ``values`` that are not fields of dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{owner or cls.__name__} has no field(s) {unknown}; allowed fields: {sorted(known)}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"InfluenceConfig.{name} must be one of {list(allowed)}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"InfluenceConfig.{name} must be an integer >= 1, got {value!r}")


__all__ = ["InfluenceConfig", "STRATEGIES", "FISHERS", "ACCUMULATION_DTYPES", "reject_unknown_fields"]
