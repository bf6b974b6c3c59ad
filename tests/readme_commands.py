"""The README's commands as the tests run them: each test that runs one passes the
README's line word for word to ``readme_argv``, and tests/test_readme.py checks that every
command line of the README is such a literal somewhere under tests/."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
# The project's executables (the venv's), by the name the README uses.
EXECUTABLES = {"snakemake": str(BIN / "snakemake"), "vlmflow": str(BIN / "vlmflow")}


def readme_argv(command: str, *extra: str) -> list[str]:
    """The argv of a README ``command`` (the venv's executable first), ``extra`` after it:
    ``-n`` where the README's command would run the whole DAG."""
    words = shlex.split(command)
    if words[0] not in EXECUTABLES:
        raise ValueError(f"{command!r}: not a snakemake or vlmflow command")
    return [EXECUTABLES[words[0]], *words[1:], *extra]
