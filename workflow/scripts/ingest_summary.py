"""One table per dataset: rows in, ok and failures by reason, per shard and in total."""

import csv

from vlmflow.contract import read_shard_index, summarize_stats
from vlmflow.io import atomic_open
from vlmflow.logs import log_to

with log_to(snakemake.log[0]):
    table = summarize_stats(read_shard_index(snakemake.input[0], "stats"))
    with atomic_open(snakemake.output[0]) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(table)
