"""When an attribution runs: `Reason` (the event asking for one) and `AttributionSchedule`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Union

from ..errors import ConfigurationError
from ..config.options import AttributionOptions


class Reason(str, Enum):
    """The training event that asks for an attribution (its value is what artifacts record)."""

    EVERY_N_STEPS = "every_n_steps"
    SAVE = "save"
    EVALUATE = "evaluate"
    TRAIN_END = "train_end"
    MANUAL = "manual"

    @classmethod
    def parse(cls, value: Union[str, "Reason"]) -> "Reason":
        """A `Reason` from itself or its value; other values raise `ConfigurationError` naming the allowed ones."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigurationError(f"reason must be one of {[r.value for r in cls]}, got {value!r}") from None


@dataclass
class AttributionSchedule:
    """Which events attribute, and at most one attribution per optimizer step.

    ``on_save`` is already resolved (`from_options` turns ``attribute_on_save=None`` into "only
    without a step schedule"); ``last_step`` is the step of the latest attribution.
    """

    every_n_steps: Optional[int] = None
    on_save: bool = True
    on_evaluate: bool = False
    at_train_end: bool = True
    last_step: Optional[int] = None

    @classmethod
    def from_options(cls, options: AttributionOptions) -> "AttributionSchedule":
        on_save = options.every_n_steps is None if options.attribute_on_save is None else options.attribute_on_save
        return cls(options.every_n_steps, on_save, options.attribute_on_evaluate, options.attribute_at_train_end)

    def due(self, step: int, reason: Union[str, Reason]) -> bool:
        """Whether ``reason`` at optimizer step ``step`` asks for an attribution."""
        reason = Reason.parse(reason)
        if self.last_step == step:
            return False
        if reason is Reason.EVERY_N_STEPS:
            return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0
        return {Reason.SAVE: self.on_save, Reason.EVALUATE: self.on_evaluate, Reason.TRAIN_END: self.at_train_end,
                Reason.MANUAL: True}[reason]


__all__ = ["AttributionSchedule", "Reason"]
