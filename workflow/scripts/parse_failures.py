"""The parse failures of both attribute phases, with example answers (see vlmflow.report)."""

from vlmflow import report
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    failures = report.parse_failures(
        snakemake.input.phase1, snakemake.input.phase2, snakemake.params.examples
    )
    report.write_parse_failures_page(failures, snakemake.wildcards.dataset, snakemake.output[0])
    log.info("%d answers without attributes", sum(entry.count for entry in failures))
