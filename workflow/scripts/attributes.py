"""Run one attribute phase on one shard (see vlmflow.attributes)."""

from vlmflow import attributes
from vlmflow.logs import log_to
from vlmflow.prompts import read_prompt

with log_to(snakemake.log[0]):
    params = dict(snakemake.params.settings)
    settings = attributes.LLMSettings(
        prompt=read_prompt(snakemake.input.prompt),
        stop_words=tuple(params.pop("stop_words")),
        **params,
    )
    if snakemake.rule == "attributes_phase1":
        attributes.run_phase1(
            snakemake.input.captions, snakemake.output[0], settings, snakemake.wildcards.shard
        )
    else:
        attributes.run_phase2(
            snakemake.input.phase1, snakemake.output[0], settings, snakemake.wildcards.shard
        )
