"""A train dataset's phase-2 data as LLaVA-format conversations, less its duplicates
(see vlmflow.export)."""

from vlmflow.contract import read_duplicates, read_shard_index
from vlmflow.export import LlavaSettings, export_llava
from vlmflow.logs import log_to

with log_to(snakemake.log[0]):
    export_llava(
        read_shard_index(snakemake.input.phase2, "phase2"),
        read_shard_index(snakemake.input.h5, "h5_images"),
        LlavaSettings(
            dataset=snakemake.wildcards.dataset,
            instruction=snakemake.params.instruction,
            phase2_style=snakemake.params.phase2_style,
            image_root=snakemake.params.image_root,
        ),
        snakemake.output.conversations,
        snakemake.output.card,
        left_out=read_duplicates(snakemake.input.duplicates),
    )
