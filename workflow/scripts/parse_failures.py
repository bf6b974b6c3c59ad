"""The parse failures of both attribute phases, with example answers (see vlmflow.report)."""

from vlmflow import report
from vlmflow.contract import read_shard_index
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    failures = report.parse_failures(
        read_shard_index(snakemake.input.phase1, "phase1"),
        read_shard_index(snakemake.input.phase2, "phase2"),
        snakemake.params.examples,
    )
    report.write_parse_failures_page(failures, snakemake.wildcards.dataset, snakemake.output[0])
    log.info("%d answers without attributes", sum(entry.count for entry in failures))
