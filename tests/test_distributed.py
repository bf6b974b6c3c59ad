"""Tests for vlmflow.core.distributed: ranks from launcher variables and launch commands."""

from __future__ import annotations

import sys

import pytest

from vlmflow.core import distributed
from vlmflow.core.distributed import Rank, SlurmAllocation


def test_rank_from_torchrun_variables() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}
    assert distributed.rank_from_env(env) == Rank(3, 4, 1)


def test_rank_from_srun_variables() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert distributed.rank_from_env(env) == Rank(5, 8, 1)


def test_a_plain_process_is_rank_zero_of_one() -> None:
    rank = distributed.rank_from_env({"SLURM_JOB_ID": "12"})
    assert rank == Rank(0, 1, 0) and rank.is_main


def test_parse_scontrol_job_line() -> None:
    line = "JobId=42 JobName=x NumNodes=2 NumCPUs=16 NumTasks=8 NodeList=gpu[01-02] Comment=a"
    fields = distributed.parse_scontrol_job(line)
    assert fields["NumTasks"] == "8" and fields["NodeList"] == "gpu[01-02]"


def test_srun_launch_uses_the_allocations_tasks_and_first_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        distributed,
        "slurm_allocation",
        lambda job_id: SlurmAllocation(job_id, 8, ["gpu01", "gpu02"]),
    )
    argv, env = distributed.launch_command(
        "srun --cpu-bind=none", "vlmflow.stages.train", ["job.json"], env={"SLURM_JOB_ID": "4321"}
    )
    assert argv == [
        "srun",
        "--cpu-bind=none",
        "--ntasks=8",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "vlmflow.stages.train",
        "job.json",
    ]
    assert env["MASTER_ADDR"] == "gpu01"
    assert env["MASTER_PORT"] == str(distributed.master_port("4321"))


def test_srun_outside_an_allocation_is_refused() -> None:
    with pytest.raises(RuntimeError, match="SLURM_JOB_ID is not set"):
        distributed.launch_command("srun", "vlmflow.stages.train", ["j"], env={})


def test_torchrun_launch_runs_the_module() -> None:
    argv, _ = distributed.launch_command(
        "torchrun --standalone --nproc-per-node=2", "vlmflow.stages.train", ["j.json"], env={}
    )
    assert argv == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "vlmflow.stages.train",
        "j.json",
    ]


def test_unknown_launcher_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown launcher 'mpirun -n 2'"):
        distributed.launch_command("mpirun -n 2", "vlmflow.stages.train", ["j"], env={})


def test_a_rank_without_a_rendezvous_address_says_how_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="has no MASTER_ADDR or MASTER_PORT"):
        distributed.init(Rank(1, 2, 1))
