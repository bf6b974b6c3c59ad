"""Where a dry run of the workflow spends its time inside Snakemake, beside a bare Snakefile.

Writes the same two work folders as ``benchmarks/dag.py`` (the workflow with a generated
URL list, and a bare Snakefile of the same DAG shape) for one size, runs
``snakemake -n all --quiet rules`` in each under cProfile, and prints the functions with
the most cumulative time in the workflow's run, each with its time in the bare run and
the difference, then the same functions ordered by that difference: what vlmflow's rules
cost on top of Snakemake's own planning. The profiles count CPU seconds (so other
processes on the machine do not show up in them); cProfile slows call-heavy code
several-fold, so the seconds are only comparable with each other, not with
``benchmarks/dag.py``.

    .venv/bin/python benchmarks/dag_profile.py [--shards 2000] [--top 25] [--keep DIR]

With ``--keep DIR`` the two profiles are kept as DIR/workflow.prof and DIR/bare.prof
(read them with ``python -m pstats``); ``--load DIR`` prints the tables of kept ones
(``--shards`` must be the size they were made with).
"""

from __future__ import annotations

import argparse
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dag import make_bare_workdir, make_workdir, snakemake_command

# (file name ending, function name) -> what that step is, for the functions that
# usually lead a profile.
WHAT = {
    ("snakemake/dag.py", "init"): "builds the DAG from the targets",
    ("snakemake/dag.py", "update"): "adds a job and, recursively, the jobs making its input",
    ("snakemake/dag.py", "update_"): "adds a job and, recursively, the jobs making its input",
    ("snakemake/dag.py", "collect_potential_dependencies"): (
        "file-to-job lookup for every input file of every job"
    ),
    ("snakemake/dag.py", "file2jobs"): "finds the rule and job producing one file",
    ("snakemake/dag.py", "new_job"): "makes (or finds in its cache) the job of a file",
    ("snakemake/rules.py", "expand_input"): "a job's input files: input functions, wildcards",
    ("snakemake/rules.py", "_apply_wildcards"): "wildcards and functions into one directive",
    ("snakemake/rules.py", "apply_input_function"): (
        "calls one input or params function (inspects its signature every call)"
    ),
    ("snakemake/rules.py", "expand_params"): "a job's params: params functions, wildcards",
    ("snakemake/rules.py", "expand_resources"): "a job's resources and threads",
    ("snakemake/rules.py", "expand_output"): "a job's output files",
    ("snakemake/dag.py", "update_needrun"): "decides which jobs run: mtimes, metadata",
    ("snakemake/dag.py", "postprocess"): "after the DAG: needrun, processors, priorities",
    ("snakemake/dag.py", "process"): "per-job DAG processors (script, wrapper, notebook)",
    ("snakemake/dag.py", "process_job"): "checks a job's script exists by reading it",
    ("snakemake/script/__init__.py", "get_source"): (
        "reads a script: formats its path, opens it through the source cache"
    ),
    ("snakemake/dag.py", "update_conda_envs"): "conda env of every job (needs its params)",
    ("snakemake/jobs.py", "conda_env_spec"): "a job's conda env (evaluates its params)",
    ("snakemake/jobs.py", "params"): "a job's params (evaluated once, on first use)",
    ("snakemake/jobs.py", "resources"): "a job's resources (evaluated once, on first use)",
    ("snakemake/scheduling/job_scheduler.py", "schedule"): (
        "the dry run's scheduling loop, which prints each job"
    ),
    ("snakemake/jobs.py", "log_info"): "prints (formats) one job of the dry run",
    ("snakemake/jobs.py", "format_files"): "formats a job's files for the job's printout",
    ("snakemake/io/__init__.py", "mtime_inventory"): "stats every input and output file",
    ("snakemake/io/__init__.py", "is_flagged"): "checks a flag (ancient, directory...) on a file",
    ("snakemake/dag.py", "check_directory_outputs"): "checks no output lies in a directory output",
    ("snakemake/dag.py", "toposorted"): "orders the jobs",
    ("snakemake/workflow.py", "_build_dag"): "parses targets and builds the DAG",
    ("snakemake/workflow.py", "execute"): "the whole dry run after parsing the Snakefile",
    ("snakemake/workflow.py", "async_run"): "runs one async step (the DAG build, the scheduler)",
    ("snakemake/jobs.py", "new"): "the job factory (one job per rule and wildcards)",
    ("snakemake/output_index.py", "match_producers"): "which rules' outputs match a file",
    ("snakemake/rules.py", "concretize_iofile"): "one file of a job: wildcards, flags, checks",
    ("snakemake/io/fmt.py", "fmt_iofile"): "formats one file for the job's printout",
    ("snakemake/io/__init__.py", "is_storage"): "whether a file is in a storage plugin",
    ("snakemake/io/__init__.py", "exists"): "whether a file exists (from the inventory)",
}

# Glue that only wraps other entries (asyncio loop, CLI, API, comprehensions).
SKIP = ("asyncio/", "contextvars", "/cli.py", "/api.py", "<built-in", "{", "runners.py")
SKIP_NAMES = ("<listcomp>", "<lambda>", "<genexpr>", "<setcomp>", "<dictcomp>")


# Runs a script under cProfile with a CPU-time clock: on a shared machine the default
# wall clock would also count the time other processes held the CPU.
PROFILER = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = sys.argv[2:]
profiler = cProfile.Profile(time.process_time)
try:
    profiler.runcall(runpy.run_path, sys.argv[0], run_name="__main__")
finally:
    profiler.dump_stats(out)
"""


def profile(root: Path, options: list[str], out: Path) -> float:
    command = [sys.executable, "-c", PROFILER, str(out)]
    command += snakemake_command(*options)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"snakemake -n failed in {root}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


Key = tuple[str, int, str]


def cumulative(path: Path) -> tuple[dict[Key, tuple[int, float]], float, float]:
    """Per function (file, line, name): calls and cumulative seconds; the profile's total,
    and the own time of vlmflow's code (the .smk files and the vlmflow package)."""
    stats = pstats.Stats(str(path))
    table: dict[Key, tuple[int, float]] = {}
    total = 0.0
    own = 0.0
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        if filename.endswith(".smk") or "/vlmflow/" in filename or filename.endswith("Snakefile"):
            own += tottime
        if "site-packages/snakemake/" in filename:
            short = "snakemake/" + filename.split("site-packages/snakemake/", 1)[1]
            table[(short, line, name)] = (calls, cumtime)
    return table, total, own


# Entries whose name alone is ambiguous, by line (Snakemake 9.27).
WHAT_AT = {
    ("snakemake/jobs.py", 226, "__init__"): (
        "a new job: input functions, wildcards into input/output/log/benchmark"
    ),
}


def describe(key: Key) -> str:
    filename, _, name = key
    return WHAT_AT.get(key, WHAT.get((filename, name), ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--keep", type=Path, help="folder to keep the two .prof files in")
    parser.add_argument(
        "--load", type=Path, help="print the tables of the .prof files kept in this folder"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        keep = args.load or args.keep or folder
        if not args.load:
            keep.mkdir(parents=True, exist_ok=True)
            (folder / "bare").mkdir()
            make_bare_workdir(folder / "bare", args.shards)
            bare_wall = profile(folder / "bare", ["--cores", "1"], keep / "bare.prof")
            (folder / "workflow").mkdir()
            make_workdir(folder / "workflow", args.shards)
            options = ["--profile", "profiles/local"]
            wall = profile(folder / "workflow", options, keep / "workflow.prof")
            print(
                f"{args.shards} shards under cProfile: workflow {wall:.1f} s, "
                f"bare Snakefile {bare_wall:.1f} s (wall)"
            )
        workflow, total, own = cumulative(keep / "workflow.prof")
        bare, bare_total, _ = cumulative(keep / "bare.prof")

    print(
        f"CPU seconds profiled: workflow {total:.1f} (vlmflow's own code {own:.1f}), "
        f"bare Snakefile {bare_total:.1f}"
    )
    entries = [
        (key, calls, seconds)
        for key, (calls, seconds) in workflow.items()
        if not any(part in key[0] for part in SKIP) and key[2] not in SKIP_NAMES
    ]
    lookups = sum(calls for (_, _, name), (calls, _) in workflow.items() if name == "file2jobs")
    bare_lookups = sum(calls for (_, _, name), (calls, _) in bare.items() if name == "file2jobs")
    print(
        f"file-to-job lookups (DAG.file2jobs calls): workflow {lookups} "
        f"({lookups / args.shards:.1f} per shard), bare Snakefile {bare_lookups} "
        f"({bare_lookups / args.shards:.1f} per shard)"
    )

    def line(key: Key, calls: int, seconds: float) -> str:
        bare_calls, bare_seconds = bare.get(key, (0, 0.0))
        filename, number, name = key
        where = f"{filename.removeprefix('snakemake/')}:{number} {name}"
        return (
            f"{where[:58]:<58} {calls:>8} {seconds:>7.1f} {bare_calls:>8} "
            f"{bare_seconds:>7.1f} {seconds - bare_seconds:>+7.1f}  {describe(key)}"
        )

    header = (
        f"{'snakemake function':<58} {'calls':>8} {'cum s':>7} {'bare':>8} "
        f"{'bare s':>7} {'extra':>7}  what it is"
    )
    print(f"\nTop {args.top} by cumulative time in the workflow's dry run:")
    print(header)
    for key, calls, seconds in sorted(entries, key=lambda e: -e[2])[: args.top]:
        print(line(key, calls, seconds))
    print(f"\nTop {args.top} by extra time over the bare Snakefile:")
    print(header)
    extra = sorted(entries, key=lambda e: -(e[2] - bare.get(e[0], (0, 0.0))[1]))
    for key, calls, seconds in extra[: args.top]:
        print(line(key, calls, seconds))


if __name__ == "__main__":
    main()
