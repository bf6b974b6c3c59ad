"""Every command the README shows is run as written: by a test, by `make demo` or by CI.

- ``snakemake ...`` and ``vlmflow ...`` lines: a test passes the README's line, word for
  word, to ``run_readme`` / ``readme_argv`` (tests.readme_commands), which runs exactly
  that (with ``-n`` after it where it would run the whole DAG);
- ``make T``: the Makefile has target T, and the test commands are lines of ``.ci/run``;
- the download loop: tests/workflow/test_presets.py runs the README's own text;
- ``pytest -m presets``: the marker is declared and the preset tests carry it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAKEFILE = REPO / "Makefile"
CI = REPO / ".ci" / "run"
RUNNERS = ("run_readme", "readme_argv")
# README commands CI runs, one line each of .ci/run.
CI_COMMANDS = {"make setup-system", "make test", "make test-slurm", "make test-vllm"}


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks and its inline `vlmflow ...` commands."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command and not line.startswith((" ", "\t")):
                commands.append(
                    command.split(" |", 1)[0] if command.startswith("grep") else command
                )
    commands += re.findall(r"`(vlmflow miniatures|pytest -m presets)\b", text)
    return sorted(set(commands))


def commands_the_tests_run() -> dict[str, str]:
    """README-style command -> the test file that runs it: the string literals passed to
    run_readme / readme_argv, or held in a module constant (a list of them) such a call
    takes."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if not any(f"{runner}(" in source for runner in RUNNERS):
            continue
        for node in ast.walk(ast.parse(source)):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and value.startswith(("snakemake ", "vlmflow ")):
                found.setdefault(value, str(path.relative_to(REPO)))
    return found


def test_the_readme_has_commands_and_fits_in_200_lines() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200
    assert "make demo" in readme_commands() and "vlmflow status" in readme_commands()


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_is_run_as_written(command: str) -> None:
    if command.startswith("make "):
        target = command.split()[1]
        assert re.search(rf"^{re.escape(target)}:", MAKEFILE.read_text(), flags=re.M)
        if command in CI_COMMANDS:
            assert command in CI.read_text(encoding="utf-8").splitlines()
        return
    if command.startswith("grep -ho"):
        presets = (REPO / "tests/workflow/test_presets.py").read_text(encoding="utf-8")
        assert 'readme.split("grep -ho", 1)' in presets
        return
    if command == "pytest -m presets":
        assert "presets:" in (REPO / "pyproject.toml").read_text(encoding="utf-8")
        presets = (REPO / "tests/workflow/test_presets.py").read_text(encoding="utf-8")
        assert "pytest.mark.presets" in presets
        return
    if command == "vlmflow miniatures":  # inline; its whole line is in the README's text
        presets = (REPO / "tests/workflow/test_presets.py").read_text(encoding="utf-8")
        assert '[VLMFLOW, "miniatures", "--configfile"' in presets
        return
    assert command in commands_the_tests_run(), f"no test runs {command!r} as written"


def test_make_demo_runs_the_readme_commands_the_tests_run() -> None:
    """`make demo`'s recipe is the README's run and report commands (with the venv's
    snakemake), so what the tests run is what the demo runs."""
    recipe = MAKEFILE.read_text(encoding="utf-8").split("\ndemo: setup\n", 1)[1].split("\n\n")[0]
    lines = [line.strip().removeprefix("$(BIN)/") for line in recipe.splitlines()]
    run = commands_the_tests_run()
    assert lines[0] in run
    report = lines[1].replace(" --profile profiles/local", "")
    assert report in run
