"""`SideTaskPolicy`: how work done beside training (statistics, attributions, reports) behaves.

Two promises hold for everything infl_plugin does inside a training run: it never changes
training (extra passes run with the tracker's hooks paused, in forked torch / numpy / ``random``
RNG states, with gradients enabled even under ``torch.inference_mode``) and it never stops
training (a failure is counted and warned about, unless ``strict`` asks for it to be raised).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from ..curvature.passes import forked_rng
from ..curvature.tracker import CurvatureTracker

WARN_FIRST_BATCHES = 5  # skipped micro-batches warned about one by one; then every 100th


class SideTaskPolicy:
    """Isolation, tolerance and failure counts of the side tasks of one training run."""

    def __init__(self, tracker: CurvatureTracker, strict: bool = False) -> None:
        self.tracker = tracker
        self.strict = strict
        self.failed_batches = 0
        self.failed_attributions = 0

    @contextmanager
    def isolated(self, pause: bool = True) -> Iterator[None]:
        """Run an extra pass that training must not see: RNG states forked, gradients enabled and,
        with ``pause``, the tracker's training sink paused (no statistics, no streamed scores;
        ``pause=False`` for calls that install a sink, which the tracker pauses around its own passes)."""
        with (self.tracker.paused() if pause else nullcontext()), forked_rng(), torch.inference_mode(False), \
                torch.enable_grad():
            yield

    @contextmanager
    def tolerant(self, what: str) -> Iterator[None]:
        """Run a side task: an error is raised when ``strict``, else warned about (naming ``what``)."""
        try:
            yield
        except Exception as error:
            if self.strict:
                raise
            warnings.warn(f"infl_plugin: {what} failed: {type(error).__name__}: {error}", stacklevel=3)

    def batch_failed(self, error: Exception) -> None:
        """Count a training micro-batch whose statistics were skipped; raise it when ``strict``."""
        self.failed_batches += 1
        if self.strict:
            raise error
        if self.failed_batches <= WARN_FIRST_BATCHES or self.failed_batches % 100 == 0:
            warnings.warn(f"infl_plugin: skipped a training micro-batch's statistics ({type(error).__name__}: {error}); "
                          f"{self.failed_batches} skipped so far", stacklevel=4)

    def attribution_failed(self, error: Exception, what: str) -> None:
        """Count a failed attribution; raise it when ``strict``."""
        self.failed_attributions += 1
        if self.strict:
            raise error
        warnings.warn(f"infl_plugin: {what} failed: {type(error).__name__}: {error}", stacklevel=4)


__all__ = ["SideTaskPolicy"]
