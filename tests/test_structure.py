"""The package's shape, measured from its source: its layers (import-linter's contracts
in pyproject.toml), no import cycles, no module importing another module's private names,
no module over 600 lines, no function over 80 (docs/architecture.md)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vlmflow"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """vlmflow's modules; remote_code is model code loaded by transformers, not vlmflow's."""
    return {
        module_name(path): path
        for path in sorted(PACKAGE.rglob("*.py"))
        if "remote_code" not in path.relative_to(PACKAGE).parts
    }


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, leaving out ``if TYPE_CHECKING:`` blocks (imports for type hints only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """(imported module, imported name or "") of every vlmflow import in a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, "") for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .mod import y
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # a submodule, not a name in base
                    yield f"{base}.{alias.name}", ""
                elif base in known:
                    yield base, alias.name


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {target for target, _ in imports(name, path, known) if target != name}
        for name, path in known.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_find_cycles_finds_a_cycle_and_nothing_else() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 20, "the walk found vlmflow's modules"
    assert find_cycles(graph) == []


def test_no_module_imports_another_modules_private_names() -> None:
    known = modules()
    offenders = [
        f"{name} imports {target}.{imported}"
        for name, path in known.items()
        for target, imported in imports(name, path, known)
        if imported.startswith("_") and target != name
    ]
    assert offenders == []


def long_functions() -> Iterator[str]:
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    yield f"{name}.{node.name}: {lines} lines"


def test_no_function_is_longer_than_80_lines() -> None:
    assert list(long_functions()) == []


def test_the_layers_hold_as_import_linter_checks_them() -> None:
    """stages -> families -> core, reporting -> core, the demo above the stages, no stage
    importing another (pyproject.toml's [tool.importlinter]; TYPE_CHECKING imports count)."""
    lint = Path(sys.executable).with_name("lint-imports")
    env = os.environ | {"PYTHONPATH": str(SRC)}  # this tree's package, whatever is installed
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=SRC.parent, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_paths_from_before_the_folders_import_the_same_modules() -> None:
    import importlib

    import vlmflow

    for old, new in [("caption", "stages.caption"), ("ingest.parts", "stages.ingest.parts")]:
        assert importlib.import_module(f"vlmflow.{old}") is importlib.import_module(
            f"vlmflow.{new}"
        )
    assert vlmflow.moved_to("vlmflow.logs") == "vlmflow.core.logs"
    assert vlmflow.moved_to("vlmflow.checks") is None  # never moved
    # Every moved module is where the table says.
    assert all(
        (PACKAGE / path.replace(".", "/")).with_suffix(".py").is_file()
        or (PACKAGE / path.replace(".", "/")).is_dir()
        for path in vlmflow.MOVED.values()
    )


def test_no_module_is_longer_than_600_lines() -> None:
    long = {
        name: count
        for name, path in modules().items()
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these modules (at most {MAX_MODULE_LINES} lines): {long}"
