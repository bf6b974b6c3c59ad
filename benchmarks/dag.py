"""How long Snakemake takes to plan the whole DAG for 1,000 to 100,000 shards.

For each size, writes a copy of the workflow with a generated URL list (16 rows per shard,
one train dataset; nothing is downloaded) and times ``snakemake -n all`` with the local
profile as its own process, reporting wall time, CPU time and peak memory (that process's
maximum resident set). Every train shard has five jobs (ingest, caption, two attribute
phases, h5), so 10,000 shards is a DAG of about 50,000 jobs and 100,000 shards one of
about 500,000.

The baseline, measured in the same run for each size: a bare Snakefile with the same DAG
shape (five chained rules per shard, one file in and one out, no params, logs,
benchmarks, conda envs or scripts), dry-run the same way: what Snakemake itself costs for
that many jobs on this machine. Its time per job at each size shows whether Snakemake's
own planning grows faster than the DAG. Also measured: Snakemake's start-up alone
(``snakemake --version``, which loads the same executor plugins; the Slurm plugin asks
``scontrol`` for the cluster's settings when it loads, which takes about 9 s on a machine
whose Slurm controller is down).

CPU time is printed beside wall time because on a shared machine the wall time of a
single-threaded dry run also counts the time other processes held the CPU; the ratio to
the bare Snakefile is given for both.

A size whose dry runs would not fit in memory is skipped, with the estimate: its peak is
extrapolated linearly from the largest size measured before it in the same run (or from
``--mib-per-shard`` when it is the first), and compared with MemAvailable. Each dry run
may also allocate no more than what was available when it started (less 1 GiB), and is
stopped when the machine has less than 512 MiB left: one that needs more is reported as
out of memory rather than pushing other processes on the machine into the kernel's
out-of-memory killer. The last line
is ``dry-run N shards: X s`` for the largest size measured, with its peak memory and its
ratio to the bare Snakefile.

    .venv/bin/python benchmarks/dag.py [--shards 1000 10000 100000]

``benchmarks/dag_profile.py`` profiles the same two dry runs (cProfile) to show where
the time goes inside Snakemake.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "rules", "workflow", "config", "profiles", "envs"]
SHARD_SIZE = 16
# Peak MiB per shard of the workflow's dry run, for the memory check of a first size
# (10,000 shards took 1.5 GiB and 100,000 shards 13.5 GiB; the bare Snakefile half that).
MIB_PER_SHARD = 0.15
# Memory left to the rest of the machine while a dry run holds its peak.
HEADROOM_MIB = 1024
# A dry run is stopped when the machine has less than this available (others' use grew).
LOW_MEMORY_MIB = 512
# How often a running dry run's memory is watched (also the resolution of its seconds).
POLL_SECONDS = 0.05


def copy_workflow(root: Path) -> None:
    """The workflow's files (WORKFLOW_FILES) copied into ``root``."""
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name)
        else:
            shutil.copy(source, root / name)


def make_workdir(root: Path, shards: int) -> None:
    copy_workflow(root)
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


@dataclass
class DryRun:
    seconds: float
    cpu_seconds: float
    peak_mib: float
    jobs: int


def snakemake_command(*options: str) -> list[str]:
    snakemake = str(Path(sys.executable).parent / "snakemake")
    return [snakemake, *options, "-n", "all", "--quiet", "rules"]


class OutOfMemory(Exception):
    """The dry run needed more memory than the machine had free when it started."""


def dry_run(root: Path, *options: str) -> DryRun:
    """Wall and CPU seconds, peak MiB and job count of one ``snakemake -n all``.

    The process may use what the machine has available when it starts, less
    HEADROOM_MIB: beyond that its allocations fail (OutOfMemory) instead of the kernel's
    out-of-memory killer picking a process, maybe someone else's.
    """
    limit = int((available_mib() - HEADROOM_MIB) * 2**20)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            snakemake_command(*options),
            cwd=root,
            stdout=out,
            stderr=err,
            text=True,
            preexec_fn=limit_memory,
        )
        # wait4 gives this child's own resource use (getrusage(RUSAGE_CHILDREN) would
        # give the largest resident set of every child so far).
        low_memory = False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if not low_memory and available_mib() < LOW_MEMORY_MIB:
                # Others on the machine took the memory meanwhile: stop before the
                # kernel's out-of-memory killer has to choose.
                low_memory = True
                process.kill()
            time.sleep(POLL_SECONDS)
        seconds = time.perf_counter() - started
        if low_memory:
            raise OutOfMemory(
                f"the machine's last {LOW_MEMORY_MIB} MiB (stopped at "
                f"{usage.ru_maxrss / 2**20:.1f} GiB after {seconds:.0f} s)"
            )
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        output = out.read() + err.read()
    if process.returncode != 0:
        if "MemoryError" in output or "Cannot allocate memory" in output:
            raise OutOfMemory(f"{limit / 2**30:.1f} GiB")
        raise SystemExit(f"snakemake -n failed in {root}:\n{output[-3000:]}")
    jobs = 0
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            jobs = int(parts[1])
    return DryRun(
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        jobs=jobs,
    )


def start_up_seconds() -> float:
    """Wall time of a Snakemake that only starts: imports and executor plugins."""
    snakemake = str(Path(sys.executable).parent / "snakemake")
    started = time.perf_counter()
    subprocess.run([snakemake, "--version"], capture_output=True, check=True)
    return time.perf_counter() - started


def available_mib() -> float:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def needed_mib(shards: int, measured: list[tuple[int, DryRun]], mib_per_shard: float) -> float:
    """Peak MiB a dry run of this size should need: linear in the shards (see the README
    for how it scaled so far), from the largest size measured, else from mib_per_shard."""
    if measured:
        done, run = max(measured, key=lambda item: item[0])
        return run.peak_mib * shards / done
    return mib_per_shard * shards


@dataclass
class Row:
    shards: int
    workflow: DryRun
    bare: DryRun


def measure_bare(shards: int) -> DryRun:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_bare_workdir(root, shards)
        return dry_run(root, "--cores", "1")


def measure_workflow(shards: int) -> DryRun:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_workdir(root, shards)
        return dry_run(root, "--profile", "profiles/local")


def print_table(rows: list[Row]) -> None:
    print(
        f"\n{'shards':>7} {'jobs':>7} {'seconds':>8} {'cpu s':>7} {'peak MiB':>9} "
        f"{'bare jobs':>10} {'bare s':>7} {'bare cpu':>8} {'bare MiB':>9} "
        f"{'vs bare':>8} {'cpu vs bare':>11}"
    )
    for row in rows:
        w, b = row.workflow, row.bare
        print(
            f"{row.shards:>7} {w.jobs:>7} {w.seconds:>8.1f} {w.cpu_seconds:>7.1f} "
            f"{w.peak_mib:>9.0f} {b.jobs:>10} {b.seconds:>7.1f} {b.cpu_seconds:>8.1f} "
            f"{b.peak_mib:>9.0f} {w.seconds / b.seconds:>7.2f}x "
            f"{w.cpu_seconds / b.cpu_seconds:>10.2f}x"
        )
    # Time per job of each: constant if planning is linear in the DAG.
    print(
        "ms per job (bare, workflow): "
        + "; ".join(
            f"{row.shards}: {1000 * row.bare.seconds / row.bare.jobs:.2f}, "
            f"{1000 * row.workflow.seconds / row.workflow.jobs:.2f}"
            for row in rows
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument(
        "--mib-per-shard",
        type=float,
        default=MIB_PER_SHARD,
        help="peak MiB per shard assumed for the memory check of the first size",
    )
    args = parser.parse_args()
    start_up = start_up_seconds()
    print(f"snakemake start-up (snakemake --version): {start_up:.1f} s", flush=True)
    rows: list[Row] = []
    for shards in sorted(set(args.shards)):
        measured = [(row.shards, row.workflow) for row in rows]
        need = needed_mib(shards, measured, args.mib_per_shard)
        free = available_mib()
        if need + HEADROOM_MIB > free:
            print(
                f"{shards} shards: skipped, needs about {need / 1024:.1f} GiB "
                f"(extrapolated) and {free / 1024:.1f} GiB is available",
                flush=True,
            )
            continue
        try:
            b = measure_bare(shards)
        except OutOfMemory as limit:
            print(f"{shards} shards: bare Snakefile out of memory at {limit}", flush=True)
            continue
        # Printed at once: a large size's workflow run may then take a long while.
        print(
            f"{shards} shards: bare Snakefile {b.jobs} jobs, {b.seconds:.1f} s "
            f"(cpu {b.cpu_seconds:.1f} s), peak {b.peak_mib:.0f} MiB",
            flush=True,
        )
        try:
            w = measure_workflow(shards)
        except OutOfMemory as limit:
            print(f"{shards} shards: workflow out of memory at {limit}", flush=True)
            continue
        rows.append(Row(shards, w, b))
        print(
            f"{shards} shards: workflow {w.jobs} jobs, {w.seconds:.1f} s "
            f"(cpu {w.cpu_seconds:.1f} s), peak {w.peak_mib:.0f} MiB",
            flush=True,
        )
    if not rows:
        raise SystemExit("no size was measured")
    print_table(rows)
    last = rows[-1]
    w, b = last.workflow, last.bare
    print(
        f"dry-run {last.shards} shards: {w.seconds:.1f} s, peak {w.peak_mib:.0f} MiB, "
        f"{w.seconds / b.seconds:.2f}x the bare Snakefile ({b.seconds:.1f} s)"
    )


if __name__ == "__main__":
    main()
