"""One table per dataset: rows in, ok and failures by reason, per shard and in total."""

import csv

from vlmflow.contract import summarize_stats
from vlmflow.io import atomic_open
from vlmflow.logs import log_to

with log_to(snakemake.log[0]):
    table = summarize_stats(list(snakemake.input))
    with atomic_open(snakemake.output[0]) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(table)
