"""The package's shape stays as docs/ARCHITECTURE.md draws it: layers importing only downward
(every import counted: module level, function-local and ``TYPE_CHECKING`` ones), no import
cycle, small modules, and a core that imports without the frameworks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top to bottom; a module may import its own layer and the ones below it
LAYERS = ["integrations", "run", "report", "results", "scoring", "curvature", "config", "leaves"]
LEAVES = {"errors", "_checks", "serialization", "tasks", "distributed"}
MAX_LINES = 400
MAX_TOP_LEVEL_MODULES = 10


def _modules() -> dict[str, Path]:
    """Dotted name → file of every module of the package (the adapters as ``infl_plugin.integrations``)."""
    found = {}
    for base, prefix in ((ROOT / "infl_plugin", "infl_plugin"), (ROOT / "integrations", "infl_plugin.integrations")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                       for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "top"  # the public API re-exports every layer
    return "leaves" if parts[1] in LEAVES else parts[1]


def test_every_module_belongs_to_a_layer():
    assert {_layer(name) for name in MODULES} <= set(LAYERS) | {"top"}


def test_imports_only_go_downward():
    upward = [f"{name} ({_layer(name)}) imports {target} ({_layer(target)})"
              for name, targets in GRAPH.items() if _layer(name) != "top" for target in sorted(targets)
              if _layer(target) == "top" or LAYERS.index(_layer(target)) < LAYERS.index(_layer(name))]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append(" → ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_modules_are_small_and_few_sit_at_the_top():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
    top = sorted((ROOT / "infl_plugin").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, [p.name for p in top]


def test_the_core_imports_without_transformers_and_lightning():
    """Every core module (all but the adapters) imports with both frameworks blocked."""
    core = sorted(name for name in MODULES if not name.startswith("infl_plugin.integrations"))
    code = ("import importlib, sys\n"
            "for blocked in ('transformers', 'lightning', 'pytorch_lightning'):\n"
            "    sys.modules[blocked] = None\n"
            f"for name in {core!r}:\n"
            "    importlib.import_module(name)\n"
            "assert not any(sys.modules.get(m) for m in ('transformers', 'lightning'))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]  # an import error or a framework pulled in


def test_core_tests_run_without_transformers_and_lightning():
    """The core tests' models (``tests/models.py``) and a core test file need neither framework."""
    code = ("import sys\n"
            "for blocked in ('transformers', 'lightning', 'pytorch_lightning'):\n"
            "    sys.modules[blocked] = None\n"
            "import pytest\n"
            "sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', 'tests/test_statistics.py']))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
