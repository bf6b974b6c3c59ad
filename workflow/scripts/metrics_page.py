"""The metrics table as an HTML table for the report (see vlmflow.report)."""

from vlmflow.logs import log_to
from vlmflow.report import write_metrics_page

with log_to(snakemake.log[0]):
    write_metrics_page(snakemake.input[0], snakemake.output[0])
