"""What the DDP scripts share: writing a run's report and leaving the process group cleanly."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch


def save_report(out: Path, name: str, rank: int, report: dict[str, Any]) -> None:
    """Rank 0: ``OUT/<name>.pt`` (everything but the warnings); every rank: ``OUT/<name>_rank<r>.json``
    (its counters, strings and lists)."""
    if rank == 0:
        torch.save({k: v for k, v in report.items() if k != "warnings"}, out / f"{name}.pt")
    public = {k: v for k, v in report.items() if isinstance(v, (int, str, list)) and k != "parameters"}
    (out / f"{name}_rank{rank}.json").write_text(json.dumps(public))


def run(main: Callable[[Path], None]) -> None:
    """``main(OUT)`` with one thread, then the process group destroyed after a barrier: no process
    tears gloo down while the other is still inside a collective, and not at interpreter exit,
    where gloo's threads can abort the process."""
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
