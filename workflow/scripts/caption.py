"""Caption one shard with a VLM (see vlmflow.caption)."""

from vlmflow import caption
from vlmflow.engine import deployment_of
from vlmflow.logs import log_to
from vlmflow.prompts import read_prompt
from vlmflow.stage_versions import without_version

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
