"""A copy of the workflow in a temp folder, run on a subset of the sample data."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.readme_commands import readme_argv

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
WORKFLOW_FILES = ["Snakefile", "rules", "workflow", "config", "profiles", "envs"]


def snakemake(
    workdir: Path,
    *args: str,
    profile: str = "profiles/local",
    timeout: int = 1200,
    env: dict[str, str | None] | None = None,
    launcher: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run Snakemake in ``workdir`` with a profile of the repo (and ``env`` added to the
    environment, a None value removing that variable); output is captured. ``launcher``:
    the command that runs Snakemake's command line instead of its executable."""
    argv = [*(launcher or [SNAKEMAKE]), "--profile", profile, *args]
    return run_in(workdir, argv, env, timeout)


def run_readme(
    workdir: Path,
    command: str,
    *extra: str,
    env: dict[str, str | None] | None = None,
    timeout: int = 1200,
) -> subprocess.CompletedProcess[str]:
    """Run a README ``command`` as written (tests.readme_commands), ``extra`` after it."""
    return run_in(workdir, readme_argv(command, *extra), env, timeout)


def run_in(
    workdir: Path, argv: list[str], env: dict[str, str | None] | None, timeout: int
) -> subprocess.CompletedProcess[str]:
    """``argv`` in ``workdir``, offline, the venv first on PATH, ``env`` added (a None
    value removes that variable); output captured."""
    merged = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    clean = {name: value for name, value in merged.items() if isinstance(value, str)}
    clean["PATH"] = f"{Path(sys.executable).parent}:{clean['PATH']}"
    return subprocess.run(
        argv, cwd=workdir, env=clean, capture_output=True, text=True, timeout=timeout
    )


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a dry run as {rule: count}; {} when nothing is to be done."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if not match:
            break
        counts[match[1]] = int(match[2])
    counts.pop("total", None)
    return counts


def job_outputs(output: str, rule: str) -> list[str]:
    """The ``output:`` line of every job of ``rule`` in a dry run's job listing."""
    outputs = []
    for block in re.split(r"\n(?:local)?rule ", output)[1:]:
        if block.startswith(f"{rule}:"):
            match = re.search(r"^\s+output: (.*)$", block, flags=re.MULTILINE)
            outputs.append(match[1] if match else "")
    return outputs


def assert_only_ingest_of(output: str, tar: str) -> None:
    """A dry run's ``output`` plans one ingest job, of shard ``tar``, and the ingest
    index and summary after it: nothing else."""
    assert job_counts(output) == {"ingest": 1, "shard_index": 1, "ingest_summary": 1}
    [ingest] = job_outputs(output, "ingest")
    assert ingest.startswith(tar)


def write_url_list(rows: list[dict[str, str]], images: Path, path: Path) -> None:
    """A URL list of ``file:`` URLs relative to the list's folder (local files a list may
    name by default), pointing at copies of the sample images."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["key", "url", "caption"])
        for row in rows:
            name = Path(row["url"].removeprefix("file:")).name
            shutil.copy(REPO / "data" / "sample" / "images" / name, images / name)
            relative = (images / name).relative_to(path.parent).as_posix()
            writer.writerow([row["key"], f"file:{relative}", row["caption"]])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def make_workdir(root: Path) -> Path:
    """Copy the workflow and write a small config: 2 train shards and 1 eval shard of 8."""
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name)
        else:
            shutil.copy(source, root / name)
    images = root / "data" / "images"
    images.mkdir(parents=True)
    sample = REPO / "data" / "sample"
    write_url_list(read_rows(sample / "train.tsv")[:16], images, root / "data" / "train.tsv")
    write_url_list(read_rows(sample / "eval.tsv")[:8], images, root / "data" / "eval.tsv")
    config = load_config(root)
    config["datasets"] = {
        "photos": {"url_list": "data/train.tsv", "key_column": "key", "shard_size": 8},
        "photos_eval": {"url_list": "data/eval.tsv", "key_column": "key", "shard_size": 8},
    }
    config["train_datasets"] = ["photos"]
    config["eval_datasets"] = ["photos_eval"]
    config["train"] = {"phase1": {"epochs": 1}, "phase2": {"epochs": 1}}
    save_config(root, config)
    return root


def load_config(workdir: Path) -> dict[str, Any]:
    with open(workdir / "config" / "config.yaml", encoding="utf-8") as handle:
        config: dict[str, Any] = yaml.safe_load(handle)
    return config


def save_config(workdir: Path, config: dict[str, Any]) -> None:
    with open(workdir / "config" / "config.yaml", "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("workflow"))


# Headless Chromium opens the report as a user's browser would. Without the background
# networking switches it tries to reach Google's services, which a closed network refuses.
CHROMIUM_SWITCHES = [
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (`make setup-system` installs it; no test installs anything)."""
    found = shutil.which("chromium")
    if not found:
        pytest.fail("chromium is missing: install it with `make setup-system` (as root)")
    return found


def run_chromium(
    chromium: str, page: Path, user_data: Path, *switches: str
) -> subprocess.CompletedProcess[str]:
    """Open ``page`` in a fresh headless profile; ``--dump-dom`` prints the DOM on stdout."""
    return subprocess.run(
        [chromium, *CHROMIUM_SWITCHES, f"--user-data-dir={user_data}", *switches, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
