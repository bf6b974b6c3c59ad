"""Run one attribute phase on one shard (see vlmflow.attributes).

A Meta-format checkpoint split over N consolidated.NN.pth files runs on N processes:
torchrun inside this job, or the launcher the profile gives as the rule's ``mpi``
resource.
"""

import sys

from vlmflow import attributes
from vlmflow.engine import deployment_of
from vlmflow.logs import log_to
from vlmflow.prompts import read_prompt
from vlmflow.stage_versions import without_version

with log_to(snakemake.log[0]):
    params = without_version(snakemake.params.settings)
    settings = attributes.LLMSettings(
        prompt=read_prompt(snakemake.input.prompt),
        stop_words=tuple(params.pop("stop_words")),
        **params,
    )
    phase1 = snakemake.rule == "attributes_phase1"
    job = attributes.PhaseJob(
        phase="phase1" if phase1 else "phase2",
        input_path=snakemake.input.captions if phase1 else snakemake.input.phase1,
        out_path=snakemake.output[0],
        settings=settings,
        shard_id=snakemake.wildcards.shard,
        deployment=deployment_of(
            snakemake.config, snakemake.log[0], snakemake.resources.get("mem_mb")
        ),
    )
    # log_to points stderr at the rule's log file; launched processes write there too.
    attributes.launch(job, snakemake.resources.get("mpi"), sys.stderr)
