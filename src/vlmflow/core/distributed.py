"""Multi-process training: who am I, how to start the others, and how they meet.

A training job is launched in one of three ways:

- in-process (no launcher): one process, world size 1;
- ``torchrun`` (e.g. ``torchrun --standalone --nproc-per-node=2``) on one machine: torchrun
  sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
- ``srun`` inside a Slurm allocation, one task per GPU, on one or many nodes: each task has
  ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``; the launcher sets
  ``MASTER_ADDR`` (the allocation's first node) and ``MASTER_PORT`` (from the job id).

snakemake-executor-plugin-slurm strips ``SLURM_*`` variables (other than the job id)
before it runs a rule, so the task count and node list of the allocation are read back
from ``scontrol`` rather than from the environment.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from vlmflow.core.io import write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_from_env(env: Mapping[str, str] | None = None) -> Rank:
    """This process's place in the job, from torchrun's or srun's variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Rank(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Rank(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
        )
    return Rank()


def init(rank: Rank) -> torch.device:
    """Join the process group (gloo on CPU, NCCL on GPU) and return this rank's device."""
    on = torch.device("cpu")
    if torch.cuda.is_available():
        on = torch.device("cuda", rank.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(on)
    if rank.world_size > 1 and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"rank {rank.rank} of {rank.world_size} has no {' or '.join(missing)}: start "
                "training through torchrun or vlmflow's srun launcher"
            )
        dist.init_process_group(
            backend="nccl" if on.type == "cuda" else "gloo",
            rank=rank.rank,
            world_size=rank.world_size,
        )
    return on


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def mean_across_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (the value itself with one process)."""
    if not dist.is_initialized():
        return float(value.detach())
    total = value.detach().float().clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


@dataclass(frozen=True)
class SlurmAllocation:
    job_id: str
    num_tasks: int
    hosts: list[str]


def parse_scontrol_job(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output (one line of ``Key=Value`` pairs) as a dict."""
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def slurm_allocation(job_id: str) -> SlurmAllocation:
    """Task count and node names of a running Slurm job, asked of the controller."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=False
    )
    fields = parse_scontrol_job(shown.stdout)
    if shown.returncode != 0 or "NumTasks" not in fields:
        raise RuntimeError(
            f"cannot read Slurm job {job_id} with scontrol: {shown.stderr.strip() or shown.stdout}"
        )
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", fields["NodeList"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return SlurmAllocation(job_id, int(fields["NumTasks"]), hosts)


def master_port(job_id: str) -> int:
    """A port all tasks of one job agree on, different for jobs sharing a node."""
    return 20000 + int(job_id) % 20000


def launch_command(
    launcher: str,
    module: str,
    args: list[str],
    env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start ``python -m module args`` on every rank.

    ``launcher`` comes from the profile (the rule's ``mpi`` resource), never from data.
    For ``srun`` the task count is the allocation's (``--ntasks``), and a failing rank
    takes the others down (``--kill-on-bad-exit``) so the job fails instead of hanging.
    """
    env = dict(os.environ if env is None else env)
    parts = shlex.split(launcher)
    if not parts:
        raise ValueError("empty launcher")
    program = Path(parts[0]).name
    if program == "srun":
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            raise RuntimeError(
                f"launcher {launcher!r} needs a Slurm allocation, but SLURM_JOB_ID is not set"
            )
        allocation = slurm_allocation(job_id)
        env["MASTER_ADDR"] = allocation.hosts[0]
        env["MASTER_PORT"] = str(master_port(job_id))
        parts += [f"--ntasks={allocation.num_tasks}", "--kill-on-bad-exit=1"]
        return [*parts, sys.executable, "-m", module, *args], env
    if program == "torchrun":
        # `torchrun` is `python -m torch.distributed.run`; this interpreter has vlmflow.
        return [sys.executable, "-m", "torch.distributed.run", *parts[1:], "-m", module, *args], env
    raise ValueError(f"unknown launcher {launcher!r}: expected srun ... or torchrun ...")


def log_as_rank() -> Rank:
    """This process's rank, with logging to stderr that names it on every line (the
    entry point of each launched process)."""
    rank = rank_from_env()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s rank {rank.rank}/{rank.world_size} %(levelname)s %(message)s",
    )
    return rank


def launch_module(
    launcher: str, module: str, spec: Path, job: dict[str, Any], log_file: IO[str]
) -> None:
    """Write ``job`` to ``spec`` and run ``python -m module spec`` on every process
    ``launcher`` starts, their output going to ``log_file``; raise if any fails."""
    write_json(spec, job)
    try:
        argv, env = launch_command(launcher, module, [str(spec)])
        log.info("launching %s", " ".join(argv))
        log_file.flush()
        done = subprocess.run(argv, env=env, stdout=log_file, stderr=log_file, check=False)
    finally:
        spec.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"{module} processes failed (exit {done.returncode}); see above")
