"""Shared helpers of the benchmark scripts (not part of the library).

* `machine` — one line describing where the numbers were taken;
* `timed` / `interleaved` — median wall-clock timings (interleaved round-robin, so that ratios
  compare configurations measured side by side under the same machine load);
* `PeakRSS` / `run_isolated` — peak resident memory of one phase, measured in a fresh
  subprocess (Linux ``/proc/self/clear_refs`` + ``VmHWM``; ``ru_maxrss`` as fallback);
* `table` / `write_section` — a Markdown table, and replacing one ``## heading`` section of
  ``benchmarks/RESULTS.md`` (sections written by other scripts are left as they are);
* `tiny_gpt2`, `lm_batches`, `digits_mlp`, `digits_batches` — the small models used everywhere.

Usage::

    from common import interleaved, table, write_section, machine
    med = interleaved({"plain": step, "tracked": tracked_step}, repeats=7)
    write_section("Overhead", table(["config", "ms"], rows), command="python benchmarks/overhead.py")
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
CACHE = HERE / ".cache"


# ------------------------------------------------------------------------------------- machine
def setup_threads(default: int = 2) -> int:
    """Use ``OMP_NUM_THREADS`` (default ``default``) torch threads; returns the number used."""
    n = int(os.environ.get("OMP_NUM_THREADS", default))
    torch.set_num_threads(n)
    return n


def machine() -> str:
    """CPU model, usable cores, torch threads, accelerator, versions — one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
        mem_s = f", {mem:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        mem_s = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU only)"
    return (
        f"{cpu}, {cores} cores available{mem_s}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"{gpu}, Python {platform.python_version()}"
    )


def command() -> str:
    """The command line that produced this run, as it would be typed from the repository root."""
    script = os.path.relpath(sys.argv[0], ROOT) if sys.argv else "?"
    return " ".join(["python", shlex.quote(script)] + [shlex.quote(a) for a in sys.argv[1:]])


# ------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    return interleaved({"fn": fn}, repeats, warmup)["fn"]


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per configuration, calling them round-robin (warm-up calls not timed)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------- memory
class PeakRSS:
    """Peak resident memory (MiB) of the code inside ``with PeakRSS() as m: ...`` → ``m.peak_mib``.

    Resets the kernel's high-water mark on entry (``/proc/self/clear_refs``, Linux), so only what
    the block adds to the process counts; ``m.baseline_mib`` is the RSS on entry and
    ``m.delta_mib = peak - baseline``. Without clear_refs it falls back to ``ru_maxrss`` (the peak
    of the whole process). Measure one configuration per fresh process (`run_isolated`): freed
    torch memory may stay mapped and hide later peaks.
    """

    def __enter__(self) -> "PeakRSS":
        self.reset = _reset_hwm()
        self.baseline_mib = _status_kib("VmRSS") / 1024
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_kib("VmHWM") if self.reset else 0
        if not hwm:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.peak_mib = hwm / 1024
        self.delta_mib = self.peak_mib - self.baseline_mib

    method = "peak RSS (VmHWM after resetting it via /proc/self/clear_refs) in a fresh process per configuration"


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_isolated(script: str, args: Sequence[str], timeout: float = 600) -> dict:
    """Run ``python script *args`` in a fresh process; it must print one JSON line prefixed ``RESULT ``."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{script} {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


def emit_result(values: dict) -> None:
    """Child side of `run_isolated`."""
    print("RESULT " + json.dumps(values), flush=True)


# ------------------------------------------------------------------------------------- reporting
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats are printed with 3 significant digits (or as given if str)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(heading: str, body: str, command_line: Optional[str] = None, path: Path = RESULTS) -> None:
    """Replace (or append) the ``## heading`` section of ``path``; other sections stay as they are.

    The section gets the command and the machine description, then ``body``. The file is locked
    while it is rewritten, so scripts run side by side do not lose each other's sections.
    """
    cmd = command_line or command()
    stamp = time.strftime("%Y-%m-%d %H:%M")
    section = f"## {heading}\n\nCommand: `{cmd}` ({stamp})\n\nMachine: {machine()}\n\n{body.strip()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read()
        if not text.strip():
            text = "# Benchmark results\n\nEach section is written by the script named in it; rerun it to refresh.\n"
        pattern = re.compile(rf"^## {re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
        if pattern.search(text):
            text = pattern.sub(lambda _: section + "\n", text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + section
        handle.seek(0)
        handle.truncate()
        handle.write(text.rstrip("\n") + "\n")
        fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------- models and data
def tiny_gpt2(layers: int = 4, width: int = 256, seq: int = 128, vocab: int = 8192, linear: bool = False, seed: int = 0):
    """A small randomly initialised GPT-2 (``transformers.GPT2LMHeadModel``), dropout off.

    ``linear=True`` swaps GPT-2's ``Conv1D`` layers for equivalent ``nn.Linear`` (kronfluence only
    tracks ``nn.Linear``/``nn.Conv2d``), so both libraries can run on the very same model.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=layers, n_embd=width, n_head=max(1, width // 64), n_positions=seq, vocab_size=vocab,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    if linear:
        conv1d_to_linear(model)
    return model


def conv1d_to_linear(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``transformers`` ``Conv1D`` by an ``nn.Linear`` computing the same function."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Conv1D":
                d_in, d_out = child.weight.shape
                linear = torch.nn.Linear(d_in, d_out, bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


def lm_batches(n: int, batch_size: int, seq: int = 128, vocab: int = 8192, seed: int = 0) -> list[dict]:
    """``n`` synthetic token sequences (Zipf-distributed ids, so the model has something to fit)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = (1.0 / ranks) / (1.0 / ranks).sum()
    ids = torch.multinomial(probs, n * seq, replacement=True, generator=g).reshape(n, seq)
    return [{"input_ids": ids[i: i + batch_size]} for i in range(0, n, batch_size)]


def digits_mlp(hidden: int = 128, seed: int = 0) -> torch.nn.Module:
    """The 64 → hidden → hidden → 10 MLP used for the sklearn digits data."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def digits_batches(batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """sklearn's bundled 8×8 digits (1797 images, no download), standardised, in fixed batches."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y, dtype=torch.long)
    return [(x[i: i + batch_size], y[i: i + batch_size]) for i in range(0, len(x), batch_size)]
