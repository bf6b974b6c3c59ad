"""Most frequent attributes and attributes per image of a dataset (see vlmflow.report)."""

from vlmflow import report
from vlmflow.contract import read_shard_index
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    stats = report.write_attribute_figures(
        read_shard_index(snakemake.input.phase2, "phase2"),
        snakemake.wildcards.dataset,
        snakemake.params.top,
        snakemake.output.top,
        snakemake.output.per_image,
    )
    log.info("%d images, %d distinct attributes", stats.images, len(stats.frequencies))
