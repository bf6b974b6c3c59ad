"""Ingest one shard of a dataset's source into a WebDataset tar (see vlmflow.ingest.sources)."""

from vlmflow.contract import PART_MANIFESTS
from vlmflow.ingest import IngestSettings, ingest_shard, source_from_config
from vlmflow.logs import log_to
from vlmflow.stage_versions import without_version

with log_to(snakemake.log[0]) as log:
    rows = snakemake.params.rows
    dataset = snakemake.wildcards.dataset
    # build=False: a job reads its own shard's manifest line, never the whole list.
    source = source_from_config(
        snakemake.params.source, dataset, PART_MANIFESTS.format(dataset=dataset), build=False
    )
    stats = ingest_shard(
        source,
        snakemake.wildcards.shard,
        rows,
        IngestSettings(**without_version(snakemake.params.settings)),
        snakemake.output.tar,
        snakemake.output.stats,
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
