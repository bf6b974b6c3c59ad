"""A dataset's funnel and failures by stage and reason, page and figure (see vlmflow.report)."""

from vlmflow import contract, report
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    inputs = snakemake.input
    funnels = contract.dataset_funnel(
        contract.read_shard_index(inputs.stats, "stats"),
        contract.read_shard_index(inputs.captions, "captions"),
        contract.read_shard_index(inputs.phase1, "phase1"),
        contract.read_shard_index(inputs.phase2, "phase2"),
        contract.read_shard_index(inputs.h5, "h5"),  # none for an eval dataset
        inputs.duplicates,
    )
    total = report.write_funnel_report(
        funnels, snakemake.wildcards.dataset, snakemake.output.page, snakemake.output.figure
    )
    log.info("%d shards, funnel %s", len(funnels), total.counts)
