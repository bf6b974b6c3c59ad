"""How long Snakemake takes to plan the whole DAG for 1,000 and 10,000 shards.

For each size, writes a copy of the workflow with a generated URL list (16 rows per shard,
one train dataset; nothing is downloaded) and times ``snakemake -n all`` with the local
profile as its own process, reporting wall time and peak memory (the child's maximum
resident set). Every train shard has five jobs (ingest, caption, two attribute phases,
h5), so 10,000 shards is a DAG of about 50,000 jobs.

The baseline, measured in the same run: a bare Snakefile with the same DAG shape (five
chained rules per shard, one file in and one out, no params, logs, benchmarks, conda
envs or scripts), dry-run the same way: what Snakemake itself costs for that many jobs
on this machine. Also measured: Snakemake's start-up alone (``snakemake --version``, which
loads the same executor plugins; the Slurm plugin asks ``scontrol`` for the cluster's
settings when it loads, which takes about 9 s on a machine whose Slurm controller is
down). The last line is ``dry-run 10000 shards: X s``.

    .venv/bin/python benchmarks/dag.py [--shards 1000 10000]
"""

from __future__ import annotations

import argparse
import csv
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "rules", "workflow", "config", "profiles", "envs"]
SHARD_SIZE = 16


def make_workdir(root: Path, shards: int) -> None:
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name)
        else:
            shutil.copy(source, root / name)
    (root / "data").mkdir()
    with open(root / "data" / "urls.tsv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["key", "url", "caption"])
        for row in range(shards * SHARD_SIZE):
            writer.writerow(
                [f"k{row:08d}", f"https://images.example.org/{row}.jpg", f"photo {row}"]
            )
    with open(root / "config" / "config.yaml", encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config["datasets"] = {
        "big": {"url_list": "data/urls.tsv", "key_column": "key", "shard_size": SHARD_SIZE},
        "big_eval": {"url_list": "data/urls.tsv", "key_column": "key", "shard_size": 10**9},
    }
    config["train_datasets"] = ["big"]
    config["eval_datasets"] = ["big_eval"]
    with open(root / "config" / "config.yaml", "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)


BARE_STEPS = ["ingest", "caption", "attributes_phase1", "attributes_phase2", "h5"]


def make_bare_workdir(root: Path, shards: int) -> None:
    """The baseline: the same number of shards and jobs per shard, nothing else."""
    lines = [
        f"SHARDS = [f'{{i:06d}}' for i in range({shards})]",
        "",
        "rule all:",
        "    input:",
        f"        expand('out/{BARE_STEPS[-1]}/{{shard}}', shard=SHARDS),",
        "",
    ]
    previous = None
    for step in BARE_STEPS:
        lines += [f"rule {step}:"]
        if previous:
            lines += ["    input:", f"        'out/{previous}/{{shard}}',"]
        lines += [
            "    output:",
            f"        'out/{step}/{{shard}}',",
            "    shell:",
            "        'touch {output}'",
            "",
        ]
        previous = step
    (root / "Snakefile").write_text("\n".join(lines), encoding="utf-8")


def dry_run(root: Path, *options: str) -> tuple[float, float, int]:
    """Seconds, peak MiB of the snakemake process and its job count."""
    snakemake = str(Path(sys.executable).parent / "snakemake")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(
        [snakemake, *options, "-n", "all", "--quiet", "rules"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"snakemake -n failed in {root}:\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    jobs = 0
    for line in (done.stdout + done.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            jobs = int(parts[1])
    # ru_maxrss of children is the largest child so far (KiB): sizes run small to large.
    return seconds, max(peak, before) / 1024, jobs


def start_up_seconds() -> float:
    """Wall time of a Snakemake that only starts: imports and executor plugins."""
    snakemake = str(Path(sys.executable).parent / "snakemake")
    started = time.perf_counter()
    subprocess.run([snakemake, "--version"], capture_output=True, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    start_up = start_up_seconds()
    print(f"snakemake start-up (snakemake --version): {start_up:.1f} s", flush=True)
    rows = []
    for shards in sorted(args.shards):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_bare_workdir(root, shards)
            bare_seconds, _, bare_jobs = dry_run(root, "--cores", "1")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_workdir(root, shards)
            seconds, peak, jobs = dry_run(root, "--profile", "profiles/local")
        rows.append((shards, jobs, seconds, peak, bare_jobs, bare_seconds))
        print(
            f"{shards} shards: {jobs} jobs, {seconds:.1f} s, peak {peak:.0f} MiB; "
            f"bare Snakefile {bare_jobs} jobs, {bare_seconds:.1f} s",
            flush=True,
        )
    print(
        f"\n{'shards':>7} {'jobs':>7} {'seconds':>8} {'peak MiB':>9} "
        f"{'bare jobs':>10} {'bare s':>7} {'vs bare':>8}"
    )
    for shards, jobs, seconds, peak, bare_jobs, bare_seconds in rows:
        print(
            f"{shards:>7} {jobs:>7} {seconds:>8.1f} {peak:>9.0f} "
            f"{bare_jobs:>10} {bare_seconds:>7.1f} {seconds / bare_seconds:>7.2f}x"
        )
    shards, _, seconds, _, _, _ = rows[-1]
    print(f"dry-run {shards} shards: {seconds:.1f} s")


if __name__ == "__main__":
    main()
