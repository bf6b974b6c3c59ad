"""Write the caption gallery or the dialog samples of a dataset (see vlmflow.inspect_samples)."""

from vlmflow import inspect_samples
from vlmflow.logs import log_to
from vlmflow.prompts import read_prompt

with log_to(snakemake.log[0]) as log:
    dataset = snakemake.wildcards.dataset
    if snakemake.rule == "caption_gallery":
        written = inspect_samples.write_gallery(
            snakemake.input.shard,
            snakemake.input.captions,
            snakemake.input.phase2,
            snakemake.output[0],
            snakemake.params.entries,
            f"{dataset}: first images with their captions and attributes",
        )
    else:
        written = inspect_samples.write_dialogs(
            snakemake.input.phase1,
            snakemake.input.phase2,
            read_prompt(snakemake.input.phase1_prompt),
            read_prompt(snakemake.input.phase2_prompt),
            snakemake.output[0],
            snakemake.params.entries,
            f"{dataset}: attribute dialogs (first prompts and answers of each phase)",
        )
    log.info("%s: %d entries written to %s", snakemake.rule, written, snakemake.output[0])
