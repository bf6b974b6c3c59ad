"""The workflow on a cluster that caps its jobs, with profiles/slurm's settings for one.

The one-node test cluster (tests/slurm/cluster.sh) holds at most 12 jobs (MaxJobCount;
finished ones count for 20 s), well below the demo DAG's 54 steps. Past the cap, sbatch
retries for two minutes and then fails the job, so a run that submits every ready job at
once (`jobs: unlimited`) meets failed submissions. With `jobs:` below the cap, as
profiles/slurm says for such a cluster, the DAG completes, with job arrays (whose chunk,
`slurm-array-limit`, stays at or below `jobs`: a chunk the cap holds back would never be
submitted, plugin issue #473) and without.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.readme_commands import readme_argv
from tests.slurm.test_slurm import CLUSTER, FAST_STATUS, kill_leftovers, ok
from tests.workflow.conftest import make_workdir, run_in

pytestmark = pytest.mark.slurm

CAP = {"VLMFLOW_SLURM_MAX_JOBS": "12", "VLMFLOW_SLURM_MIN_JOB_AGE": "20"}
# What profiles/slurm/config.yaml says to set for a cluster that caps jobs at 12.
CAPPED = ("--jobs", "8")
SCENARIOS = {
    "arrays": (*CAPPED, "--slurm-array-limit", "4"),
    "no-arrays": (*CAPPED, "--slurm-array-jobs="),
}


@pytest.fixture(scope="module")
def capped_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    env = {**os.environ, **CAP}
    try:
        subprocess.run([str(CLUSTER), "start"], check=True, timeout=300, env=env)
        limit = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, check=True
        )
        assert any(
            line.split() == ["MaxJobCount", "=", CAP["VLMFLOW_SLURM_MAX_JOBS"]]
            for line in limit.stdout.splitlines()
        )
        yield None
    finally:
        subprocess.run([str(CLUSTER), "stop"], check=False, timeout=60)
        kill_leftovers(tmp_path_factory.getbasetemp())


@pytest.mark.usefixtures("capped_cluster")
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_profile_completes_the_dag_under_a_job_cap(scenario: str, tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path)
    argv = readme_argv("snakemake --profile profiles/slurm all", *FAST_STATUS, *SCENARIOS[scenario])
    run = run_in(workdir, argv, None, 1200)
    ok(run)
    output = run.stdout + run.stderr
    assert "temporarily unable to accept job" not in output
    assert "sbatch failed" not in output
    assert (workdir / "results/eval/metrics.tsv").is_file()
    if scenario == "arrays":
        assert "Submitted array job" in output
    else:
        assert "Submitted array job" not in output
