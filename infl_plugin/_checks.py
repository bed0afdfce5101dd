"""Field validators shared by every configuration dataclass; each error names ``owner.field`` and what it allows."""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigurationError


class KnownFields(type):
    """Metaclass refusing unknown keyword arguments with a message instead of Python's TypeError."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        reject_unknown_fields(cls, kwargs)
        return super().__call__(*args, **kwargs)


def plain_fields(values: Any) -> dict[str, Any]:
    """The fields of a dataclass instance (not recursively), an OmegaConf DictConfig (resolved to
    plain containers) or a mapping, as a ``dict``."""
    if is_dataclass(values) and not isinstance(values, type):
        return {f.name: getattr(values, f.name) for f in fields(values)}
    if isinstance(values, DictConfig):
        return dict(OmegaConf.to_container(values, resolve=True))
    return dict(values)


def reject_unknown_fields(cls: type, values: Any, owner: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming the keys of ``values`` that are not fields of dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigurationError(f"{owner or cls.__name__} has no field(s) {unknown}; allowed fields: {sorted(known)}")


def choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """A string among ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ConfigurationError(f"{owner}.{name} must be one of {list(allowed)}, got {value!r}")


def positive_int(owner: str, name: str, value: Any) -> None:
    """An integer >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


def integer(owner: str, name: str, value: Any, minimum: int, optional: bool) -> None:
    """An integer >= ``minimum`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{owner}.{name} must be {'None or ' if optional else ''}an integer >= {minimum}, "
                                 f"got {value!r}")


def positive_number(owner: str, name: str, value: Any) -> None:
    """A finite int or float > 0 (bools and strings refused)."""
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{owner}.{name} must be a finite number > 0, got {value!r}")


def flag(owner: str, name: str, value: Any, optional: bool = False) -> None:
    """``True`` or ``False`` (or ``None`` when ``optional``)."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ConfigurationError(f"{owner}.{name} must be {'None, ' if optional else ''}True or False, got {value!r}")


__all__ = ["KnownFields", "choice", "flag", "integer", "plain_fields", "positive_int", "positive_number",
           "reject_unknown_fields"]
