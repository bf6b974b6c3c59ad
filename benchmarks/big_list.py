"""Planning and a Slurm job's start-up on a LAION-size URL list in parts, against a
one-part 10,000-row list.

Method. The script writes a synthetic URL list in parquet parts (by default 20,000,000
rows in 16 parts named like LAION's, ``part-00000-<hex>-c000.snappy.parquet``; columns
key, url, caption; ``--rows 100000000`` for LAION-400M's order of size) and, for the
baseline, one 10,000-row parquet file. Parts are built a row group at a time from
vectorised Arrow string functions, so no part is ever held in memory whole; URLs point
at ``http://127.0.0.1:9/`` (the ingest refuses loopback addresses: nothing is fetched)
and captions are ten words drawn from a small vocabulary. Generation time is printed
but is not a measure.

Each list gets its own copy of the workflow (Snakefile, rules, workflow, config,
profiles, envs, as in benchmarks/dag.py) with one dataset, ``big``, that is both the
train and the eval dataset: ``url_list: data/parts`` (the folder of parts) or
``data/urls.parquet``, ``shard_size: 10000`` (img2dataset's default). Its ingest
section sets ``retries: 0`` and ``shard_budget_s: 0.001``, so every row of a shard
fails at once and an ingest job does the same small work on either list (read its
10,000 rows, count them as failures, write an empty tar and its stats).

Measured in each copy, each as its own process:

* planning, ``snakemake --profile profiles/local -n all``, twice: the first plan writes
  the part manifests (one read of every part, by a spawn process pool under Snakemake),
  the second reads manifests only. Wall time, CPU time (user + system of Snakemake and
  every child it waited for, so the pool's work counts) and peak RSS (the largest
  resident set of any one of those processes; ``os.wait4``);
* one Slurm job's start-up. ``snakemake --profile profiles/slurm <shard tar>`` runs
  with fake ``sbatch``, ``squeue``, ``scontrol``, ``sacctmgr``, ``sinfo``, ``sacct`` and
  ``scancel`` first on PATH (those of benchmarks/slurm_arrays.py); once the fake sbatch
  has recorded its arguments, that Snakemake is killed (as if it ran on: its temporary
  folder, which the job waits for, stays) and the job's command is read from
  ``--wrap=``: the exact ``python -m snakemake ... --target-jobs ... --mode remote``
  invocation the Slurm plugin submits (a single job: the target is one shard, so the
  plugin sends no array; an array task runs the same command, with the other tasks'
  commands appended for the jobstep to pick from, and without srun). That command then
  runs here with ``bash -c``, with SLURM_JOB_ID set and a fake ``srun`` first on PATH
  that drops its options and runs the rest, which is what the slurm-jobstep executor
  inside the job calls (``srun -n1 --cpu-bind=q ...``). Timed: wall, CPU and peak RSS
  of the whole job (the job's Snakemake, the jobstep's Snakemake and the ingest
  script). The big list's job is its last shard (last part, last shard);
  the small list's is ``000000``. Each job runs ``--repeats`` times, small and big in
  turn, its outputs deleted before each run; the median is reported.

The last line is ``ratio job start big/small: X``: the big list's median job wall time
over the small list's (goal: at most 1.2, with a peak RSS at most 100 MB above the
small list's).

    .venv/bin/python benchmarks/big_list.py [--rows 20000000] [--parts 16] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

# Run as a script, this folder is on sys.path: the other benchmarks' helpers.
from dag import HEADROOM_MIB, LOW_MEMORY_MIB, POLL_SECONDS, available_mib, copy_workflow
from slurm_arrays import SBATCH, STUB, STUB_BODIES

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
DATASET = "big"
SMALL_ROWS = 10_000
# Caption words (space-separated).
WORDS = (
    "a the red blue green small large old new wooden metal glass dog cat bird horse car "
    "bike house tree river mountain city street beach table chair lamp window door "
    "painting photo of on in with near under over at sunset morning winter summer"
)
CAPTION_WORDS = 10
# Parquet bytes per row of the generated lists (about 36 measured; with a margin), and
# disk kept free beyond them.
BYTES_PER_ROW = 64
SPARE_DISK = 2 * 2**30
# Seconds to wait for the Slurm plugin's sbatch call.
SUBMIT_TIMEOUT = 300

# Fake srun: drop srun's own options (all given as -xN or --name=value), run the rest.
SRUN = r"""#!/bin/bash
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
exec "$@"
"""


# ---------------------------------------------------------------------------
# The lists
# ---------------------------------------------------------------------------


def part_name(index: int) -> str:
    """A LAION-like part name (its shard tag is the name without ``.parquet``)."""
    digest = hashlib.sha1(str(index).encode()).hexdigest()
    uuid = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
    return f"part-{index:05d}-{uuid}-c000.snappy.parquet"


def write_list(path: Path, first_row: int, rows: int, row_group: int, seed: int) -> None:
    """``rows`` rows (keys from ``first_row`` on), one row group in memory at a time."""
    schema = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string())])
    vocabulary = pa.array(WORDS.split())
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(first_row, first_row + rows, row_group):
            numbers = pc.cast(
                pa.array(np.arange(start, min(start + row_group, first_row + rows))), pa.string()
            )
            key = pc.utf8_lpad(numbers, width=12, padding="0")
            url = pc.binary_join_element_wise("http://127.0.0.1:9/img/", numbers, ".jpg", "")
            picks = rng.integers(0, len(vocabulary), size=(CAPTION_WORDS, len(numbers)))
            words = [pc.take(vocabulary, pa.array(column)) for column in picks]
            caption = pc.binary_join_element_wise(*words, " ")
            writer.write_table(
                pa.Table.from_arrays([key, url, caption], schema=schema),
                row_group_size=row_group,
            )


def write_parts(folder: Path, rows: int, parts: int, row_group: int) -> None:
    folder.mkdir(parents=True)
    first = 0
    for index in range(parts):
        count = rows // parts + (index < rows % parts)
        write_list(folder / part_name(index), first, count, row_group, seed=index)
        first += count


def make_workdir(root: Path, url_list: str, shard_size: int) -> None:
    """A copy of the workflow whose one dataset (train and eval) is ``url_list``."""
    root.mkdir(parents=True)
    copy_workflow(root)
    (root / "data").mkdir(exist_ok=True)
    config_path = root / "config" / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config["datasets"] = {
        DATASET: {"url_list": url_list, "key_column": "key", "shard_size": shard_size}
    }
    config["train_datasets"] = [DATASET]
    config["eval_datasets"] = [DATASET]
    # Every row fails at once: a job's own work is reading its rows and counting them.
    config["ingest"].update(retries=0, shard_budget_s=0.001)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------------
# Measuring a process
# ---------------------------------------------------------------------------


@dataclass
class Measure:
    seconds: float
    cpu_seconds: float
    peak_mib: float


def run_measured(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> Measure:
    """Wall and CPU seconds and peak MiB of ``command`` and every child it waited for.

    As in benchmarks/dag.py: the process may allocate what the machine had available
    when it started, less HEADROOM_MIB, and is stopped when the machine runs low.
    """
    limit = int((available_mib() - HEADROOM_MIB) * 2**20)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with tempfile.TemporaryFile("w+") as output:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=limit_memory,
        )
        # wait4: this child's resource use, with its waited-for descendants' (CPU summed,
        # ru_maxrss the largest of any one process).
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if available_mib() < LOW_MEMORY_MIB:
                process.kill()
                os.wait4(process.pid, 0)
                raise SystemExit(f"stopped: the machine has less than {LOW_MEMORY_MIB} MiB left")
            time.sleep(POLL_SECONDS / 5)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    if process.returncode != 0:
        raise SystemExit(
            f"{shlex.join(command)[:500]} failed (exit {process.returncode}) in {cwd}:\n"
            f"{text[-4000:]}"
        )
    return Measure(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def plan(root: Path) -> Measure:
    return run_measured([SNAKEMAKE, "--profile", "profiles/local", "-n", "all"], root)


# ---------------------------------------------------------------------------
# One Slurm job
# ---------------------------------------------------------------------------


def write_fake_slurm(bin_dir: Path) -> None:
    """sbatch records its arguments (benchmarks/slurm_arrays.py's); squeue says nothing
    runs; the others are slurm_arrays.py's stubs; srun runs its command."""
    bin_dir.mkdir(parents=True)
    scripts = {
        "sbatch": SBATCH,
        "squeue": STUB.format(name="squeue", body=""),
        "srun": SRUN,
        **{name: STUB.format(name=name, body=body) for name, body in STUB_BODIES.items()},
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text, encoding="utf-8")
        (bin_dir / name).chmod(0o755)


def fake_env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{root / '.fake-bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FAKE_SLURM_STATE": str(root / ".fake-slurm"),
    }


def capture_job_command(root: Path, target: str) -> str:
    """The command the Slurm plugin submits for the job that makes ``target``."""
    state = root / ".fake-slurm"
    shutil.rmtree(state, ignore_errors=True)
    (state / "spool").mkdir(parents=True)
    (state / "calls").touch()
    if not (root / ".fake-bin").exists():
        write_fake_slurm(root / ".fake-bin")
    with open(root / "submit.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [SNAKEMAKE, "--profile", "profiles/slurm", target],
            cwd=root,
            env=fake_env(root),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + SUBMIT_TIMEOUT
        while not list((state / "spool").glob("*.args")):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                log_text = (root / "submit.log").read_text(encoding="utf-8")
                raise SystemExit(f"no sbatch call for {target}:\n{log_text[-4000:]}")
            time.sleep(0.1)
        # Killed, not stopped: a Snakemake told to stop waits for its job, and on its way
        # out deletes its temporary folder, which the job waits for (--wait-for-files) as
        # it would on a cluster, where the main Snakemake runs on.
        process.kill()
        process.wait()
    for lock in (root / ".snakemake" / "locks").glob("*"):
        lock.unlink()
    path = next((state / "spool").glob("*.args"))
    args = path.read_bytes().decode().split("\0")[:-1]
    if any(arg.startswith("--array") for arg in args):
        raise SystemExit(f"the plugin submitted an array for one job: {args}")
    return next(arg.removeprefix("--wrap=") for arg in args if arg.startswith("--wrap="))


def job_outputs(root: Path, shard: str) -> list[Path]:
    return [
        root / f"results/{DATASET}/shards/{shard}.tar",
        root / f"results/{DATASET}/shards/{shard}.stats.json",
        root / f"logs/ingest/{DATASET}/{shard}.log",
        root / f"results/benchmarks/ingest/{DATASET}/{shard}.tsv",
    ]


def run_job(root: Path, command: str, shard: str) -> Measure:
    """The job's command as Slurm would run it in the job (bash, in the workflow's folder)."""
    for path in job_outputs(root, shard):
        path.unlink(missing_ok=True)
    env = {
        **fake_env(root),
        "SLURM_JOB_ID": "1001",
        "SLURM_JOBID": "1001",
        "SLURM_SUBMIT_DIR": str(root),
        "SLURM_CPUS_PER_TASK": "8",
    }
    measure = run_measured(["bash", "-c", command], root, env)
    missing = [str(path) for path in job_outputs(root, shard)[:2] if not path.exists()]
    if missing:
        raise SystemExit(f"the job for {shard} wrote no {', '.join(missing)}")
    return measure


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


@dataclass
class ListRun:
    label: str
    root: Path
    rows: int
    shards: int = 0
    first_plan: Measure | None = None
    plan: Measure | None = None
    job_target: str = ""
    job_command: str = ""
    jobs: list[Measure] | None = None

    @property
    def job_seconds(self) -> float:
        assert self.jobs
        return statistics.median(job.seconds for job in self.jobs)

    @property
    def job_cpu_seconds(self) -> float:
        assert self.jobs
        return statistics.median(job.cpu_seconds for job in self.jobs)

    @property
    def job_peak_mib(self) -> float:
        assert self.jobs
        return statistics.median(job.peak_mib for job in self.jobs)


def last_shard(root: Path) -> str:
    """The last shard id of the list, from its manifests (written by the first plan)."""
    manifests = sorted((root / "results" / DATASET / "parts").glob("*.tsv"))
    if not manifests:
        raise SystemExit(f"no part manifests in {root}/results/{DATASET}/parts")
    manifest = manifests[-1]
    count = len(manifest.read_text(encoding="ascii").splitlines()) - 1
    tag = manifest.stem
    return f"{count - 1:06d}" if tag == "_list" else f"{tag}_{count - 1:06d}"


def print_table(small: ListRun, big: ListRun) -> None:
    assert small.first_plan and small.plan and big.first_plan and big.plan
    rows: list[tuple[str, float, float, str]] = []
    for name, s, b in (
        ("first plan, builds manifests", small.first_plan, big.first_plan),
        ("plan, manifests read", small.plan, big.plan),
    ):
        rows += [
            (f"{name}: wall s", s.seconds, b.seconds, ".1f"),
            (f"{name}: CPU s", s.cpu_seconds, b.cpu_seconds, ".1f"),
            (f"{name}: peak MiB", s.peak_mib, b.peak_mib, ".0f"),
        ]
    rows += [
        ("job start (median): wall s", small.job_seconds, big.job_seconds, ".2f"),
        ("job start (median): CPU s", small.job_cpu_seconds, big.job_cpu_seconds, ".2f"),
        ("job start (median): peak MiB", small.job_peak_mib, big.job_peak_mib, ".0f"),
    ]
    width = max(len(row[0]) for row in rows)
    small_head = f"{small.rows:,} rows"
    big_head = f"{big.rows:,} rows"
    print(f"\n{'':<{width}} {small_head:>12} {big_head:>17} {'big/small':>10}")
    print(f"{'shards':<{width}} {small.shards:>12,} {big.shards:>17,}")
    for label, s_value, b_value, fmt in rows:
        ratio = f"{b_value / s_value:.2f}" if s_value else "-"
        print(f"{label:<{width}} {s_value:>12{fmt}} {b_value:>17{fmt}} {ratio:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000, help="rows of the big list")
    parser.add_argument("--parts", type=int, default=16, help="parquet parts of the big list")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--row-group", type=int, default=100_000, help="parquet row group rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job")
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put them")
    args = parser.parse_args()
    if args.rows < args.parts or args.parts < 1 or args.repeats < 1:
        parser.error("need --rows >= --parts >= 1 and --repeats >= 1")

    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need = (args.rows + SMALL_ROWS) * BYTES_PER_ROW + SPARE_DISK
    free = shutil.disk_usage(base).free
    if free < need:
        raise SystemExit(
            f"{base}: {free / 2**30:.1f} GiB free, the lists need about "
            f"{need / 2**30:.1f} GiB; give --workdir on a larger disk"
        )
    top = Path(tempfile.mkdtemp(prefix="big-list-", dir=base))
    try:
        small = ListRun("small", top / "small", SMALL_ROWS)
        big = ListRun("big", top / "big", args.rows)
        make_workdir(small.root, "data/urls.parquet", args.shard_size)
        make_workdir(big.root, "data/parts", args.shard_size)

        started = time.perf_counter()
        write_list(small.root / "data/urls.parquet", 0, SMALL_ROWS, args.row_group, seed=0)
        write_parts(big.root / "data/parts", args.rows, args.parts, args.row_group)
        size = sum(path.stat().st_size for path in (big.root / "data/parts").iterdir())
        print(
            f"generated {args.rows:,} rows in {args.parts} parquet parts "
            f"({size / 2**30:.2f} GiB) and the {SMALL_ROWS:,}-row list in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )

        for run in (small, big):
            run.first_plan = plan(run.root)
            run.plan = plan(run.root)
            run.shards = sum(
                len(path.read_text(encoding="ascii").splitlines()) - 1
                for path in (run.root / "results" / DATASET / "parts").glob("*.tsv")
            )
            print(
                f"{run.label} list: {run.shards:,} shards; first plan "
                f"{run.first_plan.seconds:.1f} s (CPU {run.first_plan.cpu_seconds:.1f} s, "
                f"{run.first_plan.peak_mib:.0f} MiB), plan {run.plan.seconds:.1f} s "
                f"(CPU {run.plan.cpu_seconds:.1f} s, {run.plan.peak_mib:.0f} MiB)",
                flush=True,
            )
            shard = last_shard(run.root)
            run.job_target = f"results/{DATASET}/shards/{shard}.tar"
            run.job_command = capture_job_command(run.root, run.job_target)
            run.jobs = []
        # The resource settings are base64 words of about 40 characters each.
        shown = re.sub(r"base64//\S+", "base64//...", big.job_command)
        print(f"\njob command ({big.label} list; base64 values cut):\n{shown}\n", flush=True)

        for repeat in range(args.repeats):
            for run in (small, big):
                assert run.jobs is not None
                shard = Path(run.job_target).name.removesuffix(".tar")
                job = run_job(run.root, run.job_command, shard)
                run.jobs.append(job)
                print(
                    f"job start {repeat + 1}/{args.repeats}, {run.label} list ({shard}): "
                    f"{job.seconds:.2f} s (CPU {job.cpu_seconds:.2f} s), "
                    f"peak {job.peak_mib:.0f} MiB",
                    flush=True,
                )

        print_table(small, big)
        rss = round((big.job_peak_mib - small.job_peak_mib) * 2**20 / 1e6)
        print(f"job start peak RSS big - small: {rss:+d} MB (goal: <= 100 MB)")
        print(f"ratio job start big/small: {big.job_seconds / small.job_seconds:.2f}")
    finally:
        if args.keep:
            print(f"work folders: {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
