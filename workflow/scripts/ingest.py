"""Ingest one shard of a dataset's source into a WebDataset tar (see vlmflow.ingest.sources)."""

from vlmflow.ingest import IngestSettings, ingest_source_shard, source_from_config
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    rows = snakemake.params.rows
    source = source_from_config(snakemake.params.source, snakemake.wildcards.dataset)
    stats = ingest_source_shard(
        source,
        rows["start"],
        rows["end"],
        IngestSettings(**snakemake.params.settings),
        snakemake.output.tar,
        snakemake.output.stats,
        shard_id=snakemake.wildcards.shard,
    )
    log.info(
        "%s rows [%d, %d): %d in, %d ok, failed %s",
        stats["source"],
        rows["start"],
        rows["end"],
        stats["rows_in"],
        stats["ok"],
        stats["failed"],
    )
