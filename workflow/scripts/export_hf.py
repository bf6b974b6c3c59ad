"""A dataset's final samples, less its duplicates and leaks, as a Hugging Face datasets
folder with its card (see vlmflow.export)."""

from vlmflow.contract import read_duplicates
from vlmflow.export import CardInfo, export_hf, funnel_total, shard_files
from vlmflow.logs import log_to

with log_to(snakemake.log[0]):
    inputs = snakemake.input
    card = CardInfo(
        dataset=snakemake.wildcards.dataset,
        source=snakemake.params.source,
        prompts={
            "caption": inputs.caption_prompt,
            "attributes phase 1": inputs.phase1_prompt,
            "attributes phase 2": inputs.phase2_prompt,
        },
        funnel=funnel_total(
            inputs.stats,
            inputs.captions,
            inputs.phase1,
            inputs.phase2,
            inputs.h5,
            inputs.duplicates,
        ),
        llava=snakemake.params.llava,
    )
    shards = shard_files(inputs.shards, inputs.stats, inputs.captions, inputs.phase1, inputs.phase2)
    export_hf(shards, card, snakemake.output[0], left_out=read_duplicates(inputs.duplicates))
