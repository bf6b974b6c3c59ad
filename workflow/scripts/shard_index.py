"""A dataset's index of one per-shard job's outputs (see vlmflow.contract)."""

from vlmflow.contract import write_shard_index
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    rows = write_shard_index(
        snakemake.wildcards.index,
        snakemake.wildcards.dataset,
        snakemake.params.shards,
        snakemake.output[0],
    )
    log.info("%d shards", rows)
