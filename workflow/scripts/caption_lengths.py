"""Histogram of caption lengths of a dataset (see vlmflow.report)."""

from vlmflow import report
from vlmflow.contract import read_shard_index
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    lengths = report.write_caption_lengths(
        read_shard_index(snakemake.input[0], "captions"),
        snakemake.wildcards.dataset,
        snakemake.output[0],
    )
    log.info("%d VLM captions, %d failed", len(lengths.vlm), lengths.failed)
