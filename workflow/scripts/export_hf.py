"""A dataset's final samples, less its duplicates and leaks, as a Hugging Face datasets
folder with its card (see vlmflow.export)."""

from vlmflow.contract import read_duplicates, read_shard_index
from vlmflow.export import CardInfo, export_hf, funnel_total, shard_files
from vlmflow.logs import log_to

with log_to(snakemake.log[0]):
    inputs = snakemake.input
    stats = read_shard_index(inputs.stats, "stats")
    captions = read_shard_index(inputs.captions, "captions")
    phase1 = read_shard_index(inputs.phase1, "phase1")
    phase2 = read_shard_index(inputs.phase2, "phase2")
    card = CardInfo(
        dataset=snakemake.wildcards.dataset,
        source=snakemake.params.source,
        prompts={
            "caption": inputs.caption_prompt,
            "attributes phase 1": inputs.phase1_prompt,
            "attributes phase 2": inputs.phase2_prompt,
        },
        funnel=funnel_total(
            stats,
            captions,
            phase1,
            phase2,
            read_shard_index(inputs.h5, "h5"),  # none for an eval dataset
            inputs.duplicates,
        ),
        llava=snakemake.params.llava,
    )
    tars = read_shard_index(inputs.stats, "shard")
    shards = shard_files(tars, stats, captions, phase1, phase2)
    export_hf(shards, card, snakemake.output[0], left_out=read_duplicates(inputs.duplicates))
