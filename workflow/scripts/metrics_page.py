"""The metrics table as an HTML table for the report (see vlmflow.reporting.report)."""

from vlmflow.core.logs import log_to
from vlmflow.reporting.report import write_metrics_page

with log_to(snakemake.log[0]):
    write_metrics_page(snakemake.input[0], snakemake.output[0])
