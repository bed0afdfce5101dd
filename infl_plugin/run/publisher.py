"""`Publisher`: where an attribution's result goes — the reporter, the artifact file, one log line.

The run layer knows the reporter only by its protocol (`infl_plugin.report.protocol.Reporter`);
the adapters construct it. A reporter's state restored from a checkpoint before the reporter
exists waits here and is handed to it when it is set.
"""

from __future__ import annotations

import time

from typing import Callable, Optional

from ..report.protocol import ExampleSource, Reporter
from ..results.artifacts import AttributionResult, write_artifact
from .side_tasks import SideTaskPolicy


class Publisher:
    """Reports and writes each result on the main process; failures warn, never raise (unless strict).

    Args:
        policy: the session's `SideTaskPolicy` (tolerance and isolation from training).
        log: a function taking one line.
    """

    def __init__(self, policy: SideTaskPolicy, log: Callable[[str], None]) -> None:
        self.policy = policy
        self.log = log
        self.artifact_dir: Optional[str] = None
        self.last_result: Optional[AttributionResult] = None
        self._reporter: Optional[Reporter] = None
        self._reporter_state: Optional[dict] = None  # a loaded reporter state waiting for its reporter

    @property
    def reporter(self) -> Optional[Reporter]:
        return self._reporter

    @reporter.setter
    def reporter(self, reporter: Optional[Reporter]) -> None:
        self._reporter = reporter
        self._restore_reporter()

    def reporter_state(self) -> Optional[dict]:
        """The reporter's ``state_dict()`` when it has one (else ``None``)."""
        if self._reporter is not None and hasattr(self._reporter, "state_dict"):
            return self._reporter.state_dict()
        return None

    def load_reporter_state(self, state: dict) -> None:
        """Restore the reporter's state now, or when a reporter is set."""
        self._reporter_state = state
        self._restore_reporter()

    def _restore_reporter(self) -> None:
        if self._reporter_state is not None and self._reporter is not None and hasattr(self._reporter, "load_state_dict"):
            with self.policy.tolerant("restoring the reporter's state"):
                self._reporter.load_state_dict(self._reporter_state)
            self._reporter_state = None

    def publish(self, result: AttributionResult, source: Optional[ExampleSource]) -> None:
        """Report ``result`` (isolated from training), write its artifact, and log one line. The
        report's time (TensorBoard tables and figures) is itemised as ``durations["report"]`` in
        the artifact, outside ``duration_s`` (the attribution itself)."""
        self.last_result = result
        if self.reporter is not None:
            started = time.perf_counter()
            with self.policy.tolerant(f"writing the report of step {result.step}"), self.policy.isolated():
                self.reporter.log(result, source, result.step)
            result.extra.setdefault("durations", {})["report"] = time.perf_counter() - started
        if self.artifact_dir is not None:
            with self.policy.tolerant(f"writing the artifact of step {result.step}"):
                write_artifact(self.artifact_dir, result)
        self.log(f"infl_plugin: attribution at step {result.step} ({result.reason}) scored {result.num_candidates} "
                 f"candidates ({result.candidate_mode}) against {result.num_queries} queries in {result.duration_s:.2f}s "
                 f"(strategy={result.strategy}, fisher={result.fisher})")


__all__ = ["Publisher"]
