"""Train one phase of the LLaVA-style model (see vlmflow.train).

The profile decides how many processes train: a rule with an ``mpi`` resource (e.g.
``srun`` on a Slurm cluster) starts one process per task of the job; without it the
phase trains in this process.
"""

import sys
from pathlib import Path

from vlmflow import train
from vlmflow.contract import read_shard_index
from vlmflow.logs import log_to
from vlmflow.stage_versions import without_version

with log_to(snakemake.log[0]):
    settings = train.TrainSettings(**without_version(snakemake.params.settings))
    # Image paths inside results/D/h5/phaseN/S.h5 are relative to results/D/h5/images.
    sources = [
        train.H5Source(path=Path(h5), image_root=Path(h5).parent.parent / "images")
        for h5 in read_shard_index(snakemake.input.h5, f"h5_phase{settings.phase}")
    ]
    # How often to save a resumable checkpoint changes no result, so it is read from the
    # config here rather than made a param (editing it does not rerun training).
    every = snakemake.config["train"]["checkpoint_every"]
    # DDP or FSDP: how the processes share the work, not what they compute.
    fsdp = snakemake.config["train"]["fsdp"]
    if settings.phase == 1:
        job = train.TrainJob(
            sources,
            snakemake.output[0],
            settings,
            vision_tower=snakemake.params.vision_tower,
            language_model=snakemake.params.language_model,
            checkpoint_every=every,
            fsdp=fsdp,
        )
    else:
        job = train.TrainJob(
            sources,
            snakemake.output[0],
            settings,
            init_from=snakemake.input.init,
            checkpoint_every=every,
            fsdp=fsdp,
        )
    launcher = snakemake.resources.get("mpi")
    # log_to points stderr at the rule's log file; the launched processes write there too.
    train.launch(job, launcher, sys.stderr)
