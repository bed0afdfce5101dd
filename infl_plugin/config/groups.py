"""`InfluenceConfig`'s fields in four groups, the way the pipeline reads them.

* ``curvature``: what the statistics and factors are (strategy, Fisher, layers, dtype, the
  pseudo-label seed and draws, the post-hoc passes' bound);
* ``tracking``: how training steps feed them (interval, sampled passes, forgetting, subsets,
  how many statistics steps tracked eigenvalues need);
* ``scoring``: how factors become scores (damping, query rank, refined solve);
* ``streaming``: how the training backward is scored (interval, query refreshes, step weights).

The configuration stays one flat dataclass (what OmegaConf, LightningCLI, ``dataclasses.replace``
and the artifacts read); a group is a frozen view of its fields (``config.scoring.damping``) and
is accepted as input beside flat keywords (``InfluenceConfig(scoring={"damping": 0.1})``, a
``scoring:`` block in YAML). `SHAPES_STATISTICS` names the fields a resumed run must keep: the
saved sums, eigenbasis and generator state mean something else under other values of these; all
other fields may change between runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, field, fields, is_dataclass, make_dataclass
from typing import Any

from ..errors import ConfigurationError

GROUP_FIELDS: dict[str, tuple[str, ...]] = {
    "curvature": ("strategy", "fisher", "modules", "module_types", "accumulation_dtype", "seed", "fisher_samples",
                  "max_fit_batches"),
    "tracking": ("update_every", "sample_every", "half_life", "half_life_fraction", "statistics_fraction",
                 "min_statistics_steps"),
    "scoring": ("damping", "query_rank", "refine_steps", "refine_batches"),
    "streaming": ("stream_every", "stream_refresh_every", "stream_weight"),
}
SHAPES_STATISTICS = ("strategy", "fisher", "modules", "module_types", "accumulation_dtype", "seed", "update_every",
                     "sample_every", "half_life", "half_life_fraction", "statistics_fraction")
_DOCS = {
    "curvature": "What the statistics and factors are (see `InfluenceConfig` for each field).",
    "tracking": "How training steps feed the statistics (see `InfluenceConfig` for each field).",
    "scoring": "How factors become scores (see `InfluenceConfig` for each field).",
    "streaming": "How the training backward is scored (see `InfluenceConfig` for each field).",
}


def group_classes(config_cls: type) -> dict[str, type]:
    """One frozen dataclass per group, its fields (types and defaults) those of ``config_cls``."""
    source = {f.name: f for f in fields(config_cls)}
    classes = {}
    for group, names in GROUP_FIELDS.items():
        spec = [(n, source[n].type, field(default=source[n].default)) for n in names]
        cls = make_dataclass(f"{group.capitalize()}Settings", spec, frozen=True)
        cls.__doc__ = _DOCS[group]
        cls.__module__ = __name__
        classes[group] = cls
    return classes


def flatten_groups(owner: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with each group (a mapping or a group dataclass) replaced by its fields; a field
    given both flat and in its group, or a group holding another group's field, is an error."""
    out = {k: v for k, v in values.items() if k not in GROUP_FIELDS}
    for group in GROUP_FIELDS:
        if group not in values or values[group] is None:
            continue
        block = values[group]
        if is_dataclass(block) and not isinstance(block, type):
            block = asdict(block)
        if not isinstance(block, Mapping) and not hasattr(block, "keys"):
            raise ConfigurationError(f"{owner}.{group} must be a mapping of its fields {list(GROUP_FIELDS[group])}, "
                                     f"got {type(block).__name__}")
        for name in block:
            if name not in GROUP_FIELDS[group]:
                raise ConfigurationError(f"{owner}.{group} has no field {name!r}; its fields: "
                                         f"{list(GROUP_FIELDS[group])}")
            if name in out:
                raise ConfigurationError(f"{owner}.{name} is given twice: as a keyword and in {group}")
            out[name] = block[name]
    return out


def statistics_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The `SHAPES_STATISTICS` fields whose value in ``current`` differs from ``saved`` (a field the
    saved configuration lacks, from a version before the field existed, is not compared)."""
    return [name for name in SHAPES_STATISTICS if name in saved and saved[name] != current[name]]


__all__ = ["GROUP_FIELDS", "SHAPES_STATISTICS", "flatten_groups", "group_classes", "statistics_changes"]
