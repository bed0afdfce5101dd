"""Influence followed over training: a fixed set of examples per query, across attributions.

Which examples rank first changes from one attribution to the next, so a series "score of rank 1"
mixes different examples. `InfluenceHistory` instead remembers, per key (a query, or
``"self_influence"``), every dataset index that entered the top ranks at some attribution, and
records that example's value at every later attribution: one series is one example. It also
gives the Jaccard overlap of each key's top set with the previous attribution's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """``|a ∩ b| / |a ∪ b|`` (1.0 for two empty sets)."""
    a, b = set(a), set(b)
    union = a | b
    return len(a & b) / len(union) if union else 1.0


@dataclass
class TrackedExample:
    """One example's series: ``steps``, ``values`` (e.g. raw scores) and ``shares`` (% of Σ|score|)."""

    index: int
    direction: str  # "helpful" or "harmful": how it first entered the tracked set
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)


class InfluenceHistory:
    """Tracked examples per key across attributions (reporter state; see the module docstring).

    Args:
        max_tracked: at most this many examples per key; once full, new top examples are not added
            (the earliest ones stay, so old series are never cut).
    """

    def __init__(self, max_tracked: int = 24) -> None:
        if max_tracked < 1:
            raise ValueError(f"max_tracked must be >= 1, got {max_tracked!r}")
        self.max_tracked = max_tracked
        self.tracked: dict[str, dict[int, TrackedExample]] = {}
        self.previous_top: dict[str, set[int]] = {}

    def reset(self) -> None:
        self.tracked.clear()
        self.previous_top.clear()

    def update(self, key: str, step: int, entering: dict[int, str],
               value: Callable[[int], Optional[tuple[float, float]]]) -> dict[int, TrackedExample]:
        """Add ``entering`` (index → direction) to ``key``'s tracked set, then record
        ``value(index) = (value, share)`` for every tracked index at ``step`` (skipped when ``None``).

        Returns the tracked examples of ``key`` (index → series), in the order they entered.
        """
        examples = self.tracked.setdefault(key, {})
        for index, direction in entering.items():
            if index not in examples and len(examples) < self.max_tracked:
                examples[index] = TrackedExample(int(index), direction)
        for index, example in examples.items():
            got = value(index)
            if got is None:
                continue
            if example.steps and example.steps[-1] == step:  # a second attribution at one step replaces the first
                example.steps.pop(), example.values.pop(), example.shares.pop()
            example.steps.append(int(step))
            example.values.append(float(got[0]))
            example.shares.append(float(got[1]))
        return examples

    def state_dict(self) -> dict[str, Any]:
        """Plain containers (lists, dicts, numbers): every series and the previous top sets, so that a
        resumed run continues the same lines."""
        return {"tracked": {key: [asdict(e) for e in examples.values()] for key, examples in self.tracked.items()},
                "previous_top": {key: sorted(top) for key, top in self.previous_top.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracked = {key: {int(e["index"]): TrackedExample(int(e["index"]), str(e["direction"]), list(e["steps"]),
                                                              list(e["values"]), list(e["shares"])) for e in examples}
                        for key, examples in state["tracked"].items()}
        self.previous_top = {key: {int(i) for i in top} for key, top in state["previous_top"].items()}

    def overlap(self, key: str, top: Iterable[int]) -> Optional[float]:
        """Jaccard overlap of ``top`` with ``key``'s previous top set (``None`` the first time); stores ``top``."""
        top = set(int(i) for i in top)
        previous = self.previous_top.get(key)
        self.previous_top[key] = top
        return None if previous is None else jaccard(top, previous)


__all__ = ["InfluenceHistory", "TrackedExample", "jaccard"]
