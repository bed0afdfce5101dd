"""What the run layer knows of a reporter: the `Reporter` protocol and the `ExampleSource` it reads."""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

from ..results.artifacts import AttributionResult


class ExampleSource(Protocol):
    """Gives the reporter the examples behind dataset indices (``None`` when unavailable)."""

    def query_example(self, index: int) -> Any: ...

    def candidate_example(self, index: int) -> Any: ...


@runtime_checkable
class Reporter(Protocol):
    """What ``InfluenceSession.reporter`` must implement: log one attribution (called on the main
    process after each attribution, inside the session's tolerant guard: an exception warns).

    A reporter with state across attributions may also define ``state_dict()`` (plain containers
    and tensors) and ``load_state_dict(state)``: the session saves it with its own state, so a
    resumed run continues it.
    """

    def log(self, result: AttributionResult, source: Optional[ExampleSource] = None,
            step: Optional[int] = None) -> None: ...


__all__ = ["ExampleSource", "Reporter"]
