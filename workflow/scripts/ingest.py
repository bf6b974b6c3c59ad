"""Download one shard of a URL list into a WebDataset tar (see vlmflow.ingest)."""

from vlmflow.ingest import IngestSettings, ingest_shard
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    rows = snakemake.params.rows
    stats = ingest_shard(
        snakemake.input.url_list,
        rows["start"],
        rows["end"],
        IngestSettings(**snakemake.params.settings),
        snakemake.output.tar,
        snakemake.output.stats,
        shard_id=snakemake.wildcards.shard,
    )
    log.info("rows %d, ok %d, failed %s", stats["rows_in"], stats["ok"], stats["failed"])
