"""Every command the README shows is run by a test, by `make demo` or by CI (`.ci/run`).

Each command is mapped to the file that runs it and the text there that does; a command
added to the README without a runner, or a runner that stops running it, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAKEFILE = REPO / "Makefile"

# README command -> (the file that runs it, the text in that file that runs it).
RUN_BY: dict[str, tuple[str, str]] = {
    "make demo": ("Makefile", "demo: setup"),
    "make setup-system": (".ci/run", "make setup-system"),
    "make test": (".ci/run", "make test"),
    "make test-slurm": (".ci/run", "make test-slurm"),
    "make test-vllm": (".ci/run", "make test-vllm"),
    "make setup-vllm": ("Makefile", "test-vllm: setup setup-vllm"),
    "snakemake --profile profiles/local all": ("Makefile", "--profile profiles/local all"),
    "snakemake --profile profiles/local -n all": (
        "tests/workflow/test_dag.py",
        'snakemake(workdir, "-n", "all")',
    ),
    "snakemake --profile profiles/slurm all": ("tests/slurm/test_slurm.py", '"profiles/slurm"'),
    "snakemake --report results/report.html all": ("Makefile", "--report results/report.html all"),
    "vlmflow status": ("tests/workflow/test_status.py", '[VLMFLOW, "status", *args]'),
    "snakemake --profile profiles/slurm all --configfile config/presets/llava15.yaml": (
        "tests/workflow/test_presets.py",
        'README_PRESETS = [("llava15",), ("rovi", "llava15")]',
    ),
    "snakemake --profile profiles/slurm all --configfile config/presets/rovi.yaml "
    "config/presets/llava15.yaml": (
        "tests/workflow/test_presets.py",
        'README_PRESETS = [("llava15",), ("rovi", "llava15")]',
    ),
    "grep -ho": ("tests/workflow/test_presets.py", 'readme.split("grep -ho", 1)'),
    "vlmflow miniatures": ("tests/workflow/test_presets.py", '[VLMFLOW, "miniatures"'),
    "pytest -m presets": ("pyproject.toml", "presets:"),
    "snakemake --profile profiles/local all --configfile config/vllm.yaml": (
        "tests/workflow/test_vllm_dag.py",
        'OVERLAY = ("--configfile", "config/vllm.yaml")',
    ),
}


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
    return commands


def runner_of(command: str) -> tuple[str, str]:
    if command.startswith("grep -ho"):
        return RUN_BY["grep -ho"]
    return RUN_BY[command]


def test_the_readme_has_commands_and_fits_in_200_lines() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200
    assert "make demo" in readme_commands() and "vlmflow status" in readme_commands()


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_is_run_by_a_test_make_demo_or_ci(command: str) -> None:
    assert command.startswith("grep -ho") or command in RUN_BY, f"nothing runs {command!r}"
    path, text = runner_of(command)
    assert text in (REPO / path).read_text(encoding="utf-8"), f"{path} no longer runs {command!r}"
    if command.startswith("make "):
        target = command.split()[1]
        assert re.search(rf"^{re.escape(target)}:", MAKEFILE.read_text(), flags=re.M)
