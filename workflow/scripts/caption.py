"""Caption one shard with a VLM (see vlmflow.stages.caption)."""

from vlmflow.core.engine import deployment_of
from vlmflow.core.logs import log_to
from vlmflow.core.prompts import read_prompt
from vlmflow.core.stage_versions import without_version
from vlmflow.stages import caption

with log_to(snakemake.log[0]):
    settings = caption.CaptionSettings(
        prompt=read_prompt(snakemake.input.prompt),
        **without_version(snakemake.params.settings),
    )
    caption.run(
        snakemake.input.shard,
        snakemake.output[0],
        settings,
        snakemake.wildcards.shard,
        deployment_of(snakemake.config, snakemake.log[0], snakemake.resources.get("mem_mb")),
    )
