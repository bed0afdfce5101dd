"""What an `InfluenceSession` saves into a checkpoint and restores from one (plain containers and tensors).

The functions take the session itself (typed ``Any``: this module sits below it).
"""

from __future__ import annotations

from typing import Any

from ..serialization import clone_state

STATE_VERSION = 1


def session_state(session: Any) -> dict:
    """Statistics and streamed scores (summed over processes: call on every rank), the
    streaming queries and their factors, counters, the tracker's RNG and, on the main process,
    the reporter's state (when it has one).

    Tensors are copies: later training does not change a returned state.
    """
    tracker_state = session.tracker.state_dict(gathered=True)
    if session.tracker.statistics is not None:
        tracker_state["statistics"] = clone_state(session.tracker.statistics.reduced().state_dict())
    state = {
        "version": STATE_VERSION,
        "tracker": tracker_state,
        "last_attribution_step": session.schedule.last_step,
        "attributions": session.attributions,
        "failed_attributions": session.policy.failed_attributions,
        "failed_batches": session.policy.failed_batches,
    }
    reporter_state = session.publisher.reporter_state()
    if reporter_state is not None:
        state["reporter"] = clone_state(reporter_state)
    return state


def restore_session(session: Any, state: dict, rank: int = 0) -> None:
    """Restore a `session_state`. Statistics were summed over processes when saved, so only rank 0
    keeps the sums (statistics and streamed scores); other ranks start from zero in the same
    eigenbasis, with the same streaming queries."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"Unsupported InfluenceSession state version {state.get('version')!r}")
    session.tracker.load_state_dict(clone_state(state["tracker"]), sums=rank == 0)
    session.schedule.last_step = state["last_attribution_step"]
    session.attributions = int(state["attributions"])
    session.policy.failed_attributions = int(state["failed_attributions"])
    session.policy.failed_batches = int(state["failed_batches"])
    if rank == 0 and state.get("reporter") is not None:
        session.publisher.load_reporter_state(state["reporter"])


__all__ = ["STATE_VERSION", "restore_session", "session_state"]
