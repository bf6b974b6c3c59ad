"""The workflow on a real one-node Slurm cluster, with the repo's own profile.

The cluster (tests/slurm/cluster.sh) is started for this module and stopped after it.
Snakemake asks squeue for job states (the test cluster has no accounting daemon).

The runs share the cluster side by side, and its jobs are told apart by their working
directory: the undisturbed reference run of the full DAG and, beside it, the chaos run
of the same DAG in another folder; after the reference, the scenarios (what reruns
after an edit, and the faults: scancel, a job over its memory limit, Snakemake killed;
small shards grouped into one job; the per-shard stages as job arrays), each on its own
copy of the reference folder. Each scenario checks its own assertions; its test
re-raises what it found.

The profile submits the per-shard rules' jobs as Slurm job arrays (its
``slurm-array-jobs``). The reference run turns them off (``--slurm-array-jobs=``): it is
the one-sbatch-per-job baseline whose outputs the chaos run and the array scenario, both
with the profile's arrays, must reproduce. Every other run uses the profile as it is.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.readme_commands import readme_argv
from tests.workflow.conftest import (
    REPO,
    SNAKEMAKE,
    job_counts,
    job_outputs,
    load_config,
    make_workdir,
    read_rows,
    save_config,
)
from vlmflow.core.distributed import parse_scontrol_job

pytestmark = pytest.mark.slurm

CLUSTER = Path(__file__).resolve().parent / "cluster.sh"
# The first status check 6 s after a submission, then 16 s later, then 26 s ...
# (the plugin adds 10 s per check that finds nothing finished): a job of the
# test's size is seen finished at its first or second check.
FAST_STATUS = (
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "6",
    "--seconds-between-status-checks",
    "2",
)
GPU_RULES = {"caption", "attributes_phase1", "attributes_phase2", "evaluate"}
TRAIN_RULES = {"train_phase1", "train_phase2"}
SHARD_CHAIN = ["caption", "attributes_phase1", "attributes_phase2", "h5"]
AGGREGATES = ["train_phase1", "train_phase2", "evaluate"]
# Local rules that index or summarise outputs: they run where Snakemake runs.
REPORT_RULES = {
    "shard_index",
    "loss_plot",
    "metrics_table",
    "metrics_page",
    "funnel",
    "caption_lengths",
    "attribute_stats",
    "parse_failures",
}
# Slurm jobs of the full test DAG after ingest: 2 train shards + 1 eval shard (no h5).
AFTER_INGEST = {
    "caption": 3,
    "attributes_phase1": 3,
    "attributes_phase2": 3,
    "h5": 2,
    "train_phase1": 1,
    "train_phase2": 1,
    "evaluate": 1,
    "export_hf": 2,
    "export_llava": 1,
}
EXPORTS = ["export_hf", "export_llava"]
RUN_TIMEOUT = 900
# The reference run without the profile's job arrays: one sbatch per job.
NO_ARRAYS = ("--slurm-array-jobs=",)
# Per-shard outputs after ingest: what the array scenario removes and remakes.
PER_SHARD_FILES = [
    "results/*/captions/*.parquet",
    "results/*/attributes/phase1/*.parquet",
    "results/*/attributes/phase2/*.parquet",
    "results/*/h5/phase1/*.h5",
    "results/*/h5/phase2/*.h5",
    "results/*/h5/images/*",
    "results/*/h5/shards/*.json",
]


# ---------------------------------------------------------------------------
# The cluster and its jobs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    try:
        subprocess.run([str(CLUSTER), "start"], check=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        # A failed start leaves whatever daemons it started: stop them before failing.
        subprocess.run([str(CLUSTER), "stop"], check=False, timeout=60)
        raise
    yield None
    subprocess.run([str(CLUSTER), "stop"], check=False, timeout=60)
    kill_leftovers(tmp_path_factory.getbasetemp())


def kill_leftovers(root: Path) -> None:
    """SIGKILL processes still running in the tests' folders after the cluster stops.

    The chaos scenario SIGKILLs jobs' processes; a job step whose parent died is
    re-parented to init, and proctrack/linuxproc (the test cluster has no cgroups) then
    loses it, so neither scancel nor slurmd's shutdown reaches it.
    """
    prefix = str(root.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd").removesuffix(" (deleted)")
        except OSError:
            continue
        if cwd.startswith(prefix):
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)


@dataclass(frozen=True)
class SlurmJob:
    id: int
    rule: str
    wildcards: str
    state: str
    reason: str
    workdir: str
    tres: str
    mem_mb: int
    num_tasks: int
    time_limit: str
    # A task of a job array: the array's job id and the task's index ("1-3" while the
    # array waits unsplit in the queue); None and "" for a plain job.
    array_job_id: int | None = None
    array_task_id: str = ""

    @property
    def name(self) -> str:
        return f"{self.rule}[{self.wildcards}]" if self.wildcards else self.rule

    @property
    def slurm_id(self) -> str:
        """The id scancel takes: ARRAYID_TASK for an array task (Slurm 22.05 refuses a
        task's own JobId), the JobId otherwise."""
        if self.array_job_id is None:
            return str(self.id)
        return f"{self.array_job_id}_{self.array_task_id}"

    @property
    def submission(self) -> int:
        """The sbatch call that made this job: the array's id for every task of one."""
        return self.id if self.array_job_id is None else self.array_job_id


def _mem_mb(value: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([MGT]?)", value)  # scontrol: 300M, 125G, 62.50G
    if not match:
        return 0
    return round(float(match[1]) * {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[match[2]])


def slurm_jobs(workdir: Path) -> list[SlurmJob]:
    """Every job the controller remembers that ran in ``workdir``, oldest first."""
    output = subprocess.run(
        ["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=False
    ).stdout
    jobs = []
    task_wildcards: dict[tuple[int, int], str] | None = None
    for line in output.splitlines():
        fields = parse_scontrol_job(line)
        if "JobId" not in fields or fields.get("WorkDir") != str(workdir):
            continue
        # The plugin puts "rule_<name>_wildcards_<values>" into the job comment; an
        # array's comment names its first task's wildcards for every task, so a task's
        # own come from the Snakemake log that submitted it.
        comment = fields.get("Comment", "").removeprefix("rule_")
        rule, _, wildcards = comment.partition("_wildcards_")
        array_job_id = int(fields["ArrayJobId"]) if "ArrayJobId" in fields else None
        task = fields.get("ArrayTaskId", "")
        if array_job_id is not None:
            if task_wildcards is None:
                task_wildcards = array_task_wildcards(workdir)
            wildcards = task_wildcards.get((array_job_id, int(task)), "") if task.isdigit() else ""
        jobs.append(
            SlurmJob(
                id=int(fields["JobId"]),
                rule=rule,
                wildcards=wildcards,
                state=fields.get("JobState", ""),
                reason=fields.get("Reason", ""),
                workdir=fields["WorkDir"],
                tres=fields.get("TresPerJob", ""),
                mem_mb=_mem_mb(fields.get("MinMemoryNode", "")),
                num_tasks=int(fields.get("NumTasks", "1")),
                time_limit=fields.get("TimeLimit", ""),
                array_job_id=array_job_id,
                array_task_id=task,
            )
        )
    return sorted(jobs, key=lambda job: job.id)


# ---------------------------------------------------------------------------
# What a Snakemake run's log says it submitted
# ---------------------------------------------------------------------------

SUBMITTED_ARRAY = re.compile(
    r"Submitted array job with Snakemake IDs ([\d,]+) and SLURM job ID (\d+)\. "
    r"The individual task IDs are (\d+)-(\d+)\."
)
SUBMITTED_JOB = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) ")


@dataclass
class Round:
    """One scheduling round of a run ("Execute N jobs..."): the jobs it handed on."""

    selected: int
    # Snakemake jobid -> (rule, wildcards), the values joined as the plugin joins them.
    jobs: dict[int, tuple[str, str]]


def snakemake_rounds(output: str) -> list[Round]:
    rounds: list[Round] = []
    block: list[Any] | None = None  # [rule, jobid, wildcards] of the job block being read
    for line in output.splitlines():
        if match := re.fullmatch(r"Execute (\d+) jobs\.\.\.", line):
            rounds.append(Round(int(match[1]), {}))
        elif match := re.fullmatch(r"(?:local)?rule (\w+):", line):
            block = [match[1], None, ""]
        elif block is not None and line.startswith("    "):
            key, _, value = line.strip().partition(": ")
            if key == "jobid":
                block[1] = int(value)
            elif key == "wildcards":
                values = [item.split("=", 1)[1] for item in value.split(", ")]
                block[2] = "_".join(values).replace("/", "_")
            if rounds and block[1] is not None:
                rounds[-1].jobs[block[1]] = (block[0], block[2])
        else:
            block = None
    return rounds


def array_task_wildcards(workdir: Path) -> dict[tuple[int, int], str]:
    """(array job id, task index) -> the task's wildcards, from the runs' logs."""
    found = {}
    for log in sorted(workdir.glob("snakemake-run-*.out")):
        text = log.read_text(encoding="utf-8", errors="replace")
        wildcards = {
            jobid: job[1] for round_ in snakemake_rounds(text) for jobid, job in round_.jobs.items()
        }
        for match in SUBMITTED_ARRAY.finditer(text):
            for offset, jobid in enumerate(match[1].split(",")):
                found[(int(match[2]), int(match[3]) + offset)] = wildcards.get(int(jobid), "")
    return found


def new_jobs(workdir: Path, before: list[SlurmJob]) -> list[SlurmJob]:
    seen = {job.id for job in before}
    return [job for job in slurm_jobs(workdir) if job.id not in seen]


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---------------------------------------------------------------------------
# Running Snakemake with the repo's profile
# ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


@dataclass
class Background:
    """A Snakemake run in the background; its output goes to a file we can watch."""

    process: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return subprocess.CompletedProcess(self.process.args, code, self.output(), "")


_run_numbers = Counter[str]()


def start(
    workdir: Path, *args: str, profile: str = "profiles/slurm", readme: str | None = None
) -> Background:
    """Snakemake on the cluster in the background; ``readme``: a README command, run as
    written (tests.readme_commands) with the test's status settings and ``args`` after."""
    _run_numbers[str(workdir)] += 1
    log = workdir / f"snakemake-run-{_run_numbers[str(workdir)]}.out"
    handle = open(log, "w", encoding="utf-8")  # noqa: SIM115 - the child keeps writing it
    argv = [SNAKEMAKE, "--profile", profile, *FAST_STATUS, *args]
    if readme is not None:
        argv = readme_argv(readme, *FAST_STATUS, *args)
    process = subprocess.Popen(
        argv,
        cwd=workdir,
        env=_env(),
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
    )
    handle.close()
    return Background(process, log)


def run(
    workdir: Path, *args: str, profile: str = "profiles/slurm", readme: str | None = None
) -> subprocess.CompletedProcess[str]:
    return start(workdir, *args, profile=profile, readme=readme).wait()


def ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-6000:]


def dry_run_counts(workdir: Path) -> dict[str, int]:
    result = run(workdir, "-n", "all")
    ok(result)
    return job_counts(result.stdout)


def mtimes(workdir: Path, patterns: list[str]) -> dict[str, int]:
    return {
        str(path.relative_to(workdir)): path.stat().st_mtime_ns
        for pattern in patterns
        for path in sorted(workdir.glob(pattern))
    }


def parquet_keys(path: Path) -> list[str]:
    return [str(key) for key in pq.read_table(path, columns=["key"]).column("key").to_pylist()]


def fresh_workdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return make_workdir(path)


def copy_workdir(source: Path, target: Path) -> Path:
    """A copy with mtimes and Snakemake's metadata, so it is up to date as the source is."""
    shutil.copytree(source, target, symlinks=True)
    for old_log in target.glob("snakemake-run-*.out"):
        old_log.unlink()
    return target


def assert_same_shard_outputs(workdir: Path, reference: Path) -> None:
    """Captions, attribute tables and H5 files in ``workdir`` equal the reference's."""
    for pattern in ["results/*/captions/*.parquet", "results/*/attributes/*/*.parquet"]:
        ours = sorted(p.relative_to(workdir) for p in workdir.glob(pattern))
        theirs = sorted(p.relative_to(reference) for p in reference.glob(pattern))
        assert ours == theirs
        for relative in ours:
            ref = reference / relative
            assert parquet_keys(workdir / relative) == parquet_keys(ref), relative
            assert pq.read_table(workdir / relative).equals(pq.read_table(ref)), relative
    h5_files = sorted(p.relative_to(reference) for p in reference.glob("results/*/h5/*/*.h5"))
    assert h5_files
    for relative in h5_files:
        with h5py.File(workdir / relative) as ours_h5, h5py.File(reference / relative) as ref_h5:
            assert np.array_equal(ours_h5["data"][:], ref_h5["data"][:]), relative
            assert list(ours_h5["img_path"][:]) == list(ref_h5["img_path"][:]), relative


# ---------------------------------------------------------------------------
# The reference run
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    workdir: Path
    result: subprocess.CompletedProcess[str]
    jobs: list[SlurmJob]
    chaos: Future[ChaosRun]


@pytest.fixture(scope="module")
def reference(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    """The undisturbed full run; the chaos run of the same DAG goes on beside it."""
    root = tmp_path_factory.mktemp("slurm")
    workdir, chaos_dir = fresh_workdir(root / "reference"), fresh_workdir(root / "chaos")
    with ThreadPoolExecutor(max_workers=1) as pool:
        chaos = pool.submit(run_with_chaos, chaos_dir)
        result = run(workdir, "all", *NO_ARRAYS)
        yield Reference(workdir, result, slurm_jobs(workdir), chaos)


def test_full_run_submits_one_job_per_rule_instance_with_gpus_for_model_rules(
    reference: Reference,
) -> None:
    ok(reference.result)
    rules = Counter(job.rule for job in reference.jobs)
    assert rules == {"ingest": 3, **AFTER_INGEST}
    for job in reference.jobs:
        assert job.state == "COMPLETED", job
        assert job.array_job_id is None, job  # arrays off: one sbatch per job
        if job.rule in GPU_RULES:
            assert job.tres == "gres:gpu:1", job
        elif job.rule in TRAIN_RULES:
            assert job.tres == "gres:gpu:2" and job.num_tasks == 2, job
        else:
            assert "gpu" not in job.tres, job
    # Each log is where the README says, and names the GPU Slurm gave the job.
    for rule in GPU_RULES:
        logs = sorted((reference.workdir / "logs" / rule).rglob("*.log"))
        assert logs, rule
        for log in logs:
            assert re.search(r"Slurm job \d+, CUDA_VISIBLE_DEVICES=\d", log.read_text()), log
    assert (reference.workdir / "results/eval/metrics.tsv").exists()


def test_training_runs_as_two_slurm_tasks_that_train_one_model(reference: Reference) -> None:
    ok(reference.result)
    for phase in (1, 2):
        text = (reference.workdir / f"logs/train/phase{phase}.log").read_text()
        assert "launching srun --ntasks=2" in text
        assert "rank 0 of 2" in text and "rank 1 of 2" in text
        lines = (reference.workdir / f"results/train/phase{phase}/metrics.jsonl").read_text()
        assert '"processes": 2' in lines


def test_second_run_submits_nothing(reference: Reference) -> None:
    ok(reference.result)
    before = slurm_jobs(reference.workdir)
    result = run(reference.workdir, readme="snakemake --profile profiles/slurm all")
    ok(result)
    assert "Nothing to be done" in result.stdout
    assert new_jobs(reference.workdir, before) == []


# ---------------------------------------------------------------------------
# Scenarios, side by side
# ---------------------------------------------------------------------------


def scenario_caption_removed_and_its_job_cancelled(workdir: Path) -> None:
    """Only-stale 2 and fault 1: one shard's caption output removed; its job scancel'ed."""
    others = mtimes(
        workdir,
        ["results/photos/*/000000.*", "results/photos/*/*/000000.*", "results/photos_eval/**/*.*"],
    )
    (workdir / "results/photos/captions/000001.parquet").unlink()
    counts = dry_run_counts(workdir)
    for rule in [*SHARD_CHAIN, *AGGREGATES, *EXPORTS]:
        assert counts.pop(rule) == 1, (rule, counts)
    assert set(counts) <= {"h5_index", *REPORT_RULES, "all"}, counts

    before = slurm_jobs(workdir)
    first = start(workdir, "--retries", "0", "all")
    victim = wait_for(
        lambda: [
            j for j in new_jobs(workdir, before) if j.rule == "caption" and j.state == "RUNNING"
        ],
        300,
        "the caption job to run",
    )[0]
    time.sleep(4)  # let it get into the model
    subprocess.run(["scancel", str(victim.id)], check=True)
    failed = first.wait()
    assert failed.returncode != 0
    assert f"SLURM-job '{victim.id}' failed" in failed.stdout and "CANCELLED" in failed.stdout

    ok(run(workdir, "all"))
    jobs = new_jobs(workdir, before)
    assert sorted(job.rule for job in jobs) == sorted(
        ["caption", *SHARD_CHAIN, *AGGREGATES, *EXPORTS]
    )
    assert {job.wildcards for job in jobs if job.rule in SHARD_CHAIN} == {"photos_000001"}
    assert [j.state for j in jobs if j.rule == "caption"] == ["CANCELLED", "COMPLETED"]
    shard_keys = [row["key"] for row in read_rows(workdir / "data/train.tsv")[8:16]]
    assert sorted(parquet_keys(workdir / "results/photos/captions/000001.parquet")) == sorted(
        shard_keys
    )
    assert mtimes(workdir, list(others)) == others, "another shard's files were rewritten"


def scenario_rows_appended(workdir: Path) -> None:
    """Only-stale 3: eight rows appended to the URL list make one new shard."""
    old = mtimes(workdir, ["results/photos/*/00000[01].*", "results/photos/*/*/00000[01].*"])
    # Appended as a user would: the existing lines stay byte for byte as they were.
    with open(workdir / "data/train.tsv", "a", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        for row in read_rows(REPO / "data/sample/train.tsv")[16:24]:
            name = Path(row["url"]).name
            shutil.copy(REPO / "data/sample/images" / name, workdir / "data/images" / name)
            writer.writerow([row["key"], f"file:images/{name}", row["caption"]])
    counts = dry_run_counts(workdir)
    for rule in ["ingest", *SHARD_CHAIN, *AGGREGATES, "export_llava"]:
        assert counts.pop(rule) == 1, (rule, counts)
    # Both datasets' HF exports: the eval one's leak check reads the train shards.
    assert counts.pop("export_hf") == 2, counts
    assert set(counts) <= {"ingest_summary", "duplicates", "h5_index", *REPORT_RULES, "all"}

    before = slurm_jobs(workdir)
    ok(run(workdir, "all"))
    jobs = new_jobs(workdir, before)
    assert sorted(job.rule for job in jobs) == sorted(
        ["ingest", *SHARD_CHAIN, *AGGREGATES, *EXPORTS, "export_hf"]
    )
    assert {job.wildcards for job in jobs if job.rule in ["ingest", *SHARD_CHAIN]} == {
        "photos_000002"
    }
    assert mtimes(workdir, list(old)) == old, "an existing shard was rebuilt"
    assert len(parquet_keys(workdir / "results/photos/captions/000002.parquet")) == 8


def scenario_training_edited_and_eval_over_memory(workdir: Path) -> None:
    """Only-stale 4b and fault 2: a training setting edited; evaluate's first attempt gets
    too little memory, is killed by Slurm, and is resubmitted with attempt 2's memory."""
    config = load_config(workdir)
    config["train"]["phase2"]["lr"] = 0.002
    save_config(workdir, config)
    counts = dry_run_counts(workdir)
    assert {rule: counts.get(rule, 0) for rule in ["train_phase2", "evaluate"]} == {
        "train_phase2": 1,
        "evaluate": 1,
    }
    assert set(counts) <= {"train_phase2", "evaluate", *REPORT_RULES, "all"}

    # The repo's profile with one value changed: evaluate's memory on attempt 1.
    profile = yaml.safe_load((workdir / "profiles/slurm/config.yaml").read_text())
    profile["set-resources"]["evaluate"]["mem_mb"] = "300 if attempt == 1 else 64000 * attempt"
    (workdir / "profiles/slurm-lowmem").mkdir()
    (workdir / "profiles/slurm-lowmem/config.yaml").write_text(yaml.safe_dump(profile))

    before = slurm_jobs(workdir)
    result = run(workdir, "all", profile="profiles/slurm-lowmem")
    ok(result)
    jobs = new_jobs(workdir, before)
    assert [job.rule for job in jobs] == ["train_phase2", "evaluate", "evaluate"], jobs
    first, second = jobs[1], jobs[2]
    # Without cgroups Slurm kills the step when polling sees it over --mem; the job then
    # ends FAILED (OUT_OF_MEMORY with cgroups) and its Slurm log says why.
    assert first.state in {"OUT_OF_MEMORY", "FAILED"} and first.mem_mb == 300, first
    slurm_log = workdir / f".snakemake/slurm_logs/rule_evaluate/photos_eval/{first.id}.log"
    assert "Exceeded job memory limit" in slurm_log.read_text(), slurm_log
    assert second.state == "COMPLETED" and second.mem_mb == 128000, second
    assert f"SLURM-job '{first.id}' failed" in result.stdout


def _finished_outputs(output: str) -> set[str]:
    """Outputs of the jobs a (killed) Snakemake run reported as finished."""
    outputs = {}
    for block in re.split(r"\n(?:local)?rule ", output)[1:]:
        jobid = re.search(r"^\s+jobid: (\d+)$", block, flags=re.MULTILINE)
        out = re.search(r"^\s+output: (.*)$", block, flags=re.MULTILINE)
        if jobid and out:
            outputs[jobid[1]] = out[1]
    finished = re.findall(r"Finished jobid: (\d+)", output)
    return {outputs[j] for j in finished if j in outputs}


def scenario_caption_edited_and_snakemake_killed(workdir: Path) -> None:
    """Only-stale 4a and fault 3: a caption setting edited; Snakemake SIGKILLed mid-run."""
    ingest_files = mtimes(workdir, ["results/*/shards/*"])
    config = load_config(workdir)
    config["caption"]["max_new_tokens"] = int(config["caption"].get("max_new_tokens", 32)) + 4
    save_config(workdir, config)
    counts = dry_run_counts(workdir)
    assert {
        rule: counts.get(rule, 0) for rule in [*SHARD_CHAIN, *AGGREGATES, *EXPORTS]
    } == AFTER_INGEST
    assert "ingest" not in counts

    before = slurm_jobs(workdir)
    # Without arrays: with them, one run saw an output that the killed Snakemake had
    # counted finished rewritten afterwards by a task still running (not yet explained;
    # docs/slurm.md, "Job arrays").
    first = start(workdir, "all", *NO_ARRAYS)
    wait_for(lambda: "Rule: attributes_phase1" in first.output(), 600, "a finished attributes job")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    done_before_kill = _finished_outputs(first.output())
    assert done_before_kill
    kept = mtimes(workdir, sorted(done_before_kill))

    # A killed Snakemake leaves its lock behind: --unlock, then the same command again.
    subprocess.run(
        [SNAKEMAKE, "--profile", "profiles/slurm", "--unlock"], cwd=workdir, env=_env(), check=True
    )
    second = run(workdir, "all", *NO_ARRAYS)
    ok(second)
    redone = {out for rule in SHARD_CHAIN for out in job_outputs(second.stdout, rule)}
    assert not redone & done_before_kill, sorted(redone & done_before_kill)
    assert mtimes(workdir, sorted(done_before_kill)) == kept
    jobs = new_jobs(workdir, before)
    assert "ingest" not in {job.rule for job in jobs}
    assert mtimes(workdir, list(ingest_files)) == ingest_files
    assert "Nothing to be done" in run(workdir, "-n", "all").stdout
    for path in sorted(workdir.glob("results/*/captions/*.parquet")):
        settings = pq.read_table(path, columns=["settings"]).column("settings").to_pylist()
        used = {json.loads(row)["max_new_tokens"] for row in settings}
        assert used == {config["caption"]["max_new_tokens"]}, path


# README "Several shards in one Slurm job": the caption jobs of 3 shards in one group job
# that holds one GPU and runs them one after another.
GROUPED_CAPTIONS = (
    "--groups",
    "caption=gpu_batch",
    "--group-components",
    "gpu_batch=3",
    "--resources",
    "gpu=1",
    "--set-resource-scopes",
    "gpu=local",
)


def scenario_captions_grouped_into_one_job(workdir: Path) -> None:
    """Small shards batched: three caption jobs in one Slurm job with one GPU, the summed
    time limit and the largest memory; the same captions as one job per shard."""
    captions = sorted(workdir.glob("results/*/captions/*.parquet"))
    assert len(captions) == 3
    expected = {path: parquet_keys(path) for path in captions}
    for path in captions:
        path.unlink()
    before = slurm_jobs(workdir)
    targets = [str(path.relative_to(workdir)) for path in captions]
    # Targets first: --set-resource-scopes takes every argument after it.
    ok(run(workdir, *targets, *GROUPED_CAPTIONS))
    jobs = new_jobs(workdir, before)
    assert len(jobs) == 1, jobs
    (job,) = jobs
    assert job.state == "COMPLETED" and job.tres == "gres:gpu:1", job
    # caption's runtime is 120 min per attempt: three in series.
    assert job.time_limit == "06:00:00", job
    assert job.mem_mb == 64000, job
    for path, keys in expected.items():
        assert sorted(parquet_keys(path)) == sorted(keys), path
    for rule_log in sorted((workdir / "logs/caption").rglob("*.log")):
        assert f"Slurm job {job.id}," in rule_log.read_text(encoding="utf-8"), rule_log


def scenario_shard_waves_as_arrays(workdir: Path, reference: Path) -> None:
    """Job arrays (the profile's slurm-array-jobs): every per-shard output after ingest is
    removed and remade. The jobs of a rule that Snakemake starts together go to Slurm in
    one sbatch (an array; one task each), each task runs its own shard, a cancelled task is
    resubmitted alone, and the outputs equal the reference run's (made without arrays)."""
    shards = sorted(
        f"{p.parent.parent.name}_{p.stem}" for p in workdir.glob("results/*/shards/*.tar")
    )
    targets = sorted(
        str(path.relative_to(workdir))
        for pattern in ["results/*/attributes/phase2/*.parquet", "results/*/h5/shards/*.json"]
        for path in workdir.glob(pattern)
    )
    for pattern in PER_SHARD_FILES:
        for path in workdir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    planned = run(workdir, "-n", *targets)
    ok(planned)
    assert job_counts(planned.stdout) == {rule: AFTER_INGEST[rule] for rule in SHARD_CHAIN}

    before = slurm_jobs(workdir)
    background = start(workdir, *targets)
    victim = wait_for(
        lambda: [
            job
            for job in new_jobs(workdir, before)
            if job.rule == "caption" and job.array_task_id == "2" and job.state == "RUNNING"
        ],
        300,
        "task 2 of the caption array to run",
    )[0]
    time.sleep(4)  # let it get into the model
    subprocess.run(["scancel", victim.slurm_id], check=True)
    result = background.wait()
    ok(result)  # the profile's retries: 2
    assert f"SLURM-job '{victim.slurm_id}' failed" in result.stdout and "CANCELLED" in result.stdout
    jobs = new_jobs(workdir, before)

    # The caption wave (all three ready at the start): one array of three tasks, one per
    # shard; the cancelled task alone is resubmitted, as a plain job with attempt 2's memory.
    captions = [job for job in jobs if job.rule == "caption"]
    wave = [job for job in captions if job.array_job_id is not None]
    assert {job.array_job_id for job in wave} == {victim.array_job_id}, captions
    assert sorted(job.array_task_id for job in wave) == ["1", "2", "3"], wave
    assert sorted(job.wildcards for job in wave) == shards, wave
    for job in wave:
        assert job.state == ("CANCELLED" if job.id == victim.id else "COMPLETED"), job
    victim = next(job for job in wave if job.id == victim.id)
    (retry,) = [job for job in captions if job.array_job_id is None]
    assert retry.wildcards == victim.wildcards and retry.state == "COMPLETED", retry
    assert retry.mem_mb == 128000, retry
    slurm_log = workdir / f".snakemake/slurm_logs/rule_caption/{victim.slurm_id}.log"
    assert slurm_log.exists(), slurm_log
    # The plugin passes every task's command in the array's one sbatch command line, which
    # Linux caps at 128 KiB: the array's job script holds that line, with the other two
    # tasks' commands in it; the profile's array limit must fit.
    script = subprocess.run(
        ["scontrol", "write", "batch_script", str(victim.array_job_id), "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    command = next(line for line in script.splitlines() if "--slurm-jobstep-array-execs=" in line)
    per_task = len(command.split("--slurm-jobstep-array-execs=", 1)[1].split()[0]) / 2
    limit = yaml.safe_load((workdir / "profiles/slurm/config.yaml").read_text())[
        "slurm-array-limit"
    ]
    # 2 KB for sbatch's own options (about 700 bytes here).
    assert len(command) + 2048 + (limit - 3) * per_task < 128 * 1024, (len(command), per_task)

    # Every scheduling round handed each rule's jobs to Slurm in one sbatch: an array for
    # two or more, a plain job for one; no job Snakemake selected was left unsubmitted.
    rounds = snakemake_rounds(result.stdout)
    assert all(round_.selected == len(round_.jobs) for round_ in rounds), rounds
    waves = [
        frozenset(jobid for jobid, (rule, _) in round_.jobs.items() if rule == name)
        for round_ in rounds
        for name in SHARD_CHAIN
    ]
    waves = [wave_ids for wave_ids in waves if wave_ids]
    arrays = Counter(
        frozenset(int(jobid) for jobid in match[1].split(","))
        for match in SUBMITTED_ARRAY.finditer(result.stdout)
    )
    singles = Counter(int(match[1]) for match in SUBMITTED_JOB.finditer(result.stdout))
    assert arrays == Counter(ids for ids in waves if len(ids) > 1), (arrays, waves)
    assert singles == Counter(next(iter(ids)) for ids in waves if len(ids) == 1), singles
    assert len({job.submission for job in jobs}) == len(waves) < len(jobs), jobs

    # Each task ran its own shard: the rule's log of that shard names the task's job.
    for job in jobs:
        if job.state != "COMPLETED":
            continue
        dataset, shard = job.wildcards.rsplit("_", 1)
        text = (workdir / "logs" / job.rule / dataset / f"{shard}.log").read_text()
        assert f"Slurm job {job.id}," in text, job
        if job.rule in GPU_RULES:
            assert job.tres == "gres:gpu:1", job
            assert re.search(r"CUDA_VISIBLE_DEVICES=\d", text), job
    assert_same_shard_outputs(workdir, reference)


def _job_processes(job_id: int) -> list[int]:
    """The rule's own process (the script Snakemake runs) of a running job, if started."""
    listed = subprocess.run(
        ["scontrol", "listpids", str(job_id)], capture_output=True, text=True, check=False
    ).stdout.split()
    pids = []
    for pid in listed:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b".snakemake/scripts/" in cmdline or b"-m vlmflow.stages.train" in cmdline:
            pids.append(int(pid))
    return pids


def _kill_rule_process(job_id: int, timeout: float = 30) -> bool:
    """SIGKILL the rule's process of a running job, as the OOM killer would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = _job_processes(job_id)
        if pids:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return True
        time.sleep(0.3)
    return False


@dataclass
class ChaosRun:
    workdir: Path
    result: subprocess.CompletedProcess[str]
    kills: list[tuple[str, str]]
    runs: int
    jobs_seen: int
    arrays: int  # job arrays submitted
    array_kills: int  # kills that hit an array task


def run_with_chaos(workdir: Path) -> ChaosRun:
    """A full run, with the profile's job arrays, in which a random third of the running
    jobs (array tasks among them) are killed (alternately scancel and SIGKILL of the
    rule's process); rerun until complete."""
    rng = random.Random(7)
    decided: dict[str, bool] = {}
    kills: list[tuple[str, str]] = []
    array_kills = 0
    runs = 0
    while True:
        runs += 1
        background = start(workdir, "all")
        while background.process.poll() is None:
            for job in slurm_jobs(workdir):
                if job.state != "RUNNING" or job.name in decided:
                    continue
                if job.array_job_id is not None and not job.wildcards:
                    continue  # its submission is not in the log yet: its name is unknown
                decided[job.name] = rng.random() < 1 / 3
                if not decided[job.name]:
                    continue
                how = "scancel" if len(kills) % 2 == 0 else "SIGKILL"
                if how == "scancel":
                    subprocess.run(["scancel", job.slurm_id], check=False)
                elif not _kill_rule_process(job.id):
                    continue  # it finished before its script started: spared
                kills.append((job.name, how))
                array_kills += job.array_job_id is not None
            time.sleep(1)
        result = background.wait()
        if result.returncode == 0 or runs == 4:
            arrays = {job.array_job_id for job in slurm_jobs(workdir)} - {None}
            return ChaosRun(workdir, result, kills, runs, len(decided), len(arrays), array_kills)


@pytest.fixture(scope="module")
def scenarios(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ok(reference.result)
    root = tmp_path_factory.mktemp("scenarios")
    work = {
        "removed": lambda: scenario_caption_removed_and_its_job_cancelled(
            copy_workdir(reference.workdir, root / "removed")
        ),
        "appended": lambda: scenario_rows_appended(
            copy_workdir(reference.workdir, root / "appended")
        ),
        "training": lambda: scenario_training_edited_and_eval_over_memory(
            copy_workdir(reference.workdir, root / "training")
        ),
        "killed": lambda: scenario_caption_edited_and_snakemake_killed(
            copy_workdir(reference.workdir, root / "killed")
        ),
        "grouped": lambda: scenario_captions_grouped_into_one_job(
            copy_workdir(reference.workdir, root / "grouped")
        ),
        "arrays": lambda: scenario_shard_waves_as_arrays(
            copy_workdir(reference.workdir, root / "arrays"), reference.workdir
        ),
    }
    results: dict[str, Any] = {}
    lock = threading.Lock()

    def capture(name: str) -> None:
        started = time.monotonic()
        try:
            value: Any = work[name]()
        except BaseException as error:  # re-raised by the scenario's test
            value = error
        with lock:
            results[name] = value
            seconds[name] = time.monotonic() - started

    seconds: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=len(work)) as pool:
        list(pool.map(capture, work))
    print("scenarios, side by side:", ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return results


def outcome(scenarios: dict[str, Any], name: str) -> Any:
    value = scenarios[name]
    if isinstance(value, BaseException):
        raise value
    return value


def test_removed_caption_reruns_only_its_shard_and_a_cancelled_job_is_redone(
    scenarios: dict[str, Any],
) -> None:
    outcome(scenarios, "removed")


def test_appended_rows_run_only_the_new_shard(scenarios: dict[str, Any]) -> None:
    outcome(scenarios, "appended")


def test_training_edit_reruns_train_and_eval_and_memory_kill_is_retried_bigger(
    scenarios: dict[str, Any],
) -> None:
    outcome(scenarios, "training")


def test_caption_edit_reruns_captions_on_and_a_killed_snakemake_resumes(
    scenarios: dict[str, Any],
) -> None:
    outcome(scenarios, "killed")


def test_small_shards_run_as_one_group_job(scenarios: dict[str, Any]) -> None:
    outcome(scenarios, "grouped")


def test_shard_waves_go_as_job_arrays_and_a_cancelled_task_is_retried_alone(
    scenarios: dict[str, Any],
) -> None:
    outcome(scenarios, "arrays")


def test_chaos_kills_leave_results_identical_to_an_undisturbed_run(
    reference: Reference,
) -> None:
    ok(reference.result)
    chaos = reference.chaos.result(timeout=RUN_TIMEOUT)
    ok(chaos.result)
    print(
        f"chaos: {len(chaos.kills)} kills of {chaos.jobs_seen} jobs in {chaos.runs} runs; "
        f"{chaos.arrays} job arrays, {chaos.array_kills} kills of array tasks"
    )
    assert len(chaos.kills) >= 3, chaos.kills
    assert {how for _, how in chaos.kills} == {"scancel", "SIGKILL"}
    assert chaos.arrays >= 1  # the profile's arrays were on
    workdir = chaos.workdir
    assert_same_shard_outputs(workdir, reference.workdir)
    for table in ["results/eval/metrics.tsv", "results/photos/ingest_summary.tsv"]:
        assert (workdir / table).read_text() == (reference.workdir / table).read_text(), table
