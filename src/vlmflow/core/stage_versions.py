"""The version of what each stage writes.

Snakemake reruns a job when its params change, not when the Python code behind its
script does: the stages' code lives in this package, which Snakemake does not track. So
each stage that writes data has a version here, and a change to what it writes (another
row, column, token or pixel, for the same inputs and settings) bumps it. The version
reaches the rule's ``settings`` param (``versioned``), so a bump reruns exactly that
stage's jobs and what reads their outputs, and ``vlmflow status`` names the outputs an
older version made. ``tests/test_stage_versions.py`` keeps a digest of each stage's
outputs on fixed inputs and fails when the outputs change while the version does not.

The table lives here, not beside each stage's code, because the Snakefile reads it at
parse time in every job: importing the stages would import torch there.
"""

from __future__ import annotations

import re
from typing import Any

STAGE_VERSIONS: dict[str, int] = {
    "ingest": 1,
    "caption": 1,
    "attributes_phase1": 1,
    "attributes_phase2": 1,
    "h5": 1,
    "train_phase1": 1,
    "train_phase2": 1,
    "evaluate": 1,
}
# The version every stage had before versions existed: its outputs carry no version in
# their params, so they stay up to date until the first bump.
FIRST = 1
KEY = "stage_version"
_RECORDED = re.compile(rf"'{KEY}': (\d+)")


def versioned(rule: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the stage's version in them from version 2 on."""
    version = STAGE_VERSIONS[rule]
    return settings if version == FIRST else {**settings, KEY: version}


def without_version(settings: dict[str, Any]) -> dict[str, Any]:
    """A script's ``settings`` param without the version (its settings class has none)."""
    return {key: value for key, value in settings.items() if key != KEY}


def recorded_version(params: list[str]) -> int:
    """The stage version in a job's recorded params (Snakemake's reprs of the values)."""
    for value in params:
        found = _RECORDED.search(value)
        if found:
            return int(found.group(1))
    return FIRST
