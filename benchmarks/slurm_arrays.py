"""sbatch calls for 1,000 shards with and without Slurm job arrays (profiles/slurm).

Method. 5,000 real jobs would take hours on a small machine, and the question is how
many times Snakemake calls ``sbatch``, not how fast jobs run. So the script runs
Snakemake with the repo's ``profiles/slurm`` (the Slurm executor plugin 2.8.0 with the
profile's array settings, resources and retries) on a bare Snakefile of the workflow's
shape: per shard ``ingest -> caption -> attributes_phase1 -> attributes_phase2 -> h5``
(the rule names the profile sets resources and arrays for), then ``train_phase1 ->
train_phase2 -> evaluate`` over all shards: 5 x shards + 3 Slurm jobs. Snakemake talks
to fake Slurm commands put first on PATH:

- ``sbatch`` (bash) records its arguments (and a script on stdin) and answers a new job
  id; nothing runs;
- ``squeue`` (this script, ``fake-squeue``) plays the controller: it reads every recorded
  call, finds each task's Snakemake job in what the plugin passed (``--target-jobs`` in
  the ``--wrap`` command and, for tasks 2.. of an array, in the commands packed into
  ``--slurm-jobstep-array-execs``: base64 JSON of zlib-compressed commands), creates that
  job's output (``out/<rule>/<shard>``, as the Snakefile names it) once the task's run
  time is over, and reports it ``COMPLETED``. An array the plugin sent through its stdin
  fallback (command line over 128 KiB) is reported ``FAILED``: that script runs the
  first task's command in every task;
- ``scontrol show config`` answers MaxArraySize=1001 (Slurm's default) and MinJobAge;
  ``sacctmgr`` the profile's account; ``sinfo``, ``sacct`` and ``scancel`` are stubs.

Each fake command counts its calls. The runs: "no arrays", the profile as it was before
arrays (no array keys, ``jobs: 200``, Snakemake's default 100 jobs/s), and "arrays", the
profile as it is. Both check job states every 2 s (the plugin's default first wait, 40 s,
would dominate wall time here). A run passes if it exits 0 with every output present.

Tasks take 0 s by default: the most a wave can be batched, though waves still split when
a status check sees only part of the previous wave's arrays submitted. ``--run-seconds S``
draws each task's run time from 0..S s (seeded), so a wave's jobs finish at different
checks and the plugin submits one array per rule per scheduling round, as on a real
cluster. ``--also KEY=VALUE ...`` adds a third run with profile values changed, e.g.
``--also jobs=200 max-jobs-per-timespan=100/1s`` (arrays with the old caps: it hangs, so
give ``--timeout``).

    .venv/bin/python benchmarks/slurm_arrays.py [--shards 1000] [--run-seconds 0]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARD_RULES = ["ingest", "caption", "attributes_phase1", "attributes_phase2", "h5"]
AGGREGATE_RULES = ["train_phase1", "train_phase2", "evaluate"]
# The profile's array settings; without arrays it caps jobs at 200 instead.
ARRAY_KEYS = ["slurm-array-jobs", "slurm-array-limit", "jobs", "max-jobs-per-timespan"]
FAKE_COMMANDS = ["sbatch", "squeue", "scontrol", "sacctmgr", "sinfo", "sacct", "scancel"]
# Status checks every 2 s in both runs (the plugin waits 40 s before the first one).
STATUS_OPTIONS = [
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "2",
    "--seconds-between-status-checks",
    "2",
]

SBATCH = r"""#!/bin/bash
# Fake sbatch: record the arguments, answer a new job id, run nothing.
state=$FAKE_SLURM_STATE
echo sbatch >>"$state/calls"
exec 9>>"$state/id.lock"
flock 9
id=$(( $(cat "$state/next_id" 2>/dev/null || echo 1000) + 1 ))
echo "$id" >"$state/next_id"
flock -u 9
# The plugin's fallback for a command line over the kernel's 128 KiB per-argument
# limit: the job script comes on stdin.
if [ "${*: -1}" = /dev/stdin ]; then cat >"$state/spool/$id.stdin"; fi
printf '%s\0' "$@" >"$state/spool/$id.tmp"
mv "$state/spool/$id.tmp" "$state/spool/$id.args"
echo "$id"
"""

STUB = r"""#!/bin/bash
echo {name} >>"$FAKE_SLURM_STATE/calls"
{body}
"""

STUB_BODIES = {
    "scontrol": 'if [ "$1 $2" = "show config" ]; then\n'
    '  echo "MaxArraySize            = 1001"\n'
    '  echo "MinJobAge               = 3600 sec"\nfi',
    "sacctmgr": "echo my_account",
    "sinfo": 'echo "PARTITION"; echo "cpu*"; echo "gpu"',
    "sacct": "exit 1",
    "scancel": "exit 0",
}


# ---------------------------------------------------------------------------
# The fake controller (run as `slurm_arrays.py fake-squeue ...` by the squeue stub)
# ---------------------------------------------------------------------------


def _target(command: str) -> tuple[str, str]:
    """(rule, shard or "") of the Snakemake job a job command runs."""
    match = re.search(r"--target-jobs\s+(\S+)", command)
    if not match:
        raise ValueError(f"no --target-jobs in {command[:300]}")
    spec = shlex.split(match[1])[0]
    rule, _, wildcards = spec.partition(":")
    values = dict(item.split("=", 1) for item in wildcards.split(",") if item)
    return rule, values.get("shard", "")


@dataclass
class Submission:
    """One recorded sbatch call: its workdir and its tasks [(id suffix, (rule, shard))]."""

    workdir: str
    tasks: list[tuple[str, tuple[str, str]]]
    # The plugin's stdin fallback for an array: its script has the payload option and
    # the payload on lines of their own, which the shell runs as commands (exit 127).
    broken_script: bool = False


def read_submission(path: Path) -> Submission:
    args = path.read_bytes().decode().split("\0")[:-1]
    workdir = args[args.index("-D") + 1]
    array = next((arg.removeprefix("--array=") for arg in args if arg.startswith("--array=")), "")
    script = path.with_suffix(".stdin")
    if script.exists():
        lines = script.read_text().splitlines()
        command, payload = lines[1], (lines[3] if len(lines) > 3 else "")
    else:
        wrap = next(arg.removeprefix("--wrap=") for arg in args if arg.startswith("--wrap="))
        command, _, payload = wrap.partition("--slurm-jobstep-array-execs=")
    if not array:
        return Submission(workdir, [("", _target(command))])
    first, last = (int(n) for n in array.split("-"))
    execs = json.loads(base64.b64decode(shlex.split(payload)[0])) if payload.strip() else {}
    tasks = [(f"_{first}", _target(command))]
    for index in range(first + 1, last + 1):
        task_command = zlib.decompress(bytes.fromhex(execs[str(index)])).decode()
        tasks.append((f"_{index}", _target(task_command)))
    return Submission(workdir, tasks, broken_script=script.exists())


def fake_squeue() -> None:
    state = Path(os.environ["FAKE_SLURM_STATE"])
    with open(state / "calls", "a", encoding="utf-8") as calls:
        calls.write("squeue\n")
    jobs_file = state / "jobs.json"
    jobs: dict[str, dict[str, object]] = (
        json.loads(jobs_file.read_text()) if jobs_file.exists() else {}
    )
    run_seconds = float(os.environ.get("FAKE_SLURM_RUN_SECONDS", "0"))
    now = time.time()
    for path in sorted((state / "spool").glob("*.args")):
        job_id = path.name.removesuffix(".args")
        if any(key.split("_")[0] == job_id for key in jobs):
            continue
        submission = read_submission(path)
        for suffix, (rule, shard) in submission.tasks:
            rng = random.Random(f"{rule}/{shard}")
            jobs[job_id + suffix] = {
                "output": str(Path(submission.workdir) / "out" / rule / (shard or "all")),
                "done_at": now + rng.uniform(0, run_seconds),
                "state": "RUNNING",
                "fails": submission.broken_script,
            }
    for job in jobs.values():
        if job["state"] == "RUNNING" and float(str(job["done_at"])) <= now:
            if job["fails"]:
                job["state"] = "FAILED"
                continue
            output = Path(str(job["output"]))
            output.parent.mkdir(parents=True, exist_ok=True)
            output.touch()
            job["state"] = "COMPLETED"
    jobs_file.write_text(json.dumps(jobs))
    print("\n".join(f"{key}|{job['state']}" for key, job in jobs.items()))


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def write_fake_slurm(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True)
    scripts = {"sbatch": SBATCH}
    python, script = shlex.quote(sys.executable), shlex.quote(str(Path(__file__).resolve()))
    scripts["squeue"] = f'#!/bin/bash\nexec {python} {script} fake-squeue "$@"\n'
    for name, body in STUB_BODIES.items():
        scripts[name] = STUB.format(name=name, body=body)
    for name, text in scripts.items():
        (bin_dir / name).write_text(text, encoding="utf-8")
        (bin_dir / name).chmod(0o755)


def write_snakefile(root: Path, shards: int) -> int:
    """The bare DAG; returns its number of Slurm jobs."""
    lines = [
        f"SHARDS = [f'{{i:06d}}' for i in range({shards})]",
        "",
        "localrules: all",
        "",
        "rule all:",
        f"    input: 'out/{AGGREGATE_RULES[-1]}/all'",
        "",
    ]
    previous = None
    for rule in SHARD_RULES:
        lines.append(f"rule {rule}:")
        if previous:
            lines.append(f"    input: 'out/{previous}/{{shard}}'")
        lines += [f"    output: 'out/{rule}/{{shard}}'", "    shell: 'touch {output}'", ""]
        previous = rule
    inputs = f"expand('out/{previous}/{{shard}}', shard=SHARDS)"
    for rule in AGGREGATE_RULES:
        lines += [
            f"rule {rule}:",
            f"    input: {inputs}",
            f"    output: 'out/{rule}/all'",
            "    shell: 'touch {output}'",
            "",
        ]
        inputs = f"'out/{rule}/all'"
    (root / "Snakefile").write_text("\n".join(lines), encoding="utf-8")
    return shards * len(SHARD_RULES) + len(AGGREGATE_RULES)


@dataclass
class Run:
    """One Snakemake run against the fake Slurm, and what it submitted."""

    label: str
    seconds: float
    returncode: int  # -1: killed at the timeout
    outputs: int
    calls: Counter[str]
    arrays: dict[str, list[int]] = field(default_factory=dict)  # rule -> tasks per array
    singles: Counter[str] = field(default_factory=Counter)  # rule -> one-job sbatch calls
    broken_scripts: int = 0  # arrays sent through the plugin's stdin fallback
    last_sbatch_s: float = 0.0  # seconds from the start to the last sbatch call

    @property
    def sbatch(self) -> int:
        return self.calls["sbatch"]


def run_snakemake(
    root: Path,
    label: str,
    shards: int,
    changes: dict[str, object],
    args: argparse.Namespace,
) -> Run:
    """The bare DAG run with the repo's profile, ``changes`` applied (None: key removed)."""
    work = root / re.sub(r"\W+", "-", label)
    state = work / ".fake-slurm"
    (state / "spool").mkdir(parents=True)
    (state / "calls").touch()
    write_fake_slurm(work / ".fake-bin")
    write_snakefile(work, shards)
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            profile.pop(key, None)
        else:
            profile[key] = value
    (work / "profile").mkdir()
    (work / "profile/config.yaml").write_text(yaml.safe_dump(profile), encoding="utf-8")
    env = {
        **os.environ,
        "PATH": f"{work / '.fake-bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FAKE_SLURM_STATE": str(state),
        "FAKE_SLURM_RUN_SECONDS": str(args.run_seconds),
    }
    snakemake = str(Path(sys.executable).parent / "snakemake")
    started, started_at = time.perf_counter(), time.time()
    with open(work / "snakemake.log", "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(
                [snakemake, "--profile", "profile", *STATUS_OPTIONS, "all"],
                cwd=work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    out = work / "out"
    run = Run(
        label=label,
        seconds=time.perf_counter() - started,
        returncode=code,
        outputs=sum(1 for path in out.rglob("*") if path.is_file()) if out.exists() else 0,
        calls=Counter((state / "calls").read_text().split()),
    )
    for path in sorted((state / "spool").glob("*.args")):
        submission = read_submission(path)
        suffix, (rule, _) = submission.tasks[0]
        if suffix:
            run.arrays.setdefault(rule, []).append(len(submission.tasks))
        else:
            run.singles[rule] += 1
        run.broken_scripts += submission.broken_script
        run.last_sbatch_s = max(run.last_sbatch_s, path.stat().st_mtime - started_at)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if run.returncode != 0:
        print((work / "snakemake.log").read_text()[-3000:] if args.keep else "", file=sys.stderr)
    return run


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "fake-squeue":
        fake_squeue()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--run-seconds", type=float, default=0.0, help="tasks run 0..S s")
    parser.add_argument("--timeout", type=float, default=300, help="per run, seconds")
    parser.add_argument(
        "--also",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="one more arrays run with these profile values, e.g. jobs=200 slurm-array-limit=1000",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    args = parser.parse_args()

    jobs = args.shards * len(SHARD_RULES) + len(AGGREGATE_RULES)
    rules = len(SHARD_RULES) + len(AGGREGATE_RULES)
    variants: list[tuple[str, dict[str, object]]] = [
        # The profile as it was before arrays (its comment says how to go back).
        ("no arrays", {**dict.fromkeys(ARRAY_KEYS), "jobs": 200}),
        ("arrays", {}),
    ]
    if args.also:
        changes = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.also)}
        variants.append(("arrays, " + " ".join(args.also), changes))
    root = Path(tempfile.mkdtemp(prefix="slurm-arrays-"))
    runs = []
    for label, changes in variants:
        run = run_snakemake(root, label, args.shards, changes, args)
        runs.append(run)
        ok = run.returncode == 0 and run.outputs == jobs
        ended = (
            f"killed at the timeout; last sbatch call at {run.last_sbatch_s:.0f} s"
            if run.returncode == -1
            else f"exit {run.returncode}"
        )
        print(
            f"{label}: {'ok' if ok else 'FAILED'} ({ended}, {run.outputs}/{jobs} outputs), "
            f"{run.seconds:.1f} s; fake Slurm calls: "
            + ", ".join(f"{name} {run.calls[name]}" for name in FAKE_COMMANDS),
            flush=True,
        )
    if args.keep:
        print(f"work folders: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)

    plain, arrayed = runs[0], runs[1]
    print(
        f"\n{'shards':>6} {'rules':>5} {'jobs':>5} {'sbatch, no arrays':>17} {'wall s':>7} "
        f"{'sbatch, arrays':>14} {'wall s':>7}"
    )
    print(
        f"{args.shards:>6} {rules:>5} {jobs:>5} {plain.sbatch:>17} {plain.seconds:>7.1f} "
        f"{arrayed.sbatch:>14} {arrayed.seconds:>7.1f}"
    )
    for run in runs[1:]:
        print(f"\n{run.label}: sbatch calls per rule (arrays: tasks in each)")
        for rule in SHARD_RULES + AGGREGATE_RULES:
            sizes = run.arrays.get(rule, [])
            shown = f"{len(sizes)} arrays of {min(sizes)}-{max(sizes)} tasks" if sizes else "-"
            print(f"  {rule:<18} {shown}; {run.singles[rule]} single-job calls")
        if run.broken_scripts:
            print(f"  {run.broken_scripts} arrays went through the stdin fallback (tasks fail)")
    if any(run.returncode != 0 or run.outputs != jobs for run in runs[:2]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
