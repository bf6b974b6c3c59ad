"""The workflow on a real one-node Slurm cluster, with the repo's own profile.

The cluster (tests/slurm/cluster.sh) is started for this module and stopped after it.
Snakemake asks squeue for job states (the test cluster has no accounting daemon) and
checks often, so a chain of small jobs takes seconds rather than minutes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.workflow.conftest import job_counts, make_workdir, snakemake

pytestmark = pytest.mark.slurm

CLUSTER = Path(__file__).resolve().parent / "cluster.sh"
FAST_STATUS = (
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--seconds-between-status-checks",
    "2",
)
GPU_RULES = {
    "caption",
    "attributes_phase1",
    "attributes_phase2",
    "train_phase1",
    "train_phase2",
    "evaluate",
}


@pytest.fixture(scope="module")
def cluster() -> object:
    subprocess.run([str(CLUSTER), "start"], check=True, timeout=300)
    yield None
    subprocess.run([str(CLUSTER), "stop"], check=False, timeout=60)


@pytest.fixture(scope="module")
def workdir(cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("slurm"))


def slurm_jobs() -> dict[str, dict[str, str]]:
    """Every job the controller remembers (MinJobAge=300): id -> scontrol fields."""
    output = subprocess.run(
        ["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=False
    ).stdout
    jobs = {}
    for line in output.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def rule_of(job: dict[str, str]) -> str:
    # The plugin puts "rule_<name>_wildcards_<...>" into the job comment.
    comment = job.get("Comment", "")
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def run_on_slurm(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return snakemake(workdir, *FAST_STATUS, *args, profile="profiles/slurm", timeout=1500)


def test_full_run_submits_one_job_per_rule_instance_with_gpus_for_model_rules(
    workdir: Path,
) -> None:
    before = set(slurm_jobs())
    run = run_on_slurm(workdir, "all")
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    submitted = {i: job for i, job in slurm_jobs().items() if i not in before}
    rules = [rule_of(job) for job in submitted.values()]
    assert rules.count("caption") == 3 and rules.count("ingest") == 3
    assert rules.count("train_phase1") == rules.count("train_phase2") == 1
    for job in submitted.values():
        wants_gpu = "gres:gpu:1" in job.get("TresPerJob", "")
        assert wants_gpu == (rule_of(job) in GPU_RULES), job
        assert job["JobState"] == "COMPLETED", job
    for log in (workdir / "logs" / "caption").rglob("*.log"):
        assert "CUDA_VISIBLE_DEVICES=0" in log.read_text() or "CUDA_VISIBLE_DEVICES=1" in (
            log.read_text()
        )
    assert (workdir / "results/eval/metrics.tsv").exists()


def test_second_run_submits_nothing(workdir: Path) -> None:
    before = set(slurm_jobs())
    run = run_on_slurm(workdir, "all")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Nothing to be done" in run.stdout + run.stderr
    assert set(slurm_jobs()) == before


def test_removing_one_caption_file_resubmits_only_that_shard_chain(workdir: Path) -> None:
    (workdir / "results/photos/captions/000001.parquet").unlink()
    dry = run_on_slurm(workdir, "-n", "all")
    assert job_counts(dry.stdout + dry.stderr)["caption"] == 1
    before = set(slurm_jobs())
    run = run_on_slurm(workdir, "all")
    assert run.returncode == 0, run.stderr[-4000:]
    rules = sorted(rule_of(job) for i, job in slurm_jobs().items() if i not in before)
    assert rules == sorted(
        [
            "caption",
            "attributes_phase1",
            "attributes_phase2",
            "h5",
            "train_phase1",
            "train_phase2",
            "evaluate",
        ]
    )
