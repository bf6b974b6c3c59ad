"""One metrics table over all eval datasets."""

import csv

from vlmflow.evaluate import METRIC_COLUMNS, write_metrics_tsv
from vlmflow.logs import log_to

with log_to(snakemake.log[0]):
    table = []
    for path in snakemake.input:
        with open(path, encoding="utf-8") as handle:
            table += list(csv.DictReader(handle, delimiter="\t"))
    write_metrics_tsv(snakemake.output[0], [{c: row[c] for c in METRIC_COLUMNS} for row in table])
