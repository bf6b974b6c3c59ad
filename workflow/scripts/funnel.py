"""A dataset's funnel and failures by stage and reason, page and figure (see vlmflow.report)."""

from vlmflow import contract, report
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    funnels = contract.dataset_funnel(
        snakemake.input.stats,
        snakemake.input.captions,
        snakemake.input.phase1,
        snakemake.input.phase2,
        snakemake.input.h5,
        snakemake.input.duplicates,
    )
    total = report.write_funnel_report(
        funnels, snakemake.wildcards.dataset, snakemake.output.page, snakemake.output.figure
    )
    log.info("%d shards, funnel %s", len(funnels), total.counts)
